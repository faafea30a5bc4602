"""Every tutorial in notebooks/ runs top to bottom without an error, and draws its figures.

Each notebook runs in a fresh kernel started with this interpreter (not whatever
``python3`` kernel Jupyter would pick), from a copy of the notebooks directory
in a temporary directory, with matplotlib's inline backend, as Jupyter runs it:
every figure a cell draws becomes a PNG output, and the test counts them per
notebook (a plot that silently stopped being drawn fails it). A notebook also
says each thing once: no output line repeats another (a failure printed by the
notebook and logged by the library too is noise a reader must wade through).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
jupyter_client = pytest.importorskip("jupyter_client")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

KERNEL_NAME = "flowerpets-test"
# Figures each notebook draws (PNG outputs of the executed notebook).
FIGURES = {
    "01-quickstart.ipynb": 2,
    "02-secure-aggregation.ipynb": 3,
    "03-differential-privacy.ipynb": 4,
    "04-dp-sgd-opacus.ipynb": 1,
    "05-homomorphic-encryption.ipynb": 3,
    "06-flower.ipynb": 1,
    "07-choosing-a-pet.ipynb": 2,
}

CELL_TIMEOUT = 300  # seconds per cell
STARTUP_TIMEOUT = 120  # seconds for the kernel to come up on a slow CI machine

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _kernel_manager(kernel_dir: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernel is ipykernel on this very interpreter.

    The default ``python3`` kernelspec may be a user's or a system's, pointing
    at another Python without flowerpets installed; this one cannot be.
    """
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            # nbclient adds this only to kernels it recognizes by name ("python3").
            "--HistoryManager.hist_file=:memory:",
        ],
        "display_name": f"flowerpets tests ({sys.executable})",
        "language": "python",
        # Merged into the kernel's environment, which otherwise is this process's.
        # The inline backend turns each figure into a PNG output (whatever MPLBACKEND this
        # process has, Agg on a headless CI machine); IPYTHONDIR keeps the user's IPython
        # profile and startup files out of the run.
        "env": {
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "IPYTHONDIR": str(kernel_dir / "ipython"),
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _first_error(nb: nbformat.NotebookNode) -> str:
    """The first cell that raised: its index, source and traceback, as plain text."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                traceback = _ANSI.sub("", "\n".join(output.get("traceback", [])))
                return (
                    f"cell {index} raised {output.get('ename')}: {output.get('evalue')}\n"
                    f"--- source ---\n{cell.source}\n--- traceback ---\n{traceback}"
                )
    return ""


def _figures(nb: nbformat.NotebookNode) -> int:
    """The PNG images among the executed notebook's outputs."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


_NUMBER = re.compile(r"\d+(\.\d+)?(e[-+]?\d+)?")
_LOG_PREFIX = re.compile(r"^[\d/: ,.-]*(WARNING|INFO|ERROR):")  # a root handler's timestamp
MIN_MESSAGE = 40  # characters: table rows and short labels may repeat


def repeated_messages(nb: nbformat.NotebookNode) -> list[str]:
    """Warnings (stderr lines) that say again what another output line says.

    A warning that contains another long line or is contained in one (a
    failure the notebook prints and the library logs too, with different
    prefixes), or a warning repeated with only its numbers changed (the same
    failure logged for every round). Printed lines (stdout) may repeat: table
    headers, one per run.
    """
    printed: list[tuple[str, bool]] = []  # (line, is a warning)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream":
                continue
            for line in output.get("text", "").splitlines():
                line = _LOG_PREFIX.sub("", line.strip()).strip()
                if len(line) >= MIN_MESSAGE:
                    printed.append((line, output.get("name") == "stderr"))
    found = [
        warning
        for i, (warning, is_warning) in enumerate(printed)
        if is_warning
        and any(
            warning in other or other in warning for j, (other, _) in enumerate(printed) if j != i
        )
    ]
    shapes = [_NUMBER.sub("#", line) for line, is_warning in printed if is_warning]
    found += sorted({shape for shape in shapes if shapes.count(shape) > 1})
    return found


def test_there_are_notebooks() -> None:
    # An empty glob would parametrize the test below into a silent skip.
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    assert sorted(FIGURES) == [p.name for p in NOTEBOOKS], "FIGURES must list every notebook"


def test_repeated_messages_are_found() -> None:
    # The check the notebooks must pass, on the outputs notebook 02 printed before it was fixed.
    reason = "secagg+/unmask: round 1: 5 of 20 survivors answered; a self-mask cannot be rebuilt"
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("...")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=f"SecAgg+ {reason}\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"{reason}\n"),
        nbformat.v4.new_output(
            "stream",
            name="stderr",
            text="".join(
                f"12/02/2026 06:21:18:WARNING:round {r} failed, the model is unchanged: "
                f"round {r}: 0 node(s) contributed\n"
                for r in (3, 4)
            ),
        ),
    ]
    table = "round  nodes  failed  train loss  fed. acc  accuracy\n"
    cell.outputs += [nbformat.v4.new_output("stream", name="stdout", text=table * 2)]
    nb.cells = [cell]
    found = repeated_messages(nb)
    assert found == [
        f"SecAgg+ {reason}",
        "round # failed, the model is unchanged: round #: # node(s) contributed",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, workdir)
    nb = nbformat.read(workdir / path.name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT,
        startup_timeout=STARTUP_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    failure = ""
    try:
        # We made the kernel manager, so ask the client to shut its kernel down anyway.
        client.execute(cleanup_kc=True)
    except CellExecutionError as exc:
        failure = _first_error(nb) or _ANSI.sub("", str(exc))
    # Failing outside the except block keeps nbclient's coloured copy out of the report.
    if failure:
        pytest.fail(f"{path.name}: {failure}", pytrace=False)
    assert _figures(nb) == FIGURES[path.name], f"{path.name}: {_figures(nb)} figures drawn"
    assert not repeated_messages(nb), (
        f"{path.name} says this more than once: {repeated_messages(nb)}"
    )

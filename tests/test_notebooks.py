"""Every tutorial in notebooks/ runs top to bottom without an error.

Each notebook runs in a fresh kernel started with this interpreter (not whatever
``python3`` kernel Jupyter would pick), from a copy of the notebooks directory
in a temporary directory, with matplotlib's non-interactive Agg backend.
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
        # IPYTHONDIR keeps the user's IPython profile and startup files out of the run.
        "env": {"MPLBACKEND": "Agg", "IPYTHONDIR": str(kernel_dir / "ipython")},
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


def test_there_are_notebooks() -> None:
    # An empty glob would parametrize the test below into a silent skip.
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


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

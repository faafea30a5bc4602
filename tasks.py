#!/usr/bin/env python3
"""The project's two commands, runnable with nothing but Python 3.11+ and pip.

    python3 tasks.py demo [demo options]   set up .venv and run the federated demo
    python3 tasks.py test [pytest args]    set up .venv and run lint, types and tests
                                           (with pytest args: only pytest, with those)

Each creates a virtual environment in .venv on first use and reuses it; it
reinstalls only when pyproject.toml or the requested extras change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("FLOWERPETS_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

EXTRAS = {"demo": "examples", "test": "examples,dev,dpsgd,flower"}


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    done = subprocess.run([str(a) for a in args], cwd=ROOT, check=False)  # noqa: S603
    if done.returncode != 0:
        sys.exit(done.returncode)


def ensure_venv(extras: str) -> None:
    """Create .venv if needed and install the project with ``extras`` into it."""
    stamp_file = VENV / ".flowerpets-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if stamp_file.exists() and stamp_file.read_text().strip() == digest:
        return
    if not PYTHON.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    _run(PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", f".[{extras}]")
    stamp_file.write_text(digest + "\n")


def demo(args: list[str]) -> None:
    ensure_venv(EXTRAS["demo"])
    _run(PYTHON, "-m", "flowerpets", "demo", *args)


def _start_deployment_tests(log: Path) -> subprocess.Popen[bytes]:
    """The ``deployment`` tests in a second pytest, beside lint, types and the rest.

    They start Flower's SuperLink and SuperNodes and spend most of their time
    waiting on Flower's fixed poll and heartbeat intervals, so running them
    beside the CPU-bound tests costs little and saves minutes on a 2-core machine.
    """
    args = [PYTHON, "-m", "pytest", "-q", "-m", "deployment", "--durations=10", "-p",
            "no:cacheprovider"]  # fmt: skip
    print("+", " ".join(str(a) for a in args), f"> {log.name} (beside the rest)", flush=True)
    with log.open("wb") as out:
        return subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=out, stderr=out)  # noqa: S603


def test(args: list[str]) -> None:
    ensure_venv(EXTRAS["test"])
    if args:  # the caller chose what to run
        _run(PYTHON, "-m", "pytest", *args)
        return
    log = VENV / "deployment-tests.log"
    deployment = _start_deployment_tests(log)
    try:
        _run(PYTHON, "-m", "ruff", "check", ".")
        _run(PYTHON, "-m", "ruff", "format", "--check", ".")
        _run(PYTHON, "-m", "mypy")
        _run(PYTHON, "-m", "pytest", "-q", "--durations=30", "-m", "not deployment")
    finally:
        code = deployment.wait()
        print(f"--- the deployment tests ({log}) ---", flush=True)
        print(log.read_text(errors="replace"), flush=True)
    if code != 0:
        sys.exit(code)


COMMANDS = {"demo": demo, "test": test}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(COMMANDS)}}} [options]\n\n{__doc__}")
    COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

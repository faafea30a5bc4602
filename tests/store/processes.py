"""Real server processes for the store tests: one holds a run's lease, then dies mid-commit.

The child writes the run of :func:`~tests.store.stored_runs.write_run`, takes its
lease, says ``ready`` and waits for a line on stdin; then it starts committing
round 4 and SIGKILLs itself inside the transaction, after every row of round 4
was written (round 3's arrays deleted, the counter moved) but before ``COMMIT``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.store.stored_runs import StoredRun, write_run

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import numpy as np

    from flowerpets.store import RunStore, run_writer
    from tests.store.stored_runs import model, record, write_run

    path = Path(sys.argv[1])
    run = write_run(path)
    store = RunStore(path)
    writer = store.resume_run(run.run_id)
    print("ready", flush=True)
    sys.stdin.readline()
    set_last_round = run_writer._set_last_round

    def write_all_then_die(db, info, rnd):
        set_last_round(db, info, rnd)
        os.kill(os.getpid(), signal.SIGKILL)

    run_writer._set_last_round = write_all_then_die
    writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(0))
    print("the commit survived the kill", flush=True)
    """
)


def child_env() -> dict[str, str]:
    """The environment a child process imports this checkout's flowerpets and tests in."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a process of its own, run to its end (or its death)."""
    return subprocess.run(
        [sys.executable, *args],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def server_holding_lease(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A live server process holding the lease of the stored run at ``path``."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "ready", f"the child server failed to start: {line!r}"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def let_it_die_mid_commit(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == -signal.SIGKILL


def kill_mid_commit(path: Path) -> StoredRun:
    """Run the child to its death; what the store at ``path`` must still hold."""
    with server_holding_lease(path) as child:
        let_it_die_mid_commit(child)
    expected = write_run(path.with_name("expected.db"))
    expected.path = path
    return expected

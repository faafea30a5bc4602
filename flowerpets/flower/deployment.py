"""Flower's deployment runtime on one machine: a SuperLink and SuperNodes on loopback.

A way to try a Flower app under the runtime it would have on many machines
(``flwr run`` against a SuperLink, one SuperNode per client, every message a
``flwr-clientapp`` process), and what the SuperLink tests use:

.. code-block:: python

    from flowerpets.flower.deployment import LocalDeployment

    with LocalDeployment(4, home=tmp_dir, hard_limit=300) as deployment:
        done = deployment.run("path/to/app", run_config={"num-server-rounds": 1})
        print(done.stdout)                     # what ``flwr run --stream`` printed

It starts ``flower-superlink --insecure`` on a free port of 127.0.0.1 and
``n_nodes`` ``flower-supernode`` processes (node ``i`` gets the node config
``partition-id=i num-partitions=n``, or what ``node_config(i, n)`` returns),
each in its own session, with the connection written to
``$FLWR_HOME/config.toml`` as the federation ``local``. Leaving the ``with``
block, :meth:`LocalDeployment.stop`, or the hard time limit stops every process
it started and every descendant of theirs (the SuperLink's and each SuperNode's
detached ``flower-superexec``, their ``flwr-serverapp``/``flwr-clientapp``
processes) by PID: the whole tree is frozen (SIGSTOP) and collected before any
of it is signalled, so no child is orphaned out of reach, then terminated
(SIGKILL after a grace period). :meth:`LocalDeployment.kill_node` ends one
SuperNode and its tree the same way, at once (a node that crashes).

Insecure (no TLS, no node authentication) and for one machine only: for a real
deployment, start the same commands as Flower documents them, with TLS.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil

from flowerpets._validation import integer, real
from flowerpets.exceptions import DeploymentError, ParameterTypeError, ParameterValueError

__all__ = ["LocalDeployment", "NodeConfig", "format_config"]

ConfigScalar = bool | int | float | str
NodeConfig = Callable[[int, int], Mapping[str, ConfigScalar]]
"""``(i, n) -> node config`` of SuperNode ``i`` of ``n``."""

FEDERATION = "local"
_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when stopping
_START_TIMEOUT = 60.0  # seconds for the SuperLink to listen


def default_node_config(i: int, n: int) -> Mapping[str, ConfigScalar]:
    """What flwr's simulation gives node ``i`` of ``n``: its partition."""
    return {"partition-id": i, "num-partitions": n}


def format_config(config: Mapping[str, ConfigScalar]) -> str:
    """``config`` as flwr's ``--run-config``/``--node-config`` text: ``k=v`` pairs, TOML values."""
    parts = []
    for key, value in config.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise ParameterValueError(f"config key {key!r} must be a bare word")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ParameterValueError(f"config value of {key!r} must be finite")
            text = repr(value)
        elif isinstance(value, str):
            if "'" in value or "\n" in value:
                raise ParameterValueError(f"config value of {key!r} may not hold ' or a newline")
            text = f"'{value}'"  # a TOML literal string: flwr's parser takes it whole
        else:
            raise ParameterTypeError(
                f"config value of {key!r} must be a bool, int, float or str, "
                f"got {type(value).__name__}"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_ACTIVATED = re.compile(r"Activated node_id=(\d+)")


def _activated(superlink_log: str) -> set[int]:
    return {int(m) for m in _ACTIVATED.findall(superlink_log)}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tree(roots: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    """``roots`` and all their descendants that are alive now."""
    found: dict[int, psutil.Process] = {}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            if root.is_running():
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
    return found


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.send_signal(sig)  # psutil checks the PID still names the same process


def _freeze(roots: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    """SIGSTOP ``roots`` and every descendant, until no new one appears; return them all.

    A stopped process spawns nothing, so once a pass finds no new process the
    whole tree is known and none of it can be orphaned out of reach.
    """
    start = list(roots)
    frozen: dict[int, psutil.Process] = {}
    while True:
        found = _tree([*start, *frozen.values()])
        new = [p for pid, p in found.items() if pid not in frozen]
        if not new:
            return frozen
        _signal(new, signal.SIGSTOP)
        frozen.update(found)


def _ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie: dead, waiting for its parent (maybe us, maybe init) to reap it."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_ended(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to end; return those still running.

    It reaps nothing (unlike ``psutil.wait_procs``): our own ``Popen`` children keep
    their exit status for ``Popen.wait``.
    """
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        alive = [p for p in alive if not _ended(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def stop_tree(roots: Iterable[psutil.Process], *, grace: float = _GRACE) -> list[int]:
    """Stop ``roots`` and all their descendants by PID; return the PIDs that outlived SIGKILL.

    SIGTERM first (flwr's processes shut down cleanly on it), SIGKILL what is left
    after ``grace`` seconds, and any child born meanwhile.
    """
    procs = _freeze(roots)
    if not procs:
        return []
    _signal(procs.values(), signal.SIGTERM)
    _signal(procs.values(), signal.SIGCONT)
    alive = _wait_ended(procs.values(), grace)
    if alive:
        rest = _freeze([*alive, *procs.values()])  # children born during the grace period too
        _signal(rest.values(), signal.SIGKILL)
        alive = _wait_ended(rest.values(), grace)
    return sorted(p.pid for p in alive)


def kill_tree(roots: Iterable[psutil.Process]) -> list[int]:
    """SIGKILL ``roots`` and all their descendants at once (a crash); return the PIDs killed."""
    procs = _freeze(roots)
    _signal(procs.values(), signal.SIGKILL)
    _wait_ended(procs.values(), _GRACE)
    return sorted(procs)


class LocalDeployment:
    """A SuperLink and ``n_nodes`` SuperNodes on 127.0.0.1 (see the module docstring).

    ``home`` is a directory it owns: ``FLWR_HOME`` (``home/flwr-home``), the
    logs (``home/logs/superlink.log``, ``supernode-<i>.log``) and the working
    directory of every process. ``hard_limit`` (seconds, from :meth:`start`)
    bounds the whole deployment: when it passes, everything is stopped, even if
    a run is still going. ``bin_dir`` holds the ``flower-*`` and ``flwr``
    executables (default: beside this Python); it is put first on the
    processes' ``PATH``, as the SuperLink and SuperNodes spawn
    ``flower-superexec`` by name. The processes get this process's
    ``sys.path`` as ``PYTHONPATH``, so apps import what this Python imports.
    """

    def __init__(
        self,
        n_nodes: int,
        *,
        home: str | os.PathLike[str],
        node_config: NodeConfig = default_node_config,
        hard_limit: float = 300.0,
        bin_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.n_nodes = integer("n_nodes", n_nodes, at_least=1)
        self.hard_limit = real("hard_limit", hard_limit, above=0)
        if not math.isfinite(self.hard_limit):
            raise ParameterValueError("hard_limit must be finite")
        if not callable(node_config):
            raise ParameterValueError("node_config must be a function (i, n) -> node config")
        self.node_config = node_config
        if not isinstance(home, str | os.PathLike):
            raise ParameterTypeError(f"home must be a path, got {type(home).__name__}")
        self.home = Path(home)
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.flwr_home = self.home / "flwr-home"
        self.logs = self.home / "logs"
        self.port = 0
        self.env: dict[str, str] = {
            **(os.environ if env is None else env),
            "FLWR_HOME": str(self.flwr_home),
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "PATH": os.pathsep.join([str(self.bin_dir), os.environ.get("PATH", "")]),
        }
        self.deadline = math.inf
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes]] = []
        self._runs: list[subprocess.Popen[str]] = []
        self._logs: list[IO[bytes]] = []
        self._lock = threading.Lock()
        self._watchdog: threading.Timer | None = None
        self.timed_out = False

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The SuperLink's Fleet API address (what a SuperNode connects to)."""
        return f"127.0.0.1:{self.port}"

    def remaining(self) -> float:
        """Seconds left before the hard limit stops everything."""
        return self.deadline - time.monotonic()

    def start(self) -> None:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        if self.superlink is not None:
            raise DeploymentError("this deployment was started already")
        self.deadline = time.monotonic() + self.hard_limit
        self._watchdog = threading.Timer(self.hard_limit, self._time_up)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.port = free_port()
            (self.flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
                encoding="utf-8",
            )
            self.superlink = self._spawn(
                "superlink",
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            )
            self._wait_listening(min(self.deadline, time.monotonic() + _START_TIMEOUT))
            for i in range(self.n_nodes):
                self.nodes.append(self._start_node(i))
            self._wait_connected(min(self.deadline, time.monotonic() + _START_TIMEOUT))
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self._logs.append(log)
        return subprocess.Popen(  # noqa: S603  # our own executables, no shell
            [str(self.bin_dir / argv[0]), *argv[1:]],
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _start_node(self, i: int) -> subprocess.Popen[bytes]:
        config = format_config(self.node_config(i, self.n_nodes))
        return self._spawn(
            f"supernode-{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            self.address,
            "--port",
            str(free_port()),
            "--node-config",
            config,
        )

    def _wait_listening(self, deadline: float) -> None:
        assert self.superlink is not None
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with code {self.superlink.returncode}: "
                    f"{self.log('superlink')[-2000:]}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise DeploymentError(f"flower-superlink does not listen on {self.address}")

    def _wait_connected(self, deadline: float) -> None:
        """Until every SuperNode has its node id and the SuperLink has activated it."""
        while time.monotonic() < deadline:
            for i, node in enumerate(self.nodes):
                if node.poll() is not None:
                    raise DeploymentError(
                        f"flower-supernode {i} exited with code {node.returncode}: "
                        f"{self.log(f'supernode-{i}')[-2000:]}"
                    )
            ids = self.node_ids
            if None not in ids and set(ids) <= _activated(self.log("superlink")):
                return
            time.sleep(0.1)
        raise DeploymentError(f"not every SuperNode connected to {self.address} in time")

    @property
    def node_ids(self) -> list[int | None]:
        """Flower's id of each SuperNode, by node index (None until it has registered).

        Read from the SuperNode's log (flwr 1.42 prints ``SuperNode ID: <id>``): what
        lets a test match a node of a run's History to the process it killed.
        """
        out: list[int | None] = []
        for i in range(len(self.nodes)):
            found = _NODE_ID.search(self.log(f"supernode-{i}"))
            out.append(int(found.group(1)) if found else None)
        return out

    def log(self, name: str) -> str:
        """The output so far of ``superlink`` or ``supernode-<i>``."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _time_up(self) -> None:
        self.timed_out = True
        self.stop()

    def _procs(self) -> list[subprocess.Popen[Any]]:
        """Every process started here: runs first, then the nodes, the SuperLink last."""
        return [*self._runs, *self.nodes, *([self.superlink] if self.superlink else [])]

    def _roots(self) -> list[psutil.Process]:
        roots = []
        for proc in self._procs():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.poll() is None:
                    roots.append(psutil.Process(proc.pid))
        return roots

    def pids(self) -> list[int]:
        """Every process of this deployment alive now, descendants included."""
        return sorted(_tree(self._roots()))

    def stop(self) -> None:
        """Stop every process started here and all their descendants, by PID."""
        with self._lock:
            if self._watchdog is not None and threading.current_thread() is not self._watchdog:
                self._watchdog.cancel()
            left = stop_tree(self._roots())
            for proc in self._procs():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_GRACE)
            for log in self._logs:
                log.close()
            self._logs.clear()
        if left:
            raise DeploymentError(f"processes still running after SIGKILL: {left}")

    # -- nodes --------------------------------------------------------------------------

    @property
    def node_pids(self) -> list[int]:
        """The PID of each SuperNode process, by node index."""
        return [p.pid for p in self.nodes]

    def node_alive(self, i: int) -> bool:
        return self.nodes[integer("i", i, at_least=0, below=len(self.nodes))].poll() is None

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL SuperNode ``i`` and its whole tree (its superexec, its ClientApps) at once.

        Returns the PIDs killed. The SuperLink learns of it only when the node's
        heartbeat lapses (Flower's, about a minute).
        """
        node = self.nodes[integer("i", i, at_least=0, below=len(self.nodes))]
        if node.poll() is not None:
            return []
        killed = kill_tree([psutil.Process(node.pid)])
        node.wait(timeout=_GRACE)
        return killed

    # -- runs ---------------------------------------------------------------------------

    def run(
        self,
        app_dir: str | os.PathLike[str],
        *,
        run_config: Mapping[str, ConfigScalar] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP local --stream``: wait for the run to end, return what it printed.

        ``timeout`` (seconds) defaults to what is left of the hard limit; past
        it the ``flwr`` process is stopped and :class:`DeploymentError` raised.
        The return code is flwr's: check it, and the run's own output.
        """
        if self.superlink is None or self.superlink.poll() is not None:
            raise DeploymentError("the deployment is not running")
        budget = self.remaining() if timeout is None else min(timeout, self.remaining())
        argv = [str(self.bin_dir / "flwr"), "run", str(app_dir), FEDERATION, "--stream"]
        if run_config:
            argv += ["--run-config", format_config(run_config)]
        proc = subprocess.Popen(  # noqa: S603  # our own executable, no shell
            argv,
            env=self.env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        with self._lock:
            self._runs.append(proc)
        try:
            out, err = proc.communicate(timeout=max(budget, 0.0))
        except subprocess.TimeoutExpired:
            stop_tree([psutil.Process(proc.pid)])
            out, err = proc.communicate()
            raise DeploymentError(
                f"flwr run did not end within {budget:.0f} s: {(out + err)[-3000:]}"
            ) from None
        finally:
            with self._lock:
                self._runs.remove(proc)
        if self.timed_out:
            raise DeploymentError(
                f"the deployment's hard limit ({self.hard_limit:.0f} s) stopped the run: "
                f"{(out + err)[-3000:]}"
            )
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

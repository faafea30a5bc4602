"""Fixtures for the transport tests: credentials, in-process servers, and real processes.

Every process a test starts is killed when the test ends, whatever happened
(SIGCONT first, for one a test stopped). Waits are bounded, so a broken build
fails in seconds instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowerpets.core import Message
from flowerpets.core.codec import CodecLimits
from flowerpets.transport import (
    ClientAppSpec,
    ClientExit,
    ClientSettings,
    Credentials,
    NodeClient,
    NodeKey,
    ServerSettings,
    TransportServer,
    create_credentials,
)
from flowerpets.transport._auth import sign_frame
from flowerpets.transport._frames import (
    Challenge,
    Head,
    Heartbeat,
    Hello,
    Welcome,
    chunk_frames,
    decode_frame,
    digest,
    encode_content,
    envelope_parts,
)
from flowerpets.transport.server import METHOD_PATH

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WAIT = 60.0  # the longest any single wait in a process test may take


def wait_until(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A development CA, a server certificate and six node key pairs."""
    return create_credentials(tmp_path_factory.mktemp("credentials"), nodes=6)


@dataclass
class Proc:
    """One process of a test, with its output in files."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first match of ``pattern`` in the process's stderr, waiting for it to appear."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = regex.search(self.log())
            if match:
                found.append(match)
            return bool(match) or self.popen.poll() is not None

        wait_until(seen, timeout, f"{pattern!r} in the log of {self.name}")
        if not found:
            match = regex.search(self.log())
            assert match, f"{self.name} exited ({self.popen.returncode}) without logging " + (
                f"{pattern!r}:\n{self.log()}"
            )
            return match
        return found[0]

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s:\n{self.log()}"
            ) from None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)


@dataclass
class Processes:
    """Starts flowerpets server/client processes; kills them all at teardown."""

    directory: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("GRPC_VERBOSITY", None)  # gRPC core's default: its TLS refusals are INFO lines
        return env

    def start(self, name: str, *args: str) -> Proc:
        stdout, stderr = self.directory / f"{name}.out", self.directory / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                [sys.executable, "-m", "flowerpets.transport", *args],
                stdout=out,
                stderr=err,
                env=self.env(),
                cwd=self.directory,
            )
        proc = Proc(name, popen, stdout, stderr)
        self.procs.append(proc)
        return proc

    def server(self, *args: str, name: str = "server") -> tuple[Proc, int]:
        """A server on a free loopback port; returns it and its port once it listens."""
        port_file = self.directory / f"{name}.port"
        proc = self.start(
            name, "server", "--address", "127.0.0.1:0", "--port-file", str(port_file), *args
        )
        wait_until(
            lambda: (
                (port_file.exists() and port_file.read_text().strip())
                or proc.popen.poll() is not None
            ),
            what=f"{name} to listen",
        )
        assert proc.popen.poll() is None, f"{name} exited:\n{proc.log()}"
        return proc, int(port_file.read_text())

    def client(self, name: str, port: int, *args: str) -> Proc:
        return self.start(name, "client", "--server", f"127.0.0.1:{port}", *args)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(proc.popen.pid, sig)
                    except ProcessLookupError:
                        break
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be refused
                proc.popen.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.cleanup()


# -- in-process servers and nodes -----------------------------------------------------------------
FAST_SERVER = ServerSettings(
    heartbeat_interval=0.2,
    heartbeat_timeout=2.5,  # short, with room for a busy machine that starves a thread
    hello_timeout=2.0,
    max_chunk_bytes=64 * 1024,
    shutdown_grace=1.0,
)
FAST_CLIENT = ClientSettings(retry_initial=0.05, retry_max=0.2, retry_for=10.0)


@dataclass
class Federation:
    """A TransportServer in this process, and NodeClients on threads."""

    server: TransportServer
    clients: list[NodeClient] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    exits: dict[int, ClientExit] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def add(
        self, app: ClientAppSpec, pid: int = 0, *, wait: bool = True, **kwargs: Any
    ) -> NodeClient:
        kwargs.setdefault("settings", FAST_CLIENT)
        kwargs.setdefault("node_config", {"partition-id": pid})
        client = NodeClient(app, kwargs.pop("address", self.address), **kwargs)
        index = len(self.clients)

        def run() -> None:
            self.exits[index] = client.run()

        thread = threading.Thread(target=run, name=f"node-{pid}", daemon=True)
        self.clients.append(client)
        self.threads.append(thread)
        thread.start()
        if wait:
            wait_until(lambda: client.node_id in self.server.node_ids(), 20, "the node to join")
        return client

    def exit_of(self, client: NodeClient, timeout: float = 20) -> ClientExit:
        index = self.clients.index(client)
        self.threads[index].join(timeout)
        assert index in self.exits, "the node did not exit"
        return self.exits[index]

    def close(self) -> None:
        self.server.stop("the test is over", grace=0.5)
        for client in self.clients:
            client.stop("the test is over")
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def federation_factory() -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(**kwargs: Any) -> Federation:
        kwargs.setdefault("settings", FAST_SERVER)
        federation = Federation(TransportServer("127.0.0.1:0", **kwargs).start())
        made.append(federation)
        return federation

    try:
        yield make
    finally:
        for federation in made:
            federation.close()


@pytest.fixture
def federation(federation_factory: Callable[..., Federation]) -> Federation:
    return federation_factory()


class RawNode:
    """A hand-driven connection: sends the frames a test builds, records what comes back.

    What an attacker (or a broken node) can do: any bytes, any order, any key.
    """

    def __init__(
        self,
        port: int,
        *,
        key: NodeKey | None = None,
        root_certificates: bytes | None = None,
        plain_text: bool = True,
    ) -> None:
        self.key = key or NodeKey.generate()
        target = f"127.0.0.1:{port}"
        if root_certificates is None:
            self.channel = grpc.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials)
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.frames: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.ended = threading.Event()
        self.welcome: Welcome | None = None
        self._challenge: bytes | None = None
        self.seq = 0
        self.call = self.channel.stream_stream(METHOD_PATH)(iter(self._out.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.frames.put(raw)
            self.status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        finally:
            self.ended.set()

    def send(self, *frames: bytes) -> None:
        for frame in frames:
            self._out.put(frame)

    @property
    def challenge(self) -> bytes:
        """The session id of the server's CHALLENGE (its first frame, read on first use)."""
        if self._challenge is None:
            frame = decode_frame(self.frames.get(timeout=20), max_frame=1 << 30)
            assert isinstance(frame, Challenge), frame
            self._challenge = frame.session
        return self._challenge

    def hello(self, **kwargs: Any) -> Hello:
        """A HELLO answering this connection's challenge (unless ``challenge`` is given)."""
        kwargs.setdefault("max_chunk", 1 << 20)
        kwargs.setdefault("max_message", 1 << 30)
        if "challenge" not in kwargs:
            kwargs["challenge"] = self.challenge
        return self.key.hello(**kwargs)

    def join(self, hello: Hello | None = None) -> Welcome:
        self.challenge  # noqa: B018 - the CHALLENGE comes first: read it
        self.send((hello or self.hello()).encode())
        frame = decode_frame(self.frames.get(timeout=20), max_frame=1 << 30)
        assert isinstance(frame, Welcome), frame
        self.welcome = frame
        return frame

    def signed(self, frame: Head | Heartbeat) -> bytes:
        assert self.welcome is not None
        return sign_frame(self.key, self.welcome.session, frame)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def heartbeat(self, seq: int | None = None) -> bytes:
        return self.signed(
            Heartbeat(self.next_seq() if seq is None else seq, int(time.time() * 1000))
        )

    def message(self, data: bytes | Message, *, max_chunk: int = 1 << 16) -> list[bytes]:
        """The signed HEAD and the CHUNKs of ``data`` (a Message goes in its envelope)."""
        if isinstance(data, Message):
            limits = CodecLimits()
            data = b"".join(envelope_parts(data, encode_content(data, limits), limits))
        seq = self.next_seq()
        head = self.signed(Head(seq, len(data), digest(data)))
        return [head, *chunk_frames(seq, [data], max_chunk)]

    def wait_closed(self, timeout: float = 20) -> tuple[grpc.StatusCode, str]:
        assert self.ended.wait(timeout), "the server did not close the connection"
        assert self.status is not None
        return self.status

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()

"""Benchmark: one FedAvg round over gRPC with node processes, against the same round in simulation.

The workload: ``--nodes`` nodes (default 20), each holding a pre-made update of
``--params`` float32 parameters (default 1,000,000) and a weight (its index + 1).
No training happens: a node's train handler wraps its update and replies. The
update of node ``i`` is drawn from ``default_rng([seed, i])`` in whichever
process holds it, so both cases sum exactly the same numbers.

``simulation``
    ``run_simulation(ServerApp(FedAvg(), num_rounds=1), app, nodes)``: the whole
    round in this process (nodes on threads), as ``bench/core_round.py``'s
    ``round`` case.
``transport``
    ``ServerApp(FedAvg(), num_rounds=1).run(grid)`` over a :class:`TransportServer`
    in this process, with ``--nodes`` node processes (``python -m
    flowerpets.transport client``, the same code as ``flowerpets client``),
    connected over TLS with Ed25519 node keys (``--plaintext``: neither). The
    nodes are started and connected once, before timing (their start-up time
    is reported apart); each timed run is one round: the global model out to
    every node, every update back, summed.

``grpc_floor``
    the floor under any gRPC transport of these bytes: the same number of bytes
    each way over the same TLS, as raw 1 MiB gRPC messages on one stream per
    node, to ``--nodes`` echo processes that send every message straight back
    (no codec, no hashing, no signatures, no app, no aggregation; and echoing
    pipelines what a real node can only send once its message is complete). Off
    with ``--no-floor``. Every ratio is to ``simulation``; the table's last
    column also gives ``transport``'s ratio to ``grpc_floor``.

Bytes on the wire per parameter, for one extra untimed round, each way:

* *frames*: the transport's own frames (codec bytes, chunk headers,
  signatures), counted by the server;
* *TCP*: the TCP payload bytes of the server's sockets (``ss -ti``:
  ``bytes_sent``/``bytes_received``), which add gRPC's message headers,
  HTTP/2 framing and TLS records; reported when ``ss`` is available (Linux).

Peak memory is the tracemalloc peak of this process (the server side) above
the start of one untimed run. The bench checks that the transport round's
model equals the simulation's (within one float32 ulp: the float64 sums only
differ in order) and the numpy weighted mean, and exits with status 1 if not.

Run from the repository root::

    PYTHONPATH=src python bench/transport.py [--nodes 20] [--params 1000000] [--repeats 3]
    PYTHONPATH=src python bench/transport.py --json
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MEMORY_METRIC,
    Case,
    Measurement,
    add_common_arguments,
    emit_result,
    format_table,
    measurement_table,
    positive_int,
    ratio,
    run_cases,
    update_app,
)
from numpy.typing import NDArray

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    FedAvg,
    ServerApp,
)
from flowerpets.simulation import run_simulation

NAME = "params"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLOAT32_EPS = float(np.finfo(np.float32).eps)


# -- the workload (also imported by the node processes: --app transport:client_app) --------------
def make_update(seed: int, index: int, params: int) -> NDArray[np.float32]:
    return np.random.default_rng([seed, index]).standard_normal(params, dtype=np.float32)


def weight(index: int) -> int:
    return index + 1


def make_app(updates: Mapping[int, NDArray[np.float32]]) -> ClientApp:
    """A node replies with its pre-made update, wrapped without a copy."""
    return update_app(updates, {index: weight(index) for index in updates}, name=NAME)


def client_app(context: Context) -> ClientApp:
    """The node processes' app: the update of this node only."""
    index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    seed = int(context.run_config["bench-seed"])  # type: ignore[arg-type]
    params = int(context.run_config["bench-params"])  # type: ignore[arg-type]
    return make_app({index: make_update(seed, index, params)})


def server_app(params: int) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({NAME: np.zeros(params, np.float32)}),
    )


# -- the deployment --------------------------------------------------------------------------------
class Deployment:
    """A TransportServer here and ``nodes`` node processes connected to it."""

    def __init__(self, nodes: int, params: int, seed: int, *, plaintext: bool, quiet: bool) -> None:
        from flowerpets.transport import (
            ServerTls,
            TransportServer,
            create_credentials,
            load_public_keys,
        )

        self.nodes = nodes
        self._tmp = tempfile.TemporaryDirectory(prefix="fp-bench-transport-")
        creds = create_credentials(self._tmp.name, nodes=nodes)
        assert creds.server_certificate and creds.server_key and creds.node_public_keys
        assert creds.ca_certificate
        self.tls_files = (
            None
            if plaintext
            else (
                creds.server_key.read_bytes(),
                creds.server_certificate.read_bytes(),
                str(creds.ca_certificate),
            )
        )
        tls = (
            None if plaintext else ServerTls.from_files(creds.server_certificate, creds.server_key)
        )
        keys = None if plaintext else load_public_keys([creds.node_public_keys])
        self.server = TransportServer(
            "127.0.0.1:0",
            tls=tls,
            node_keys=keys,
            run_config={"bench-params": params, "bench-seed": seed},
        ).start()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
        )
        started = time.perf_counter()
        self.procs: list[subprocess.Popen[bytes]] = []
        for index in range(nodes):
            security = (
                []
                if plaintext
                else [
                    "--root-cert",
                    str(creds.ca_certificate),
                    "--key",
                    str(creds.node_keys[index]),
                ]
            )
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "flowerpets.transport",
                        "client",
                        "--app",
                        "transport:client_app",
                        "--server",
                        f"127.0.0.1:{self.server.port}",
                        "--node-config",
                        f"partition-id={index}",
                        "--log-level",
                        "WARNING",
                        *security,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=None if not quiet else subprocess.DEVNULL,
                )
            )
        connected = self.server.wait_for_nodes(nodes, timeout=300)
        if connected < nodes:
            self.close()
            raise RuntimeError(f"only {connected} of {nodes} node processes connected in 300 s")
        self.startup_seconds = time.perf_counter() - started

    def round(self, params: int) -> NDArray[np.float32]:
        result = server_app(params).run(self.server.grid)
        if len(result.history[0].participants) != self.nodes:
            raise RuntimeError(f"a round had only {result.history[0].participants} participants")
        model: NDArray[np.float32] = result.arrays[NAME].numpy()
        return model

    def tcp_bytes(self) -> tuple[int, int] | None:
        """(sent, received) TCP payload bytes of the server's connections, from ``ss -ti``."""
        ss = shutil.which("ss")
        if ss is None:
            return None
        port = self.server.port
        done = subprocess.run(
            [ss, "-tinH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            check=False,
        )
        sent = [int(x) for x in re.findall(r"\bbytes_sent:(\d+)", done.stdout)]
        received = [int(x) for x in re.findall(r"\bbytes_received:(\d+)", done.stdout)]
        if done.returncode != 0 or len(sent) != self.nodes or len(received) != self.nodes:
            return None
        return sum(sent), sum(received)

    def close(self) -> None:
        from flowerpets.transport import ByeCode

        self.server.stop("the benchmark is over", code=ByeCode.RUN_FINISHED)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._tmp.cleanup()


# -- the floor: raw gRPC, the same bytes, no flowerpets --------------------------------------------
ECHO_PATH = "/bench.Echo/Connect"
CHUNK = 1 << 20


class _Stream:
    def __init__(self) -> None:
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.received = 0
        self.done = threading.Event()
        self.expected = 0


class Floor:
    """A raw gRPC server here and ``nodes`` echo processes: what gRPC and TLS alone cost."""

    def __init__(self, nodes: int, params: int, tls: tuple[bytes, bytes, str] | None) -> None:
        import grpc

        self.nodes = nodes
        self.message = [bytes(CHUNK)] * (4 * params // CHUNK) + [bytes(4 * params % CHUNK)]
        self.message = [m for m in self.message if m]
        self.streams: list[_Stream] = []
        self._lock = threading.Lock()
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=nodes + 4),
            handlers=[
                grpc.method_handlers_generic_handler(
                    "bench.Echo", {"Connect": grpc.stream_stream_rpc_method_handler(self._serve)}
                )
            ],
            options=[("grpc.max_receive_message_length", 2 * CHUNK), ("grpc.so_reuseport", 0)],
        )
        if tls is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            key, chain, _ = tls
            port = self.server.add_secure_port(
                "127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)])
            )
        self.server.start()
        command = [sys.executable, str(Path(__file__)), "--echo-node", f"127.0.0.1:{port}"]
        if tls is not None:
            command += ["--echo-root-cert", tls[2]]
        self.procs = [subprocess.Popen(command) for _ in range(nodes)]
        deadline = time.monotonic() + 300
        while len(self.streams) < nodes and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(self.streams) < nodes:
            self.close()
            raise RuntimeError(f"only {len(self.streams)} of {nodes} echo processes connected")

    def _serve(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        stream = _Stream()

        def read() -> None:
            for raw in requests:
                stream.received += len(raw)
                if stream.received >= stream.expected:
                    stream.done.set()

        threading.Thread(target=read, daemon=True).start()
        with self._lock:
            self.streams.append(stream)
        while (item := stream.outbox.get()) is not None:
            yield item

    def round(self) -> int:
        total = sum(len(m) for m in self.message)
        for stream in self.streams:
            stream.done.clear()
            stream.received, stream.expected = 0, total
            for chunk in self.message:
                stream.outbox.put(chunk)
        for stream in self.streams:
            if not stream.done.wait(120):
                raise RuntimeError("an echo process did not answer")
        return total

    def close(self) -> None:
        for stream in self.streams:
            stream.outbox.put(None)
        self.server.stop(grace=1).wait()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def echo_node(address: str, root_cert: str | None) -> int:
    """An echo process of the floor: sends every message it gets straight back."""
    import grpc

    options = [("grpc.max_receive_message_length", 2 * CHUNK)]
    if root_cert is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(Path(root_cert).read_bytes())
        channel = grpc.secure_channel(address, credentials, options=options)
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    outbox.put(b"hello")
    call = channel.stream_stream(ECHO_PATH)(iter(outbox.get, None))
    try:
        for raw in call:
            outbox.put(raw)
    except grpc.RpcError:
        pass
    outbox.put(None)
    return 0


def wire(deployment: Deployment, params: int) -> dict[str, Any]:
    """Bytes per parameter each way, for one round (frames; and TCP if ``ss`` is there)."""
    before, tcp_before = deployment.server.stats(), deployment.tcp_bytes()
    deployment.round(params)
    after, tcp_after = deployment.server.stats(), deployment.tcp_bytes()
    scale = deployment.nodes * params
    out: dict[str, Any] = {
        "frames": {
            "server_to_nodes": (after.bytes_sent - before.bytes_sent) / scale,
            "nodes_to_server": (after.bytes_received - before.bytes_received) / scale,
        },
        "tcp": None,
    }
    if tcp_before is not None and tcp_after is not None:
        out["tcp"] = {
            "server_to_nodes": (tcp_after[0] - tcp_before[0]) / scale,
            "nodes_to_server": (tcp_after[1] - tcp_before[1]) / scale,
        }
    return out


def verify(
    transport: NDArray[np.float32], simulation: NDArray[np.float32], expected: NDArray[np.float64]
) -> dict[str, Any]:
    ulps = np.abs(transport.view(np.int32).astype(np.int64) - simulation.view(np.int32))
    rel = float(np.max(np.abs(transport - expected) / np.maximum(np.abs(expected), 1e-12)))
    same = int(ulps.max()) <= 1
    close = bool(np.all(np.abs(transport - expected) <= 2 * FLOAT32_EPS * np.abs(expected) + 1e-7))
    return {
        "ok": same and close,
        "max_ulp_transport_vs_simulation": int(ulps.max()),
        "max_rel_diff_vs_numpy": rel,
    }


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One FedAvg round over gRPC with node processes, against the simulation."
    )
    parser.add_argument("--nodes", type=positive_int, default=20)
    parser.add_argument("--params", type=positive_int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plaintext", action="store_true", help="no TLS and no node keys (loopback only)"
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the raw gRPC floor")
    parser.add_argument("--echo-node", help=argparse.SUPPRESS)  # a floor echo process
    parser.add_argument("--echo-root-cert", help=argparse.SUPPRESS)
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_node:
        return echo_node(args.echo_node, args.echo_root_cert)
    progress = None if args.quiet else sys.stderr
    updates = {i: make_update(args.seed, i, args.params) for i in range(args.nodes)}
    weights = np.array([weight(i) for i in range(args.nodes)], np.float64)
    expected = sum(w * updates[i].astype(np.float64) for i, w in enumerate(weights)) / weights.sum()
    sim_app = make_app(updates)
    deployment = Deployment(
        args.nodes, args.params, args.seed, plaintext=args.plaintext, quiet=args.quiet
    )
    floor = None
    try:
        if not args.no_floor:
            floor = Floor(args.nodes, args.params, deployment.tls_files)
        cases = [
            Case(
                "simulation",
                lambda: (
                    run_simulation(server_app(args.params), sim_app, args.nodes, seed=args.seed)
                    .arrays[NAME]
                    .numpy()
                ),
                "in-process nodes on threads",
            ),
            Case(
                "transport",
                lambda: deployment.round(args.params),
                f"{args.nodes} node processes over gRPC"
                + (", plain text" if args.plaintext else ", TLS + node keys"),
            ),
        ]
        if floor is not None:
            cases.append(
                Case(
                    "grpc_floor",
                    floor.round,
                    "the same bytes as raw gRPC messages to echo processes",
                )
            )
        results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
        bytes_per_param = wire(deployment, args.params)
    finally:
        deployment.close()
        if floor is not None:
            floor.close()
    verification = verify(
        results["transport"].result, results["simulation"].result, np.asarray(expected)
    )
    base = results["simulation"]
    payload = {
        "config": {
            "nodes": args.nodes,
            "params": args.params,
            "repeats": args.repeats,
            "seed": args.seed,
            "tls": not args.plaintext,
        },
        "results": {name: m.to_json(base) for name, m in results.items()},
        "ratio": ratio(results["transport"], base),
        "ratio_to_floor": (
            ratio(results["transport"], results["grpc_floor"]) if "grpc_floor" in results else None
        ),
        "startup_s": deployment.startup_seconds,
        "bytes_per_param": bytes_per_param,
        "verification": verification,
        "memory_metric": MEMORY_METRIC,
    }
    # No process_max_rss_mb: the rounds run in the node processes.
    emit_result(
        args, "transport", payload, lambda: report(args, results, payload), process_rss=False
    )
    return 0 if verification["ok"] else 1


def report(
    args: argparse.Namespace, results: dict[str, Measurement], payload: dict[str, Any]
) -> str:
    lines = [
        f"one FedAvg round: {args.nodes} nodes x {args.params:,} float32 parameters, "
        f"{args.repeats} repeats (medians); node processes started and connected in "
        f"{payload['startup_s']:.1f} s (not timed)",
        "",
        measurement_table(results.values(), baseline="simulation"),
    ]
    if "grpc_floor" in results:
        floor_ratio = ratio(results["transport"], results["grpc_floor"])
        lines.append(f"transport / grpc_floor: {floor_ratio:.2f}x")
    frames, tcp = payload["bytes_per_param"]["frames"], payload["bytes_per_param"]["tcp"]
    verification = payload["verification"]
    ulps, rel = (
        verification["max_ulp_transport_vs_simulation"],
        verification["max_rel_diff_vs_numpy"],
    )
    lines += [
        "",
        "bytes on the wire per parameter, one round",
        format_table(
            ("direction", "frames", "TCP payload"),
            [
                (
                    direction.replace("_", " "),
                    frames[direction],
                    None if tcp is None else tcp[direction],
                )
                for direction in ("server_to_nodes", "nodes_to_server")
            ],
        ),
        "",
        f"verification: transport vs simulation max {ulps} ulp, vs numpy max relative "
        f"difference {rel:.2e}: " + ("ok" if verification["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""``flowerpets server``, ``flowerpets client`` and ``flowerpets certs``.

Each ``add_*_parser(subparsers)`` adds one subcommand whose ``command``
default runs it and returns the process exit code. At load time this module
imports the standard library and :mod:`flowerpets._argtypes` only: gRPC,
cryptography, the rest of the transport and the apps are imported when a
command runs (``python -X importtime`` shows it; the ``flowerpets`` package
itself still loads the core, and with it numpy).

With ``--store PATH`` the server commits every round to a run store and, started
again with the same app, run config and seed, continues after the last committed
round (:mod:`flowerpets.store.serving`; a store that is damaged, held by a live
server or holds the run with another configuration is refused at start). A CKKS
run resumes with the nodes that kept its key: they keep a context per run id, so
``--store`` with ``HomomorphicAggregation`` needs ``--run-id``.

Exit codes: the server returns 0 when the run ended (also early, on SIGTERM),
1 if the ServerApp failed and 2 for bad arguments (and a refused store); a client returns its
:class:`~flowerpets.transport.client.ExitCode` (0: the run is over or the server
let it go; 1: server unreachable; 2: refused; 3: protocol error; 4: replaced).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from flowerpets._argtypes import checked, non_negative_int, number

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    from flowerpets.core import RunResult, ServerApp
    from flowerpets.transport._corelog import CoreLogRouter
    from flowerpets.transport.server import TransportServer

__all__ = [
    "add_certs_parser",
    "add_client_parser",
    "add_server_parser",
    "run_certs",
    "run_client",
    "run_server",
]

log = logging.getLogger("flowerpets.transport.cli")


DEFAULT_ADDRESS = "127.0.0.1:9092"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_BAD_ARGUMENTS = 2


# -- argument types -------------------------------------------------------------------------------
_positive_float = checked(
    number, lambda v: math.isfinite(v) and v > 0, "expected a number > 0, got {text}"
)


_non_negative_float = checked(
    number, lambda v: math.isfinite(v) and v >= 0, "expected a number >= 0, got {text}"
)


def _megabytes(text: str) -> int:
    value = _positive_float(text)
    return max(1024, int(value * (1 << 20)))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (the log goes to stderr; default INFO)",
    )


# -- server ---------------------------------------------------------------------------------------
def add_server_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``flowerpets server``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "server",
        help="host a run: the ServerApp, and the nodes that connect over gRPC",
        description="Host a run: load a ServerApp, wait for nodes, run it over gRPC, and let "
        "the nodes go. TLS and node keys are required outside loopback.",
    )
    parser.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help="the ServerApp, or a function of the run config (a ConfigRecord) returning one",
    )
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_ADDRESS}; port 0 picks a free port)",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--cert", metavar="PEM", help="the server's certificate (chain)")
    security.add_argument("--key", metavar="PEM", help="the server's private key")
    security.add_argument(
        "--node-keys",
        action="append",
        metavar="FILE_OR_DIR",
        help="the nodes' Ed25519 public keys: a file of OpenSSH lines or PEM blocks, or a "
        "directory of *.pub files (repeatable); only these nodes may join",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain text and/or any node on a non-loopback address (development only)",
    )
    run = parser.add_argument_group("the run")
    run.add_argument(
        "--min-nodes",
        type=non_negative_int,
        default=1,
        help="wait for this many nodes before the first round (default 1)",
    )
    run.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="start anyway after this long without --min-nodes nodes (default 300)",
    )
    run.add_argument(
        "--wait-for-nodes",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="when fewer than --round-min-nodes nodes are connected as a round starts "
        "(after an outage), wait up to this long for them to (re)connect "
        "(default 60; 0: never wait)",
    )
    run.add_argument(
        "--round-min-nodes",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="the nodes --wait-for-nodes waits for (default 1: wait only when none is "
        "connected; more makes rounds wait for nodes that left)",
    )
    run.add_argument(
        "--run-config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="the run config, sent to every node (values: int, float, true/false, or string)",
    )
    run.add_argument("--seed", type=int, help="seed of the run (also run_config['seed'])")
    run.add_argument(
        "--run-id",
        type=int,
        help="the run's id (default: random; give it with --store for a CKKS run, whose "
        "nodes keep its key per run id)",
    )
    run.add_argument(
        "--store",
        metavar="PATH",
        help="commit every round to the run store (an SQLite file) at PATH; a server started "
        "again with the same --app, --run-config and --seed continues after the last "
        "committed round",
    )
    run.add_argument(
        "--store-run",
        default="server",
        metavar="ID",
        help="the run's id in the store (default: server)",
    )
    run.add_argument(
        "--store-population",
        metavar="ID",
        help="the privacy ledger the run spends from (default: the run's own); runs over the "
        "same people's data given one id compose their epsilons in it",
    )
    run.add_argument(
        "--store-commit-every",
        type=int,
        default=1,
        metavar="N",
        help="commit to the store after every N-th round and the last (default: 1, every "
        "round); a crash loses the rounds since the last commit, which run again on restart",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--history", metavar="FILE", help="write the history as JSON here")
    output.add_argument(
        "--save", metavar="FILE", help="write the final arrays here (a codec RecordDict frame)"
    )
    output.add_argument(
        "--port-file", metavar="FILE", help="write the port the server listens on here"
    )
    tuning = parser.add_argument_group("timeouts and limits")
    tuning.add_argument("--heartbeat-interval", type=_positive_float, default=5.0)
    tuning.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        default=20.0,
        help="a node silent for this long is a dropout (default 20 s)",
    )
    tuning.add_argument(
        "--message-timeout",
        type=_positive_float,
        help="the longest wait for a reply when the app sets no timeout (default: none)",
    )
    tuning.add_argument(
        "--max-chunk-mb", type=_megabytes, default=1 << 20, help="chunk size (default 1)"
    )
    tuning.add_argument(
        "--max-message-mb",
        type=_megabytes,
        default=1 << 30,
        help="largest message accepted from a node (default 1024)",
    )
    _common(parser)
    parser.set_defaults(command=run_server)
    return parser


def _server_app(spec: Any, run_config: Any) -> ServerApp:
    from flowerpets.core import ServerApp
    from flowerpets.exceptions import ParameterTypeError

    if isinstance(spec, ServerApp):
        return spec
    if callable(spec):
        app = spec(run_config)
        if isinstance(app, ServerApp):
            return app
        raise ParameterTypeError(f"the app factory returned {type(app).__name__}, not a ServerApp")
    raise ParameterTypeError(
        f"--app must name a ServerApp or a function returning one, got {spec!r}"
    )


def _install_logging(level: str) -> CoreLogRouter:
    from flowerpets.transport._corelog import CoreLogRouter

    router = CoreLogRouter().install()
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    return router


def _on_signals(handler: Callable[[str], None]) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        # A second signal gets the default treatment: SIGINT raises, SIGTERM kills.
        signal.signal(signum, signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
        handler(f"received {name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def _logged(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run ``command`` with the process's log routed at ``--log-level``; its exit code."""
    router = _install_logging(args.log_level)
    try:
        return command(args)
    finally:
        router.close()


def run_server(args: argparse.Namespace) -> int:
    """Run ``flowerpets server``; returns the exit code."""
    return _logged(args, _serve)


def _serve(args: argparse.Namespace) -> int:
    with ExitStack() as stored:
        return _serve_stored(args, stored)


def _serve_stored(args: argparse.Namespace, stored: ExitStack) -> int:
    from flowerpets.core import ConfigRecord
    from flowerpets.exceptions import ParameterValueError, StoreError
    from flowerpets.transport._auth import load_public_keys
    from flowerpets.transport._loading import load_object, parse_config
    from flowerpets.transport.server import TransportServer
    from flowerpets.transport.settings import ServerSettings, ServerTls

    try:
        run_config = parse_config(args.run_config)
        if args.seed is not None:
            run_config.setdefault("seed", args.seed)
        app = _server_app(load_object(args.app), ConfigRecord(run_config))
        if args.store is None and args.store_commit_every != 1:
            raise ParameterValueError("--store-commit-every says how often to commit: give --store")
        if args.store is None and args.store_population is not None:
            raise ParameterValueError("--store-population names a ledger in a store: give --store")
        if args.store is not None:
            from flowerpets.store.serving import stored_app

            identity = {
                "program": "flowerpets server",
                "app": args.app,
                "run_config": run_config,
                "seed": args.seed,
                "num_rounds": app.num_rounds,
            }
            # A node keeps its context (an HE key) per run id: a restart must keep the id.
            lost = (
                None
                if args.run_id is not None
                else "a server started again without --run-id draws a new run id, under which "
                "the nodes hold no context: give --run-id"
            )
            app = stored.enter_context(
                stored_app(
                    app,
                    args.store,
                    args.store_run,
                    identity,
                    nodes_lose_state=lost,
                    commit_every=args.store_commit_every,
                    population_id=args.store_population,
                )
            )
        if (args.cert is None) != (args.key is None):
            raise ParameterValueError("give both --cert and --key, or neither")
        tls = ServerTls.from_files(args.cert, args.key) if args.cert else None
        node_keys = load_public_keys(args.node_keys) if args.node_keys else None
        settings = ServerSettings(
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            message_timeout=args.message_timeout,
            max_chunk_bytes=args.max_chunk_mb,
            max_message_bytes=args.max_message_mb,
            min_nodes=args.round_min_nodes,
            wait_for_nodes=args.wait_for_nodes,
        )
        server = TransportServer(
            args.address,
            tls=tls,
            node_keys=node_keys,
            settings=settings,
            run_id=args.run_id,
            run_config=run_config,
            insecure=args.insecure,
        )
        server.start()
    except (ValueError, TypeError, ImportError, AttributeError, OSError, StoreError) as exc:
        log.error("cannot start the server: %s", exc)
        return EXIT_BAD_ARGUMENTS
    if args.port_file:
        Path(args.port_file).write_text(f"{server.port}\n")
    _on_signals(server.request_stop)
    try:
        return _host(server, app, args, run_config)
    finally:
        why = server.stop_requested
        server.stop(
            f"the server is shutting down ({why})" if why else "the server is shutting down"
        )


def _host(
    server: TransportServer, app: ServerApp, args: argparse.Namespace, run_config: dict[str, Any]
) -> int:
    from flowerpets.exceptions import StopRunError
    from flowerpets.transport._frames import ByeCode

    log.info("waiting for %d node(s) (at most %g s)", args.min_nodes, args.wait_timeout)
    connected = server.wait_for_nodes(args.min_nodes, timeout=args.wait_timeout)
    if server.stop_requested is not None:
        log.warning("stopping before the run: %s", server.stop_requested)
        return 0
    if connected < args.min_nodes:
        log.warning(
            "only %d of %d node(s) after %g s; starting anyway",
            connected,
            args.min_nodes,
            args.wait_timeout,
        )
    log.info("starting the run with %d node(s)", connected)

    def on_round(record: Any) -> None:
        log.info(
            "round %d: %d participant(s), %d failure(s)%s; %s",
            record.round,
            len(record.participants),
            len(record.failures),
            f", error: {record.error}" if record.error else "",
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(record.server_metrics.items())) or "-",
        )

    try:
        result = app.run(server.grid, run_config=run_config, seed=args.seed, on_round=on_round)
    except StopRunError as exc:  # stopped outside a training round (no result to keep)
        log.warning("the run stopped: %s", exc)
        return 0
    except Exception:
        log.exception("the ServerApp failed")
        server.stop("the server app failed", code=ByeCode.SHUTDOWN)
        return 1
    _write_outputs(result, args, server)
    if result.stopped:
        log.warning("the run stopped early: %s", result.stopped)
    else:
        log.info("the run is over (%d rounds)", len(result.history))
        server.stop("the run is over", code=ByeCode.RUN_FINISHED)
    return 0


def _write_outputs(result: RunResult, args: argparse.Namespace, server: TransportServer) -> None:
    from flowerpets.core import RecordDict
    from flowerpets.core.codec import encode_record_dict

    if args.history:
        stats = server.stats()
        payload = {
            "run_id": server.run_id,
            "stopped": result.stopped,
            "history": result.history.to_dicts(),
            "transport": {
                "connections": stats.connections,
                "refused": stats.refused,
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
            },
        }
        Path(args.history).write_text(json.dumps(payload, indent=2) + "\n")
        log.info("history written to %s", args.history)
    if args.save:
        Path(args.save).write_bytes(encode_record_dict(RecordDict({"arrays": result.arrays})))
        log.info("final arrays written to %s", args.save)


# -- client ---------------------------------------------------------------------------------------
def add_client_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``flowerpets client``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "client",
        help="run a node: connect to a server and run a ClientApp on its messages",
        description="Run a node: connect to the server, run the ClientApp on every message, "
        "reply, and reconnect with backoff when the connection breaks.",
    )
    parser.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help="the ClientApp, or a function of the node's Context returning one",
    )
    parser.add_argument(
        "--server",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the server's address (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--node-config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="this node's config, e.g. partition-id=0 num-partitions=5",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--root-cert", metavar="PEM", help="the CA certificate to trust")
    security.add_argument(
        "--server-name", help="check the server's certificate for this name instead"
    )
    security.add_argument("--key", metavar="PEM", help="this node's Ed25519 private key")
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain text to a non-loopback address (development only)",
    )
    tuning = parser.add_argument_group("reconnection and limits")
    tuning.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long without a connection (default 300; 0: never)",
    )
    tuning.add_argument("--max-chunk-mb", type=_megabytes, default=1 << 20)
    tuning.add_argument("--max-message-mb", type=_megabytes, default=1 << 30)
    _common(parser)
    parser.set_defaults(command=run_client)
    return parser


def run_client(args: argparse.Namespace) -> int:
    """Run ``flowerpets client``; returns the exit code."""
    return _logged(args, _client)


def _client(args: argparse.Namespace) -> int:
    from flowerpets.transport._auth import NodeKey
    from flowerpets.transport._loading import load_object, parse_config
    from flowerpets.transport.client import NodeClient
    from flowerpets.transport.settings import ClientSettings, ClientTls

    try:
        client = NodeClient(
            load_object(args.app),
            args.server,
            key=NodeKey.load(args.key) if args.key else None,
            tls=ClientTls.from_file(args.root_cert, args.server_name) if args.root_cert else None,
            node_config=parse_config(args.node_config),
            settings=ClientSettings(
                max_chunk_bytes=args.max_chunk_mb,
                max_message_bytes=args.max_message_mb,
                retry_for=args.retry_for if args.retry_for > 0 else None,
            ),
            insecure=args.insecure,
        )
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as exc:
        log.error("cannot start the node: %s", exc)
        return EXIT_BAD_ARGUMENTS
    _on_signals(client.stop)
    outcome = client.run()
    level = logging.INFO if outcome.code == 0 else logging.ERROR
    log.log(level, "node %d exits (%s): %s", client.node_id, outcome.code.name, outcome.reason)
    return int(outcome.code)


# -- certs ----------------------------------------------------------------------------------------
def add_certs_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``flowerpets certs``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="make a development CA, a server certificate and node keys",
        description="Write a development CA (ca.pem, ca.key), a server certificate for "
        "localhost, 127.0.0.1, ::1 and the --name values (server.pem, server.key), and with "
        "--nodes N, N Ed25519 node key pairs (node-<i>.key, node-<i>.pub) plus node-keys.pub "
        "listing them all. For development: use your own CA in production.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="another host name or IP address the server certificate is valid for (repeatable)",
    )
    parser.add_argument("--nodes", type=non_negative_int, default=0, help="node key pairs")
    parser.add_argument(
        "--days", type=int, default=90, help="validity of the certificates (default 90)"
    )
    parser.add_argument("--no-tls", action="store_true", help="only make node keys")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(command=run_certs)
    return parser


def run_certs(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``flowerpets certs``; returns the exit code."""
    from flowerpets.transport.certs import create_credentials

    stream = out or sys.stdout
    try:
        made = create_credentials(
            args.out,
            names=args.name,
            days=args.days,
            nodes=args.nodes,
            tls=not args.no_tls,
            force=args.force,
        )
    except (ValueError, OSError) as exc:
        print(f"flowerpets certs: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    files = [
        made.ca_certificate,
        made.ca_key,
        made.server_certificate,
        made.server_key,
        *made.node_keys,
        made.node_public_keys,
    ]
    for path in files:
        if path is not None:
            mode = oct(os.stat(path).st_mode & 0o777)
            print(f"wrote {path} ({mode})", file=stream)
    if made.ca_key is not None:
        print(
            f"keep {made.ca_key} away from the nodes; they need {made.ca_certificate} only",
            file=stream,
        )
    return 0

"""The ``flowerpets`` command: one entry point, one subcommand per tool.

``flowerpets demo`` runs the federated digits demo; ``flowerpets accountant``
answers privacy-budget questions (epsilon, noise, plans); ``flowerpets
server``, ``client`` and ``certs`` run a federation as separate processes over
gRPC. Subcommands import what
they need only when they run, so ``flowerpets --help`` works without the
optional extras.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flowerpets.transport.cli import add_certs_parser, add_client_parser, add_server_parser

__all__ = ["main"]


def _demo(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    try:
        from flowerpets.examples.digits import demo
    except ImportError as exc:  # the examples extra is missing
        parser.exit(2, f"flowerpets demo: {exc}\n")
    return demo.run


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="federated learning on the handwritten digits data set",
        description="Run a federated simulation on scikit-learn's handwritten digits.",
    )
    from flowerpets.examples.digits.demo import add_arguments

    add_arguments(parser)
    parser.set_defaults(command=lambda args: _demo(parser)(args))


def _add_accountant(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from flowerpets.dp.cli import add_parser

    add_parser(subparsers)


SUBCOMMANDS = [_add_demo, _add_accountant, add_server_parser, add_client_parser, add_certs_parser]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flowerpets", description="Privacy-enhancing technologies for federated learning."
    )
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


if __name__ == "__main__":
    sys.exit(main())

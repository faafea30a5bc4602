"""The ``flowerpets`` command: one entry point, one subcommand per tool.

``flowerpets demo`` runs the federated digits demo (``--store`` keeps its
rounds, ``flowerpets resume`` continues it after a crash); ``flowerpets accountant``
answers privacy-budget questions (epsilon, noise, plans); ``flowerpets
server``, ``client`` and ``certs`` run a federation as separate processes over
gRPC; ``flowerpets new`` writes a Flower app that uses the PETs. Subcommands
import what they need only when they run, so ``flowerpets
--help`` works without the optional extras.

Every parser of the tree refuses abbreviations (``--round`` is not
``--rounds``) and reports a usage error as one line on stderr with exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence

from flowerpets._argtypes import OneLineParser
from flowerpets.new import add_parser as add_new_parser
from flowerpets.transport.cli import add_certs_parser, add_client_parser, add_server_parser

__all__ = ["build_parser", "main", "parsers"]


def _demo(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    try:
        from flowerpets.examples.digits import demo
    except ImportError as exc:  # the examples extra is missing
        parser.exit(2, f"flowerpets demo: {exc}\n")
    return demo.run


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from flowerpets.examples.digits.demo import DESCRIPTION, RECOMMENDED, add_arguments
    from flowerpets.examples.digits.stored import add_store_arguments

    parser = subparsers.add_parser(
        "demo",
        help="federated learning on the handwritten digits data set",
        description=DESCRIPTION,
    )
    add_arguments(parser, default_pets=RECOMMENDED)
    add_store_arguments(parser)
    parser.set_defaults(command=lambda args: _demo(parser)(args))


def _resume(args: argparse.Namespace) -> int:
    from flowerpets.examples.digits.stored import resume

    return resume(args)


def _add_resume(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "resume",
        help="continue a demo run stored with --store from its last committed round",
        description="Continue a run that 'flowerpets demo --store PATH' stored, after its "
        "last committed round: the run's options are read from the store and the same apps "
        "rebuilt from them, so the run ends where the uninterrupted run would have.",
    )
    parser.add_argument("--store", required=True, metavar="PATH", help="the run store")
    parser.add_argument(
        "--run", metavar="ID", help="the run to continue (default: the last demo run started)"
    )
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    parser.set_defaults(command=_resume)


def _add_accountant(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from flowerpets.dp.cli import add_parser

    add_parser(subparsers)


SUBCOMMANDS = [
    _add_demo,
    _add_resume,
    _add_accountant,
    add_server_parser,
    add_client_parser,
    add_certs_parser,
    add_new_parser,
]


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subparser below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from parsers(child)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``flowerpets`` command line."""
    parser: argparse.ArgumentParser = OneLineParser(
        prog="flowerpets", description="Privacy-enhancing technologies for federated learning."
    )
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    # A subcommand may bring its own parser class: no abbreviations anywhere all the same.
    for each in parsers(parser):
        each.allow_abbrev = False
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


if __name__ == "__main__":
    sys.exit(main())

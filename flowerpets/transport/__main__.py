"""``python -m flowerpets.transport {server,client,certs} ...`` (the same as ``flowerpets ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flowerpets.transport.cli import add_certs_parser, add_client_parser, add_server_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowerpets.transport",
        description="The gRPC deployment runtime: server, client (node) and certificates.",
    )
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add in (add_server_parser, add_client_parser, add_certs_parser):
        add(subparsers)
    args = parser.parse_args(argv)
    code: int = args.command(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The deployment runtime: the same ServerApp and ClientApp as separate processes over gRPC.

.. code-block:: text

    flowerpets certs  --out creds --nodes 2
    flowerpets server --app my_apps:server_app --address 0.0.0.0:9092 \\
        --cert creds/server.pem --key creds/server.key --node-keys creds/node-keys.pub
    flowerpets client --app my_apps:client_app --server server.example.org:9092 \\
        --root-cert creds/ca.pem --key creds/node-0.key --node-config partition-id=0

In Python, :class:`TransportServer` hosts a run and its :class:`TransportGrid`
implements :class:`~flowerpets.core.Grid`; :class:`NodeClient` is a node.
Messages travel in the core codec (never pickle), in chunks; TLS is required
outside loopback; nodes prove who they are with Ed25519 keys; dead or silent
nodes are dropouts and rejoin when they reconnect. See ``docs/transport.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowerpets.transport._auth import NodeKey, load_public_keys, node_id_of
    from flowerpets.transport._frames import ByeCode
    from flowerpets.transport.certs import Credentials, create_credentials, write_node_keys
    from flowerpets.transport.client import ClientAppSpec, ClientExit, ExitCode, NodeClient
    from flowerpets.transport.server import TransportGrid, TransportServer, TransportStats
    from flowerpets.transport.settings import (
        ClientSettings,
        ClientTls,
        ServerSettings,
        ServerTls,
        is_loopback,
    )

# Where each name lives: they are imported on first use, so that the command line
# (``flowerpets.transport.cli``) can load without gRPC and cryptography.
_HOMES = {
    "ByeCode": "_frames",
    "ClientAppSpec": "client",
    "ClientExit": "client",
    "ClientSettings": "settings",
    "ClientTls": "settings",
    "Credentials": "certs",
    "ExitCode": "client",
    "NodeClient": "client",
    "NodeKey": "_auth",
    "ServerSettings": "settings",
    "ServerTls": "settings",
    "TransportGrid": "server",
    "TransportServer": "server",
    "TransportStats": "server",
    "create_credentials": "certs",
    "is_loopback": "settings",
    "load_public_keys": "_auth",
    "node_id_of": "_auth",
    "write_node_keys": "certs",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ByeCode",
    "ClientAppSpec",
    "ClientExit",
    "ClientSettings",
    "ClientTls",
    "Credentials",
    "ExitCode",
    "NodeClient",
    "NodeKey",
    "ServerSettings",
    "ServerTls",
    "TransportGrid",
    "TransportServer",
    "TransportStats",
    "create_credentials",
    "is_loopback",
    "load_public_keys",
    "node_id_of",
    "write_node_keys",
]

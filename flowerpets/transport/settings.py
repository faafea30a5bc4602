"""Settings of the server and the nodes, TLS material, and the loopback rule.

The defaults are the safe ones: TLS and node keys are required for any address
that is not loopback (``127.0.0.0/8``, ``::1``, ``localhost``); turning that off
takes an explicit ``insecure=True`` (``--insecure``), which logs a warning.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flowerpets._validation import integer, real
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

__all__ = [
    "ClientSettings",
    "ClientTls",
    "ServerSettings",
    "ServerTls",
    "is_loopback",
    "split_address",
]

log = logging.getLogger(__name__)

MB = 1 << 20


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as ``(host, port)``; a clear ValueError otherwise."""
    if not isinstance(address, str):
        raise ParameterTypeError(f"an address is a HOST:PORT str, got {type(address).__name__}")
    if ":" not in address:
        raise ParameterValueError(f"an address is HOST:PORT, got {address!r}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ParameterValueError(f"the port in {address!r} is not a number") from None
    if not host or not 0 <= port <= 65535:
        raise ParameterValueError(
            f"an address is HOST:PORT with a port in [0, 65535], got {address!r}"
        )
    return host, port


def is_loopback(address: str) -> bool:
    """True if ``address`` (HOST:PORT) stays on this machine.

    Only ``localhost`` and literal loopback IPs count; other host names are not
    resolved (what they resolve to can change), so they count as remote.
    """
    host, _ = split_address(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(owner: object, name: str, *, allow_none: bool = False) -> None:
    value = getattr(owner, name)
    if value is None and allow_none:
        return
    real(f"{type(owner).__name__}.{name}", value, above=0)


def _positive_int(owner: object, name: str, minimum: int = 1) -> None:
    integer(f"{type(owner).__name__}.{name}", getattr(owner, name), at_least=minimum)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How the server treats its connections.

    ``heartbeat_interval``
        Seconds between the heartbeats a node sends (the server tells each node
        at connection) and between the server's own pings. Default 5.
    ``heartbeat_timeout``
        A node that sends nothing for this long is disconnected and is a
        dropout for the messages it had not answered. Default 20 seconds.
    ``hello_timeout``
        A connection that has not authenticated within this many seconds is
        closed. Default 10.
    ``max_clock_skew``
        A HELLO timestamped further than this from the server's clock is refused;
        nonces are remembered for twice this long. Default 60 seconds.
    ``max_chunk_bytes``
        The largest chunk of a message the server sends or accepts in one frame.
        Default 1 MiB.
    ``max_message_bytes``
        The largest reassembled message the server accepts from a node.
        Default 1 GiB.
    ``message_timeout``
        An upper bound, in seconds, on how long one exchange waits for replies
        when the caller gave no timeout (a node whose process is alive but whose
        app hangs). Default None: heartbeats alone detect dead nodes.
    ``max_connections``
        Connections served at once (authenticated or not); more are refused by
        gRPC with RESOURCE_EXHAUSTED. Default 512.
    ``shutdown_grace``
        Seconds the server waits for nodes to receive its goodbye. Default 3.
    ``min_nodes`` / ``wait_for_nodes``
        When fewer than ``min_nodes`` nodes are connected as a round starts,
        the grid's round-start hook (``wait_for_nodes()``, which the ServerApp
        calls before it picks a cohort) waits up to ``wait_for_nodes`` seconds
        for them to connect or reconnect, so that a short outage delays the run
        instead of failing its rounds. After a wait in vain it does not wait
        again until the next exchange. Defaults 1 (wait only when no node is
        connected) and 60 seconds; 0 seconds never waits. More than 1 also
        makes a round wait for nodes that left for good; mods that list the
        nodes mid-round (SecAgg+) get the nodes connected then, without a wait.
    """

    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 20.0
    hello_timeout: float = 10.0
    max_clock_skew: float = 60.0
    max_chunk_bytes: int = 1 * MB
    max_message_bytes: int = 1024 * MB
    message_timeout: float | None = None
    max_connections: int = 512
    shutdown_grace: float = 3.0
    min_nodes: int = 1
    wait_for_nodes: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in ("max_chunk_bytes", "max_message_bytes", "max_connections"):
                _positive_int(self, f.name, 1024 if f.name != "max_connections" else 1)
            elif f.name == "min_nodes":
                _positive_int(self, f.name, 0)
            elif f.name == "wait_for_nodes":
                real("ServerSettings.wait_for_nodes", self.wait_for_nodes, at_least=0)
            else:
                _positive(self, f.name, allow_none=f.name == "message_timeout")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ParameterValueError(
                f"ServerSettings.heartbeat_timeout ({self.heartbeat_timeout}) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )
        if self.max_chunk_bytes >= 1 << 31:
            raise ParameterValueError("ServerSettings.max_chunk_bytes must be below 2 GiB")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a node connects and reconnects.

    ``max_chunk_bytes`` / ``max_message_bytes``
        The largest chunk and message the node accepts from the server (the
        server sends chunks of the smaller of its and the node's limit).
        Defaults 1 MiB and 1 GiB.
    ``retry_initial`` / ``retry_max``
        Reconnection backoff: the first wait, doubled after every failed
        attempt up to ``retry_max``, each with random jitter (a wait is drawn in
        ``[w/2, w]``). Defaults 0.5 and 30 seconds.
    ``retry_for``
        Give up after this many seconds without a connection (None: never).
        Default 300.
    """

    max_chunk_bytes: int = 1 * MB
    max_message_bytes: int = 1024 * MB
    retry_initial: float = 0.5
    retry_max: float = 30.0
    retry_for: float | None = 300.0

    def __post_init__(self) -> None:
        _positive_int(self, "max_chunk_bytes", 1024)
        _positive_int(self, "max_message_bytes", 1024)
        _positive(self, "retry_initial")
        _positive(self, "retry_max")
        _positive(self, "retry_for", allow_none=True)
        if self.max_chunk_bytes >= 1 << 31:
            raise ParameterValueError("ClientSettings.max_chunk_bytes must be below 2 GiB")


def _load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ParameterValueError(f"{where}: not a PEM certificate: {exc}") from None
    return certificates


def _warn_if_expired(cert: x509.Certificate, where: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.warning(
            "%s: the certificate is valid from %s to %s only, and it is now %s",
            where,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            now,
        )


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's certificate chain and private key, in PEM."""

    certificate_chain: bytes
    private_key: bytes

    @classmethod
    def from_files(
        cls, certificate: str | os.PathLike[str], key: str | os.PathLike[str]
    ) -> ServerTls:
        """Read and check the pair: the key must match the first certificate of the chain."""
        chain = Path(certificate).read_bytes()
        private = Path(key).read_bytes()
        first = _load_certificates(chain, str(certificate))[0]
        try:
            loaded = serialization.load_pem_private_key(private, password=None)
        except (ValueError, TypeError) as exc:
            raise ParameterValueError(f"{key}: not an unencrypted PEM private key: {exc}") from None
        mine = loaded.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = first.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != theirs:
            raise ParameterValueError(
                f"{key} is not the private key of the certificate {certificate}"
            )
        _warn_if_expired(first, str(certificate))
        return cls(certificate_chain=chain, private_key=private)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a node trusts: the root certificates (PEM) that signed the server's certificate.

    ``server_name`` overrides the name the server's certificate is checked
    against (by default, the host of the address the node dials).
    """

    root_certificates: bytes
    server_name: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], server_name: str | None = None) -> ClientTls:
        data = Path(path).read_bytes()
        for cert in _load_certificates(data, str(path)):
            _warn_if_expired(cert, str(path))
        return cls(root_certificates=data, server_name=server_name)

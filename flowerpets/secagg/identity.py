"""Node identities for SecAgg+'s malicious mode: a small PKI of Ed25519 keys.

Every node holds a long-term :class:`IdentityKey` (Ed25519, from
``cryptography``) and signs with it what it advertises. The user provides the
PKI, :class:`NodeIdentities` (node id -> Ed25519 public key), to the server mod
*and to every client mod*, from a source the server does not control (the same
file distributed with the app): a node that took its neighbours' public keys
from the server would accept whatever keys the server made up.

Where the keys come from:

* **simulation**: :func:`enroll` makes a key per node id and returns the PKI
  and a :class:`Keyring` (every node's private key, for the one process that
  runs them all); ``run_simulation(..., node_ids=enrolment.node_ids)``.
* **flowerpets' gRPC runtime**: its node keys are Ed25519 already. The PKI is
  ``NodeIdentities.from_public_keys(load_public_keys([...]), node_id=node_id_of)``
  (both from :mod:`flowerpets.transport`), and a node's key
  ``IdentityKey.from_pem(NodeKey.load(path).private_pem())``. Signatures are
  domain-separated, so one key serves both purposes safely.
* **Flower**: a SuperNode's authentication key is an ECDSA key that the
  SuperNode process keeps; a ClientApp never sees it. Provision an Ed25519 key
  per node with the app and name its file in the node config:
  :class:`NodeConfigKey` reads it (``--node-config "secagg-identity-key=..."``).

A private key never enters a message, a record, a log line or a ``repr``; it is
never pickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flowerpets._validation import integer, string
from flowerpets.core import Context
from flowerpets.exceptions import (
    ConfigurationError,
    KeyMaterialError,
    NotEnrolledError,
    ParameterTypeError,
    ParameterValueError,
)
from flowerpets.secagg._primitives import signatures

__all__ = [
    "IDENTITY_KEY_CONFIG",
    "Enrolment",
    "IdentityKey",
    "IdentitySource",
    "Keyring",
    "NodeConfigKey",
    "NodeIdentities",
    "enroll",
]

Randomness = Callable[[int], bytes]

IDENTITY_KEY_CONFIG = "secagg-identity-key"
"""The node-config key :class:`NodeConfigKey` reads by default: a path to a PEM private key."""

_MAX_TEXT = 64 * 1024 * 1024  # an identities file: ~60 bytes a node, so ~1M nodes at most
_SSH_TYPE = "ssh-ed25519"


class IdentityKey:
    """A node's long-term Ed25519 signing key. Its ``repr`` shows the public key only."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ParameterTypeError(
                f"an identity key is an Ed25519 private key, got {type(private_key).__name__}"
            )
        self._private = private_key
        self.public_bytes = signatures.public_bytes(private_key)

    @classmethod
    def generate(cls, randomness: Randomness = os.urandom) -> IdentityKey:
        """A fresh key (``randomness``: the OS's secure source; a seeded one only in tests)."""
        return cls(signatures.generate(randomness))

    @classmethod
    def from_pem(cls, data: bytes) -> IdentityKey:
        """An unencrypted PEM (PKCS#8) Ed25519 private key, e.g. a transport ``NodeKey``'s."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyMaterialError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyMaterialError(f"identity keys are Ed25519, got {type(key).__name__}")
        return cls(key)

    def private_pem(self) -> bytes:
        """The key in PEM (PKCS#8), to store with mode 0600 with the app; never to send."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def key_for(self, context: Context) -> IdentityKey:
        """This key, for whichever node asks (a deployed node holds one key)."""
        return self

    def __reduce__(self) -> tuple[object, ...]:
        raise ParameterTypeError("an identity key is never pickled")

    def __repr__(self) -> str:
        return f"IdentityKey(public={self.public_bytes.hex()[:16]}...)"


@runtime_checkable
class IdentitySource(Protocol):
    """Where a client mod finds the identity key of the node it runs for."""

    def key_for(self, context: Context) -> IdentityKey: ...


class Keyring(Mapping[int, IdentityKey]):
    """Every node's identity key, by node id: for a simulation, where one process runs them all."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[int, IdentityKey]) -> None:
        for node, key in keys.items():
            integer("node id", node)
            if not isinstance(key, IdentityKey):
                raise ParameterTypeError(f"node {node}: not an IdentityKey: {type(key).__name__}")
        self._keys = dict(keys)

    def __getitem__(self, node: int) -> IdentityKey:
        return self._keys[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def key_for(self, context: Context) -> IdentityKey:
        key = self._keys.get(context.node_id)
        if key is None:
            raise ConfigurationError(
                f"the keyring holds no identity key for node {context.node_id}"
            )
        return key

    def __reduce__(self) -> tuple[object, ...]:
        raise ParameterTypeError("a keyring of identity keys is never pickled")

    def __repr__(self) -> str:
        return f"Keyring({len(self._keys)} nodes)"


class NodeConfigKey:
    """The identity key in the PEM file that the node config names (under ``config_key``).

    For runtimes that start a ClientApp per node with that node's config (Flower):
    the key is provisioned with the app, its path given as
    ``--node-config "secagg-identity-key=/path/node.key"``. Read once per path.
    """

    __slots__ = ("_loaded", "config_key")

    def __init__(self, config_key: str = IDENTITY_KEY_CONFIG) -> None:
        self.config_key = string("config_key", config_key, non_empty=True)
        self._loaded: dict[str, IdentityKey] = {}

    def key_for(self, context: Context) -> IdentityKey:
        path = context.node_config.get(self.config_key)
        if not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"node {context.node_id}: the node config names no identity key file under "
                f"{self.config_key!r}"
            )
        key = self._loaded.get(path)
        if key is None:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"{path}: cannot read the identity key: {exc}") from None
            key = self._loaded[path] = IdentityKey.from_pem(data)
        return key

    def __repr__(self) -> str:
        return f"NodeConfigKey({self.config_key!r})"


class NodeIdentities(Mapping[int, bytes]):
    """The PKI: each enrolled node id and its Ed25519 public key (32 raw bytes).

    Give the same object (or the same file, :meth:`to_text` / :meth:`from_text`)
    to the server mod and to every client mod. A node id it does not list is a
    Sybil to every honest node.
    """

    __slots__ = ("_keys", "_public")

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        public: dict[int, Ed25519PublicKey] = {}
        seen: dict[bytes, int] = {}
        for node, raw in keys.items():
            integer("node id", node)
            public[node] = signatures.load_public_key(raw)
            if raw in seen:
                raise ParameterValueError(
                    f"nodes {seen[raw]} and {node} are enrolled with one public key"
                )
            seen[raw] = node
        if not public:
            raise ParameterValueError("identities need at least one enrolled node")
        self._keys = MappingProxyType(dict(keys))
        self._public = public

    def __reduce__(self) -> tuple[object, ...]:
        # Public keys only: an app that carries its PKI may be shipped to its workers.
        return (NodeIdentities, (dict(self._keys),))

    @classmethod
    def from_public_keys(
        cls, public_keys: Iterable[bytes], *, node_id: Callable[[bytes], int]
    ) -> NodeIdentities:
        """Identities where each node's id is a function of its key (the gRPC runtime's
        ``flowerpets.transport.node_id_of``)."""
        return cls({node_id(raw): raw for raw in public_keys})

    def __getitem__(self, node: int) -> bytes:
        return self._keys[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def public_key(self, node: int) -> Ed25519PublicKey:
        """The enrolled key of ``node``; a node not enrolled is a NotEnrolledError."""
        key = self._public.get(node)
        if key is None:
            raise NotEnrolledError(f"node {node} is not enrolled (no identity key)")
        return key

    def verify(self, node: int, signature: bytes, data: bytes, *, what: str) -> None:
        """Return if ``node``'s enrolled key signed ``data``; else SignatureError (or
        NotEnrolledError) naming ``what``."""
        signatures.verify(self.public_key(node), signature, data, what=what)

    def check_own(self, node: int, key: IdentityKey) -> None:
        """A node's own key must be its enrolment (ConfigurationError otherwise)."""
        if self._keys.get(node) != key.public_bytes:
            raise ConfigurationError(
                f"node {node}'s identity key is not the one enrolled for it"
                if node in self._keys
                else f"node {node} is not enrolled in the identities it was given"
            )

    def to_text(self) -> str:
        """One line per node: ``<node id> ssh-ed25519 <base64 key>`` (OpenSSH's encoding)."""
        lines = []
        for node in sorted(self._keys):
            line = self._public[node].public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            lines.append(f"{node} {line.decode('ascii')}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> NodeIdentities:
        """Read :meth:`to_text`'s format (``#`` comments and blank lines allowed)."""
        if not isinstance(text, str) or len(text) > _MAX_TEXT:
            raise ParameterValueError(f"identities text must be a str of at most {_MAX_TEXT} chars")
        keys: dict[int, bytes] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 3 or parts[1] != _SSH_TYPE or not parts[0].lstrip("-").isdigit():
                raise ParameterValueError(
                    f"line {number}: expected '<node id> {_SSH_TYPE} <base64 key>'"
                )
            node = int(parts[0])
            if node in keys:
                raise ParameterValueError(f"line {number}: node {node} is enrolled twice")
            keys[node] = _ssh_raw(parts[1], parts[2], number)
        return cls(keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentities:
        try:
            return cls.from_text(Path(path).read_text(encoding="utf-8"))
        except ParameterValueError as exc:
            raise ParameterValueError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return f"NodeIdentities({len(self._keys)} nodes)"


def _ssh_raw(kind: str, blob: str, number: int) -> bytes:
    try:
        key = serialization.load_ssh_public_key(f"{kind} {blob}".encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ParameterValueError(f"line {number}: not an OpenSSH Ed25519 key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ParameterValueError(f"line {number}: not an Ed25519 key")
    return signatures.public_bytes(key)


@dataclass(frozen=True)
class Enrolment:
    """Identities and their private keys, made together: a simulation's PKI."""

    identities: NodeIdentities
    keyring: Keyring

    @property
    def node_ids(self) -> list[int]:
        return list(self.identities)


def enroll(node_ids: Iterable[int], *, randomness: Randomness = os.urandom) -> Enrolment:
    """A fresh identity key per node id, and the PKI that lists their public keys.

    ``randomness`` is the OS's secure source; tests inject a seeded one.
    """
    ids = [integer("node id", node) for node in node_ids]
    if len(set(ids)) != len(ids):
        raise ParameterValueError("enroll: a node id is listed twice")
    keyring = Keyring({node: IdentityKey.generate(randomness) for node in ids})
    return Enrolment(
        identities=NodeIdentities({node: key.public_bytes for node, key in keyring.items()}),
        keyring=keyring,
    )

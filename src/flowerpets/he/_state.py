"""The key set-up protocol's stages, its two state machines, and where their state lives.

Stages (``Metadata.stage`` of the messages, so fault injection can hit one):

``he/advertise``
    server -> nodes without the key: each answers with its X25519 transport
    public key (made once, kept in its state), whether it volunteers to
    generate the key (node config ``he-key-generator``), and the id of the key
    it already holds, if any.
``he/keygen``
    server -> one node: make a CKKS context and wrap its secret for each listed
    recipient; answer with the key id, the public context (parameters only)
    and the wrapped keys.
``he/share``
    server -> one node that holds the key: wrap it for newcomers.
``he/install``
    server -> each recipient: the wrapped key, its sender and the public
    context; the node unwraps, checks and keeps it.

Every transition is checked against a table; anything else is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from flowerpets.core import ConfigRecord, RecordDict
from flowerpets.exceptions import RequestRefusedError
from flowerpets.he._primitives.params import CKKSParameters
from flowerpets.he.protocol import HE_MESSAGE_TYPE, KEY_GENERATOR_CONFIG, Stage

__all__ = [
    "CLIENT_TRANSITIONS",
    "HE_MESSAGE_TYPE",
    "KEY_GENERATOR_CONFIG",
    "SERVER_TRANSITIONS",
    "ClientKeys",
    "ClientPhase",
    "ServerEvent",
    "ServerKeys",
    "ServerPhase",
    "Stage",
]

_CLIENT_RECORD = "he.client"
_SERVER_RECORD = "he.server"


# -- the node's side -----------------------------------------------------------------------------
class ClientPhase(enum.StrEnum):
    NEW = "new"  # no transport key yet
    ADVERTISED = "advertised"  # has a transport key, no CKKS key
    HOLDS_KEY = "holds-key"


CLIENT_TRANSITIONS: Mapping[tuple[ClientPhase, Stage], ClientPhase] = MappingProxyType(
    {
        (ClientPhase.NEW, Stage.ADVERTISE): ClientPhase.ADVERTISED,
        (ClientPhase.ADVERTISED, Stage.ADVERTISE): ClientPhase.ADVERTISED,
        (ClientPhase.HOLDS_KEY, Stage.ADVERTISE): ClientPhase.HOLDS_KEY,
        (ClientPhase.ADVERTISED, Stage.KEYGEN): ClientPhase.HOLDS_KEY,
        # A new key replaces one whose last other holder is gone (before any sealed model).
        (ClientPhase.HOLDS_KEY, Stage.KEYGEN): ClientPhase.HOLDS_KEY,
        (ClientPhase.HOLDS_KEY, Stage.SHARE): ClientPhase.HOLDS_KEY,
        (ClientPhase.ADVERTISED, Stage.INSTALL): ClientPhase.HOLDS_KEY,
        (ClientPhase.HOLDS_KEY, Stage.INSTALL): ClientPhase.HOLDS_KEY,
    }
)


def client_transition(phase: ClientPhase, stage: Stage) -> ClientPhase:
    """The phase after ``stage``; a stage this phase does not allow is refused."""
    try:
        return CLIENT_TRANSITIONS[(phase, stage)]
    except KeyError:
        raise RequestRefusedError(
            f"key set-up stage {stage.value!r} is not allowed in phase {phase.value!r}"
        ) from None


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key, b"")
    if not isinstance(value, bytes):
        raise ValueError(f"state {key!r} must be bytes")
    return value


def _str(record: ConfigRecord, key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"state {key!r} must be a string")
    return value


def _params(record: ConfigRecord) -> CKKSParameters | None:
    value = record.get("params")
    return None if value is None else CKKSParameters.from_list(value)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A node's key material, kept in ``context.state["he.client"]`` (a ConfigRecord).

    ``secret_context`` is the serialized TenSEAL context with the secret key; it
    leaves the node only wrapped for one peer (:mod:`._primitives.keywrap`).
    """

    phase: ClientPhase = ClientPhase.NEW
    transport_private: bytes = b""
    transport_public: bytes = b""
    key_id: str = ""
    params: CKKSParameters | None = None
    secret_context: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"ClientKeys(phase={self.phase.value}, key_id={self.key_id!r})"

    @classmethod
    def load(cls, state: RecordDict) -> ClientKeys:
        if _CLIENT_RECORD not in state:
            return cls()
        record = state.get_typed(_CLIENT_RECORD, ConfigRecord)
        return cls(
            phase=ClientPhase(_str(record, "phase")),
            transport_private=_bytes(record, "transport-private"),
            transport_public=_bytes(record, "transport-public"),
            key_id=_str(record, "key-id"),
            params=_params(record),
            secret_context=_bytes(record, "secret-context"),
        )

    def store(self, state: RecordDict) -> None:
        record = ConfigRecord(
            {
                "phase": self.phase.value,
                "transport-private": self.transport_private,
                "transport-public": self.transport_public,
                "key-id": self.key_id,
                "secret-context": self.secret_context,
            }
        )
        if self.params is not None:
            record["params"] = self.params.to_list()
        state[_CLIENT_RECORD] = record

    def after(self, stage: Stage, **changes: Any) -> ClientKeys:
        """This state after ``stage`` (checked) with ``changes`` applied."""
        return replace(self, phase=client_transition(self.phase, stage), **changes)


# -- the server's side ---------------------------------------------------------------------------
class ServerPhase(enum.StrEnum):
    NO_KEY = "no-key"
    KEYED = "keyed"


class ServerEvent(enum.StrEnum):
    GENERATED = "generated"  # a node made the key and (some) others installed it
    ONBOARDED = "onboarded"  # newcomers installed it from a holder
    RESET = "reset"  # every holder is gone before any sealed model existed: start over


SERVER_TRANSITIONS: Mapping[tuple[ServerPhase, ServerEvent], ServerPhase] = MappingProxyType(
    {
        (ServerPhase.NO_KEY, ServerEvent.GENERATED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.ONBOARDED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.RESET): ServerPhase.NO_KEY,
    }
)


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What the server keeps in ``context.state["he.server"]``: nothing that can decrypt.

    The public context is the parameters alone (no key of any kind); the
    holders are the nodes that installed the key (the generator first).
    """

    phase: ServerPhase = ServerPhase.NO_KEY
    key_id: str = ""
    params: CKKSParameters | None = None
    public_context: bytes = b""
    holders: tuple[int, ...] = ()
    generator: int = 0

    @classmethod
    def load(cls, state: RecordDict) -> ServerKeys:
        if _SERVER_RECORD not in state:
            return cls()
        record = state.get_typed(_SERVER_RECORD, ConfigRecord)
        holders = record.get("holders", [])
        generator = record.get("generator", 0)
        if not isinstance(holders, list) or not isinstance(generator, int):
            raise ValueError("server key state is corrupt")
        return cls(
            phase=ServerPhase(_str(record, "phase")),
            key_id=_str(record, "key-id"),
            params=_params(record),
            public_context=_bytes(record, "public-context"),
            holders=tuple(int(h) for h in holders),
            generator=generator,
        )

    def store(self, state: RecordDict) -> None:
        record = ConfigRecord(
            {
                "phase": self.phase.value,
                "key-id": self.key_id,
                "public-context": self.public_context,
                "holders": list(self.holders),
                "generator": self.generator,
            }
        )
        if self.params is not None:
            record["params"] = self.params.to_list()
        state[_SERVER_RECORD] = record

    def after(self, event: ServerEvent, **changes: Any) -> ServerKeys:
        """This state after ``event`` (checked) with ``changes`` applied."""
        try:
            phase = SERVER_TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise RuntimeError(
                f"server key state cannot go through {event.value!r} from {self.phase.value!r}"
            ) from None
        return replace(self, phase=phase, **changes)

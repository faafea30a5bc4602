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

The server's phase is ``no-key`` or ``keyed``, and ``resumed`` for a key state
read back from a run store until nodes confirm they still hold the key (a
resumed run runs no stage again but an advertise). Every transition is checked
against a table; anything else is refused. Both
sides' state is a frozen dataclass written to the context by one
:class:`~flowerpets.core.state.StateSlot` each: a record that cannot be read
raises a :class:`~flowerpets.exceptions.StateError`, never a fresh state.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from flowerpets.core import RecordDict
from flowerpets.core.state import StateSlot, convert
from flowerpets.exceptions import KeySetupError, RequestRefusedError
from flowerpets.he._primitives.params import CKKSParameters
from flowerpets.he.protocol import HE_MESSAGE_TYPE, KEY_GENERATOR_CONFIG, Stage

__all__ = [
    "CLIENT_TRANSITIONS",
    "HE_MESSAGE_TYPE",
    "KEY_GENERATOR_CONFIG",
    "SERVER_RECORD",
    "SERVER_TRANSITIONS",
    "ClientKeys",
    "ClientPhase",
    "ServerEvent",
    "ServerKeys",
    "ServerPhase",
    "Stage",
]

_CLIENT_RECORD = "he.client"
SERVER_RECORD = "he.server"


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


# The parameters travel as CKKSParameters.to_list() in the state as on the wire.
_PARAMS = convert(CKKSParameters.to_list, CKKSParameters.from_list)


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
    params: CKKSParameters | None = field(default=None, metadata=_PARAMS)
    secret_context: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"ClientKeys(phase={self.phase.value}, key_id={self.key_id!r})"

    @classmethod
    def load(cls, state: RecordDict) -> ClientKeys:
        """The node's keys; a fresh node's if it has none (a corrupt record raises StateError)."""
        return _CLIENT_SLOT.get(state, cls())

    def store(self, state: RecordDict) -> None:
        _CLIENT_SLOT.store(state, self)

    def after(self, stage: Stage, **changes: Any) -> ClientKeys:
        """This state after ``stage`` (checked) with ``changes`` applied."""
        return replace(self, phase=client_transition(self.phase, stage), **changes)


# -- the server's side ---------------------------------------------------------------------------
class ServerPhase(enum.StrEnum):
    NO_KEY = "no-key"
    KEYED = "keyed"
    RESUMED = "resumed"  # keyed, read from a run store: its holders not yet asked again


class ServerEvent(enum.StrEnum):
    GENERATED = "generated"  # a node made the key and (some) others installed it
    ONBOARDED = "onboarded"  # newcomers installed it from a holder
    RESET = "reset"  # every holder is gone before any sealed model existed: start over
    RESUMED = "resumed"  # a new server process read the state from the run's store
    CONFIRMED = "confirmed"  # nodes of the resumed run answered that they hold its key


SERVER_TRANSITIONS: Mapping[tuple[ServerPhase, ServerEvent], ServerPhase] = MappingProxyType(
    {
        (ServerPhase.NO_KEY, ServerEvent.GENERATED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.ONBOARDED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.RESET): ServerPhase.NO_KEY,
        (ServerPhase.KEYED, ServerEvent.RESUMED): ServerPhase.RESUMED,
        # Killed again before its holders were asked: still to be asked.
        (ServerPhase.RESUMED, ServerEvent.RESUMED): ServerPhase.RESUMED,
        (ServerPhase.RESUMED, ServerEvent.CONFIRMED): ServerPhase.KEYED,
        (ServerPhase.RESUMED, ServerEvent.RESET): ServerPhase.NO_KEY,
    }
)


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What the server keeps in ``context.state["he.server"]``: nothing that can decrypt.

    The public context is the parameters alone (no key of any kind); the
    holders are the nodes that installed the key (the generator first). A run
    resumed from a store is ``RESUMED`` until nodes confirm they still hold it.
    """

    phase: ServerPhase = ServerPhase.NO_KEY
    key_id: str = ""
    params: CKKSParameters | None = field(default=None, metadata=_PARAMS)
    public_context: bytes = b""
    holders: tuple[int, ...] = ()
    generator: int = 0

    @classmethod
    def load(cls, state: RecordDict) -> ServerKeys:
        """The run's key state; a new run's if it has none (a corrupt record raises StateError)."""
        return _SERVER_SLOT.get(state, cls())

    @classmethod
    def require(cls, state: RecordDict) -> ServerKeys:
        """The key state ``state`` holds; MissingStateError if it holds none."""
        return _SERVER_SLOT.load(state)

    def store(self, state: RecordDict) -> None:
        _SERVER_SLOT.store(state, self)

    def after(self, event: ServerEvent, **changes: Any) -> ServerKeys:
        """This state after ``event`` (checked) with ``changes`` applied."""
        try:
            phase = SERVER_TRANSITIONS[(self.phase, event)]
        except KeyError:
            # The server's own code chose the event: the round fails rather than go on.
            raise KeySetupError(
                f"server key state cannot go through {event.value!r} from {self.phase.value!r}"
            ) from None
        return replace(self, phase=phase, **changes)


_CLIENT_SLOT = StateSlot(ClientKeys, _CLIENT_RECORD)
_SERVER_SLOT = StateSlot(ServerKeys, SERVER_RECORD)

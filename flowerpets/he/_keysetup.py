"""The server's side of the key set-up: which nodes are asked what, and what they must answer.

:class:`KeySetup` drives the stages of :class:`~flowerpets.he.Stage` for one
round. Every stage takes one path, :meth:`KeySetup._stage`, through one core
:class:`~flowerpets.core.StageExchange` of the set-up's own message type, so
every node's reason is kept across the stages (and travels on the
:class:`~flowerpets.exceptions.KeySetupError` that fails a round). The run's
key state, :class:`~flowerpets.he._state.ServerKeys`, lives in the context
and changes only through its transition table. The server relays wrapped keys
and keeps the parameters alone: nothing it holds can decrypt.

A run resumed from a store (:mod:`flowerpets.he._durable`) starts ``RESUMED``:
no key is made again; its first round advertises to every connected node, keeps
as holders those that answer with the run's key id and onboards the others,
and refuses with :class:`~flowerpets.exceptions.KeyHoldersGoneError` if none of
the key's holders is connected or holds it while the model is sealed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from flowerpets.core import (
    ConfigRecord,
    Failure,
    Grid,
    RecordDict,
    RoundRequest,
    ServerContext,
    StageExchange,
    is_sealed,
)
from flowerpets.core.fields import Fields
from flowerpets.exceptions import (
    InvalidUpdateError,
    KeyHoldersGoneError,
    KeyMaterialError,
    KeySetupError,
    MessageFieldError,
    ProtocolViolationError,
    RecordTypeError,
)
from flowerpets.he import protocol as wire
from flowerpets.he._primitives.params import CKKSParameters, load_public_context
from flowerpets.he._state import ServerEvent, ServerKeys, ServerPhase

__all__ = ["KeySetup"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a set-up reply the server cannot use raises (the node is recorded INVALID_REPLY): ours
# only, so a bug in the server's own code fails the round instead of blaming a node.
_INVALID = (InvalidUpdateError, MessageFieldError, KeyMaterialError, RecordTypeError)

Read = Callable[[int, Fields], object]


@dataclass(frozen=True, slots=True)
class _Advert:
    public_key: bytes
    volunteer: bool
    key_id: str


def _unique(nodes: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(nodes))


def _reset(keys: ServerKeys) -> ServerKeys:
    return keys.after(ServerEvent.RESET, key_id="", params=None, public_context=b"", holders=())


class KeySetup:
    """One round's key set-up over ``grid``: gives the connected nodes the run's CKKS key.

    :meth:`run` loads the key state from the server's context, generates a key
    through one node if the run has none (at most ``max_attempts`` nodes asked
    in turn), or shares it with the connected nodes that lack it, and stores the
    state back. :attr:`failures` holds every node's reason across the stages.
    """

    __slots__ = ("exchange", "max_attempts", "params")

    def __init__(
        self, grid: Grid, request: RoundRequest, *, params: CKKSParameters, max_attempts: int
    ) -> None:
        self.exchange = StageExchange(
            grid, round=request.round, message_type=wire.HE_MESSAGE_TYPE, timeout=request.timeout
        )
        self.params = params
        self.max_attempts = max_attempts

    @property
    def failures(self) -> dict[int, Failure]:
        """Every node's reason so far (node -> its latest failure), across the stages."""
        return self.exchange.failures

    def run(self, request: RoundRequest, context: ServerContext) -> ServerKeys:
        """The run's keys after this round's set-up (stored in ``context.state``).

        Raises :class:`KeySetupError` (the round fails) if no node could make
        the key or none holding a sealed model's key is connected, and
        :class:`KeyHoldersGoneError` (the run ends) if a resumed run's key is gone.
        """
        keys = ServerKeys.load(context.state)
        connected = list(self.exchange.grid.node_ids())
        sealed = is_sealed(request.arrays)
        if keys.phase is not ServerPhase.NO_KEY and not any(h in connected for h in keys.holders):
            if sealed and keys.phase is ServerPhase.RESUMED:
                raise KeyHoldersGoneError(
                    f"round {request.round}: the model is sealed under CKKS key {keys.key_id}, "
                    f"but none of the {len(keys.holders)} node(s) that held it is connected and "
                    "no other key can open the model: the run cannot be resumed until they are "
                    "back; the store keeps its last round"
                )
            if sealed:
                raise KeySetupError(
                    f"round {request.round}: no connected node holds the key of the sealed "
                    f"model (holders {list(keys.holders)}); the round fails until one returns"
                )
            log.warning("every holder of the CKKS key is gone before any sealed model: new key")
            keys = _reset(keys)
            keys.store(context.state)
        adverts: dict[int, _Advert] | None = None
        if keys.phase is ServerPhase.RESUMED:
            adverts = self._advertise(connected)
            keys = self._confirmed(request, keys, adverts, sealed=sealed)
            keys.store(context.state)
        if keys.phase is ServerPhase.NO_KEY:
            keys = self._generate(request, connected)
        else:
            missing = [n for n in connected if n not in keys.holders]
            if missing:
                keys = self._onboard(request, keys, connected, missing, adverts)
        keys.store(context.state)
        return keys

    def _confirmed(
        self, request: RoundRequest, keys: ServerKeys, adverts: dict[int, _Advert], *, sealed: bool
    ) -> ServerKeys:
        """A resumed run's keys once the nodes said which key they hold; refused if none holds it.

        The nodes that answer with the run's key id are its holders from now
        on; the others are onboarded like newcomers. If no node holds it any
        more (a simulation's nodes die with the server's process; a node that
        was reset holds another key or none), a sealed model can never be
        opened again: :class:`KeyHoldersGoneError` ends the run, the store
        unchanged. Without a sealed model the run makes a new key instead.
        """
        answered = [h for h in keys.holders if h in adverts]
        if not answered:
            raise KeySetupError(
                f"round {request.round}: none of the key's holders {list(keys.holders)} answered "
                "whether it still holds the key; the round fails until one does",
                failures=self.exchange.failures,
            )
        kept = [n for n, advert in adverts.items() if advert.key_id == keys.key_id]
        if kept:
            log.info(
                "round %d: %d node(s) still hold the resumed run's CKKS key %s",
                request.round,
                len(kept),
                keys.key_id,
            )
            ordered = _unique((*(h for h in keys.holders if h in kept), *kept))
            return keys.after(ServerEvent.CONFIRMED, holders=ordered)
        if not sealed:
            log.warning("no node holds the resumed run's CKKS key before any sealed model: new key")
            return _reset(keys)
        others = sorted({adverts[n].key_id for n in answered} - {""})
        held = f"{sum(not adverts[n].key_id for n in answered)} of {len(answered)} hold no key"
        if others:
            held += f", the others hold key(s) {', '.join(others[:3])}"
        raise KeyHoldersGoneError(
            f"round {request.round}: the model is sealed under CKKS key {keys.key_id}, but none "
            f"of the nodes that held it holds it any more ({held}): the nodes that held the key "
            "are gone (a simulation's nodes die with its process) and no other key can open the "
            "model, so the run cannot be resumed; the store keeps its last round"
        )

    # -- the one path of every stage -----------------------------------------------------------
    def _stage(
        self, stage: wire.Stage, asks: Iterable[tuple[int, ConfigRecord]], read: Read
    ) -> tuple[int, ...]:
        """Send each node its ask; ``read`` checks each reply's fields (raising to refuse it)."""

        def accept(node: int, body: RecordDict) -> None:
            read(node, Fields.of(body, wire.SETUP_RECORD))

        contents = [(node, RecordDict({wire.SETUP_RECORD: ask})) for node, ask in asks]
        return self.exchange.send(stage, contents, accept, invalid=_INVALID)

    def _one(
        self, stage: wire.Stage, node: int, ask: ConfigRecord, read: Callable[[Fields], T]
    ) -> T | None:
        """A one-node stage: what ``read`` makes of the reply, or None (the failure recorded)."""
        got: list[T] = []
        self._stage(stage, [(node, ask)], lambda _, fields: got.append(read(fields)))
        return got[0] if got else None

    # -- the stages ----------------------------------------------------------------------------
    def _advertise(self, nodes: Sequence[int]) -> dict[int, _Advert]:
        adverts: dict[int, _Advert] = {}

        def read(node: int, fields: Fields) -> None:
            public = fields.get(wire.FIELD_PUBLIC_KEY, bytes)
            if len(public) != wire.PUBLIC_KEY_BYTES:
                raise InvalidUpdateError("a transport public key is 32 bytes")
            volunteer = fields.get(wire.FIELD_VOLUNTEER, bool, False)
            adverts[node] = _Advert(public, volunteer, fields.get(wire.CONFIG_KEY_ID, str, ""))

        self._stage(wire.Stage.ADVERTISE, [(n, ConfigRecord()) for n in nodes], read)
        return {n: adverts[n] for n in nodes if n in adverts}  # the order asked, not of arrival

    def _wrapped(self, fields: Fields, key_id: str, recipients: Sequence[int]) -> dict[int, bytes]:
        """The wrapped keys a keygen or share reply carries, checked against the request."""
        record = fields.record
        if record.get(wire.CONFIG_KEY_ID) != key_id:
            raise ProtocolViolationError(
                f"the reply is for key {record.get(wire.CONFIG_KEY_ID)!r}, not {key_id}"
            )
        if record.get(wire.FIELD_RECIPIENTS) != list(recipients):
            raise ProtocolViolationError("the reply wraps the key for other recipients than asked")
        wrapped = fields.items(wire.FIELD_WRAPPED, bytes)
        if len(wrapped) != len(recipients):
            raise InvalidUpdateError("the reply does not carry one wrapped key per recipient")
        return dict(zip(recipients, wrapped, strict=True))

    def _made(
        self, fields: Fields, recipients: Sequence[int]
    ) -> tuple[str, bytes, dict[int, bytes]]:
        """A keygen reply: the key id, the public context and the wrapped keys, checked."""
        key_id = fields.get(wire.CONFIG_KEY_ID, str)
        if not wire.KEY_ID.fullmatch(key_id):
            raise InvalidUpdateError(f"malformed key id {key_id!r}")
        public = fields.get(wire.FIELD_PUBLIC_CONTEXT, bytes)
        # Refuses a context that carries a secret key: the server never keeps one.
        load_public_context(public, self.params)
        return key_id, public, self._wrapped(fields, key_id, recipients)

    def _generate(self, request: RoundRequest, connected: Sequence[int]) -> ServerKeys:
        adverts = self._advertise(connected)
        volunteers = [n for n, a in adverts.items() if a.volunteer]
        others = [n for n in adverts if n not in volunteers]
        secrets.SystemRandom().shuffle(others)  # no node can predict it will hold the key first
        candidates = (volunteers + others)[: self.max_attempts]
        for candidate in candidates:
            recipients = [n for n in adverts if n != candidate]
            ask = ConfigRecord(
                {
                    wire.FIELD_PARAMS: self.params.to_list(),
                    wire.FIELD_RECIPIENTS: recipients,
                    wire.FIELD_RECIPIENT_KEYS: [adverts[n].public_key for n in recipients],
                }
            )
            made = self._one(
                wire.Stage.KEYGEN, candidate, ask, partial(self._made, recipients=recipients)
            )
            if made is None:
                continue
            key_id, public, wrapped = made
            keys = ServerKeys().after(
                ServerEvent.GENERATED,
                key_id=key_id,
                params=self.params,
                public_context=public,
                holders=(candidate,),
                generator=candidate,
            )
            installed = self._install(keys, candidate, wrapped)
            log.info(
                "round %d: node %d generated the CKKS key; %d of %d others installed it",
                request.round,
                candidate,
                len(installed),
                len(recipients),
            )
            return keys.after(ServerEvent.ONBOARDED, holders=_unique((candidate, *installed)))
        failures = self.exchange.failures
        raise KeySetupError(
            f"round {request.round}: no node could generate the CKKS key "
            f"({len(candidates)} asked of {len(adverts)} that advertised): "
            + "; ".join(f"{n}: {failures[n]}" for n in candidates if n in failures),
            failures=failures,
        )

    def _onboard(
        self,
        request: RoundRequest,
        keys: ServerKeys,
        connected: Sequence[int],
        missing: Sequence[int],
        known: Mapping[int, _Advert] | None = None,
    ) -> ServerKeys:
        """Give the key to the ``missing`` nodes (``known``: their adverts, if already asked)."""
        if known is None:
            adverts = self._advertise(missing)
        else:
            adverts = {n: known[n] for n in missing if n in known}
        # A node that already holds this key (its install reply was lost) needs nothing.
        already = [n for n, a in adverts.items() if a.key_id == keys.key_id]
        newcomers = [n for n in adverts if n not in already]
        installed: list[int] = []
        if newcomers:
            # Any holder can serve: the generator first, then the others in the order they joined.
            alive = [h for h in _unique((keys.generator, *keys.holders)) if h in connected]
            for holder in alive[: self.max_attempts]:
                ask = ConfigRecord(
                    {
                        wire.CONFIG_KEY_ID: keys.key_id,
                        wire.FIELD_RECIPIENTS: newcomers,
                        wire.FIELD_RECIPIENT_KEYS: [adverts[n].public_key for n in newcomers],
                    }
                )
                read = partial(self._wrapped, key_id=keys.key_id, recipients=newcomers)
                shared = self._one(wire.Stage.SHARE, holder, ask, read)
                if shared is None:
                    continue
                installed = self._install(keys, holder, shared)
                break
            else:
                log.warning(
                    "round %d: no key holder could share the key with %d newcomer(s)",
                    request.round,
                    len(newcomers),
                )
        return keys.after(
            ServerEvent.ONBOARDED, holders=_unique((*keys.holders, *already, *installed))
        )

    def _install(self, keys: ServerKeys, sender: int, wrapped: dict[int, bytes]) -> list[int]:
        """Relay each wrapped key to its recipient; the nodes that installed it."""
        assert keys.params is not None
        asks = [
            (
                node,
                ConfigRecord(
                    {
                        wire.CONFIG_KEY_ID: keys.key_id,
                        wire.FIELD_PARAMS: keys.params.to_list(),
                        wire.FIELD_PUBLIC_CONTEXT: keys.public_context,
                        wire.FIELD_SENDER: sender,
                        wire.FIELD_WRAPPED: blob,
                    }
                ),
            )
            for node, blob in wrapped.items()
        ]

        def read(node: int, fields: Fields) -> None:
            if fields.record.get(wire.CONFIG_KEY_ID) != keys.key_id:
                raise ProtocolViolationError("the node confirms another key")

        installed = set(self._stage(wire.Stage.INSTALL, asks, read))
        return [node for node in wrapped if node in installed]  # the order asked

"""The client side of SecAgg+: a mod that answers the four stages for its node.

Put :data:`secaggplus_mod` (or a configured :class:`SecAggPlusClientMod`) first
in the ``ClientApp``'s mods, outside any mod that post-processes updates
(clipping, noise): those must run on the plain update, before it is masked.

.. code-block:: python

    app = ClientApp(mods=[secaggplus_mod, fixed_clipping_mod])

Per node and round the mod is an explicit state machine whose every transition
is checked against one table (:data:`TRANSITIONS`)::

    NEW (no round) --advertise-keys--> ADVERTISED --share-keys--> SHARED
        --collect-masked-input--> MASKED --unmask--> DONE

A stage message that does not fit (out of order, repeated, for another
session, for a stale round) is refused with
:class:`~flowerpets.exceptions.RequestRefusedError`, which the ClientApp turns
into an error reply with code ``REFUSED``; a same-round violation also aborts
the round (the node's secrets are wiped and it answers nothing more for that
round). The checks that protect an honest node from a dishonest server:

* it only accepts keys from, and only sends shares to, its own neighbours in the
  Harary graph computed from the ring order it was given, with distinct keys and
  at least ``t`` of them;
* share ciphertexts are authenticated with associated data binding session,
  round, sender and receiver: replayed, rerouted or reflected ones are refused;
* it masks only with neighbours that delivered shares (at least ``t``);
* at unmasking it refuses if the survivor and dropout lists overlap, if it is
  listed as dropped or not listed as a survivor, if a listed neighbour never
  shared keys with it, or if fewer than ``t`` of its neighbours survive; and it
  never releases both the self-mask share and the key share of one neighbour.

Protocol state (including the round's private keys and self-mask seed) lives in
``context.state`` under ``"secagg+/..."`` records (a frozen :class:`ClientState`
written by :class:`~flowerpets.core.state.StateSlot`; a record it cannot read is
refused, never taken for a new round), never in a reply, and is wiped when the
round ends. All randomness comes from ``randomness`` (default
``os.urandom``); tests inject a seeded source.

Requests of the protected types (``train`` and ``query`` by default) that are
not one of the four SecAgg+ stages (plain, stage-less requests, and any other
stage a server names) are refused unless ``refuse_plaintext=False``: a node that
runs this mod expects its updates to leave it masked, and a server that skips
SecAgg+ must not get them in the clear. Other messages (``evaluate``) pass
through untouched.
"""

from __future__ import annotations

import enum
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import boolean, integer, strings
from flowerpets.core import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    ErrorCode,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.core.fields import Fields
from flowerpets.core.state import StateSlot
from flowerpets.exceptions import (
    CorruptStateError,
    DecryptionError,
    InfeasibleParametersError,
    InvalidUpdateError,
    MessageFieldError,
    ParameterTypeError,
    ParameterValueError,
    PhaseError,
    ProtocolViolationError,
    RecordTypeError,
    RequestRefusedError,
    StateError,
)
from flowerpets.secagg._primitives import aead, keys, prg, quantize, shamir
from flowerpets.secagg.parameters import check_threshold
from flowerpets.secagg.protocol import (
    FLOAT,
    MASKED_ARRAY,
    MASKED_RECORD,
    RECORD,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_PLAINTEXT_BYTES,
    Layout,
    RoundConfig,
    Stage,
    elements_to_share,
    fields_of,
    pair_mask_seed,
    share_key,
)

__all__ = ["Phase", "SecAggPlusClientMod", "TRANSITIONS", "secaggplus_mod", "transition"]

log = logging.getLogger(__name__)

Randomness = Callable[[int], bytes]
CallNext = Callable[[Message, Context], Message]

SHAMIR = shamir.Shamir()

_STATE = "secagg+/client-state"
_STATE_CONFIG = "secagg+/client-round"

# What a server's stage request can get wrong, and so what the node refuses (REFUSED): a
# field missing or mistyped, a value the protocol forbids, a share that fails
# authentication, a threshold below the node's safe minimum. Anything else raised in a
# stage is a bug of the node's own code and is reported as one, never as the server's fault.
_REFUSABLE = (
    MessageFieldError,
    ProtocolViolationError,
    DecryptionError,
    InfeasibleParametersError,
)


class Phase(enum.StrEnum):
    """Where a node's round stands; :data:`TRANSITIONS` says which stage moves it on."""

    NEW = "new"  # no state for this round yet (never stored: the round starts at advertise-keys)
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


TRANSITIONS: Mapping[tuple[Phase, str], Phase] = MappingProxyType(
    {
        (Phase.NEW, Stage.ADVERTISE_KEYS): Phase.ADVERTISED,
        (Phase.ADVERTISED, Stage.SHARE_KEYS): Phase.SHARED,
        (Phase.SHARED, Stage.COLLECT_MASKED_INPUT): Phase.MASKED,
        (Phase.MASKED, Stage.UNMASK): Phase.DONE,
    }
)
"""(phase of the message's round, stage) -> the phase after it; every other pair is refused.

A refused pair aborts the round (ABORTED: its secrets are wiped), except where the
node has nothing to abort: a round it never started (NEW) or one it finished (DONE).
"""


def transition(phase: Phase, stage: str) -> Phase:
    """The phase after ``stage``; a stage this phase does not allow is refused."""
    after = TRANSITIONS.get((phase, stage))
    if after is None:
        needs = [p.value for (p, s), _ in TRANSITIONS.items() if s == stage]
        raise RequestRefusedError(
            f"{stage}: out of order (the round is {phase.value}, this stage needs "
            f"{' or '.join(needs) or 'nothing: it is no SecAgg+ stage'})"
        )
    return after


@dataclass(frozen=True, slots=True)
class ClientState:
    """One node's state for its current round, kept in ``context.state[_STATE]``.

    The round's :class:`RoundConfig` is kept beside it (``_STATE_CONFIG``), written
    once per round in the wire format the node received it in.
    """

    run_id: int
    round: int
    phase: Phase
    c_sk: bytes = b""
    s_sk: bytes = b""
    self_seed: bytes = b""
    neighbours: tuple[int, ...] = ()  # told at share-keys: got my shares
    share_keys: tuple[bytes, ...] = ()  # AES-GCM keys, per neighbour
    s_pks: tuple[bytes, ...] = ()
    senders: tuple[int, ...] = ()  # delivered shares to me: I mask with them
    b_shares: tuple[bytes, ...] = ()
    s_shares: tuple[bytes, ...] = ()
    released_b: tuple[int, ...] = ()
    released_s: tuple[int, ...] = ()

    def after(self, stage: str, **changes: Any) -> ClientState:
        """This state after ``stage`` (checked against :data:`TRANSITIONS`), with ``changes``."""
        return replace(self, phase=transition(self.phase, stage), **changes)

    def wiped(self, phase: Phase) -> ClientState:
        """The round ended: every secret forgotten (what was released stays recorded)."""
        return replace(self, phase=phase, **_SECRETS_WIPED)


_SECRETS_WIPED: dict[str, Any] = {
    **dict.fromkeys(("c_sk", "s_sk", "self_seed"), b""),
    **dict.fromkeys(("share_keys", "b_shares", "s_shares"), ()),
}


_SLOT = StateSlot(ClientState, _STATE)


def _load(context: Context) -> tuple[ClientState, RoundConfig] | None:
    state = _SLOT.get(context.state)
    if state is None:
        return None
    record = context.state.get(_STATE_CONFIG)
    if not isinstance(record, ConfigRecord):
        raise CorruptStateError(f"state {_STATE_CONFIG!r} holds no ConfigRecord")
    try:
        config = RoundConfig.from_record(Fields(record, _STATE_CONFIG))
    except (MessageFieldError, ProtocolViolationError) as exc:
        raise CorruptStateError(f"state {_STATE_CONFIG!r} cannot be read: {exc}") from None
    return state, config


@dataclass(frozen=True, slots=True)
class _StageRequest:
    """One stage message, parsed as far as every stage needs."""

    msg: Message
    context: Context
    body: Fields
    round: tuple[ClientState, RoundConfig] | None  # None only for advertise-keys: it starts one
    call_next: CallNext

    def unpack(self) -> tuple[Message, Context, Fields, ClientState, RoundConfig]:
        if self.round is None:
            raise PhaseError("this stage needs a round in progress")
        return self.msg, self.context, self.body, *self.round


class _DownstreamError(Exception):
    """Carries what the mods and handler after this one raised past this mod's own checks."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _unique(values: Sequence[Any], what: str) -> None:
    if len(set(values)) != len(values):
        raise ProtocolViolationError(f"{what} lists an entry twice")


def _message_type(name: str) -> None:
    if not name:
        raise ParameterValueError("every item of protected_types must be a non-empty str")


class SecAggPlusClientMod:
    """The SecAgg+ client mod (see the module docstring).

    Keyword-only configuration:

    ``protected_types``
        Message types whose replies leave the node only masked (default
        ``("train", "query")``).
    ``refuse_plaintext``
        Refuse requests of the protected types that are not SecAgg+ stages
        (stage-less or any foreign stage; default True; turning it off warns).
    ``min_threshold``
        The smallest Shamir threshold the node accepts from a server (default 2).
    ``randomness``
        ``n -> n random bytes`` for keys, seeds, sharing polynomials, nonces and
        stochastic rounding (default ``os.urandom``; inject a seeded source only in tests).
    """

    def __init__(
        self,
        *,
        protected_types: Iterable[str] = (MessageType.TRAIN, MessageType.QUERY),
        refuse_plaintext: bool = True,
        min_threshold: int = 2,
        randomness: Randomness = os.urandom,
    ) -> None:
        types = strings("protected_types", protected_types, check=_message_type)
        if not boolean("refuse_plaintext", refuse_plaintext):
            warnings.warn(
                "SecAggPlusClientMod(refuse_plaintext=False): this node will send its "
                f"{'/'.join(types)} replies in the clear to a server that does not run SecAgg+",
                stacklevel=2,
            )
        min_threshold = integer("min_threshold", min_threshold, at_least=2)
        if not callable(randomness):
            raise ParameterTypeError(
                f"randomness must be callable as randomness(n) -> bytes, got {randomness!r}"
            )
        self.protected_types = types
        self.refuse_plaintext = refuse_plaintext
        self._handlers: dict[str, Callable[[_StageRequest], Message]] = {
            Stage.ADVERTISE_KEYS: self._advertise,
            Stage.SHARE_KEYS: self._share_keys,
            Stage.COLLECT_MASKED_INPUT: self._collect_masked_input,
            Stage.UNMASK: self._unmask,
        }
        self.min_threshold = min_threshold
        self.randomness = randomness

    def __repr__(self) -> str:
        return (
            f"SecAggPlusClientMod(protected_types={self.protected_types!r}, "
            f"refuse_plaintext={self.refuse_plaintext}, min_threshold={self.min_threshold})"
        )

    # -- dispatch --------------------------------------------------------------
    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        stage = msg.metadata.stage
        if stage in Stage.ALL:
            return self._run_stage(stage, msg, context, call_next)
        if stage.startswith(Stage.PREFIX):
            raise RequestRefusedError(f"unknown SecAgg+ stage {stage!r}")
        # Any other stage, empty or foreign, would reach the handler and leave in the clear.
        if msg.message_type in self.protected_types and self.refuse_plaintext:
            what = f"stage {stage!r}" if stage else "a plain request"
            raise RequestRefusedError(
                f"this node sends {msg.message_type!r} replies only through SecAgg+; "
                f"it refuses {what}, which is not a SecAgg+ stage"
            )
        return call_next(msg, context)

    def _run_stage(
        self, stage: str, msg: Message, context: Context, call_next: CallNext
    ) -> Message:
        current = self._check_transition(stage, msg, context)
        state = None if current is None else current[0]
        try:
            body = fields_of(msg.content)
            if current is not None and body.get("session", bytes) != current[1].session:
                raise ProtocolViolationError("the message belongs to another session")
            handler = self._handlers[stage]
            return handler(_StageRequest(msg, context, body, current, call_next))
        except _DownstreamError as wrapped:
            downstream = wrapped.error
        except InvalidUpdateError as exc:
            # The node's own update cannot be masked: not a refusal, an invalid reply.
            _abort(state, context)
            return msg.error_reply(Error(ErrorCode.INVALID_REPLY, str(exc)))
        except _REFUSABLE as exc:
            _abort(state, context)
            raise RequestRefusedError(f"{stage}: {exc}") from None
        except BaseException:
            # A bug of this node's own code: the round cannot go on, but nothing is refused.
            _abort(state, context)
            raise
        # What the mods and handler after this one raised is not this mod's refusal (its
        # message may hold anything): it goes on as it is, and the ClientApp reports it
        # as it would without this mod.
        raise downstream

    def _check_transition(
        self, stage: str, msg: Message, context: Context
    ) -> tuple[ClientState, RoundConfig] | None:
        """The round this stage goes on with (None: it starts one), or a refusal saying why not."""
        try:
            loaded = _load(context)
        except StateError as exc:
            raise RequestRefusedError(
                f"{stage}: the node's SecAgg+ state is unreadable: {exc}"
            ) from None
        run_id, rnd = msg.metadata.run_id, msg.round
        current = loaded if loaded is not None and loaded[0].run_id == run_id else None
        if current is None or rnd > current[0].round:  # a round this node has not started
            if stage == Stage.ADVERTISE_KEYS:
                return None
            raise RequestRefusedError(f"{stage}: no SecAgg+ round {rnd} in progress (out of order)")
        state = current[0]
        if stage == Stage.ADVERTISE_KEYS:  # nothing to abort: the round goes on
            raise RequestRefusedError(
                f"{stage}: round {rnd} is not after round {state.round}, which this node "
                "already started (a stale or repeated round)"
            )
        if rnd < state.round:
            raise RequestRefusedError(f"{stage}: round {rnd} is stale (round {state.round} runs)")
        try:
            transition(state.phase, stage)
        except RequestRefusedError as exc:
            _abort(state, context)
            raise RequestRefusedError(f"{exc}; the round is aborted") from None
        return current

    # -- stage 0: advertise keys -------------------------------------------------
    def _advertise(self, request: _StageRequest) -> Message:
        msg, context, body = request.msg, request.context, request.body
        config = RoundConfig.from_record(body)
        if context.node_id not in config.graph:
            raise ProtocolViolationError(f"node {context.node_id} is not in the round's cohort")
        if config.threshold < self.min_threshold:
            raise ProtocolViolationError(
                f"threshold {config.threshold} is below this node's minimum {self.min_threshold}"
            )
        check_threshold(len(config.order), config.degree, config.threshold)
        c_sk = keys.generate_private_key(self.randomness)
        s_sk = keys.generate_private_key(self.randomness)
        state = ClientState(
            run_id=msg.metadata.run_id,
            round=msg.round,
            phase=transition(Phase.NEW, Stage.ADVERTISE_KEYS),
            c_sk=keys.private_bytes(c_sk),
            s_sk=keys.private_bytes(s_sk),
        )
        context.state[_STATE_CONFIG] = config.to_record()
        _SLOT.store(context.state, state)
        reply = ConfigRecord(
            {
                "session": config.session,
                "c-pk": keys.public_bytes(c_sk),
                "s-pk": keys.public_bytes(s_sk),
            }
        )
        return msg.reply(RecordDict({RECORD: reply}))

    # -- stage 1: share keys -----------------------------------------------------
    def _share_keys(self, request: _StageRequest) -> Message:
        msg, context, body, state, config = request.unpack()
        me, graph = context.node_id, config.graph
        nodes = body.items("nodes", int)
        c_pks = body.items("c-pks", bytes, size=keys.KEY_BYTES)
        s_pks = body.items("s-pks", bytes, size=keys.KEY_BYTES)
        if not len(nodes) == len(c_pks) == len(s_pks):
            raise ProtocolViolationError("nodes, c-pks and s-pks differ in length")
        _unique(nodes, "the neighbour list")
        strangers = [
            j for j in nodes if j == me or j not in graph or not graph.are_neighbours(me, j)
        ]
        if strangers:
            raise ProtocolViolationError(f"nodes {strangers[:5]} are not this node's neighbours")
        own = {keys.public_key_of(state.c_sk), keys.public_key_of(state.s_sk)}
        for what, pks in (("c-pks", c_pks), ("s-pks", s_pks)):
            _unique(pks, what)
            if own & set(pks):
                raise ProtocolViolationError(f"{what} holds this node's own public key")
        if len(nodes) < config.threshold:
            raise ProtocolViolationError(
                f"only {len(nodes)} of this node's {config.degree} neighbours advertised keys, "
                f"fewer than the threshold t={config.threshold}"
            )
        self_seed = self.randomness(prg.SEED_BYTES)
        secret = np.concatenate(
            [shamir.bytes_to_elements(self_seed), shamir.bytes_to_elements(state.s_sk)]
        )
        points = [graph.share_point(me, j) for j in nodes]
        shares = SHAMIR.split(secret, config.threshold, points, self.randomness)
        half = shares.shape[1] // 2
        c_private = keys.load_private_key(state.c_sk)
        # One AES-GCM key per pair, both directions (the associated data tells them apart).
        pair_keys = [share_key(c_private, c_pk, session=config.session) for c_pk in c_pks]
        ciphertexts = []
        for j, key, row in zip(nodes, pair_keys, shares, strict=True):
            plaintext = elements_to_share(row[:half]) + elements_to_share(row[half:])
            associated = aead.associated_data(
                session=config.session, round=state.round, sender=me, receiver=j
            )
            ciphertexts.append(aead.encrypt(key, plaintext, associated, self.randomness))
        state = state.after(
            Stage.SHARE_KEYS,
            self_seed=self_seed,
            c_sk=b"",  # the encryption key pair has done its job
            neighbours=tuple(nodes),
            share_keys=tuple(pair_keys),
            s_pks=tuple(s_pks),
        )
        _SLOT.store(context.state, state)
        reply = ConfigRecord(
            {"session": config.session, "receivers": nodes, "ciphertexts": ciphertexts}
        )
        return msg.reply(RecordDict({RECORD: reply}))

    # -- stage 2: collect masked input ---------------------------------------------
    def _collect_masked_input(self, request: _StageRequest) -> Message:
        msg, context, body, state, config = request.unpack()
        call_next, me = request.call_next, context.node_id
        senders = body.items("senders", int)
        ciphertexts = body.items("ciphertexts", bytes, size=SHARE_CIPHERTEXT_BYTES)
        if len(senders) != len(ciphertexts):
            raise ProtocolViolationError("senders and ciphertexts differ in length")
        _unique(senders, "the sender list")
        index = {j: i for i, j in enumerate(state.neighbours)}
        strangers = [j for j in senders if j not in index]
        if strangers:
            raise ProtocolViolationError(f"nodes {strangers[:5]} never received this node's keys")
        if len(senders) < config.threshold:
            raise ProtocolViolationError(
                f"only {len(senders)} neighbours delivered shares, fewer than the threshold "
                f"t={config.threshold}"
            )
        b_shares, s_shares = [], []
        for j, ciphertext in zip(senders, ciphertexts, strict=True):
            key = state.share_keys[index[j]]
            associated = aead.associated_data(
                session=config.session, round=state.round, sender=j, receiver=me
            )
            plaintext = aead.decrypt(key, ciphertext, associated)
            if len(plaintext) != SHARE_PLAINTEXT_BYTES:
                raise ProtocolViolationError(f"the shares from node {j} have the wrong length")
            b_shares.append(plaintext[:SHARE_BYTES])
            s_shares.append(plaintext[SHARE_BYTES:])
        state = replace(
            state, senders=tuple(senders), b_shares=tuple(b_shares), s_shares=tuple(s_shares)
        )

        content = msg.require_content()
        inner = Message(
            metadata=replace(msg.metadata, stage=""),
            content=RecordDict({k: content[k] for k in ("arrays", "config") if k in content}),
        )
        try:
            reply = call_next(inner, context)
        except Exception as exc:
            _abort(state, context)
            raise _DownstreamError(exc) from exc
        except BaseException:
            _abort(state, context)
            raise
        if reply.error is not None:
            _abort(state, context)
            return msg.error_reply(reply.error)
        vector, layout = self._masked_vector(reply.require_content(), state, config, context)
        _SLOT.store(context.state, state.after(Stage.COLLECT_MASKED_INPUT))
        record = ConfigRecord({"session": config.session})
        layout.write(record)
        masked = ArrayRecord({MASKED_ARRAY: Array(vector, copy=False)})
        return msg.reply(RecordDict({RECORD: record, MASKED_RECORD: masked}))

    def _masked_vector(
        self, reply: RecordDict, state: ClientState, config: RoundConfig, context: Context
    ) -> tuple[NDArray[np.uint32], Layout]:
        me = context.node_id
        try:
            arrays = reply.get_typed("arrays", ArrayRecord) if "arrays" in reply else ArrayRecord()
            metrics = (
                reply.get_typed("metrics", MetricRecord) if "metrics" in reply else MetricRecord()
            )
            layout = Layout.of_arrays(arrays, config.secure_metrics)
        except (InvalidUpdateError, RecordTypeError) as exc:
            raise InvalidUpdateError(f"the handler's reply cannot be masked: {exc}") from None
        weight = _weight(metrics, config.weight_key, config.max_weight)
        quant = config.quantization
        vector = np.zeros(layout.length, dtype=np.uint32)
        uniform = prg.UniformStream(
            self.randomness(prg.SEED_BYTES), block_words=quantize.BLOCK_WORDS
        )
        factor, limit = quant.float_factor(weight), quant.float_limit(weight)
        clipped, at = 0, 0
        for (name, array), kind in zip(arrays.items(), layout.kinds, strict=True):
            data = array.numpy()
            out = vector[at : at + data.size]
            if kind == FLOAT:
                clipped += quantize.quantize_into(
                    out, data, factor=factor, limit=limit, uniform=uniform
                )
            else:
                try:
                    quantize.encode_integers_into(
                        out, data, weight=weight, limit=quant.integer_limit(weight)
                    )
                except InvalidUpdateError as exc:
                    raise InvalidUpdateError(f"array {name!r}: {exc}") from None
            at += data.size
        vector[layout.weight_index] = weight
        values = np.array([_metric(metrics, key) for key in config.secure_metrics], np.float64)
        tail = vector[layout.weight_index + 1 : layout.clip_index]
        clipped += quantize.quantize_into(tail, values, factor=factor, limit=limit, uniform=uniform)
        vector[layout.clip_index] = 1 if clipped else 0
        if clipped:
            log.warning(
                "node %s: %d value(s) outside the clipping range +-%g were clipped before masking",
                me,
                clipped,
                config.clipping_range,
            )
        # Masks: the self mask, and one pairwise mask per neighbour that delivered shares,
        # added by the smaller node id and subtracted by the larger one.
        s_private = keys.load_private_key(state.s_sk)
        index = {j: i for i, j in enumerate(state.neighbours)}
        add, subtract = [state.self_seed], list[bytes]()
        for j in state.senders:
            seed = pair_mask_seed(
                s_private, state.s_pks[index[j]], session=config.session, round=state.round
            )
            (add if me < j else subtract).append(seed)
        prg.apply_masks(vector, add=add, subtract=subtract)
        return vector, layout

    # -- stage 3: unmask -----------------------------------------------------------
    def _unmask(self, request: _StageRequest) -> Message:
        msg, context, body, state, config = request.unpack()
        me = context.node_id
        survivors = set(body.items("survivors", int))
        dropped = set(body.items("dropped", int))
        if survivors & dropped:
            raise ProtocolViolationError(
                f"nodes {sorted(survivors & dropped)[:5]} are listed as both survivors and dropped"
            )
        if me in dropped:
            raise ProtocolViolationError("this node is listed as dropped")
        if me not in survivors:
            raise ProtocolViolationError("this node is not listed as a survivor")
        mine = set(config.graph.neighbours(me))
        listed = (survivors | dropped) & mine
        unknown = listed - set(state.senders)
        if unknown:
            raise ProtocolViolationError(
                f"neighbours {sorted(unknown)[:5]} never shared keys with this node"
            )
        alive = survivors & mine
        if len(alive) < config.threshold:
            raise ProtocolViolationError(
                f"only {len(alive)} of this node's neighbours survive, fewer than the threshold "
                f"t={config.threshold}"
            )
        b_nodes, b_shares, s_nodes, s_shares = [], [], [], []
        for j, b_share, s_share in zip(state.senders, state.b_shares, state.s_shares, strict=True):
            if j in survivors:
                b_nodes.append(j)
                b_shares.append(b_share)
            elif j in dropped:
                s_nodes.append(j)
                s_shares.append(s_share)
        # Never both kinds for one neighbour, whatever earlier requests asked.
        both = (set(b_nodes) | set(state.released_b)) & (set(s_nodes) | set(state.released_s))
        if both:
            raise ProtocolViolationError(
                f"releasing both kinds of share for nodes {sorted(both)[:5]}"
            )
        state = state.after(
            Stage.UNMASK,
            released_b=tuple(sorted(set(state.released_b) | set(b_nodes))),
            released_s=tuple(sorted(set(state.released_s) | set(s_nodes))),
        )
        _SLOT.store(context.state, state.wiped(Phase.DONE))
        reply = ConfigRecord(
            {
                "session": config.session,
                "b-nodes": b_nodes,
                "b-shares": b_shares,
                "s-nodes": s_nodes,
                "s-shares": s_shares,
            }
        )
        return msg.reply(RecordDict({RECORD: reply}))


def _abort(state: ClientState | None, context: Context) -> None:
    if state is not None and state.phase != Phase.DONE:
        _SLOT.store(context.state, state.wiped(Phase.ABORTED))


def _weight(metrics: MetricRecord, key: str | None, max_weight: int) -> int:
    if key is None:
        return 1
    if key not in metrics:
        raise InvalidUpdateError(f"the reply lacks the weight metric {key!r}")
    # The reasons below travel in the clear: they say what is wrong, never the value (a
    # server may name any metric as the weight key, or send max_weight=1 to read it).
    value = metrics[key]
    if isinstance(value, list) or not float(value).is_integer():
        raise InvalidUpdateError(
            f"the weight metric {key!r} must be a whole number under SecAgg+; it is not"
        )
    weight = int(value)
    if not 0 <= weight <= max_weight:
        raise InvalidUpdateError(
            f"the weight metric {key!r} is outside [0, max_weight={max_weight}]"
        )
    return weight


def _metric(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise InvalidUpdateError(f"the reply lacks the secure metric {key!r}")
    value = metrics[key]
    if isinstance(value, list):
        raise InvalidUpdateError(f"the secure metric {key!r} must be a number, got a list")
    return float(value)


secaggplus_mod = SecAggPlusClientMod()
"""The SecAgg+ client mod with its secure defaults."""

"""The SecAgg+ stages as a node answers them: one function per stage.

Each takes the node's settings (:class:`NodeSettings`: its randomness, the
least threshold it accepts, its threat model and, in malicious mode, the
identities and its own identity key) and one parsed :class:`StageRequest`, checks what
the server sent against what an honest server would send, and answers; a
check that fails raises one of our protocol errors
(:class:`~flowerpets.exceptions.ProtocolViolationError`,
:class:`~flowerpets.exceptions.MessageFieldError`, ...), which the mod turns
into a refusal. :data:`STAGES` maps each stage name to its function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from flowerpets.core import (
    BINDING_KEY,
    MODULUS_BITS_KEY,
    NAMES_KEY,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flowerpets.core.fields import Fields
from flowerpets.exceptions import (
    FlowerpetsError,
    InconsistentViewError,
    InvalidUpdateError,
    MessageFieldError,
    NotEnrolledError,
    ProtocolViolationError,
    RecordTypeError,
    UsageError,
)
from flowerpets.secagg._node_state import (
    SLOT,
    STATE_CONFIG,
    ClientState,
    Phase,
    abort,
    transition,
)
from flowerpets.secagg._primitives import aead, keys, prg, quantize, shamir
from flowerpets.secagg.identity import IdentityKey, NodeIdentities
from flowerpets.secagg.parameters import check_threshold
from flowerpets.secagg.protocol import (
    FLOAT,
    MASKED_ARRAY,
    MASKED_RECORD,
    MODULAR,
    RECORD,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_PLAINTEXT_BYTES,
    SIGNATURE_BYTES,
    Layout,
    RoundConfig,
    Stage,
    advertisement,
    elements_to_share,
    pair_mask_seed,
    share_key,
    survivor_set,
    survivor_sets,
)
from flowerpets.secagg.threat import ThreatModel

__all__ = ["STAGES", "DownstreamError", "NodeSettings", "StageRequest", "inner_config"]

log = logging.getLogger("flowerpets.secagg.client")  # the mod's logger: one name for the node side

Randomness = Callable[[int], bytes]
CallNext = Callable[[Message, Context], Message]

SHAMIR = shamir.Shamir()


class NodeSettings(Protocol):
    """What a stage reads of the mod: where randomness comes from, the least threshold,
    the threat model, and (malicious mode) the identities and this node's key."""

    @property
    def randomness(self) -> Randomness: ...

    @property
    def min_threshold(self) -> int: ...

    @property
    def model(self) -> ThreatModel: ...

    @property
    def identities(self) -> NodeIdentities | None: ...

    @property
    def require_quorum(self) -> bool: ...

    def identity_key(self, context: Context) -> IdentityKey: ...


def _identities(node: NodeSettings) -> NodeIdentities:
    if node.identities is None:  # resolve() refuses a signed threat model without them
        raise UsageError("a signed SecAgg+ round needs identities")
    return node.identities


@dataclass(frozen=True, slots=True)
class StageRequest:
    """One stage message, parsed as far as every stage needs."""

    msg: Message
    context: Context
    body: Fields
    round: tuple[ClientState, RoundConfig] | None  # None only for advertise-keys: it starts one
    call_next: CallNext

    def unpack(self) -> tuple[Message, Context, Fields, ClientState, RoundConfig]:
        if self.round is None:
            raise UsageError("this stage needs a round in progress")
        return self.msg, self.context, self.body, *self.round


class DownstreamError(FlowerpetsError):
    """Carries what the mods and handler after this one raised past this mod's own checks.

    It never leaves the mod: the mod takes ``error`` out and raises it as it was, so a
    later mod's exception is reported as its own, never as this node's refusal.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _enough(
    count: int,
    what: str,
    config: RoundConfig,
    error: type[ProtocolViolationError] = ProtocolViolationError,
) -> None:
    """At least ``t`` of something, or the server is refused."""
    if count < config.threshold:
        raise error(f"only {count} {what}, fewer than the threshold t={config.threshold}")


def _unique(values: Sequence[Any], what: str) -> None:
    if len(set(values)) != len(values):
        raise ProtocolViolationError(f"{what} lists an entry twice")


# -- stage 0: advertise keys -------------------------------------------------
def advertise_keys(node: NodeSettings, request: StageRequest) -> Message:
    msg, context, body = request.msg, request.context, request.body
    config = RoundConfig.from_record(body)
    me = context.node_id
    if config.threat != node.model.threat:
        # Either way round: a node of the malicious mode is never downgraded.
        raise ProtocolViolationError(
            f"the round is {config.threat.value}; this node takes part in "
            f"{node.model.threat.value} rounds only"
        )
    if me not in config.graph:
        raise ProtocolViolationError(f"node {me} is not in the round's cohort")
    if config.threshold < node.min_threshold:
        raise ProtocolViolationError(
            f"threshold {config.threshold} is below this node's minimum {node.min_threshold}"
        )
    check_threshold(len(config.order), config.degree, config.threshold, threat=config.threat)
    if node.require_quorum and not config.quorum and not config.graph.is_complete:
        # The neighbours' signatures alone let far-apart parts of the ring see different
        # survivor sets (docs/secagg.md, regional views): this node asks for the cohort's.
        raise ProtocolViolationError(
            "this node unmasks only for a survivor set signed by a quorum of the cohort; "
            "the round sets none"
        )
    signer = None
    if node.model.signed:
        identities = _identities(node)
        sybils = [j for j in config.order if j not in identities]
        if sybils:
            raise NotEnrolledError(f"nodes {sybils[:5]} of the ring order are not enrolled")
        signer = node.identity_key(context)
    c_sk = keys.generate_private_key(node.randomness)
    s_sk = keys.generate_private_key(node.randomness)
    state = ClientState(
        run_id=msg.metadata.run_id,
        round=msg.round,
        phase=transition(Phase.NEW, Stage.ADVERTISE_KEYS, config.threat),
        c_sk=keys.private_bytes(c_sk),
        s_sk=keys.private_bytes(s_sk),
    )
    context.state[STATE_CONFIG] = config.to_record()
    SLOT.store(context.state, state)
    c_pk, s_pk = keys.public_bytes(c_sk), keys.public_bytes(s_sk)
    reply = ConfigRecord({"session": config.session, "c-pk": c_pk, "s-pk": s_pk})
    if signer is not None:
        reply["signature"] = signer.sign(advertisement(config, msg.round, me, c_pk, s_pk))
    return msg.reply(RecordDict({RECORD: reply}))


# -- stage 1: share keys -----------------------------------------------------
def share_keys(node: NodeSettings, request: StageRequest) -> Message:
    msg, context, body, state, config = request.unpack()
    me, graph = context.node_id, config.graph
    nodes = body.items("nodes", int)
    c_pks = body.items("c-pks", bytes, size=keys.KEY_BYTES)
    s_pks = body.items("s-pks", bytes, size=keys.KEY_BYTES)
    if not len(nodes) == len(c_pks) == len(s_pks):
        raise ProtocolViolationError("nodes, c-pks and s-pks differ in length")
    _unique(nodes, "the neighbour list")
    strangers = [j for j in nodes if j == me or j not in graph or not graph.are_neighbours(me, j)]
    if strangers:
        raise ProtocolViolationError(f"nodes {strangers[:5]} are not this node's neighbours")
    own = {keys.public_key_of(state.c_sk), keys.public_key_of(state.s_sk)}
    for what, pks in (("c-pks", c_pks), ("s-pks", s_pks)):
        _unique(pks, what)
        if own & set(pks):
            raise ProtocolViolationError(f"{what} holds this node's own public key")
    _enough(len(nodes), f"of this node's {config.degree} neighbours advertised keys", config)
    if node.model.signed:
        _verify_advertisements(_identities(node), body, config, state.round, nodes, c_pks, s_pks)
    self_seed = node.randomness(prg.SEED_BYTES)
    secret = np.concatenate(
        [shamir.bytes_to_elements(self_seed), shamir.bytes_to_elements(state.s_sk)]
    )
    points = [graph.share_point(me, j) for j in nodes]
    shares = SHAMIR.split(secret, config.threshold, points, node.randomness)
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
        ciphertexts.append(aead.encrypt(key, plaintext, associated, node.randomness))
    state = state.after(
        Stage.SHARE_KEYS,
        config.threat,
        self_seed=self_seed,
        c_sk=b"",  # the encryption key pair has done its job
        neighbours=tuple(nodes),
        share_keys=tuple(pair_keys),
        s_pks=tuple(s_pks),
    )
    SLOT.store(context.state, state)
    reply = ConfigRecord(
        {"session": config.session, "receivers": nodes, "ciphertexts": ciphertexts}
    )
    return msg.reply(RecordDict({RECORD: reply}))


def _verify_advertisements(
    identities: NodeIdentities,
    body: Fields,
    config: RoundConfig,
    round: int,
    nodes: Sequence[int],
    c_pks: Sequence[bytes],
    s_pks: Sequence[bytes],
) -> None:
    """Each neighbour's keys must carry its enrolled identity key's signature over this
    round's configuration (session, ring order, ...), the round, its id and both keys."""
    signed = body.items("signatures", bytes, size=SIGNATURE_BYTES)
    if len(signed) != len(nodes):
        raise ProtocolViolationError("nodes and signatures differ in length")
    for j, c_pk, s_pk, signature in zip(nodes, c_pks, s_pks, signed, strict=True):
        identities.verify(
            j,
            signature,
            advertisement(config, round, j, c_pk, s_pk),
            what=f"the key advertisement of node {j}",
        )


# -- stage 2: collect masked input ---------------------------------------------
def collect_masked_input(node: NodeSettings, request: StageRequest) -> Message:
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
    _enough(len(senders), "neighbours delivered shares", config)
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
    inner_content = RecordDict({k: content[k] for k in ("arrays", "config") if k in content})
    if "config" in content or config.quantized is not None:
        inner_content["config"] = inner_config(content, config)
    inner = Message(metadata=replace(msg.metadata, stage=""), content=inner_content)
    try:
        reply = call_next(inner, context)
    except Exception as exc:
        abort(state, context)
        raise DownstreamError(exc) from exc
    except BaseException:
        abort(state, context)
        raise
    if reply.error is not None:
        abort(state, context)
        return msg.error_reply(reply.error)
    vector, layout = _masked_vector(node, reply.require_content(), state, config, context)
    SLOT.store(context.state, state.after(Stage.COLLECT_MASKED_INPUT, config.threat))
    record = ConfigRecord({"session": config.session})
    layout.write(record)
    masked = ArrayRecord({MASKED_ARRAY: Array(vector, copy=False)})
    return msg.reply(RecordDict({RECORD: record, MASKED_RECORD: masked}))


_DOMAIN_KEYS = frozenset({MODULUS_BITS_KEY, NAMES_KEY, BINDING_KEY})


def inner_config(content: RecordDict, config: RoundConfig | None) -> ConfigRecord:
    """The train config the mods and handler inside this mod see.

    Its quantized-domain keys (:data:`~flowerpets.core.MODULUS_BITS_KEY`,
    :data:`~flowerpets.core.NAMES_KEY`, :data:`~flowerpets.core.BINDING_KEY`) are this
    mod's to set: from the round's
    configuration (the one whose digest a malicious-mode round signs) when it
    has a quantized domain; any value the server put there itself is removed.
    """
    sent = content.get("config", ConfigRecord())
    if not isinstance(sent, ConfigRecord):
        raise MessageFieldError("the train message's 'config' is not a ConfigRecord")
    values = {k: v for k, v in sent.items() if k not in _DOMAIN_KEYS}
    if config is not None and config.quantized is not None:
        values.update(config.quantized.config_entries())
    return ConfigRecord(values)


def _masked_vector(
    node: NodeSettings, reply: RecordDict, state: ClientState, config: RoundConfig, context: Context
) -> tuple[NDArray[np.uint32], Layout]:
    me = context.node_id
    try:
        arrays = reply.get_typed("arrays", ArrayRecord) if "arrays" in reply else ArrayRecord()
        metrics = reply.get_typed("metrics", MetricRecord) if "metrics" in reply else MetricRecord()
        layout = Layout.of_arrays(arrays, config.secure_metrics, modular=config.modular_names)
    except (InvalidUpdateError, RecordTypeError) as exc:
        raise InvalidUpdateError(f"the handler's reply cannot be masked: {exc}") from None
    missing = [name for name in config.modular_names if name not in arrays]
    if missing:
        raise InvalidUpdateError(
            f"the handler's reply lacks the arrays {missing[:4]} of the round's quantized domain"
        )
    weight = _weight(metrics, config.weight_key, config.max_weight)
    quant = config.quantization
    vector = np.zeros(layout.length, dtype=np.uint32)
    uniform = prg.UniformStream(node.randomness(prg.SEED_BYTES), block_words=quantize.BLOCK_WORDS)
    factor, limit = quant.float_factor(weight), quant.float_limit(weight)
    clipped, at = 0, 0
    for (name, array), kind in zip(arrays.items(), layout.kinds, strict=True):
        data = array.numpy()
        out = vector[at : at + data.size]
        if kind == FLOAT:
            clipped += quantize.quantize_into(
                out, data, factor=factor, limit=limit, uniform=uniform
            )
        elif kind == MODULAR and config.quantized is not None:
            # Residues below 2**bits <= 2**32: the words are the values, unweighted.
            np.copyto(out, config.quantized.check_residues(name, data).reshape(-1), "unsafe")
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


# -- checks on the survivors the server names --------------------------------------
def _check_survivors(
    me: int, survivors: set[int], dropped: set[int], state: ClientState, config: RoundConfig
) -> None:
    """What an honest server's survivor and dropout lists always satisfy for this node."""
    if survivors & dropped:
        raise ProtocolViolationError(
            f"nodes {sorted(survivors & dropped)[:5]} are listed as both survivors and dropped"
        )
    if me in dropped:
        raise ProtocolViolationError("this node is listed as dropped")
    if me not in survivors:
        raise ProtocolViolationError("this node is not listed as a survivor")
    # Only the ring order's nodes are in the round: an enrolled node outside it (one the
    # server may collude with) must not be a survivor whose signature counts for the quorum.
    outside = sorted(j for j in survivors | dropped if j not in config.graph)
    if outside:
        raise ProtocolViolationError(f"nodes {outside[:5]} are not in the round's cohort")
    mine = set(config.graph.neighbours(me))
    listed = (survivors | dropped) & mine
    unknown = listed - set(state.senders)
    if unknown:
        raise ProtocolViolationError(
            f"neighbours {sorted(unknown)[:5]} never shared keys with this node"
        )
    alive = survivors & mine
    _enough(len(alive), "of this node's neighbours survive", config)


# -- stage 3 (malicious mode): consistency check ---------------------------------------
def consistency_check(node: NodeSettings, request: StageRequest) -> Message:
    """Sign the survivor set the server names (once per round: the table allows one)."""
    msg, context, body, state, config = request.unpack()
    me = context.node_id
    listed = body.items("survivors", int)
    _unique(listed, "the survivor list")
    survivors = set(listed)
    _check_survivors(me, survivors, set(), state, config)
    signed = tuple(sorted(survivors))
    signature = node.identity_key(context).sign(survivor_set(config, state.round, me, signed))
    SLOT.store(
        context.state, state.after(Stage.CONSISTENCY_CHECK, config.threat, signed_set=signed)
    )
    reply = ConfigRecord({"session": config.session, "signature": signature})
    return msg.reply(RecordDict({RECORD: reply}))


def _verify_consistency(
    identities: NodeIdentities,
    body: Fields,
    me: int,
    survivors: set[int],
    state: ClientState,
    config: RoundConfig,
) -> None:
    """The unmask request's survivors must be the set this node signed, and at least ``t``
    of its neighbours must have signed that same set (their signatures travel with it)."""
    if tuple(sorted(survivors)) != state.signed_set:
        differ = sorted(survivors.symmetric_difference(state.signed_set))
        raise InconsistentViewError(
            f"the survivors differ from the set this node signed at the consistency check "
            f"(in one and not the other: nodes {differ[:5]})"
        )
    signers = body.items("signers", int)
    signed = body.items("signatures", bytes, size=SIGNATURE_BYTES)
    if len(signers) != len(signed):
        raise ProtocolViolationError("signers and signatures differ in length")
    _unique(signers, "the signer list")
    mine = set(config.graph.neighbours(me))
    if config.quorum:  # signers from the whole cohort: survivors other than this node
        strangers = [j for j in signers if j == me or j not in survivors]
        if strangers:
            raise ProtocolViolationError(f"nodes {strangers[:5]} are no other survivors")
    else:
        strangers = [j for j in signers if j not in mine or j not in survivors]
        if strangers:
            raise ProtocolViolationError(f"nodes {strangers[:5]} are no surviving neighbours")
    signed_by = survivor_sets(config, state.round, state.signed_set)
    for j, signature in zip(signers, signed, strict=True):
        identities.verify(
            j, signature, signed_by(j), what=f"node {j}'s signature of the survivor set"
        )
    _enough(
        len(mine.intersection(signers)),
        "of this node's neighbours signed the survivor set it signed",
        config,
        InconsistentViewError,
    )
    if len(signers) < config.quorum:
        raise InconsistentViewError(
            f"only {len(signers)} nodes of the cohort signed the survivor set this node signed, "
            f"fewer than the quorum {config.quorum}"
        )


# -- stage 4: unmask -----------------------------------------------------------
def unmask(node: NodeSettings, request: StageRequest) -> Message:
    msg, context, body, state, config = request.unpack()
    me = context.node_id
    survivors = set(body.items("survivors", int))
    dropped = set(body.items("dropped", int))
    _check_survivors(me, survivors, dropped, state, config)
    if node.model.consistency_check:
        _verify_consistency(_identities(node), body, me, survivors, state, config)
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
        raise ProtocolViolationError(f"releasing both kinds of share for nodes {sorted(both)[:5]}")
    state = state.after(
        Stage.UNMASK,
        config.threat,
        released_b=tuple(sorted(set(state.released_b) | set(b_nodes))),
        released_s=tuple(sorted(set(state.released_s) | set(s_nodes))),
    )
    SLOT.store(context.state, state.wiped(Phase.DONE))
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


STAGES: Mapping[str, Callable[[NodeSettings, StageRequest], Message]] = MappingProxyType(
    {
        Stage.ADVERTISE_KEYS: advertise_keys,
        Stage.SHARE_KEYS: share_keys,
        Stage.COLLECT_MASKED_INPUT: collect_masked_input,
        Stage.CONSISTENCY_CHECK: consistency_check,
        Stage.UNMASK: unmask,
    }
)
"""The function that answers each SecAgg+ stage."""

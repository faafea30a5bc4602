"""The client side of SecAgg+: a mod that answers the stages of a round for its node.

Put :data:`secaggplus_mod` (or a configured :class:`SecAggPlusClientMod`) first
in the ``ClientApp``'s mods, outside any mod that post-processes updates
(clipping, noise): those must run on the plain update, before it is masked.

.. code-block:: python

    app = ClientApp(mods=[secaggplus_mod, fixed_clipping_mod])

Per node and round the mod is an explicit state machine whose every transition
is checked against one table (:data:`TRANSITIONS`, in
:mod:`flowerpets.secagg._node_state`; the stages themselves are in
:mod:`flowerpets.secagg._node_stages`)::

    NEW (no round) --advertise-keys--> ADVERTISED --share-keys--> SHARED
        --collect-masked-input--> MASKED --unmask--> DONE
                                  MASKED --consistency-check--> CHECKED --unmask--> DONE
                                  (malicious mode: MALICIOUS_TRANSITIONS)

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
  never releases both the self-mask share and the key share of one neighbour;
* in malicious mode (``threat="malicious"``, with the enrolled ``identities``
  and this node's ``identity`` key): it signs its advertised keys with its
  identity key, over the round's whole configuration (session, ring order,
  degree, threshold, ...), the round and its id; it refuses a ring order with a
  node that is not enrolled and a neighbour's keys without that neighbour's
  valid signature; it signs the survivor set once (the consistency check) and
  releases shares only for that very set, and only with at least ``t`` of its
  neighbours' valid signatures over it and, by default on a sparse graph, of a
  quorum of the whole cohort (so that no two parts of the ring can be shown
  different sets); it refuses rounds of the semi-honest mode (no downgrade) and,
  unless built with ``require_quorum=False`` (which warns), sparse rounds that
  ask no quorum.

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
through untouched, but for the quantized-domain keys of their config.

The mods and handler inside this one learn from the config of the train message
they are passed whether the round sums some of their reply arrays modulo
(:data:`~flowerpets.core.MODULUS_BITS_KEY` and :data:`~flowerpets.core.NAMES_KEY`,
and the domain's :data:`~flowerpets.core.BINDING_KEY`, set from the round's
configuration, whose digest a malicious-mode round signs: see
:mod:`flowerpets.core.quantized`); this
mod removes any value of those keys the server sent itself. A reply array the
domain names must hold unsigned integers below the modulus: anything else is
refused (an ``INVALID_REPLY`` error reply whose reason names the array, never a
value).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

from flowerpets._validation import boolean, instance, integer, strings
from flowerpets.core import (
    BINDING_KEY,
    MODULUS_BITS_KEY,
    NAMES_KEY,
    ConfigRecord,
    Context,
    Error,
    ErrorCode,
    Message,
    MessageType,
    RecordDict,
)
from flowerpets.exceptions import (
    DecryptionError,
    InfeasibleParametersError,
    InvalidUpdateError,
    MessageFieldError,
    ParameterTypeError,
    ParameterValueError,
    ProtocolViolationError,
    RequestRefusedError,
    StateError,
)
from flowerpets.secagg._node_stages import STAGES, DownstreamError, StageRequest, inner_config
from flowerpets.secagg._node_state import (
    MALICIOUS_TRANSITIONS,
    TRANSITIONS,
    ClientState,
    Phase,
    abort,
    load,
    transition,
)
from flowerpets.secagg.identity import IdentityKey, IdentitySource, NodeConfigKey, NodeIdentities
from flowerpets.secagg.protocol import (
    RoundConfig,
    Stage,
    Threat,
    fields_of,
)
from flowerpets.secagg.threat import ThreatModel, quorum_setting, resolve

__all__ = [
    "MALICIOUS_TRANSITIONS",
    "TRANSITIONS",
    "Phase",
    "SecAggPlusClientMod",
    "secaggplus_mod",
    "transition",
]

Randomness = Callable[[int], bytes]
CallNext = Callable[[Message, Context], Message]

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
    ``threat``
        ``"semi-honest"`` or ``"malicious"`` (:class:`~flowerpets.secagg.protocol.Threat`);
        by default malicious when ``identities`` are given, semi-honest otherwise.
        The node takes part only in rounds of its own threat model.
    ``identities``
        The PKI (:class:`~flowerpets.secagg.NodeIdentities`): every enrolled node's
        Ed25519 public key, from the same source the server's come from, never
        from the server. Required for ``threat="malicious"``.
    ``require_quorum``
        Malicious mode: take part only in rounds whose survivor set must be signed by
        a quorum of the whole cohort (``floor((n + C) / 2) + 1`` nodes, which
        ``SecAggPlus`` asks for by default), not only by ``t`` neighbours: without it,
        a server can show far-apart parts of a sparse ring different survivor sets and
        learn the sum of a small block of nodes (``docs/secagg.md``, regional views).
        Default: on in the malicious mode (``require_quorum=False`` warns), off in the
        semi-honest one (``require_quorum=True`` there is a ConfigurationError). The
        complete graph needs none (its ``t`` neighbours are already cohort-wide).
    ``identity``
        Where this node's identity key is (:class:`~flowerpets.secagg.IdentityKey`
        for a deployed node, a :class:`~flowerpets.secagg.Keyring` in a
        simulation, :class:`~flowerpets.secagg.NodeConfigKey` under Flower; the
        last by default). It must be the key ``identities`` enrolled for the node.
    """

    def __init__(
        self,
        *,
        protected_types: Iterable[str] = (MessageType.TRAIN, MessageType.QUERY),
        refuse_plaintext: bool = True,
        min_threshold: int = 2,
        randomness: Randomness = os.urandom,
        threat: Threat | str | None = None,
        identities: NodeIdentities | None = None,
        identity: IdentitySource | None = None,
        require_quorum: bool | None = None,
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
        if identities is not None:
            instance("identities", identities, NodeIdentities)
        if identity is not None and not isinstance(identity, IdentitySource):
            raise ParameterTypeError(
                f"identity must have key_for(context) -> IdentityKey, got {identity!r}"
            )
        self.model: ThreatModel = resolve(
            threat, has_identities=identities is not None, who="SecAggPlusClientMod"
        )
        self.protected_types = types
        self.refuse_plaintext = refuse_plaintext
        self.min_threshold = min_threshold
        self.randomness = randomness
        self.identities = identities
        self.identity: IdentitySource = identity if identity is not None else NodeConfigKey()
        self.require_quorum = quorum_setting(
            require_quorum, self.model, who="SecAggPlusClientMod", name="require_quorum"
        )

    @property
    def threat(self) -> Threat:
        return self.model.threat

    def identity_key(self, context: Context) -> IdentityKey:
        """This node's identity key; one that is not its enrolment is a ConfigurationError."""
        key = self.identity.key_for(context)
        if self.identities is not None:
            self.identities.check_own(context.node_id, key)
        return key

    def __repr__(self) -> str:
        opted_out = (
            "" if self.require_quorum == self.model.consistency_check else ", require_quorum=False"
        )
        return (
            f"SecAggPlusClientMod(protected_types={self.protected_types!r}, "
            f"refuse_plaintext={self.refuse_plaintext}, min_threshold={self.min_threshold}, "
            f"threat={self.threat.value!r}"
            f"{opted_out})"
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
        return call_next(_without_domain(msg), context)

    def _run_stage(
        self, stage: str, msg: Message, context: Context, call_next: CallNext
    ) -> Message:
        current = self._check_transition(stage, msg, context)
        state = None if current is None else current[0]
        try:
            body = fields_of(msg.content)
            if current is not None and body.get("session", bytes) != current[1].session:
                raise ProtocolViolationError("the message belongs to another session")
            return STAGES[stage](self, StageRequest(msg, context, body, current, call_next))
        except DownstreamError as wrapped:
            downstream = wrapped.error
        except InvalidUpdateError as exc:
            # The node's own update cannot be masked: not a refusal, an invalid reply.
            abort(state, context)
            return msg.error_reply(Error(ErrorCode.INVALID_REPLY, str(exc)))
        except _REFUSABLE as exc:
            abort(state, context)
            raise RequestRefusedError(f"{stage}: {exc}") from None
        except BaseException:
            # A bug of this node's own code: the round cannot go on, but nothing is refused.
            abort(state, context)
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
            loaded = load(context)
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
            transition(state.phase, stage, current[1].threat)
        except RequestRefusedError as exc:
            abort(state, context)
            raise RequestRefusedError(f"{exc}; the round is aborted") from None
        return current


def _without_domain(msg: Message) -> Message:
    """``msg`` without a quantized domain in its config: only this mod says that a reply will
    be summed modulo, and a message it lets through is not masked at all."""
    content = msg.content
    config = None if content is None else content.get("config")
    if (
        content is None
        or not isinstance(config, ConfigRecord)
        or not {MODULUS_BITS_KEY, NAMES_KEY, BINDING_KEY} & set(config)
    ):
        return msg
    stripped = RecordDict(dict(content.items()))
    stripped["config"] = inner_config(content, None)
    return Message(metadata=msg.metadata, content=stripped)


secaggplus_mod = SecAggPlusClientMod()
"""The SecAgg+ client mod with its secure defaults."""

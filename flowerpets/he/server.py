"""The server mod: key set-up through the nodes, then a streaming sum of ciphertexts.

:class:`HomomorphicAggregation` replaces the innermost exchange of a round
(it does not call ``call_next``), so it must be the *last* server mod listed;
mods before it (central DP's noise) post-process its sealed result::

    from flowerpets.dp import CentralDp

    app = ServerApp(
        strategy=FedAvg(...),
        mods=[CentralDp(noise_multiplier=1.0, clipping_norm=0.5), HomomorphicAggregation()],
    )

(with ``fixed_clipping_mod`` on the clients: the server cannot clip what it cannot read).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from flowerpets.core import (
    SEALED_WEIGHT_KEY,
    ArrayRecord,
    ConfigRecord,
    Error,
    ErrorCode,
    Failure,
    FailureKind,
    Grid,
    MetricMean,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerContext,
    StageExchange,
    WeightedSum,
    is_sealed,
    reply_weight,
)
from flowerpets.exceptions import (
    InvalidUpdateError,
    KeySetupError,
    ModelMismatchError,
    ProtocolViolationError,
    RecordTypeError,
    RoundFailedError,
)
from flowerpets.he._primitives.ciphertexts import Header, split_wire
from flowerpets.he._primitives.packing import Layout, select_names
from flowerpets.he._primitives.params import COMPACT, CKKSParameters, load_public_context
from flowerpets.he._state import ServerEvent, ServerKeys, ServerPhase
from flowerpets.he.protocol import (
    CONFIG_COHORT_SIZE,
    CONFIG_ENCRYPT,
    CONFIG_KEY_ID,
    CONFIG_WEIGHT_KEY,
    HE_MESSAGE_TYPE,
    KEY_ID,
    PUBLIC_KEY_BYTES,
    RESERVED_PREFIX,
    Stage,
)
from flowerpets.he.sealed import CiphertextSum

__all__ = ["HomomorphicAggregation"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Next = Callable[[RoundRequest, ServerContext], RoundResult]
_MODEL_RECORD = "he.model"


@dataclass(frozen=True, slots=True)
class _Advert:
    public_key: bytes
    volunteer: bool
    key_id: str


@dataclass(frozen=True, slots=True)
class _Model:
    """The model's shape as the server knows it: every name in order, and the encrypted part."""

    order: tuple[str, ...]
    layout: Layout

    @property
    def plain(self) -> tuple[str, ...]:
        encrypted = set(self.layout.names)
        return tuple(n for n in self.order if n not in encrypted)

    def encode(self) -> bytes:
        body = {"order": list(self.order), "layout": self.layout.to_json()}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> _Model:
        body = json.loads(data.decode())
        return cls(order=tuple(body["order"]), layout=Layout.from_json(body["layout"]))


# What a set-up stage's accept raises for a reply it cannot use.
_INVALID = (ValueError, RecordTypeError)


def _config(body: RecordDict) -> ConfigRecord:
    """A set-up reply's config."""
    if "config" not in body:
        raise InvalidUpdateError("the reply carries no config")
    return body.get_typed("config", ConfigRecord)


def _field(config: ConfigRecord, key: str, kind: type) -> object:
    value = config.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidUpdateError(f"{key!r} is missing or not a {kind.__name__}")
    return value


def _ask(config: ConfigRecord) -> RecordDict:
    """A set-up request: its config record alone."""
    return RecordDict({"config": config})


def _one(
    setup: StageExchange,
    stage: Stage,
    node: int,
    ask: ConfigRecord,
    read: Callable[[ConfigRecord], T],
) -> T | None:
    """A one-node set-up stage: what ``read`` makes of the reply, or None (the failure recorded)."""
    got: list[T] = []
    setup.send(
        stage,
        [(node, _ask(ask))],
        lambda _, body: got.append(read(_config(body))),
        invalid=_INVALID,
    )
    return got[0] if got else None


def _unique(nodes: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(nodes))


class HomomorphicAggregation(SecureAggregator):
    """Sums CKKS-encrypted updates; the server never holds a key that can decrypt.

    Before its first round (and whenever connected nodes lack the key) it runs
    the key set-up stages over ``context.grid`` (see :class:`~flowerpets.he.Stage`):
    one node generates the CKKS context and wraps its secret for every other
    node, the server relays, and keeps only the parameters. Then each round it
    sends the model to the cohort's key holders, adds every encrypted update to
    one running sum as it arrives (peak memory: the sum plus one update), sums
    the arrays left in the clear with the core's weighted sum, and returns a
    :class:`~flowerpets.core.RoundResult` whose ``sealed`` part is an
    :class:`~flowerpets.he.EncryptedSum`. A malformed or foreign update marks
    its node failed for the round; the others' sum is unaffected.

    ``encrypt`` lists the arrays to encrypt (exact names or globs; default all;
    a pattern matching nothing is an error). ``params`` is the CKKS parameter
    set (default :data:`~flowerpets.he.COMPACT`). ``max_keygen_attempts``
    bounds how many nodes are asked in turn to generate (or share) the key in
    one round before the round fails.
    """

    def __init__(
        self,
        *,
        encrypt: Sequence[str] = ("*",),
        params: CKKSParameters = COMPACT,
        max_keygen_attempts: int = 3,
    ) -> None:
        if (
            isinstance(encrypt, str)
            or not encrypt
            or not all(isinstance(p, str) and p for p in encrypt)
        ):
            raise ValueError(
                f"encrypt must be a non-empty sequence of names or patterns, got {encrypt!r}"
            )
        if not isinstance(params, CKKSParameters):
            raise TypeError(f"params must be a CKKSParameters, got {params!r}")
        if (
            isinstance(max_keygen_attempts, bool)
            or not isinstance(max_keygen_attempts, int)
            or max_keygen_attempts < 1
        ):
            raise ValueError(
                f"max_keygen_attempts must be an integer >= 1, got {max_keygen_attempts!r}"
            )
        self.encrypt = tuple(encrypt)
        self.params = params
        self.max_keygen_attempts = max_keygen_attempts
        self._warned_plain = False

    def __repr__(self) -> str:
        return (
            f"HomomorphicAggregation(encrypt={self.encrypt!r}, params={self.params.describe()!r})"
        )

    # -- one round -----------------------------------------------------------------------------
    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Next
    ) -> RoundResult:
        grid = context.require_grid()
        model = self._model(request, context)
        # Key set-up's stages: its own message type, every node's reason kept across them.
        setup = StageExchange(
            grid, round=request.round, message_type=HE_MESSAGE_TYPE, timeout=request.timeout
        )
        keys = self._keys(request, context, setup)
        holders = set(keys.holders)
        keyed = [node for node in request.cohort if node in holders]
        result = self._aggregate(request, grid, keys, model, keyed)
        failures = dict(result.failures)
        no_key = Failure(
            Stage.INSTALL,
            Error(ErrorCode.REFUSED, "the node holds no CKKS key"),
            FailureKind.EXCLUDED,
        )
        for node in request.cohort:
            if node not in holders:
                failures[node] = setup.failures.get(node, no_key)
        return result.replace(failures=failures)

    def _aggregate(
        self,
        request: RoundRequest,
        grid: Grid,
        keys: ServerKeys,
        model: _Model,
        nodes: Sequence[int],
    ) -> RoundResult:
        assert keys.params is not None
        header = Header(
            key_id=keys.key_id, params=keys.params, layout=model.layout, order=model.order
        )
        encrypted = CiphertextSum(
            context=load_public_context(keys.public_context, keys.params), header=header
        )
        plain = WeightedSum(expected=ArrayRecord({n: request.arrays[n] for n in model.plain}))
        metrics = MetricMean(weight_key=request.weight_key)
        config = request.config.copy()
        config[CONFIG_KEY_ID] = keys.key_id
        config[CONFIG_ENCRYPT] = list(model.layout.names)
        config[CONFIG_WEIGHT_KEY] = request.weight_key or ""
        config[CONFIG_COHORT_SIZE] = len(request.cohort)
        content = RecordDict({"arrays": request.arrays, "config": config})
        exchange = StageExchange.of(grid, request)

        def accept(node: int, body: RecordDict) -> None:
            if "metrics" not in body or "arrays" not in body:
                raise InvalidUpdateError("an encrypted reply carries 'metrics' and 'arrays'")
            reported = body.get_typed("metrics", MetricRecord)
            weight = reply_weight(reported, request.weight_key)
            # The header is compared with the round's before anything it claims is sized.
            clear, update_header, chunks = split_wire(
                body.get_typed("arrays", ArrayRecord), expected=encrypted.header
            )
            if update_header is None:
                raise InvalidUpdateError("the reply carries no encrypted part")
            checked = plain.check(ArrayRecord(clear), weight)
            vectors = encrypted.load(chunks, update_header)  # every check, before any add
            plain.add_checked(checked)
            encrypted.add(vectors)
            metrics.add(reported, float(weight))

        participants = exchange.send("", [(node, content) for node in nodes], accept)
        return RoundResult(
            round=request.round,
            aggregate=plain.result(),
            total_weight=plain.total_weight,
            participants=participants,
            failures=exchange.failures,
            metrics=metrics.result(),
            sealed=encrypted.result(),
        )

    # -- the model's layout --------------------------------------------------------------------
    def _model(self, request: RoundRequest, context: ServerContext) -> _Model:
        stored = None
        if _MODEL_RECORD in context.state:
            data = context.state.get_typed(_MODEL_RECORD, ConfigRecord).get("model")
            stored = _Model.decode(data) if isinstance(data, bytes) else None
        if is_sealed(request.arrays):
            if stored is None:
                raise RoundFailedError(
                    f"round {request.round}: the model is sealed, but this server never saw it "
                    "in the clear: HomomorphicAggregation must run from the first round"
                )
            return stored
        names = list(request.arrays)
        reserved = [n for n in names if n.startswith(RESERVED_PREFIX) or n == SEALED_WEIGHT_KEY]
        if reserved:
            raise ModelMismatchError(
                f"model arrays {reserved} use names reserved for the HE wire format"
            )
        model = _Model(
            order=tuple(names),
            layout=Layout.of(request.arrays, select_names(names, self.encrypt)),
        )
        if model.plain and not self._warned_plain:
            self._warned_plain = True
            log.warning(
                "HomomorphicAggregation: %s are aggregated in the clear; the server sees each "
                "node's values of them",
                list(model.plain),
            )
        context.state[_MODEL_RECORD] = ConfigRecord({"model": model.encode()})
        return model

    # -- keys ----------------------------------------------------------------------------------
    def _keys(
        self, request: RoundRequest, context: ServerContext, setup: StageExchange
    ) -> ServerKeys:
        keys = ServerKeys.load(context.state)
        connected = list(setup.grid.node_ids())
        if keys.phase is ServerPhase.KEYED and not any(h in connected for h in keys.holders):
            if is_sealed(request.arrays):
                raise KeySetupError(
                    f"round {request.round}: no connected node holds the key of the sealed "
                    f"model (holders {list(keys.holders)}); the round fails until one returns"
                )
            log.warning("every holder of the CKKS key is gone before any sealed model: new key")
            keys = keys.after(
                ServerEvent.RESET, key_id="", params=None, public_context=b"", holders=()
            )
            keys.store(context.state)
        if keys.phase is ServerPhase.NO_KEY:
            keys = self._generate(request, setup, connected)
        else:
            missing = [n for n in connected if n not in keys.holders]
            if missing:
                keys = self._onboard(request, setup, keys, connected, missing)
        keys.store(context.state)
        return keys

    def _advertise(self, setup: StageExchange, nodes: Sequence[int]) -> dict[int, _Advert]:
        adverts: dict[int, _Advert] = {}

        def accept(node: int, body: RecordDict) -> None:
            config = _config(body)
            public = _field(config, "he.public-key", bytes)
            assert isinstance(public, bytes)
            if len(public) != PUBLIC_KEY_BYTES:
                raise InvalidUpdateError("a transport public key is 32 bytes")
            volunteer = config.get("he.volunteer") is True
            held = config.get("he.key-id", "")
            adverts[node] = _Advert(public, volunteer, held if isinstance(held, str) else "")

        setup.send(
            Stage.ADVERTISE, [(n, _ask(ConfigRecord())) for n in nodes], accept, invalid=_INVALID
        )
        return {n: adverts[n] for n in nodes if n in adverts}  # the order asked, not of arrival

    def _wrapped(
        self, config: ConfigRecord, key_id: str, recipients: Sequence[int]
    ) -> dict[int, bytes]:
        """The wrapped keys a keygen or share reply carries, checked against the request."""
        if config.get("he.key-id") != key_id:
            raise ProtocolViolationError(
                f"the reply is for key {config.get('he.key-id')!r}, not {key_id}"
            )
        if config.get("he.recipients") != list(recipients):
            raise ProtocolViolationError("the reply wraps the key for other recipients than asked")
        wrapped = config.get("he.wrapped")
        if not isinstance(wrapped, list) or len(wrapped) != len(recipients):
            raise InvalidUpdateError("the reply does not carry one wrapped key per recipient")
        if not all(isinstance(blob, bytes) for blob in wrapped):
            raise InvalidUpdateError("wrapped keys must be bytes")
        return dict(zip(recipients, wrapped, strict=True))  # type: ignore[arg-type]

    def _made(
        self, config: ConfigRecord, recipients: Sequence[int]
    ) -> tuple[str, bytes, dict[int, bytes]]:
        """A keygen reply: the key id, the public context and the wrapped keys, checked."""
        key_id = config.get("he.key-id")
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise InvalidUpdateError(f"malformed key id {key_id!r}")
        public = _field(config, "he.public-context", bytes)
        assert isinstance(public, bytes)
        # Refuses a context that carries a secret key: the server never keeps one.
        load_public_context(public, self.params)
        return key_id, public, self._wrapped(config, key_id, recipients)

    def _generate(
        self, request: RoundRequest, setup: StageExchange, connected: Sequence[int]
    ) -> ServerKeys:
        adverts = self._advertise(setup, connected)
        volunteers = [n for n, a in adverts.items() if a.volunteer]
        others = [n for n in adverts if n not in volunteers]
        secrets.SystemRandom().shuffle(others)  # no node can predict it will hold the key first
        candidates = (volunteers + others)[: self.max_keygen_attempts]
        for candidate in candidates:
            recipients = [n for n in adverts if n != candidate]
            ask = ConfigRecord(
                {
                    "he.params": self.params.to_list(),
                    "he.recipients": recipients,
                    "he.recipient-keys": [adverts[n].public_key for n in recipients],
                }
            )
            made = _one(
                setup, Stage.KEYGEN, candidate, ask, partial(self._made, recipients=recipients)
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
            installed = self._install(setup, keys, candidate, wrapped)
            log.info(
                "round %d: node %d generated the CKKS key; %d of %d others installed it",
                request.round,
                candidate,
                len(installed),
                len(recipients),
            )
            return keys.after(ServerEvent.ONBOARDED, holders=_unique((candidate, *installed)))
        raise KeySetupError(
            f"round {request.round}: no node could generate the CKKS key "
            f"({len(candidates)} asked of {len(adverts)} that advertised): "
            + "; ".join(f"{n}: {setup.failures[n]}" for n in candidates if n in setup.failures),
            failures=setup.failures,
        )

    def _onboard(
        self,
        request: RoundRequest,
        setup: StageExchange,
        keys: ServerKeys,
        connected: Sequence[int],
        missing: Sequence[int],
    ) -> ServerKeys:
        adverts = self._advertise(setup, missing)
        # A node that already holds this key (its install reply was lost) needs nothing.
        already = [n for n, a in adverts.items() if a.key_id == keys.key_id]
        newcomers = [n for n in adverts if n not in already]
        installed: list[int] = []
        if newcomers:
            # Any holder can serve: the generator first, then the others in the order they joined.
            alive = [h for h in _unique((keys.generator, *keys.holders)) if h in connected]
            for holder in alive[: self.max_keygen_attempts]:
                ask = ConfigRecord(
                    {
                        "he.key-id": keys.key_id,
                        "he.recipients": newcomers,
                        "he.recipient-keys": [adverts[n].public_key for n in newcomers],
                    }
                )
                shared = _one(
                    setup,
                    Stage.SHARE,
                    holder,
                    ask,
                    partial(self._wrapped, key_id=keys.key_id, recipients=newcomers),
                )
                if shared is None:
                    continue
                installed = self._install(setup, keys, holder, shared)
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

    def _install(
        self, setup: StageExchange, keys: ServerKeys, sender: int, wrapped: dict[int, bytes]
    ) -> list[int]:
        """Relay each wrapped key to its recipient; the nodes that installed it."""
        assert keys.params is not None
        contents = {
            node: _ask(
                ConfigRecord(
                    {
                        "he.key-id": keys.key_id,
                        "he.params": keys.params.to_list(),
                        "he.public-context": keys.public_context,
                        "he.sender": sender,
                        "he.wrapped": blob,
                    }
                )
            )
            for node, blob in wrapped.items()
        }

        def accept(node: int, body: RecordDict) -> None:
            if _config(body).get("he.key-id") != keys.key_id:
                raise ProtocolViolationError("the node confirms another key")

        installed = set(setup.send(Stage.INSTALL, contents, accept, invalid=_INVALID))
        return [node for node in contents if node in installed]  # the order asked

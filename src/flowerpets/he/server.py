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
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from flowerpets.core import (
    SEALED_WEIGHT_KEY,
    ArrayRecord,
    ConfigRecord,
    Error,
    ErrorCode,
    Failure,
    Grid,
    Message,
    MetricMean,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerContext,
    WeightedSum,
    collect,
    gather,
    is_sealed,
    reply_weight,
    request_messages,
)
from flowerpets.exceptions import (
    InvalidUpdateError,
    KeySetupError,
    ModelMismatchError,
    RoundFailedError,
)
from flowerpets.he._primitives.ciphertexts import Header, split_wire
from flowerpets.he._primitives.packing import RESERVED_PREFIX, Layout, select_names
from flowerpets.he._primitives.params import COMPACT, CKKSParameters, load_public_context
from flowerpets.he._state import HE_MESSAGE_TYPE, ServerEvent, ServerKeys, ServerPhase, Stage
from flowerpets.he.client import (
    CONFIG_COHORT_SIZE,
    CONFIG_ENCRYPT,
    CONFIG_KEY_ID,
    CONFIG_WEIGHT_KEY,
)
from flowerpets.he.sealed import CiphertextSum

__all__ = ["HomomorphicAggregation"]

log = logging.getLogger(__name__)

Next = Callable[[RoundRequest, ServerContext], RoundResult]
_MODEL_RECORD = "he.model"
_KEY_ID = re.compile(r"[0-9a-f]{32}")
_PUBLIC_KEY_BYTES = 32


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


def _failure(stage: str, reason: str, code: ErrorCode = ErrorCode.INVALID_REPLY) -> Failure:
    return Failure(stage, Error(code, reason))


def _reply_config(reply: Message | None, stage: Stage) -> ConfigRecord:
    """A set-up reply's config, or ``_StageError`` carrying the node's failure."""
    if reply is None:
        raise _StageError(_failure(stage, "no reply", ErrorCode.NODE_UNAVAILABLE))
    if reply.error is not None:
        raise _StageError(Failure(stage, reply.error))
    body = reply.require_content()
    if "config" not in body:
        raise _StageError(_failure(stage, "the reply carries no config"))
    return body.get_typed("config", ConfigRecord)


class _StageError(Exception):
    """Internal: one node failed one set-up stage (never escapes this module)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _field(config: ConfigRecord, key: str, kind: type) -> object:
    value = config.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
    return value


def _unique(nodes: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(nodes))


class HomomorphicAggregation:
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

    secure_aggregation = True  # the server never sees an update on its own

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
        setup_failures: dict[int, Failure] = {}
        keys = self._keys(request, context, grid, setup_failures)
        holders = set(keys.holders)
        keyed = [node for node in request.cohort if node in holders]
        result = self._aggregate(request, grid, keys, model, keyed)
        failures = dict(result.failures)
        for node in request.cohort:
            if node not in holders:
                failures[node] = setup_failures.get(
                    node, _failure(Stage.INSTALL, "the node holds no CKKS key", ErrorCode.REFUSED)
                )
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
        messages = request_messages(grid, request, content, nodes=nodes)

        def accept(reply: Message) -> None:
            body = reply.require_content()
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

        participants, failures = gather(grid, messages, request, accept)
        return RoundResult(
            round=request.round,
            aggregate=plain.result(),
            total_weight=plain.total_weight,
            participants=participants,
            failures=failures,
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
        self,
        request: RoundRequest,
        context: ServerContext,
        grid: Grid,
        failures: dict[int, Failure],
    ) -> ServerKeys:
        keys = ServerKeys.load(context.state)
        connected = list(grid.node_ids())
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
            keys = self._generate(request, grid, connected, failures)
        else:
            missing = [n for n in connected if n not in keys.holders]
            if missing:
                keys = self._onboard(request, grid, keys, connected, missing, failures)
        keys.store(context.state)
        return keys

    def _send(
        self, grid: Grid, request: RoundRequest, stage: Stage, contents: Mapping[int, ConfigRecord]
    ) -> dict[int, Message]:
        messages = [
            Message.create(
                RecordDict({"config": config}),
                message_type=HE_MESSAGE_TYPE,
                dst_node_id=node,
                round=request.round,
                run_id=grid.run_id,
                stage=stage,
            )
            for node, config in contents.items()
        ]
        return {
            reply.metadata.src_node_id: reply
            for reply in collect(grid, messages, timeout=request.timeout)
        }

    def _advertise(
        self,
        grid: Grid,
        request: RoundRequest,
        nodes: Sequence[int],
        failures: dict[int, Failure],
    ) -> dict[int, _Advert]:
        replies = self._send(grid, request, Stage.ADVERTISE, {n: ConfigRecord() for n in nodes})
        adverts: dict[int, _Advert] = {}
        for node in nodes:
            try:
                config = _reply_config(replies.get(node), Stage.ADVERTISE)
                public = _field(config, "he.public-key", bytes)
                assert isinstance(public, bytes)
                if len(public) != _PUBLIC_KEY_BYTES:
                    raise ValueError("a transport public key is 32 bytes")
                volunteer = config.get("he.volunteer") is True
                held = config.get("he.key-id", "")
                adverts[node] = _Advert(public, volunteer, held if isinstance(held, str) else "")
            except _StageError as exc:
                failures[node] = exc.failure
            except ValueError as exc:
                failures[node] = _failure(Stage.ADVERTISE, str(exc))
        return adverts

    def _wrapped(
        self, config: ConfigRecord, key_id: str, recipients: Sequence[int]
    ) -> dict[int, bytes]:
        """The wrapped keys a keygen or share reply carries, checked against the request."""
        if config.get("he.key-id") != key_id:
            raise ValueError(f"the reply is for key {config.get('he.key-id')!r}, not {key_id}")
        if config.get("he.recipients") != list(recipients):
            raise ValueError("the reply wraps the key for other recipients than asked")
        wrapped = config.get("he.wrapped")
        if not isinstance(wrapped, list) or len(wrapped) != len(recipients):
            raise ValueError("the reply does not carry one wrapped key per recipient")
        if not all(isinstance(blob, bytes) for blob in wrapped):
            raise ValueError("wrapped keys must be bytes")
        return dict(zip(recipients, wrapped, strict=True))  # type: ignore[arg-type]

    def _generate(
        self,
        request: RoundRequest,
        grid: Grid,
        connected: Sequence[int],
        failures: dict[int, Failure],
    ) -> ServerKeys:
        adverts = self._advertise(grid, request, connected, failures)
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
            replies = self._send(grid, request, Stage.KEYGEN, {candidate: ask})
            try:
                config = _reply_config(replies.get(candidate), Stage.KEYGEN)
                key_id = config.get("he.key-id")
                if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                    raise ValueError(f"malformed key id {key_id!r}")
                public = _field(config, "he.public-context", bytes)
                assert isinstance(public, bytes)
                # Refuses a context that carries a secret key: the server never keeps one.
                load_public_context(public, self.params)
                wrapped = self._wrapped(config, key_id, recipients)
            except _StageError as exc:
                failures[candidate] = exc.failure
                continue
            except ValueError as exc:
                failures[candidate] = _failure(Stage.KEYGEN, str(exc))
                continue
            keys = ServerKeys().after(
                ServerEvent.GENERATED,
                key_id=key_id,
                params=self.params,
                public_context=public,
                holders=(candidate,),
                generator=candidate,
            )
            installed = self._install(grid, request, keys, candidate, wrapped, failures)
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
            + "; ".join(f"{n}: {failures[n]}" for n in candidates if n in failures)
        )

    def _onboard(
        self,
        request: RoundRequest,
        grid: Grid,
        keys: ServerKeys,
        connected: Sequence[int],
        missing: Sequence[int],
        failures: dict[int, Failure],
    ) -> ServerKeys:
        adverts = self._advertise(grid, request, missing, failures)
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
                replies = self._send(grid, request, Stage.SHARE, {holder: ask})
                try:
                    config = _reply_config(replies.get(holder), Stage.SHARE)
                    wrapped = self._wrapped(config, keys.key_id, newcomers)
                except _StageError as exc:
                    failures.setdefault(holder, exc.failure)
                    continue
                except ValueError as exc:
                    failures.setdefault(holder, _failure(Stage.SHARE, str(exc)))
                    continue
                installed = self._install(grid, request, keys, holder, wrapped, failures)
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
        self,
        grid: Grid,
        request: RoundRequest,
        keys: ServerKeys,
        sender: int,
        wrapped: Mapping[int, bytes],
        failures: dict[int, Failure],
    ) -> list[int]:
        """Relay each wrapped key to its recipient; the nodes that installed it."""
        assert keys.params is not None
        contents = {
            node: ConfigRecord(
                {
                    "he.key-id": keys.key_id,
                    "he.params": keys.params.to_list(),
                    "he.public-context": keys.public_context,
                    "he.sender": sender,
                    "he.wrapped": blob,
                }
            )
            for node, blob in wrapped.items()
        }
        replies = self._send(grid, request, Stage.INSTALL, contents)
        installed = []
        for node in contents:
            try:
                config = _reply_config(replies.get(node), Stage.INSTALL)
                if config.get("he.key-id") != keys.key_id:
                    raise ValueError("the node confirms another key")
            except _StageError as exc:
                failures[node] = exc.failure
                continue
            except ValueError as exc:
                failures[node] = _failure(Stage.INSTALL, str(exc))
                continue
            installed.append(node)
        return installed

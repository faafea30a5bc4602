"""One encrypted round on the server: the model's layout, and the streaming sum of ciphertexts.

:class:`ModelLayout` is the model as the server knows it (every name in order,
and which arrays are encrypted), kept in the context because from the second
round on the model is sealed and the server cannot read its shapes.
:func:`aggregate_encrypted` sends the round's request to the key holders of the
cohort through the core :class:`~flowerpets.core.StageExchange` and adds each
reply as it arrives: its encrypted part to one running sum of ciphertexts, its
arrays in the clear (if any) to the core's weighted sum. Peak memory is the sum
plus one update; a malformed or foreign update marks its node failed, and the
others' sum is unaffected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowerpets.core import (
    ArrayRecord,
    Grid,
    MetricMean,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    StageExchange,
    WeightedSum,
    reply_weight,
)
from flowerpets.core.state import StateSlot, convert
from flowerpets.exceptions import InvalidUpdateError
from flowerpets.he._primitives.ciphertexts import Header, split_wire
from flowerpets.he._primitives.packing import Layout
from flowerpets.he._primitives.params import load_public_context
from flowerpets.he._state import ServerKeys
from flowerpets.he.protocol import (
    CONFIG_COHORT_SIZE,
    CONFIG_ENCRYPT,
    CONFIG_KEY_ID,
    CONFIG_WEIGHT_KEY,
)
from flowerpets.he.sealed import CiphertextSum

__all__ = ["MODEL_RECORD", "ModelLayout", "aggregate_encrypted"]

MODEL_RECORD = "he.model"
"""The server context's state record of the model's layout."""


def _layout_text(layout: Layout) -> str:
    return json.dumps(layout.to_json(), separators=(",", ":"))


def _layout_from_text(text: str) -> Layout:
    return Layout.from_json(json.loads(text))


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """The model's shape as the server knows it: every name in order, and the encrypted part.

    Kept in ``context.state["he.model"]`` by a core state slot: a record that
    cannot be read raises a StateError, never a model forgotten.
    """

    order: tuple[str, ...]
    layout: Layout = field(metadata=convert(_layout_text, _layout_from_text))

    @property
    def plain(self) -> tuple[str, ...]:
        """The arrays aggregated in the clear, in model order."""
        encrypted = set(self.layout.names)
        return tuple(n for n in self.order if n not in encrypted)

    @classmethod
    def load(cls, state: RecordDict) -> ModelLayout | None:
        """The layout kept in the server's ``state``, or None if it never saw the model."""
        return _MODEL_SLOT.get(state)

    def store(self, state: RecordDict) -> None:
        _MODEL_SLOT.store(state, self)


_MODEL_SLOT = StateSlot(ModelLayout, MODEL_RECORD)


def aggregate_encrypted(
    request: RoundRequest,
    grid: Grid,
    keys: ServerKeys,
    model: ModelLayout,
    nodes: Sequence[int],
) -> RoundResult:
    """Send ``request`` to ``nodes`` (holders of ``keys``) and sum their encrypted updates."""
    assert keys.params is not None
    header = Header(key_id=keys.key_id, params=keys.params, layout=model.layout, order=model.order)
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

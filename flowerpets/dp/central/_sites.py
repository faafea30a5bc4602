"""Where the updates are clipped under central DP, and what the server checks of each.

``ClipOn.CLIENTS`` (default): each client runs a clipping mod
(:mod:`flowerpets.dp.clipping`); without secure aggregation the server checks
each reply before it is summed (its norm is at most the clip it sent, its
indicator is +-1/2) and refuses a reply that is not, with a reason that
carries no value of the reply. Under secure aggregation, or with a sealed
model, the server sees only the sum and trusts every client to clip.
``ClipOn.SERVER``: the server clips each update it receives, which needs every
update one by one (no secure aggregation, no sealed sum).

Each site takes the round's request (the clip already decided) and returns the
inner chain's result with the indicator array taken out, and the sum of the
shifted unclipped indicators (0 without adaptive clipping).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np

from flowerpets.core import ArrayRecord, ConfigRecord, RoundRequest, RoundResult, ServerContext
from flowerpets.core.round import is_sealed
from flowerpets.dp._primitives.clip import clip_update, enforce_clip, update_between
from flowerpets.dp._protocol import CLIP_KEY, INDICATOR
from flowerpets.dp.central._checking_grid import (
    Check,
    CheckingGrid,
    ReplyRefusedError,
    over,
    refuse_bypass,
)
from flowerpets.exceptions import IncompatibleModsError, InvalidUpdateError

__all__ = ["SITES", "CallNext", "ClipOn", "Site"]

CallNext = Callable[[RoundRequest, ServerContext], RoundResult]


class ClipOn(Enum):
    """Where updates are clipped under :class:`~flowerpets.dp.CentralDp`."""

    CLIENTS = "clients"  # each client runs fixed_clipping_mod or adaptive_clipping_mod
    SERVER = "server"  # the server clips each update it receives (no secure aggregation)


_NOT_CLIPPED = (
    "the update's L2 norm exceeds the clip the server sent ('dp.clip'): the node did not clip "
    "it (is its DP clipping mod installed?)"
)


def _client_check(request: RoundRequest, clip: float, adaptive: bool) -> Check:
    """The server's check of each client-clipped reply (possible without secure aggregation).

    The reply must be a clipped update: real-valued, of norm at most the clip,
    and with adaptive clipping an indicator of exactly +-1/2. A client that did
    not clip (no clipping mod: it sends its new weights) is refused, so it
    cannot move the model beyond what the noise was calibrated for. The reason
    names what was wrong, never the norm.
    """
    dtypes = {n: a.dtype for n, a in request.arrays.items() if n != INDICATOR}

    def check(node: int, arrays: ArrayRecord) -> ArrayRecord:
        if [n for n in arrays if n != INDICATOR] != list(dtypes):
            raise InvalidUpdateError("names differ from the model's")  # the exchange refuses it
        update: dict[str, np.ndarray] = {}
        for name in dtypes:
            data = arrays[name].numpy()
            if data.dtype.kind not in "biuf":
                raise ReplyRefusedError(f"array {name!r} of the update is not real-valued")
            if not np.isfinite(np.add.reduce(data, axis=None, dtype=np.float64)):
                raise InvalidUpdateError("not finite")  # the exchange refuses it
            update[name] = data
        kept = enforce_clip(update, clip, dtypes=dtypes)
        if kept is None:
            raise ReplyRefusedError(_NOT_CLIPPED)
        out = ArrayRecord.from_numpy(kept, copy=False)
        if adaptive:
            bit = arrays[INDICATOR].numpy() if INDICATOR in arrays else None
            if bit is None or bit.shape != (1,) or float(bit[0]) not in (-0.5, 0.5):
                raise ReplyRefusedError(
                    f"the unclipped indicator {INDICATOR!r} must be one value, -1/2 or +1/2"
                )
            out[INDICATOR] = np.array([float(bit[0])])
        return out

    return check


def _on_clients(
    request: RoundRequest, context: ServerContext, call_next: CallNext, clip: float, adaptive: bool
) -> tuple[RoundResult, float]:
    config = ConfigRecord(request.config)
    config[CLIP_KEY] = clip
    arrays = ArrayRecord(request.arrays)
    if adaptive:
        arrays[INDICATOR] = np.zeros(1)
    inner = request.replace(config=config, arrays=arrays)
    if context.secure_aggregation or is_sealed(request.arrays) or context.grid is None:
        # The server sees only the sum (or replies holding a model it cannot read): it cannot
        # check each client's clipping, and trusts it (see docs/dp.md).
        result = call_next(inner, context)
    else:
        grid = CheckingGrid(context.grid, inner, _client_check(inner, clip, adaptive))
        result = call_next(inner, over(context, grid))
        if result.sealed is None:  # a sealed sum cannot be checked: it is a secure sum
            refuse_bypass(result, grid.seen, "the server's check of each client's clipping")
    if not adaptive:
        return result, 0.0
    if INDICATOR not in result.aggregate:
        if result.participants:
            raise IncompatibleModsError(
                "adaptive clipping needs the unclipped count in the clear, but the round's sum "
                "holds no plain 'dp.unclipped' array (is it sealed by an inner mod?)"
            )
        return result, 0.0
    count = float(np.sum(result.aggregate[INDICATOR].numpy(), dtype=np.float64))
    aggregate = ArrayRecord({n: a for n, a in result.aggregate.items() if n != INDICATOR})
    return result.replace(aggregate=aggregate), count


def _server_clip(request: RoundRequest, clip: float, unclipped: dict[int, bool]) -> Check:
    """Server-side clipping: each reply's update (reply minus model) clipped to ``clip``."""
    dtypes = {n: a.dtype for n, a in request.arrays.items()}

    def check(node: int, arrays: ArrayRecord) -> ArrayRecord:
        clipped = clip_update(update_between(arrays, request.arrays), clip, dtypes=dtypes)
        unclipped.setdefault(node, clipped.unclipped)
        return ArrayRecord.from_numpy(clipped.arrays, copy=False)

    return check


def _on_server(
    request: RoundRequest, context: ServerContext, call_next: CallNext, clip: float, adaptive: bool
) -> tuple[RoundResult, float]:
    if context.secure_aggregation:
        raise IncompatibleModsError(
            "CentralDp(clip_on=ClipOn.SERVER) needs every update one by one, but a mod of this "
            "app sums them securely: clip on the clients instead (ClipOn.CLIENTS)"
        )
    unclipped: dict[int, bool] = {}
    grid = CheckingGrid(context.require_grid(), request, _server_clip(request, clip, unclipped))
    result = call_next(request, over(context, grid))
    if result.sealed is not None:
        raise IncompatibleModsError(
            "CentralDp(clip_on=ClipOn.SERVER) cannot clip updates that an inner mod sealed"
        )
    refuse_bypass(result, unclipped, "server-side clipping")
    count = sum(0.5 if unclipped[node] else -0.5 for node in result.participants)
    return result, float(count)


Site = Callable[[RoundRequest, ServerContext, CallNext, float, bool], tuple[RoundResult, float]]
"""(request, context, inner chain, clip, adaptive) -> (result, sum of the shifted indicators)."""

SITES: dict[ClipOn, Site] = {ClipOn.CLIENTS: _on_clients, ClipOn.SERVER: _on_server}

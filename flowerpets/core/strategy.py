"""Strategies: which nodes take part in a round, what they are sent, and how
the round's aggregate becomes the next global model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from flowerpets._validation import integer, real
from flowerpets.core.message import MessageType
from flowerpets.core.records import Array, ArrayRecord, ConfigRecord, ConfigValue
from flowerpets.core.round import (
    SEALED_WEIGHT_KEY,
    WEIGHT_KEY,
    RoundRequest,
    RoundResult,
    SealedArrays,
    is_sealed,
)
from flowerpets.core.sampling import CohortSampling, FullParticipation
from flowerpets.exceptions import ParameterTypeError, RoundFailedError

__all__ = ["EvaluateFn", "FedAvg", "Strategy"]

log = logging.getLogger(__name__)

# Centralized evaluation on the server: (round, global arrays) -> metrics.
EvaluateFn = Callable[[int, ArrayRecord], Mapping[str, float]]
ConfigFn = Callable[[int], Mapping[str, ConfigValue]]


@runtime_checkable
class Strategy(Protocol):
    """What a ServerApp asks of a strategy each round."""

    sampling: CohortSampling

    def configure_train(
        self, round: int, arrays: ArrayRecord, node_ids: Sequence[int], rng: np.random.Generator
    ) -> RoundRequest: ...

    def aggregate_train(self, result: RoundResult, current: ArrayRecord) -> ArrayRecord: ...

    def configure_evaluate(
        self, round: int, arrays: ArrayRecord, node_ids: Sequence[int], rng: np.random.Generator
    ) -> RoundRequest | None: ...

    def evaluate(self, round: int, arrays: ArrayRecord) -> Mapping[str, float] | None: ...


def _config(round: int, static: Mapping[str, ConfigValue] | ConfigFn) -> ConfigRecord:
    values = static(round) if callable(static) else static
    config = ConfigRecord(values)
    config["server-round"] = round
    return config


class FedAvg:
    """Federated averaging (McMahan et al., 2017), weighted by examples.

    Each round samples a cohort with ``sampling``, sends it the global arrays
    and ``train_config``, and replaces the global arrays with the weighted mean
    of the updates (``RoundResult.mean``), cast back to each array's dtype. A
    round with fewer than ``min_nodes`` participants fails and leaves the model
    unchanged, unless its result has a ``fixed_denominator`` (central DP).
    ``evaluate_sampling`` turns on federated evaluation; ``evaluate_fn``
    evaluates the global model on the server.

    A sealed sum (``RoundResult.sealed``, for example CKKS ciphertexts) cannot
    be divided by the server: the new global model is then the plain arrays'
    mean, plus the sealed sum's wire form (:meth:`SealedArrays.to_arrays`) and
    the total weight under :data:`~flowerpets.core.round.SEALED_WEIGHT_KEY`,
    which the nodes' client mod opens and divides. ``evaluate_fn`` cannot read a
    sealed model, so it is skipped (with a warning) while the model is sealed:
    use federated evaluation instead.
    """

    def __init__(
        self,
        *,
        sampling: CohortSampling | None = None,
        evaluate_sampling: CohortSampling | None = None,
        min_nodes: int = 1,
        train_config: Mapping[str, ConfigValue] | ConfigFn | None = None,
        evaluate_config: Mapping[str, ConfigValue] | ConfigFn | None = None,
        evaluate_fn: EvaluateFn | None = None,
        weight_key: str | None = WEIGHT_KEY,
        round_timeout: float | None = None,
    ) -> None:
        integer("min_nodes", min_nodes, at_least=1)
        if round_timeout is not None:
            real("round_timeout", round_timeout, above=0, finite=False)
        for name, value in (("sampling", sampling), ("evaluate_sampling", evaluate_sampling)):
            if value is not None and not isinstance(value, CohortSampling):
                raise ParameterTypeError(f"{name} must be a CohortSampling, got {value!r}")
        self.sampling: CohortSampling = sampling if sampling is not None else FullParticipation()
        self.evaluate_sampling = evaluate_sampling
        self.min_nodes = min_nodes
        self.train_config: Mapping[str, ConfigValue] | ConfigFn = train_config or {}
        self.evaluate_config: Mapping[str, ConfigValue] | ConfigFn = evaluate_config or {}
        self.evaluate_fn = evaluate_fn
        self.weight_key = weight_key
        self.round_timeout = round_timeout
        self._warned_sealed = False

    def __repr__(self) -> str:
        return (
            f"FedAvg(sampling={self.sampling!r}, evaluate_sampling={self.evaluate_sampling!r}, "
            f"min_nodes={self.min_nodes})"
        )

    def _request(
        self,
        message_type: str,
        sampling: CohortSampling,
        config: Mapping[str, ConfigValue] | ConfigFn,
        round: int,
        arrays: ArrayRecord,
        node_ids: Sequence[int],
        rng: np.random.Generator,
    ) -> RoundRequest:
        return RoundRequest(
            round=round,
            cohort=sampling.sample(node_ids, rng),
            arrays=arrays,
            config=_config(round, config),
            sampling=sampling,
            population=len(node_ids),
            message_type=message_type,
            weight_key=self.weight_key,
            timeout=self.round_timeout,
        )

    def configure_train(
        self, round: int, arrays: ArrayRecord, node_ids: Sequence[int], rng: np.random.Generator
    ) -> RoundRequest:
        return self._request(
            MessageType.TRAIN, self.sampling, self.train_config, round, arrays, node_ids, rng
        )

    def aggregate_train(self, result: RoundResult, current: ArrayRecord) -> ArrayRecord:
        if not result.fixed_denominator and len(result.participants) < self.min_nodes:
            raise RoundFailedError(
                f"round {result.round}: {len(result.participants)} node(s) contributed, "
                f"fewer than min_nodes={self.min_nodes} ({len(result.failures)} failed)",
                failures=result.failures,
                participants=result.participants,
            )
        if result.sealed is not None:
            return _sealed_model(result, current)
        if list(result.aggregate) != list(current):
            raise RoundFailedError(
                f"round {result.round}: the aggregate holds {list(result.aggregate)}, "
                f"the model holds {list(current)}"
            )
        _check_total_weight(result)
        mean = result.mean()
        new: dict[str, Any] = {}
        for name, array in current.items():
            new[name] = mean[name].astype(array.dtype, copy=False)
        return ArrayRecord.from_numpy(new, copy=False)

    def configure_evaluate(
        self, round: int, arrays: ArrayRecord, node_ids: Sequence[int], rng: np.random.Generator
    ) -> RoundRequest | None:
        if self.evaluate_sampling is None:
            return None
        return self._request(
            MessageType.EVALUATE,
            self.evaluate_sampling,
            self.evaluate_config,
            round,
            arrays,
            node_ids,
            rng,
        )

    def evaluate(self, round: int, arrays: ArrayRecord) -> Mapping[str, float] | None:
        if self.evaluate_fn is None:
            return None
        if is_sealed(arrays):
            if not self._warned_sealed:
                self._warned_sealed = True
                log.warning(
                    "centralized evaluation is skipped: the global model is sealed (for "
                    "example, encrypted) and the server cannot read it; use federated "
                    "evaluation (evaluate_sampling) instead"
                )
            return None
        return self.evaluate_fn(round, arrays)


def _check_total_weight(result: RoundResult) -> None:
    """A mean needs a positive, finite total weight (every participant may report 0)."""
    if not (np.isfinite(result.total_weight) and result.total_weight > 0):
        raise RoundFailedError(
            f"round {result.round}: total weight is {result.total_weight}, nothing to divide by",
            failures=result.failures,
            participants=result.participants,
        )


def _sealed_model(result: RoundResult, current: ArrayRecord) -> ArrayRecord:
    """The next global model when the round's sum is sealed: plain means + wire form + weight."""
    sealed = result.sealed
    if not isinstance(sealed, SealedArrays):
        raise RoundFailedError(
            f"round {result.round}: the sum is sealed by {type(sealed).__name__}, which cannot "
            "be sent to the nodes (it does not implement SealedArrays)"
        )
    _check_total_weight(result)
    unknown = [name for name in result.aggregate if name not in current]
    if unknown:
        raise RoundFailedError(
            f"round {result.round}: the aggregate holds {unknown}, which the model does not"
        )
    if not is_sealed(current):
        # The first sealed round: every model array is summed in exactly one of the parts.
        parts = [*result.aggregate, *sealed.shapes]
        if sorted(parts) != sorted(current):
            raise RoundFailedError(
                f"round {result.round}: the plain and sealed sums hold {parts}, "
                f"the model holds {list(current)}"
            )
    mean = result.mean()
    model = ArrayRecord()
    for name in result.aggregate:
        model[name] = Array(mean[name].astype(current[name].dtype, copy=False), copy=False)
    wire = sealed.to_arrays()
    clash = [name for name in wire if name in model or name == SEALED_WEIGHT_KEY]
    if clash:
        raise RoundFailedError(f"round {result.round}: the sealed sum's wire form reuses {clash}")
    model.update(wire)
    model[SEALED_WEIGHT_KEY] = Array(np.float64(result.total_weight))
    return model

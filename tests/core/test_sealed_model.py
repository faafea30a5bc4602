"""The core's sealed-model path: FedAvg carries a sealed sum to the nodes instead of dividing.

A stand-in SealedArrays (no cryptography: the core knows none) whose wire form
is the sum itself under a reserved name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pytest

from flowerpets import (
    SEALED_WEIGHT_KEY,
    ArrayRecord,
    FedAvg,
    RoundResult,
    SealedArrays,
    SealedSum,
    is_sealed,
)
from flowerpets.exceptions import RoundFailedError


class FakeSealed:
    """Seals ``w`` by renaming it: enough to follow the core's plumbing."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return {"w": self.w.shape}

    def add_plaintext(self, arrays: Mapping[str, np.ndarray]) -> FakeSealed:
        return FakeSealed(self.w + arrays.get("w", 0))

    def to_arrays(self) -> ArrayRecord:
        return ArrayRecord({"fake.w": self.w})


class OnlyAddable:
    def add_plaintext(self, arrays: Mapping[str, np.ndarray]) -> OnlyAddable:
        return self


def _result(sealed: object = None, **changes: object) -> RoundResult:
    fields: dict[str, object] = {
        "round": 3,
        "aggregate": ArrayRecord({"b": np.array([2.0, 4.0])}),
        "total_weight": 2.0,
        "participants": (1, 2),
        "sealed": sealed if sealed is not None else FakeSealed(np.array([6.0, 8.0, 10.0])),
    }
    fields.update(changes)
    return RoundResult(**fields)  # type: ignore[arg-type]


def _model() -> ArrayRecord:
    return ArrayRecord({"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})


def test_protocols_and_reserved_name() -> None:
    assert isinstance(FakeSealed(np.ones(1)), SealedArrays)
    assert isinstance(OnlyAddable(), SealedSum) and not isinstance(OnlyAddable(), SealedArrays)
    assert not is_sealed(_model())
    assert is_sealed(ArrayRecord({SEALED_WEIGHT_KEY: np.array(1.0)}))


def test_fedavg_sends_plain_means_wire_form_and_total_weight() -> None:
    model = FedAvg().aggregate_train(_result(), _model())
    assert list(model) == ["b", "fake.w", SEALED_WEIGHT_KEY]
    np.testing.assert_array_equal(model["b"].numpy(), [1.0, 2.0])  # divided on the server
    assert model["b"].dtype == np.float32  # cast back like a plain round
    np.testing.assert_array_equal(model["fake.w"].numpy(), [6.0, 8.0, 10.0])  # not divided
    assert model[SEALED_WEIGHT_KEY].numpy() == 2.0 and model[SEALED_WEIGHT_KEY].shape == ()
    assert is_sealed(model)
    # The next round starts from the sealed model: its plain names still match.
    again = FedAvg().aggregate_train(_result(), model)
    assert list(again) == list(model)


def test_fedavg_refuses_what_it_cannot_send() -> None:
    strategy = FedAvg(min_nodes=2)
    with pytest.raises(RoundFailedError, match="min_nodes"):
        strategy.aggregate_train(_result(participants=(1,)), _model())
    with pytest.raises(RoundFailedError, match="SealedArrays"):
        strategy.aggregate_train(_result(sealed=OnlyAddable()), _model())
    with pytest.raises(RoundFailedError, match="total weight"):
        strategy.aggregate_train(_result(total_weight=0.0), _model())
    with pytest.raises(RoundFailedError, match="the model holds"):
        strategy.aggregate_train(_result(), ArrayRecord({"b": np.zeros(2), "v": np.zeros(3)}))
    with pytest.raises(RoundFailedError, match="which the model does not"):
        strategy.aggregate_train(_result(aggregate=ArrayRecord({"c": np.ones(2)})), _model())

    class Clashing(FakeSealed):
        def to_arrays(self) -> ArrayRecord:
            return ArrayRecord({"b": self.w})

    with pytest.raises(RoundFailedError, match="reuses"):
        strategy.aggregate_train(_result(sealed=Clashing(np.ones(3))), _model())


def test_plain_rounds_are_unchanged() -> None:
    plain = _result(sealed=None).replace(
        sealed=None, aggregate=ArrayRecord({"w": np.ones(3) * 2, "b": np.ones(2) * 4})
    )
    model = FedAvg().aggregate_train(plain, _model())
    assert list(model) == ["w", "b"] and not is_sealed(model)
    np.testing.assert_array_equal(model["w"].numpy(), [1, 1, 1])


def test_shapes_cover_the_plain_and_the_sealed_part() -> None:
    assert _result().shapes() == {"b": (2,), "w": (3,)}
    assert _result(sealed=None).replace(sealed=None).shapes() == {"b": (2,)}
    with pytest.raises(TypeError, match="SealedArrays"):
        _result(sealed=OnlyAddable()).shapes()
    noised = _result().add_to_sum({"w": np.ones(3), "b": np.ones(2)})
    assert isinstance(noised.sealed, FakeSealed)
    np.testing.assert_array_equal(noised.sealed.w, [7.0, 9.0, 11.0])


def test_centralized_evaluation_is_skipped_for_a_sealed_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def evaluate(round: int, arrays: ArrayRecord) -> dict[str, float]:
        calls.append(round)
        return {"accuracy": 1.0}

    strategy = FedAvg(evaluate_fn=evaluate)
    sealed = FedAvg().aggregate_train(_result(), _model())
    with caplog.at_level(logging.WARNING):
        assert strategy.evaluate(1, sealed) is None
        assert strategy.evaluate(2, sealed) is None
    assert caplog.text.count("centralized evaluation is skipped") == 1  # warned once
    assert strategy.evaluate(3, _model()) == {"accuracy": 1.0}
    assert calls == [3]

"""Tests for the numpy digits models, their gradients, SGD training and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from flowerpets.examples.digits import (
    MLP,
    MODELS,
    DigitsData,
    Model,
    Params,
    SoftmaxRegression,
    evaluate,
    load_digits_split,
    train,
)

EXPECTED_SHAPES = {
    "softmax": {"weight": (64, 10), "bias": (10,)},
    "mlp": {
        "fc1.weight": (64, 32),
        "fc1.bias": (32,),
        "fc2.weight": (32, 10),
        "fc2.bias": (10,),
    },
}

# Settings that reach >= 0.93 test accuracy on every seed tried (measured 0.956..0.97).
CENTRALIZED = {
    "softmax": {"epochs": 20, "learning_rate": 0.5},
    "mlp": {"epochs": 30, "learning_rate": 0.1},
}


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits_split()


def _copy(params: Params) -> Params:
    return {name: value.copy() for name, value in params.items()}


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_init_params_names_shapes_dtypes(name: str) -> None:
    params = MODELS[name]().init_params(np.random.default_rng(0))
    assert list(params) == list(EXPECTED_SHAPES[name])  # insertion order is part of the API
    for key, shape in EXPECTED_SHAPES[name].items():
        assert params[key].shape == shape
        assert params[key].dtype == np.float32
        assert np.all(np.isfinite(params[key]))


def test_mlp_uses_he_init() -> None:
    params = MLP(hidden=256).init_params(np.random.default_rng(0))
    w1, w2 = params["fc1.weight"], params["fc2.weight"]
    assert abs(w1.std() / math.sqrt(2 / 64) - 1) < 0.05
    assert abs(w2.std() / math.sqrt(2 / 256) - 1) < 0.05
    assert not np.any(params["fc1.bias"]) and not np.any(params["fc2.bias"])


def test_models_registry() -> None:
    assert set(MODELS) == {"softmax", "mlp"}
    assert isinstance(MODELS["softmax"](), SoftmaxRegression)
    assert isinstance(MODELS["mlp"](hidden=8), MLP)
    with pytest.raises(TypeError):
        MODELS["other"] = MLP  # type: ignore[index]


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SoftmaxRegression(num_features=0),
        lambda: SoftmaxRegression(num_classes=1),
        lambda: SoftmaxRegression(l2=-1.0),
        lambda: MLP(hidden=0),
        lambda: MLP(l2=float("nan")),
    ],
)
def test_models_reject_bad_config(factory: Callable[[], Model]) -> None:
    with pytest.raises(ValueError):
        factory()


# ---------------------------------------------------------------- loss and gradient


@pytest.mark.parametrize(
    "model",
    [SoftmaxRegression(l2=0.05), MLP(hidden=16, l2=0.05)],
    ids=["softmax", "mlp"],
)
def test_gradient_matches_finite_differences(model: Model) -> None:
    rng = np.random.default_rng(42)
    # float64 throughout, so central differences are accurate; the models compute in the
    # parameters' dtype. Nonzero biases make their gradients non-trivial too.
    params: dict[str, NDArray[np.float64]] = {
        name: (value + 0.1 * rng.standard_normal(value.shape)).astype(np.float64)
        for name, value in model.init_params(rng).items()
    }
    x = rng.random((24, 64))
    y = rng.integers(0, 10, size=24)
    _, grads = model.loss_and_grad(params, x, y)  # type: ignore[arg-type]

    eps = 1e-6
    for name, value in params.items():
        assert grads[name].shape == value.shape
        assert grads[name].dtype == np.float64
        assert np.linalg.norm(grads[name]) > 1e-3, f"{name}: gradient is suspiciously small"
        for flat in rng.choice(value.size, size=min(8, value.size), replace=False):
            idx = np.unravel_index(flat, value.shape)
            plus, minus = dict(params), dict(params)
            plus[name] = value.copy()
            plus[name][idx] += eps
            minus[name] = value.copy()
            minus[name][idx] -= eps
            numeric = (
                model.loss_and_grad(plus, x, y)[0] - model.loss_and_grad(minus, x, y)[0]  # type: ignore[arg-type]
            ) / (2 * eps)
            analytic = float(grads[name][idx])
            rel = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-6)
            assert rel < 1e-3, f"{name}{idx}: numeric {numeric} vs analytic {analytic}"


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_loss_and_grad_keeps_names_and_float32(name: str) -> None:
    model = MODELS[name]()
    params = model.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    loss, grads = model.loss_and_grad(params, rng.random((5, 64), dtype=np.float32), np.arange(5))
    assert isinstance(loss, float) and math.isfinite(loss)
    assert list(grads) == list(params)
    for key in params:
        assert grads[key].shape == params[key].shape
        assert grads[key].dtype == np.float32


def test_uniform_prediction_loss_is_log_num_classes() -> None:
    model = SoftmaxRegression(l2=0.0)
    zeros = {"weight": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)
    y = np.array([0, 1, 2, 3, 4, 5, 0])
    loss, grads = model.loss_and_grad(zeros, x, y)
    assert loss == pytest.approx(math.log(10), rel=1e-6)
    # d loss / d bias = mean(softmax - onehot) = 1/10 - class frequency.
    np.testing.assert_allclose(grads["bias"], 0.1 - np.bincount(y, minlength=10) / 7, atol=1e-7)
    mean_loss, accuracy = evaluate(model, zeros, x, y)
    assert mean_loss == pytest.approx(math.log(10), rel=1e-6)
    assert accuracy == pytest.approx(2 / 7)  # ties break to class 0


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    model = SoftmaxRegression(l2=0.0)
    params = {"weight": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
    params["bias"][3] = 1e4  # exp(1e4) overflows float32 and float64 without log-sum-exp
    x = np.zeros((2, 64), np.float32)
    # Underflow of exp(-1e4) to 0 is expected; overflow, inf - inf or log(0) are the bugs.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grads = model.loss_and_grad(params, x, np.array([3, 4]))
    assert loss == pytest.approx(0.5 * 1e4, rel=1e-6)  # the second example pays the full gap
    assert all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_models_reject_bad_inputs(name: str) -> None:
    model = MODELS[name]()
    params = model.init_params(np.random.default_rng(0))
    x = np.zeros((3, 64), np.float32)
    with pytest.raises(ValueError, match="shape"):
        model.loss_and_grad(params, np.zeros((3, 63), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="shape"):
        model.loss_and_grad(params, x, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(params, x, np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, params, x, np.array([0, -1, 2]))


# ---------------------------------------------------------------- training


def test_train_does_not_mutate_its_inputs(digits: DigitsData) -> None:
    model = MLP()
    params = model.init_params(np.random.default_rng(0))
    before = _copy(params)
    # digits' arrays are read-only, so any in-place write to x or y would raise here.
    new, _ = train(
        model,
        params,
        digits.x_train,
        digits.y_train,
        epochs=1,
        batch_size=32,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    assert list(new) == list(params)
    for key in params:
        np.testing.assert_array_equal(params[key], before[key])
        assert not np.shares_memory(new[key], params[key])
        assert new[key].dtype == np.float32
        assert not np.array_equal(new[key], before[key]), f"{key} was not trained"


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_train_is_deterministic_per_seed(name: str, digits: DigitsData) -> None:
    model = MODELS[name]()

    def run(seed: int) -> tuple[Params, float]:
        params = model.init_params(np.random.default_rng(seed))
        return train(
            model,
            params,
            digits.x_train[:300],
            digits.y_train[:300],
            epochs=2,
            batch_size=32,
            learning_rate=0.1,
            rng=np.random.default_rng(seed),
        )

    (a, loss_a), (b, loss_b), (c, _) = run(5), run(5), run(6)
    assert loss_a == loss_b
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("batch_size", [7, 100, 10_000])
def test_train_reports_mean_loss_of_last_epoch(batch_size: int) -> None:
    # With a negligible step the parameters stay put, so the example-weighted mean of the
    # batch losses must equal the full-data loss, whatever the batch size.
    model = MLP(l2=0.01)
    rng = np.random.default_rng(3)
    params = model.init_params(rng)
    x = rng.random((100, 64), dtype=np.float32)
    y = rng.integers(0, 10, size=100)
    _, reported = train(
        model, params, x, y, epochs=2, batch_size=batch_size, learning_rate=1e-12, rng=rng
    )
    assert reported == pytest.approx(model.loss_and_grad(params, x, y)[0], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"learning_rate": -0.1},
        {"learning_rate": float("nan")},
    ],
)
def test_train_rejects_bad_hyperparameters(kwargs: dict[str, float]) -> None:
    model = SoftmaxRegression()
    params = model.init_params(np.random.default_rng(0))
    settings: dict[str, float] = {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}
    settings.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        train(
            model,
            params,
            np.zeros((4, 64), np.float32),
            np.zeros(4, np.int64),
            rng=np.random.default_rng(0),
            **settings,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_centralized_training_reaches_93_percent(name: str, digits: DigitsData) -> None:
    model = MODELS[name]()
    params = model.init_params(np.random.default_rng(0))
    initial_loss, initial_acc = evaluate(model, params, digits.x_test, digits.y_test)
    trained, train_loss = train(
        model,
        params,
        digits.x_train,
        digits.y_train,
        batch_size=32,
        rng=np.random.default_rng(0),
        **CENTRALIZED[name],  # type: ignore[arg-type]
    )
    test_loss, test_acc = evaluate(model, trained, digits.x_test, digits.y_test)
    assert initial_acc < 0.5  # so the accuracy below is learned, not given
    assert test_acc >= 0.93
    assert test_loss < initial_loss / 4
    assert train_loss < 0.25

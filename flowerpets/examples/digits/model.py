"""Pure-numpy classifiers over named float32 parameters, with SGD training and evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import integer, real
from flowerpets.exceptions import ParameterValueError

__all__ = [
    "MLP",
    "MODELS",
    "Model",
    "Params",
    "SoftmaxRegression",
    "evaluate",
    "train",
]

Params: TypeAlias = dict[str, NDArray[np.float32]]
"""Named parameter arrays, in a fixed insertion order, all float32."""

_Array: TypeAlias = NDArray[np.float32]


class Model(Protocol):
    """A stateless classifier: all state lives in the ``Params`` passed to each method."""

    def init_params(self, rng: np.random.Generator) -> Params:
        """Fresh randomly initialised parameters."""
        ...

    def loss_and_grad(
        self, params: Mapping[str, _Array], x: NDArray[np.floating], y: NDArray[np.integer]
    ) -> tuple[float, Params]:
        """Mean cross-entropy (plus any L2 penalty) and its gradient, keyed like ``params``."""
        ...

    def predict_logits(self, params: Mapping[str, _Array], x: NDArray[np.floating]) -> _Array:
        """Unnormalised class scores of shape (n, num_classes)."""
        ...


@dataclass(frozen=True)
class SoftmaxRegression:
    """Multinomial logistic regression: ``logits = x @ weight + bias``.

    The loss is mean cross-entropy plus ``l2 / 2 * ||weight||^2`` (biases are not penalised).
    """

    num_features: int = 64
    num_classes: int = 10
    l2: float = 1e-4

    def __post_init__(self) -> None:
        _check_dims(num_features=self.num_features, num_classes=self.num_classes, l2=self.l2)

    def init_params(self, rng: np.random.Generator) -> Params:
        """Small random weights and zero biases."""
        return {
            "weight": _normal(rng, (self.num_features, self.num_classes), 0.01),
            "bias": np.zeros(self.num_classes, dtype=np.float32),
        }

    def predict_logits(self, params: Mapping[str, _Array], x: NDArray[np.floating]) -> _Array:
        """Class scores of shape (n, num_classes)."""
        w, b = params["weight"], params["bias"]
        xs = _check_x(x, self.num_features, w.dtype)
        return xs @ w + b

    def loss_and_grad(
        self, params: Mapping[str, _Array], x: NDArray[np.floating], y: NDArray[np.integer]
    ) -> tuple[float, Params]:
        """Mean cross-entropy plus L2 penalty, and its gradient."""
        w, b = params["weight"], params["bias"]
        xs = _check_x(x, self.num_features, w.dtype)
        labels = _check_y(y, xs.shape[0], self.num_classes)
        loss, dlogits = _softmax_cross_entropy(xs @ w + b, labels)
        loss += 0.5 * self.l2 * float(np.sum(w * w))
        grads: Params = {
            "weight": xs.T @ dlogits + self.l2 * w,
            "bias": dlogits.sum(axis=0),
        }
        return loss, grads


@dataclass(frozen=True)
class MLP:
    """One hidden ReLU layer: ``fc2(relu(fc1(x)))``, He-initialised.

    The loss is mean cross-entropy plus ``l2 / 2`` times the squared norm of both weight
    matrices (biases are not penalised).
    """

    num_features: int = 64
    hidden: int = 32
    num_classes: int = 10
    l2: float = 1e-4

    def __post_init__(self) -> None:
        _check_dims(num_features=self.num_features, num_classes=self.num_classes, l2=self.l2)
        integer("hidden", self.hidden, at_least=1)

    def init_params(self, rng: np.random.Generator) -> Params:
        """He-normal weights (suited to ReLU) and zero biases."""
        return {
            "fc1.weight": _normal(
                rng, (self.num_features, self.hidden), math.sqrt(2.0 / self.num_features)
            ),
            "fc1.bias": np.zeros(self.hidden, dtype=np.float32),
            "fc2.weight": _normal(
                rng, (self.hidden, self.num_classes), math.sqrt(2.0 / self.hidden)
            ),
            "fc2.bias": np.zeros(self.num_classes, dtype=np.float32),
        }

    def predict_logits(self, params: Mapping[str, _Array], x: NDArray[np.floating]) -> _Array:
        """Class scores of shape (n, num_classes)."""
        xs = _check_x(x, self.num_features, params["fc1.weight"].dtype)
        return self._forward(params, xs)[1]

    def loss_and_grad(
        self, params: Mapping[str, _Array], x: NDArray[np.floating], y: NDArray[np.integer]
    ) -> tuple[float, Params]:
        """Mean cross-entropy plus L2 penalty, and its gradient by backpropagation."""
        w1, w2 = params["fc1.weight"], params["fc2.weight"]
        xs = _check_x(x, self.num_features, w1.dtype)
        labels = _check_y(y, xs.shape[0], self.num_classes)
        hidden, logits = self._forward(params, xs)
        loss, dlogits = _softmax_cross_entropy(logits, labels)
        loss += 0.5 * self.l2 * (float(np.sum(w1 * w1)) + float(np.sum(w2 * w2)))
        # ReLU passes gradient only where its output is positive.
        dhidden = (dlogits @ w2.T) * (hidden > 0)
        grads: Params = {
            "fc1.weight": xs.T @ dhidden + self.l2 * w1,
            "fc1.bias": dhidden.sum(axis=0),
            "fc2.weight": hidden.T @ dlogits + self.l2 * w2,
            "fc2.bias": dlogits.sum(axis=0),
        }
        return loss, grads

    @staticmethod
    def _forward(params: Mapping[str, _Array], xs: _Array) -> tuple[_Array, _Array]:
        hidden = np.maximum(xs @ params["fc1.weight"] + params["fc1.bias"], 0)
        return hidden, hidden @ params["fc2.weight"] + params["fc2.bias"]


MODELS: Mapping[str, Callable[..., Model]] = MappingProxyType(
    {"mlp": MLP, "softmax": SoftmaxRegression}
)
"""Model factories by name, for choosing one from the command line."""


def evaluate(
    model: Model,
    params: Mapping[str, _Array],
    x: NDArray[np.floating],
    y: NDArray[np.integer],
) -> tuple[float, float]:
    """Mean cross-entropy (no L2 penalty) and accuracy of ``params`` on ``(x, y)``."""
    logits = model.predict_logits(params, x)
    labels = _check_y(y, logits.shape[0], logits.shape[1])
    loss, _ = _softmax_cross_entropy(logits, labels)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    return loss, accuracy


def train(
    model: Model,
    params: Mapping[str, _Array],
    x: NDArray[np.floating],
    y: NDArray[np.integer],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    rng: np.random.Generator,
) -> tuple[Params, float]:
    """Minibatch SGD on fresh copies of ``params``; the inputs are left untouched.

    Returns the trained parameters and the example-weighted mean training loss over the last
    epoch, each batch's loss taken just before its update.
    """
    integer("epochs", epochs, at_least=1)
    integer("batch_size", batch_size, at_least=1)
    real("learning_rate", learning_rate, above=0)
    num_examples = len(x)
    if num_examples == 0:
        raise ParameterValueError("cannot train on an empty dataset")
    if len(y) != num_examples:
        raise ParameterValueError(f"x has {num_examples} rows but y has {len(y)} labels")

    # Updates below are in place, so they must land on copies, never on the caller's arrays.
    current: Params = {name: np.array(value, copy=True) for name, value in params.items()}
    epoch_loss = math.nan
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        total = 0.0
        for start in range(0, num_examples, batch_size):
            batch = order[start : start + batch_size]
            loss, grads = model.loss_and_grad(current, x[batch], y[batch])
            for name, grad in grads.items():
                current[name] -= learning_rate * grad
            total += loss * batch.size
        epoch_loss = total / num_examples
    return current, epoch_loss


def _softmax_cross_entropy(logits: _Array, labels: NDArray[np.intp]) -> tuple[float, _Array]:
    """Mean cross-entropy and its gradient w.r.t. the logits, via log-sum-exp."""
    # Shifting by the row max keeps exp() from overflowing; it cancels out of the softmax.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(labels.size)
    loss = -float(np.mean(log_probs[rows, labels]))
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= labels.size
    return loss, dlogits


def _normal(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> _Array:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _check_dims(*, num_features: int, num_classes: int, l2: float) -> None:
    integer("num_features", num_features, at_least=1)
    integer("num_classes", num_classes, at_least=2)
    real("l2", l2, at_least=0)


def _check_x(x: NDArray[np.floating], num_features: int, dtype: np.dtype[np.float32]) -> _Array:
    # Compute in the parameters' dtype, so float64 parameters give a float64 gradient check.
    xs = np.asarray(x, dtype=dtype)
    if xs.ndim != 2 or xs.shape[1] != num_features:
        raise ParameterValueError(f"x must have shape (n, {num_features}), got {xs.shape}")
    if xs.shape[0] == 0:
        raise ParameterValueError("x has no rows")
    return xs


def _check_y(y: NDArray[np.integer], num_examples: int, num_classes: int) -> NDArray[np.intp]:
    labels = np.asarray(y)
    if labels.shape != (num_examples,):
        raise ParameterValueError(f"y must have shape ({num_examples},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ParameterValueError(f"y must hold integer labels, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        # Not which labels: a node's error reply would carry them off its data.
        raise ParameterValueError(f"labels must be in [0, {num_classes})")
    return labels.astype(np.intp, copy=False)

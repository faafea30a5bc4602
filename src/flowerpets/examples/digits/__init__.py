"""Federated learning on scikit-learn's 8x8 handwritten digits: data, partitions and models."""

from __future__ import annotations

from .data import (
    DigitsData,
    load_digits_split,
    partition_dirichlet,
    partition_iid,
)
from .model import (
    MLP,
    MODELS,
    Model,
    Params,
    SoftmaxRegression,
    evaluate,
    train,
)

__all__ = [
    "DigitsData",
    "MLP",
    "MODELS",
    "Model",
    "Params",
    "SoftmaxRegression",
    "evaluate",
    "load_digits_split",
    "partition_dirichlet",
    "partition_iid",
    "train",
]

"""Federated learning on scikit-learn's 8x8 handwritten digits: data, partitions and models."""

from __future__ import annotations

from .apps import DigitsTask, TrainSettings, make_client_app, make_server_app
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
    "DigitsTask",
    "MLP",
    "MODELS",
    "Model",
    "Params",
    "SoftmaxRegression",
    "TrainSettings",
    "evaluate",
    "load_digits_split",
    "make_client_app",
    "make_server_app",
    "partition_dirichlet",
    "partition_iid",
    "train",
]

"""The digits demo's ``--he`` switch, and the digits federation under CKKS."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("sklearn")

from flowerpets import FullParticipation
from flowerpets.examples.digits import (
    DigitsTask,
    SoftmaxRegression,
    evaluate,
    load_digits_split,
    make_client_app,
    make_server_app,
    partition_iid,
)
from flowerpets.examples.digits.features import DemoFeature
from flowerpets.examples.digits.pets.he import HEFeature
from flowerpets.he import COMPACT, WIDE, CKKSClientMod, HomomorphicAggregation, open_model
from flowerpets.simulation import run_simulation


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    HEFeature().add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_turn_into_mods() -> None:
    feature: DemoFeature = HEFeature()
    assert feature.mods(_args(), task=None).client == ()  # type: ignore[arg-type]
    on = feature.mods(_args("--he"), task=None)  # type: ignore[arg-type]
    (client,), (server,) = on.client, on.server
    assert isinstance(client, CKKSClientMod) and client.encrypt == ("*",)
    assert isinstance(server, HomomorphicAggregation) and server.params == COMPACT
    assert "compact" in on.summary and "all arrays" in on.summary
    wide = feature.mods(  # type: ignore[arg-type]
        _args("--he", "--he-params", "wide", "--he-encrypt", "weight", "--he-encrypt", "b*"),
        task=None,
    )
    assert wide.server[0].params == WIDE  # type: ignore[attr-defined]
    assert wide.client[0].encrypt == ("weight", "b*")  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        _args("--he-params", "tiny")


def test_digits_under_ckks_learn_what_plain_digits_learn() -> None:
    data = load_digits_split(seed=0)
    partitions = partition_iid(len(data.y_train), 5, np.random.default_rng(0))
    task = DigitsTask.create(data, partitions, SoftmaxRegression(), seed=0)
    mods = HEFeature().mods(_args("--he"), task)
    runs = {}
    for name, client_mods, server_mods in (("plain", [], []), ("he", mods.client, mods.server)):
        server = make_server_app(
            task,
            num_rounds=3,
            sampling=FullParticipation(),
            federated_evaluation=True,
            mods=server_mods,
            seed=0,
        )
        runs[name] = run_simulation(server, make_client_app(task, mods=client_mods), 5, seed=0)
    plain, he = runs["plain"], runs["he"]
    model = open_model(he.arrays, he.contexts[0])
    for name, array in plain.arrays.items():
        np.testing.assert_allclose(model[name].numpy(), array.numpy(), atol=1e-6)
    accuracy = evaluate(
        task.model, {n: a.numpy() for n, a in model.items()}, data.x_test, data.y_test
    )[1]
    assert accuracy == plain.history.last("accuracy") > 0.85
    # The server cannot evaluate a sealed model; the nodes' federated evaluation can.
    assert np.isnan(he.history.last("accuracy"))
    assert he.history.last("accuracy", source="evaluate_metrics") == pytest.approx(
        plain.history.last("accuracy", source="evaluate_metrics")
    )

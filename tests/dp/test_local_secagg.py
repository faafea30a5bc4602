"""LocalDpMod inside SecAgg+: the combination runs (issue 9, item 10), in a simulation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    FedAvg,
    Message,
    MetricRecord,
    RecordDict,
    ServerApp,
)
from flowerpets.dp import LocalDpMod
from flowerpets.dp._primitives.clip import clip_update
from flowerpets.secagg import SecAggPlus, secaggplus_mod
from flowerpets.simulation import run_simulation

pytestmark = pytest.mark.filterwarnings("ignore::flowerpets.exceptions.InsecureRandomnessWarning")

NODES = 8
MODEL = np.linspace(-0.5, 0.5, 16)


def delta_of(pid: int) -> np.ndarray:
    # Two of the eight updates are above the clip (1.0), the others below.
    return np.full(16, 0.4 if pid < 2 else 0.05 * (pid - 3))


def client_app(local: LocalDpMod) -> ClientApp:
    app = ClientApp(mods=[secaggplus_mod, local])  # local DP inside, masking outside

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = context.node_config["partition-id"]
        assert isinstance(pid, int)
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        new = {n: np.asarray(a.numpy()) + delta_of(pid) for n, a in arrays.items()}
        metrics = MetricRecord({"num-examples": 100 + pid, "train-loss": 0.25 * pid})
        return RecordDict({"arrays": ArrayRecord(new), "metrics": metrics})

    return app


def simulate(local: LocalDpMod, secagg: SecAggPlus, rounds: int = 2) -> Any:
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=rounds,
        initial_arrays=ArrayRecord({"w": MODEL}),
        mods=[secagg],
    )
    return run_simulation(server, client_app(local), NODES, seed=3, max_workers=1)


def test_local_dp_inside_secagg_trains_every_round_with_uniform_weights() -> None:
    local = LocalDpMod(clipping_norm=1.0, epsilon=8.0, delta=1e-5, rng=np.random.default_rng(6))
    # Weight 1: max_weight=1 gives the quantization its full resolution for weight 1.
    result = simulate(local, SecAggPlus(max_weight=1))
    for rnd in (1, 2):
        record = result.history.round(rnd)
        assert record.ok and len(record.participants) == NODES and not record.failures
    # FedAvg's mean of the noised replies, with weight 1 each: the same seeded draws, in any
    # order of the nodes, sum to the same noise.
    noise = np.random.default_rng(6)
    model = MODEL.copy()
    for _ in range(2):
        clipped = [clip_update({"w": delta_of(pid)}, 1.0).arrays["w"] for pid in range(NODES)]
        draws = [noise.normal(0.0, local.sigma, size=16) for _ in range(NODES)]
        model = model + (np.sum(clipped, axis=0) + np.sum(draws, axis=0)) / NODES
    # SecAgg+ quantizes each value to 2^-k of its +-8 range: far below the noise.
    np.testing.assert_allclose(result.arrays["w"].numpy(), model, atol=1e-6)
    for context in result.contexts:
        assert local.spent(context) == pytest.approx(local.spent(result.contexts[0]))


def test_a_secure_metric_must_be_kept_by_name_to_be_summed() -> None:
    dropped = LocalDpMod(clipping_norm=1.0, epsilon=8.0, delta=1e-5, rng=np.random.default_rng(6))
    secagg = SecAggPlus(secure_metrics=("train-loss",), max_weight=1)
    record = simulate(dropped, secagg, rounds=1).history.round(1)
    assert not record.ok  # the loss is not protected by local DP: dropped, and SecAgg+ refuses
    with pytest.warns(UserWarning, match=r"\['train-loss'\] without noise"):
        kept = LocalDpMod(
            clipping_norm=1.0,
            epsilon=8.0,
            delta=1e-5,
            keep_metrics=("train-loss",),
            rng=np.random.default_rng(6),
        )
    result = simulate(kept, secagg, rounds=1)
    record = result.history.round(1)
    assert record.ok and len(record.participants) == NODES
    # Summed under the masks with weight 1: the mean of 0.25 * pid.
    assert record.train_metrics["train-loss"] == pytest.approx(0.25 * 3.5, abs=1e-6)

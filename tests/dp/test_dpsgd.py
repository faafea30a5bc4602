"""DpSgd: Opacus training with our noise, epsilon across rounds, budgets, and the lazy import."""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from flowerpets.core import ConfigRecord, Context
from flowerpets.core.state import VERSION_KEY
from flowerpets.dp import DpSgd
from flowerpets.dp.accountant import PldAccountant, PoissonSampledGaussian, RdpAccountant
from flowerpets.exceptions import ParameterTypeError, ParameterValueError, RequestRefusedError

pytestmark = pytest.mark.filterwarnings("ignore::flowerpets.exceptions.InsecureRandomnessWarning")


def test_importing_dp_does_not_import_torch() -> None:
    code = (
        "import sys, flowerpets.dp\n"
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules\n"
        "assert 'dp_accounting' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


torch = pytest.importorskip("torch")
pytest.importorskip("opacus")


def dataset(n: int = 64, features: int = 5, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def model(features: int = 5, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Linear(features, 2)


def weights(m: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def test_epsilon_is_the_accountants_over_every_round() -> None:
    dpsgd = DpSgd(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        batch_size=16,
        epochs=2,
        rng=np.random.default_rng(0),
    )
    context = Context(1)
    first = dpsgd.train(model(), dataset(), context)
    assert first.sample_rate == 0.25 and first.steps == 8  # q = 1 / ceil(64 / 16), 2 epochs
    expected = PldAccountant().compose(PoissonSampledGaussian(1.0, 0.25), 8)
    assert first.epsilon == pytest.approx(expected.get_epsilon(1e-5), rel=1e-12)
    second = dpsgd.train(model(), dataset(), context)
    both = PldAccountant().compose(PoissonSampledGaussian(1.0, 0.25), 16)
    assert second.epsilon == pytest.approx(both.get_epsilon(1e-5), rel=1e-12)
    assert DpSgd.history(context) == {(1.0, 0.25): 16}
    metrics = second.metrics()
    assert metrics["dp-sample-epsilon"] == second.epsilon


def test_reply_metrics_reveal_neither_the_dataset_size_nor_the_loss_unless_asked() -> None:
    # Issue 9, item 6: metrics() sent the exact num-examples and an unnoised train-loss.
    dpsgd = DpSgd(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        batch_size=16,
        rng=np.random.default_rng(0),
    )
    report = dpsgd.train(model(), dataset(n=61), Context(1))
    metrics = report.metrics()
    assert metrics == {
        "dp-sample-epsilon": report.epsilon,
        "dp-sample-delta": 1e-5,
        "num-examples": 1,  # FedAvg weighs every client alike
    }
    with pytest.warns(UserWarning, match="does not cover them"):
        exact = report.metrics(unprotected=True)
    assert exact["num-examples"] == 61 and exact["train-loss"] == report.loss


def test_rdp_epsilon_matches_opacus_own_accountant() -> None:
    from opacus.accountants import RDPAccountant

    dpsgd = DpSgd(
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        delta=1e-5,
        batch_size=8,
        accountant=RdpAccountant,
        rng=np.random.default_rng(0),
    )
    report = dpsgd.train(model(), dataset(), Context(1))
    theirs = RDPAccountant()
    theirs.history = [(0.8, report.sample_rate, report.steps)]
    # The same RDP mathematics over slightly different grids of orders.
    assert report.epsilon == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-3)
    assert report.epsilon == pytest.approx(
        RdpAccountant().compose(PoissonSampledGaussian(0.8, 0.125), 8).get_epsilon(1e-5)
    )


def test_training_learns_and_is_reproducible_with_a_seed() -> None:
    def trained() -> dict[str, np.ndarray]:
        m = model()
        DpSgd(
            noise_multiplier=0.5,
            max_grad_norm=1.0,
            delta=1e-5,
            batch_size=16,
            epochs=5,
            learning_rate=0.5,
            rng=np.random.default_rng(3),
        ).train(m, dataset(), Context(1))
        return weights(m)

    one, two = trained(), trained()
    assert all(np.array_equal(one[k], two[k]) for k in one)
    m = model()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in one.items()})
    data = dataset(n=500, seed=1)
    x, y = data.tensors
    accuracy = float((m(x).argmax(dim=1) == y).float().mean())
    assert accuracy > 0.8  # a linear separable task, learned through the noise


def test_noise_has_the_calibrated_standard_deviation() -> None:
    # Gradients are zero, so one step moves the weights by -lr * noise / expected batch.
    # The secure source, unseeded: for 2,000 normals, P(|std / sigma - 1| > 0.1) = 2.8e-10
    # (chi-square with 1,999 degrees of freedom).
    features, n = 2000, 8
    m = torch.nn.Linear(features, 1, bias=False)
    torch.nn.init.zeros_(m.weight)
    data = torch.utils.data.TensorDataset(torch.zeros(n, features), torch.zeros(n, 1))
    dpsgd = DpSgd(
        noise_multiplier=1.5, max_grad_norm=0.4, delta=1e-5, batch_size=n, learning_rate=1.0
    )
    report = dpsgd.train(m, data, Context(1), loss_fn=lambda out, y: (out * 0.0).sum())
    assert report.steps == 1 and report.sample_rate == 1.0
    noise = -m.weight.detach().numpy().ravel() * n
    assert noise.std() == pytest.approx(1.5 * 0.4, rel=0.1)


def test_budget_refuses_before_training() -> None:
    one_round = PldAccountant().compose(PoissonSampledGaussian(1.0, 0.25), 4).get_epsilon(1e-5)
    dpsgd = DpSgd(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        batch_size=16,
        max_epsilon=one_round * 1.2,
        rng=np.random.default_rng(0),
    )
    context = Context(1)
    dpsgd.train(model(), dataset(), context)
    m = model()
    before = weights(m)
    with pytest.raises(RequestRefusedError, match="DP-SGD budget"):
        dpsgd.train(m, dataset(), context)
    assert all(np.array_equal(before[k], weights(m)[k]) for k in before)
    assert DpSgd.history(context) == {(1.0, 0.25): 4}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise_multiplier": 0.0}, ParameterValueError, "noise_multiplier"),
        ({"max_grad_norm": -1.0}, ParameterValueError, "max_grad_norm"),
        ({"delta": 1.0}, ParameterValueError, "delta"),
        ({"batch_size": 0}, ParameterValueError, "batch_size"),
        ({"epochs": 1.5}, ParameterTypeError, "epochs"),
        ({"accountant": "pld"}, ParameterTypeError, "accountant"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any], error: type, match: str) -> None:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "batch_size": 8}
    with pytest.raises(error, match=match):
        DpSgd(**{**settings, **kwargs})


def test_empty_poisson_batches_still_step() -> None:
    # q = 1/4 over 4 examples: about a third of the batches are empty.
    data = dataset(n=4)
    m = model()
    before = weights(m)
    report = DpSgd(
        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, batch_size=1, epochs=5
    ).train(m, data, Context(1))
    assert report.steps == 20
    after = weights(m)
    assert all(
        np.all(np.isfinite(after[k])) and not np.array_equal(before[k], after[k]) for k in after
    )


def test_the_node_state_is_a_versioned_record_and_the_helper_pickles_after_training() -> None:
    dpsgd = DpSgd(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, batch_size=16)
    context = Context(1)
    dpsgd.train(model(), dataset(), context)  # the secure noise source is now in use
    record = context.state["dp.sgd"]
    assert isinstance(record, ConfigRecord)
    assert set(record) == {VERSION_KEY, "noise-multipliers", "sample-rates", "steps"}
    assert record["steps"] == [4] and record["sample-rates"] == [0.25]
    clone = pickle.loads(pickle.dumps(dpsgd))
    assert clone.spent(context) == dpsgd.spent(context) > 0
    clone.train(model(), dataset(), context)
    assert DpSgd.history(context) == {(1.0, 0.25): 8}


@pytest.mark.parametrize(
    "fields",
    [
        {"noise-multipliers": [1.0], "sample-rates": [0.25], "steps": [-4]},  # gives budget back
        {"noise-multipliers": [1.0, 1.0], "sample-rates": [0.25, 0.25], "steps": [1, 1]},
        {"noise-multipliers": [1.0], "sample-rates": [0.25], "steps": []},
        {"noise-multipliers": [1.0], "sample-rates": [1.5], "steps": [4]},
    ],
)
def test_a_state_it_cannot_read_is_refused(fields: dict[str, Any]) -> None:
    context = Context(1)
    context.state["dp.sgd"] = ConfigRecord({VERSION_KEY: 1, **fields})
    with pytest.raises(RequestRefusedError, match="corrupt"):
        DpSgd.history(context)

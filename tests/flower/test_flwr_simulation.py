"""Our PETs in flwr's own simulation (``flwr.simulation.run_simulation``, Ray backend).

Few and small: 3 nodes, 2 rounds, one Ray session shared by the module (flwr starts
Ray only if it is not running, and its shutdown is held until the module ends),
one actor. Each test compares with our own ``run_simulation`` on the same seeds.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from flwr.simulation import run_simulation as flwr_run_simulation  # noqa: E402
from ray import cloudpickle as ray_cloudpickle  # noqa: E402

from flowerpets.dp import CentralDp, fixed_clipping_mod  # noqa: E402
from flowerpets.exceptions import InsecureRandomnessWarning  # noqa: E402
from flowerpets.flower import ClientApp, FlowerServerApp, client_app, mods, server_app  # noqa: E402
from flowerpets.he import HomomorphicAggregation, ckks_mod  # noqa: E402
from flowerpets.secagg import SecAggPlus, secaggplus_mod  # noqa: E402
from flowerpets.simulation import run_simulation  # noqa: E402

pytestmark = pytest.mark.slow
N = 3
BACKEND = {"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}}


@pytest.fixture(scope="module", autouse=True)
def one_ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    shutdown = ray.shutdown
    ray.shutdown = lambda *a, **k: None  # flwr's backend calls it after every run
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Override conftest's: flwr's simulation sets the ServerApp's identity itself."""


@pytest.fixture
def by_value(kit: SimpleNamespace) -> None:
    # Ray's workers cannot import this test folder: ship its helpers by value.
    for pickler in (cloudpickle, ray_cloudpickle):
        pickler.register_pickle_by_value(sys.modules[kit.numpy_client.__module__])


def _flwr(kit, server_mods=(), client_mods=(), *, native=True, rounds=2):  # type: ignore[no-untyped-def]
    if native:
        app = ClientApp(mods=[mods(*client_mods)] if client_mods else [])
        app.train()(kit.flwr_train)
    else:
        app = client_app(kit.numpy_client(client_mods))
    server: FlowerServerApp = server_app(kit.numpy_server(server_mods, rounds=rounds), min_nodes=N)
    flwr_run_simulation(server, app, N, backend_config=BACKEND)
    assert server.last_result is not None
    return server.last_result


def _ours(kit, server_mods=(), client_mods=(), rounds=2):  # type: ignore[no-untyped-def]
    return run_simulation(
        kit.numpy_server(server_mods, rounds=rounds), kit.numpy_client(client_mods), N, seed=1
    )


def _close(a, b, atol):  # type: ignore[no-untyped-def]
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=atol)


def test_plain_fedavg_equals_our_simulation(kit: SimpleNamespace, by_value: None) -> None:
    # Arrival order differs, so the float64 sums may differ in the last bits (see test_bridge).
    got = _flwr(kit, native=False)
    _close(got.arrays, _ours(kit).arrays, atol=1e-6)
    assert all(len(r.participants) == N for r in got.history.rounds)


def test_secagg(kit: SimpleNamespace, by_value: None) -> None:
    got = _flwr(kit, [SecAggPlus()], [secaggplus_mod])
    bound = got.history[0].train_metrics["secagg-mean-error-bound"]
    _close(got.arrays, _ours(kit).arrays, atol=2 * 2 * bound)


def test_central_dp_with_secagg(kit: SimpleNamespace, by_value: None) -> None:
    def server_mods():  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRandomnessWarning)
            dp = CentralDp(noise_multiplier=0.5, clipping_norm=1.0, rng=np.random.default_rng(3))
        return [dp, SecAggPlus()]

    client_mods = [secaggplus_mod, fixed_clipping_mod]
    got = _flwr(kit, server_mods(), client_mods)
    want = _ours(kit, server_mods(), client_mods)
    eps = [r.train_metrics["epsilon"] for r in got.history.rounds]
    assert eps == [r.train_metrics["epsilon"] for r in want.history.rounds] and eps[0] < eps[1]
    _close(got.arrays, want.arrays, atol=1e-3)


def test_distributed_dp_with_secagg(kit: SimpleNamespace, by_value: None) -> None:
    from flowerpets.dp import DistributedDp, DistributedDpMod

    def server_mods():  # type: ignore[no-untyped-def]
        return [DistributedDp(noise_multiplier=0.5, clipping_norm=1.0), SecAggPlus()]

    client_mods = [secaggplus_mod, DistributedDpMod()]
    got = _flwr(kit, server_mods(), client_mods)
    want = _ours(kit, server_mods(), client_mods)
    for rounds in (got.history.rounds, want.history.rounds):
        assert all(r.ok and len(r.participants) == N for r in rounds)
    eps = [r.train_metrics["epsilon"] for r in got.history.rounds]
    assert eps == [r.train_metrics["epsilon"] for r in want.history.rounds] and eps[0] < eps[1]
    # Each run's noise is its own (secure, unseeded): the two models differ by noise only,
    # two rounds of it, well within 8 standard deviations of the difference per value.
    std = got.history.rounds[0].train_metrics["dp-noise-std"]
    _close(got.arrays, want.arrays, atol=8 * std * 2)


def test_ckks(kit: SimpleNamespace, by_value: None) -> None:
    got = _flwr(kit, [HomomorphicAggregation()], [ckks_mod], rounds=1)
    record = got.history[0]
    assert record.ok and len(record.participants) == N, record.to_dict()


def test_local_dp(kit: SimpleNamespace, by_value: None) -> None:
    from flowerpets.dp import LocalDpMod

    mod = LocalDpMod(clipping_norm=10.0, epsilon=2.0, delta=1e-5)
    got = _flwr(kit, (), [mod], rounds=1)
    record = got.history[0]
    assert record.ok and len(record.participants) == N
    assert record.train_metrics["dp-local-epsilon"] == pytest.approx(2.0)

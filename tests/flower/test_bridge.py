"""Our ServerApp and PETs end to end through the bridge, both sides, with flwr's own objects.

The nodes run real flwr ClientApps (shipped through cloudpickle, messages through
flwr's protobuf serde) over ``LocalFlwrGrid`` (see conftest): the whole bridge
without Ray's start-up cost. ``test_flwr_simulation.py`` runs a few of these in
flwr's real simulation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flowerpets.core import ErrorCode
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.exceptions import InsecureRandomnessWarning
from flowerpets.flower import ClientApp, Settings, client_app, mods
from flowerpets.he import HomomorphicAggregation, ckks_mod
from flowerpets.secagg import (
    IdentityKey,
    NodeConfigKey,
    NodeIdentities,
    SecAggPlus,
    SecAggPlusClientMod,
    Stage,
    secaggplus_mod,
)
from flowerpets.secagg.protocol import RECORD
from flowerpets.secagg.threat import MODELS, Threat
from flowerpets.simulation import run_simulation

N = 4


def _ours(kit: SimpleNamespace, server_mods=(), client_mods=(), **kw):  # type: ignore[no-untyped-def]
    return run_simulation(
        kit.numpy_server(server_mods, **kw), kit.numpy_client(client_mods), N, seed=1
    )


def _bridged(
    kit, server_mods=(), client_mods=(), *, native=False, grid_kw=None, run_config=None, **kw
):  # type: ignore[no-untyped-def]
    if native:  # plain Flower handler code behind our mods
        app = ClientApp(mods=[mods(*client_mods)] if client_mods else [])
        app.train()(kit.flwr_train)
    else:  # our whole ClientApp
        app = client_app(kit.numpy_client(client_mods))
    grid = kit.LocalFlwrGrid(app, N, **(grid_kw or {}))
    return kit.run_bridge(kit.numpy_server(server_mods, **kw), grid, run_config), grid


def _close(a, b, atol):  # type: ignore[no-untyped-def]
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("native", [False, True], ids=["our-client-app", "flwr-handler"])
def test_plain_fedavg_equals_our_simulation(kit: SimpleNamespace, native: bool) -> None:
    """Same seeds, same partitions: the same model. Not bit-exact in general: the weighted sum
    is taken in reply-arrival order, and float addition is not associative (float64 sums,
    float32 model: a few float32 ulps at most)."""
    want = _ours(kit)
    app, grid = _bridged(kit, native=native)
    got = app.last_result
    _close(got.arrays, want.arrays, atol=1e-6)
    assert [r.participants and len(r.participants) for r in got.history.rounds] == [N, N]
    assert grid.pulls > 1  # replies were streamed, one pull at a time
    first_round = grid.pushed[:N]
    assert all(m.content is first_round[0].content for m in first_round)  # converted once


def test_the_flwr_result_and_history_file_come_back(kit: SimpleNamespace, tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    app, _ = _bridged(kit, run_config={"num-server-rounds": 3, "history-file": str(path)})
    assert len(app.last_result.history) == 3
    assert sorted(app.last_flwr_result.train_metrics_clientapp) == [1, 2, 3]
    np.testing.assert_array_equal(
        app.last_flwr_result.arrays["w"].numpy(), app.last_result.arrays["w"].numpy()
    )
    assert [r["round"] for r in json.loads(path.read_text())] == [1, 2, 3]


def test_secagg_through_the_bridge_sums_as_our_simulation(kit: SimpleNamespace) -> None:
    want = _ours(kit, [SecAggPlus()], [secaggplus_mod])
    app, grid = _bridged(kit, [SecAggPlus()], [secaggplus_mod], native=True)
    got = app.last_result
    bound = got.history[0].train_metrics["secagg-mean-error-bound"]
    _close(got.arrays, want.arrays, atol=2 * 2 * bound)  # two rounds, both within their bound
    stages = {m.metadata.group_id.partition(":")[2] for m in grid.pushed}
    semi_honest = MODELS[Threat.SEMI_HONEST].stages
    assert set(semi_honest) <= stages  # every stage travelled as '<round>:<stage>'


def test_secagg_survives_a_node_lost_in_the_masked_input_stage(kit: SimpleNamespace) -> None:
    app, grid = _bridged(
        kit,
        [SecAggPlus(dropout_rate=0.3)],
        [secaggplus_mod],
        grid_kw={"silent": [2], "silent_from": Stage.COLLECT_MASKED_INPUT},
        rounds=1,
    )
    record = app.last_result.history[0]
    assert record.ok and len(record.participants) == N - 1
    lost = grid.node_ids[2]
    assert record.failures[lost].error.code is ErrorCode.NODE_UNAVAILABLE
    # The survivors' weighted mean, computed in the clear from the same training.
    want = kit.numpy_server(rounds=1).initial_arrays["w"].numpy().astype(np.float64)
    total, acc = 0, 0.0
    for pid in (0, 1, 3):
        rng = np.random.default_rng([7, pid, 1])
        acc = acc + (pid + 1) * (want + rng.normal(size=want.shape)).astype(np.float32)
        total += pid + 1
    bound = record.train_metrics["secagg-mean-error-bound"]
    np.testing.assert_allclose(app.last_result.arrays["w"].numpy(), acc / total, atol=2 * bound)


def test_central_dp_with_secagg_through_the_bridge(kit: SimpleNamespace) -> None:
    def server_mods():  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRandomnessWarning)
            dp = CentralDp(noise_multiplier=0.5, clipping_norm=1.0, rng=np.random.default_rng(3))
        return [dp, SecAggPlus()]

    client_mods = [secaggplus_mod, fixed_clipping_mod]
    want = _ours(kit, server_mods(), client_mods)
    app, _ = _bridged(kit, server_mods(), client_mods, native=True)
    got = app.last_result
    eps = [r.train_metrics["epsilon"] for r in got.history.rounds]
    assert eps == [r.train_metrics["epsilon"] for r in want.history.rounds]
    assert eps[0] < eps[1]
    _close(got.arrays, want.arrays, atol=1e-3)  # same seeded noise; quantization differs


def test_ckks_through_the_bridge_matches_plain_fedavg(kit: SimpleNamespace) -> None:
    plain = _ours(kit)
    app, grid = _bridged(kit, [HomomorphicAggregation()], [ckks_mod], native=True, rounds=1)
    record = app.last_result.history[0]
    assert record.ok and len(record.participants) == N
    assert any(m.metadata.message_type == "query.flowerpets_he_keys" for m in grid.pushed)
    # The model stays sealed on the server; a node opens it as our own simulation does.
    from flowerpets.core import Context
    from flowerpets.flower.messages import state_from_flwr
    from flowerpets.he import open_model

    node = grid.contexts[grid.node_ids[0]]
    ctx = Context(node_id=node.node_id, state=state_from_flwr(node.state))
    opened = open_model(app.last_result.arrays, ctx)
    first = kit.numpy_server(rounds=1)
    want = run_simulation(first, kit.numpy_client(), N, seed=1).arrays
    for name in want:
        np.testing.assert_allclose(np.asarray(opened[name]), want[name].numpy(), atol=1e-3)
    assert plain.arrays  # the two-round plain run also ran


def test_run_config_maps_to_settings() -> None:
    s = Settings.from_run_config(
        {"num-server-rounds": 4, "seed": 2, "min-nodes": 3, "node-timeout": 1.5}
    )
    assert (s.num_rounds, s.seed, s.min_nodes, s.node_timeout) == (4, 2, 3, 1.5)
    for bad in ({"num-server-rounds": 0}, {"seed": "x"}, {"node-timeout": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings.from_run_config(bad)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_malicious_mode_through_the_bridge_sums_as_the_semi_honest(
    kit: SimpleNamespace, tmp_path: Path, sparse: bool
) -> None:
    """Under Flower the identity keys are provisioned with the app: each node's PEM file,
    named in its node config (``NodeConfigKey``), and the PKI shipped with the ClientApp.
    Every stage, the consistency check included, travels through flwr's messages. The
    node-side mod built so requires the cohort quorum by default and ``SecAggPlus`` sends
    it: on a sparse graph (``k = 2`` of 4 nodes) every unmask request carries the
    signatures of ``q = 3`` other nodes (the complete graph's, ``t``: it needs no quorum)."""
    grid_ids = kit.LocalFlwrGrid(client_app(kit.numpy_client()), N).node_ids
    keys = {node: IdentityKey.generate() for node in grid_ids}
    pki = NodeIdentities({node: key.public_bytes for node, key in keys.items()})
    malicious = SecAggPlusClientMod(identities=pki, identity=NodeConfigKey())
    assert malicious.require_quorum
    app = ClientApp(mods=[mods(malicious)])
    app.train()(kit.flwr_train)
    grid = kit.LocalFlwrGrid(app, N)
    for node, key in keys.items():
        path = tmp_path / f"{node}.key"
        path.write_bytes(key.private_pem())
        grid.contexts[node].node_config["secagg-identity-key"] = str(path)
    graph = {"degree": 2, "threshold": 2} if sparse else {}
    server = SecAggPlus(identities=pki, **graph)
    got = kit.run_bridge(kit.numpy_server([server]), grid).last_result
    assert [len(r.participants) for r in got.history.rounds] == [N, N]
    want = _bridged(kit, [SecAggPlus()], [secaggplus_mod], native=True)[0].last_result
    bound = got.history[0].train_metrics["secagg-mean-error-bound"]
    _close(got.arrays, want.arrays, atol=2 * 2 * bound)  # two rounds, each within its bound
    stages = {m.metadata.group_id.partition(":")[2] for m in grid.pushed}
    assert set(MODELS[Threat.MALICIOUS].stages) <= stages
    signers = 3 if sparse else server.parameters(N).threshold
    unmasks = [m for m in grid.pushed if m.metadata.group_id.endswith(Stage.UNMASK)]
    assert unmasks and all(len(m.content[RECORD]["signers"]) == signers for m in unmasks)

"""The digits ``--app`` targets: the run config decides everything, as the demo's flags do."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from flowerpets.core import ClientApp, Context, ServerApp
from flowerpets.examples.digits import demo, deploy
from flowerpets.simulation import run_simulation


def test_run_config_keys_become_the_demo_s_options() -> None:
    args = deploy.demo_arguments(
        {
            "num-partitions": 5,
            "num-rounds": 3,
            "seed": 7,
            "lr": 0.25,
            "cohort-size": 2,
            "demo-flags": "--model mlp --epochs 2",
        }
    )
    assert (args.clients, args.rounds, args.seed, args.lr, args.cohort_size) == (5, 3, 7, 0.25, 2)
    assert (args.model, args.epochs) == ("mlp", 2)
    defaults = deploy.demo_arguments({})
    assert (defaults.clients, defaults.rounds, defaults.seed) == (20, 10, 0)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"num-rounds": 0}, "--rounds: must be >= 1"),
        ({"demo-flags": "--no-such-flag"}, "unrecognized arguments: --no-such-flag"),
        ({"model": "nope"}, "invalid choice: 'nope'"),
    ],
)
def test_a_bad_run_config_is_a_clear_value_error(config: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        deploy.demo_arguments(config)  # type: ignore[arg-type]


def test_the_apps_compute_what_the_demo_computes() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = io.StringIO()
    argv = ["--clients", "3", "--rounds", "2", "--seed", "4", "--json"]
    assert demo.run(parser.parse_args(argv), out=out) == 0
    expected = json.loads(out.getvalue())["history"]
    config = {"num-partitions": 3, "num-rounds": 2, "seed": 4}
    server_app, client_app = deploy.build(config)
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)
    result = run_simulation(server_app, client_app, 3, seed=4, run_config=config)
    got = [r.server_metrics for r in result.history.rounds]
    assert got == [r["server_metrics"] for r in expected]


def test_the_factories_read_the_run_config() -> None:
    config = {"num-partitions": 2, "num-rounds": 4, "seed": 1}
    assert deploy.server_app(config).num_rounds == 4
    context = Context(5, node_config={"partition-id": 1}, run_config=config)
    app = deploy.client_app(context)
    assert set(app.message_types) == {"train", "evaluate"}
    initial = deploy.server_app(config).initial_arrays
    assert all(np.isfinite(a.numpy()).all() for a in initial.values())

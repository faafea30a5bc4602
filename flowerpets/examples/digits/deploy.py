"""The digits federation as separate processes: ``--app`` targets for the gRPC runtime.

.. code-block:: text

    flowerpets server --app flowerpets.examples.digits.deploy:server_app \\
        --run-config num-partitions=2 num-rounds=3 --seed 7 --min-nodes 2
    flowerpets client --app flowerpets.examples.digits.deploy:client_app \\
        --node-config partition-id=0
    flowerpets client --app flowerpets.examples.digits.deploy:client_app \\
        --node-config partition-id=1

Everything is decided by the *run config*, which the server sends every node
when it joins, so the server and the nodes build the same task (data split,
partitions, model) without sharing anything else. The keys, all optional:

``num-partitions`` (default 20), ``num-rounds`` (10), ``seed`` (0), ``model``,
``partition``, ``alpha``, ``epochs``, ``batch-size``, ``lr``, ``cohort-size``,
``sample-rate``
    the demo's options of the same name (``--clients`` is ``num-partitions``
    and ``--rounds`` is ``num-rounds``);
``demo-flags``
    any other flags of ``flowerpets demo``, as one string, for example the flags
    that turn a PET on; its mods are composed exactly as the demo composes them.

A node needs only its ``partition-id`` in its node config. With the same run
config and seed, a deployment computes what ``flowerpets demo`` computes in
simulation (:func:`build` gives both apps, for comparing).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from typing import NoReturn

from flowerpets.core import ClientApp, ConfigValue, Context, ServerApp
from flowerpets.examples.digits.demo import add_arguments, build_apps
from flowerpets.exceptions import ParameterValueError

__all__ = ["build", "client_app", "demo_arguments", "server_app"]

# Run-config key -> the demo flag it sets.
_FLAGS = {
    "num-partitions": "--clients",
    "num-rounds": "--rounds",
    "seed": "--seed",
    "model": "--model",
    "partition": "--partition",
    "alpha": "--alpha",
    "epochs": "--epochs",
    "batch-size": "--batch-size",
    "lr": "--lr",
    "cohort-size": "--cohort-size",
    "sample-rate": "--sample-rate",
}


def demo_arguments(run_config: Mapping[str, ConfigValue]) -> argparse.Namespace:
    """The demo's options that ``run_config`` describes (defaults for the keys it lacks)."""
    flags = shlex.split(str(run_config.get("demo-flags", "")))
    for key, flag in _FLAGS.items():
        if key in run_config:
            flags += [flag, str(run_config[key])]
    parser = _Parser(prog="digits deploy", allow_abbrev=False)
    add_arguments(parser)
    try:
        return parser.parse_args(flags)
    except ValueError as exc:
        raise ParameterValueError(
            f"the run config {dict(run_config)!r} is not valid: {exc}"
        ) from None


class _Parser(argparse.ArgumentParser):
    """The demo's parser, raising instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ParameterValueError(message)


def build(run_config: Mapping[str, ConfigValue]) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and the ClientApp that ``run_config`` describes (as the demo builds them)."""
    apps = build_apps(demo_arguments(run_config))
    return apps.server_app, apps.client_app


def server_app(run_config: Mapping[str, ConfigValue]) -> ServerApp:
    """``--app ...deploy:server_app``: the ServerApp for the server's run config."""
    return build(run_config)[0]


def client_app(context: Context) -> ClientApp:
    """``--app ...deploy:client_app``: the ClientApp for the run config the server sent."""
    return build(context.run_config)[1]

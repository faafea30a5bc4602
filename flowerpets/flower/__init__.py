"""Run flowerpets inside Flower (flwr): our mods in a flwr ClientApp, our ServerApp as flwr's.

Needs the ``flower`` extra (``pip install 'flowerpets[flower]'``, flwr 1.42).

Client side:

.. code-block:: python

    from flowerpets.flower import ClientApp, mods
    app = ClientApp(mods=[mods(secaggplus_mod, fixed_clipping_mod)])   # a flwr ClientApp

    # or a whole flowerpets ClientApp, handlers and mods:
    app = flowerpets.flower.client_app(my_flowerpets_client_app)

Server side:

.. code-block:: python

    from flowerpets.flower import server_app
    app = server_app(ServerApp(strategy=FedAvg(), num_rounds=3, initial_arrays=arrays,
                               mods=[CentralDp(...), SecAggPlus(...)]))   # a flwr ServerApp

Or keep a Flower strategy and let our mods aggregate (flwr's FedAvg over SecAgg+):

.. code-block:: python

    strategy = secure_strategy(flwr.serverapp.strategy.FedAvg(), mods=[SecAggPlus()])
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

Flower's deployment runtime on this machine (a SuperLink and SuperNodes on loopback,
for trying an app under ``flwr run``): :class:`~flowerpets.flower.deployment.LocalDeployment`.

What maps to what, and what is refused: ``docs/flower.md``.
"""

from typing import Any

from flowerpets.flower.client import (
    BRIDGE_RECORD,
    PROTOCOL_MESSAGE_TYPES,
    ClientApp,
    FlowerMod,
    client_app,
    mods,
)
from flowerpets.flower.grid import FlowerGrid
from flowerpets.flower.server import FlowerServerApp, Settings, flwr_result, server_app
from flowerpets.flower.strategy import (
    WEIGHTED_MEAN_DECLARATION,
    WEIGHTED_MEAN_STRATEGIES,
    SecureStrategy,
    secure_strategy,
)

__all__ = [
    "BRIDGE_RECORD",
    "ClientApp",
    "FlowerGrid",
    "FlowerMod",
    "FlowerServerApp",
    "LocalDeployment",
    "PROTOCOL_MESSAGE_TYPES",
    "SecureStrategy",
    "Settings",
    "WEIGHTED_MEAN_DECLARATION",
    "WEIGHTED_MEAN_STRATEGIES",
    "client_app",
    "flwr_result",
    "mods",
    "secure_strategy",
    "server_app",
]


def __getattr__(name: str) -> Any:
    # LocalDeployment needs psutil and starts processes: a ClientApp process never imports it.
    if name == "LocalDeployment":
        from flowerpets.flower.deployment import LocalDeployment

        return LocalDeployment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Our SecAgg+ round: our ServerApp through the bridge, ``mods(secaggplus_mod)`` on the nodes."""

from __future__ import annotations

from typing import Any

from flwr import app as fl
from flwr.serverapp import Grid
from numpy.typing import NDArray

from flowerpets.flower import ClientApp, mods
from flowerpets.secagg import secaggplus_mod
from fpbench.common import flwr_train, timed
from fpbench.ours_plain import SERVER_SIDE, our_round

client = ClientApp(mods=[mods(secaggplus_mod)])
client.train()(flwr_train)


def _round(grid: Grid, context: fl.Context) -> tuple[NDArray[Any], float, dict[str, Any]]:
    from flowerpets.secagg import SecAggPlus

    nodes = int(context.run_config["nodes"])
    return our_round(grid, context, [SecAggPlus(max_weight=nodes)])


# scipy.special is what the parameter finder loads on its first call: once per process.
server = timed(
    "ours_secagg", _round, warm=(*SERVER_SIDE, "flowerpets.secagg.server", "scipy.special")
)

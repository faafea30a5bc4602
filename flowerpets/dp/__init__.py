"""Differential privacy for federated learning: central DP, local DP, DP-SGD, and accounting.

Central DP (user-level DP-FedAvg): a server mod and a client mod.

.. code-block:: python

    from flowerpets.dp import CentralDp, fixed_clipping_mod

    client_app = ClientApp(mods=[fixed_clipping_mod])
    server_app = ServerApp(..., mods=[CentralDp(noise_multiplier=1.0, clipping_norm=0.5,
                                                delta=1e-5, max_epsilon=8.0)])

Adaptive clipping: ``CentralDp(..., adaptive=AdaptiveClipping())`` on the
server and :func:`adaptive_clipping_mod` on the clients. Clipping on the
server instead: ``CentralDp(..., clip_on=ClipOn.SERVER)`` and no client mod.

Distributed DP (the server sees only a noised sum; needs SecAgg+):
:class:`DistributedDp` on the server, :class:`DistributedDpMod` on the clients
inside ``secaggplus_mod`` (see :mod:`flowerpets.dp.distributed`).

Local DP: ``ClientApp(mods=[LocalDpMod(clipping_norm=..., epsilon=..., delta=...)])``.

Sample-level DP-SGD with Opacus: :class:`DpSgd` (needs the ``dpsgd`` extra).

Privacy accounting and calibration: :mod:`flowerpets.dp.accountant`, and the
``flowerpets accountant`` command. See ``docs/dp.md`` for what each protects
against and what it does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowerpets._lazy import lazy_face

if TYPE_CHECKING:
    from flowerpets.dp import accountant
    from flowerpets.dp.accountant import Neighbouring
    from flowerpets.dp.central import AdaptiveClipping, CentralDp, ClipOn
    from flowerpets.dp.clipping import adaptive_clipping_mod, fixed_clipping_mod
    from flowerpets.dp.distributed import DistributedDp, DistributedDpMod, Mechanism
    from flowerpets.dp.dpsgd import DpSgd, DpSgdReport
    from flowerpets.dp.local import LocalDpMod

# Where each name lives, imported on first use: a node loads its client mod only.
_HOMES = {
    "AdaptiveClipping": "central",
    "CentralDp": "central",
    "ClipOn": "central",
    "DistributedDp": "distributed",
    "DistributedDpMod": "distributed",
    "DpSgd": "dpsgd",
    "DpSgdReport": "dpsgd",
    "LocalDpMod": "local",
    "Mechanism": "distributed",
    "Neighbouring": "accountant",
    "accountant": "accountant",
    "adaptive_clipping_mod": "clipping",
    "fixed_clipping_mod": "clipping",
}
__getattr__, __dir__ = lazy_face(__name__, _HOMES)

__all__ = [
    "AdaptiveClipping",
    "CentralDp",
    "ClipOn",
    "DistributedDp",
    "DistributedDpMod",
    "DpSgd",
    "DpSgdReport",
    "LocalDpMod",
    "Mechanism",
    "Neighbouring",
    "accountant",
    "adaptive_clipping_mod",
    "fixed_clipping_mod",
]

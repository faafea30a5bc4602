"""bench/flower.py's Flower apps: one round of ours and of Flower's own, per module.

Four cases, each a module with a ``server`` (flwr ServerApp) and a ``client``
(flwr ClientApp), so a node's process imports its own case only:

* :mod:`fpbench.ours_secagg`: our SecAgg+ (:func:`flowerpets.flower.server_app`
  with :class:`~flowerpets.secagg.SecAggPlus`; the nodes run a flwr ClientApp
  with ``mods(secaggplus_mod)`` around a plain flwr ``train`` handler);
* :mod:`fpbench.flwr_secagg`: Flower's own, ``DefaultWorkflow(fit_workflow=
  SecAggPlusWorkflow(...))`` over its legacy FedAvg, and
  ``flwr.client.mod.secaggplus_mod`` around a ``NumPyClient`` (its
  ``secaggplus_mod`` reads legacy ``fit`` replies);
* :mod:`fpbench.ours_plain`: our FedAvg ServerApp and our ClientApp, both
  through the bridge;
* :mod:`fpbench.flwr_plain`: Flower's ``flwr.serverapp.strategy.FedAvg`` and a
  plain ``flwr.clientapp.ClientApp``.

What they share (the nodes' updates, the exact mean, the timed ServerApp):
:mod:`fpbench.common`.
"""

CASES = ("ours_secagg", "flwr_secagg", "ours_plain", "flwr_plain")
"""Each case's components are ``fpbench.<case>:server`` and ``fpbench.<case>:client``."""

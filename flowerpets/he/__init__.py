"""Homomorphic encryption: CKKS aggregation in which the server never holds a key.

Two mods, built on TenSEAL's CKKS:

* :class:`CKKSClientMod` (``ckks_mod`` with its defaults) on every node: takes
  part in the key set-up, encrypts the node's weighted update, and opens the
  sealed global model before the handler sees it;
* :class:`HomomorphicAggregation` on the server, as its last mod: runs the key
  set-up through the nodes (one node generates the key and wraps it for each
  other node; the server relays and keeps the parameters only), then sums the
  encrypted updates as they arrive. The global model stays encrypted on the
  server; the nodes decrypt it and divide by the total weight.

.. code-block:: python

    from flowerpets import ClientApp, FedAvg, FullParticipation, ServerApp
    from flowerpets.he import HomomorphicAggregation, ckks_mod, open_model

    client_app = ClientApp(mods=[ckks_mod])
    server_app = ServerApp(
        strategy=FedAvg(evaluate_sampling=FullParticipation()),  # federated evaluation
        num_rounds=10,
        initial_arrays=initial,
        mods=[HomomorphicAggregation()],
    )
    result = run_simulation(server_app, client_app, 10)
    model = open_model(result.arrays, result.contexts[0])  # as the nodes see it

What it protects against, what it does not, the parameter sets and their
measured precision: ``docs/he.md``.
"""

from typing import TYPE_CHECKING

from flowerpets._lazy import lazy_face

if TYPE_CHECKING:
    from flowerpets.he._primitives.params import (
        COMPACT,
        MAX_MODULUS_BITS_128,
        PARAMETER_SETS,
        WIDE,
        CKKSParameters,
    )
    from flowerpets.he.client import CKKSClientMod, ckks_mod
    from flowerpets.he.protocol import HE_MESSAGE_TYPE, KEY_GENERATOR_CONFIG, Stage
    from flowerpets.he.sealed import EncryptedSum, open_model
    from flowerpets.he.server import HomomorphicAggregation

# Where each name lives, imported on first use: a node loads its client mod only.
_HOMES = {
    "CKKSClientMod": "client",
    "CKKSParameters": "_primitives.params",
    "COMPACT": "_primitives.params",
    "EncryptedSum": "sealed",
    "HE_MESSAGE_TYPE": "protocol",
    "HomomorphicAggregation": "server",
    "KEY_GENERATOR_CONFIG": "protocol",
    "MAX_MODULUS_BITS_128": "_primitives.params",
    "PARAMETER_SETS": "_primitives.params",
    "Stage": "protocol",
    "WIDE": "_primitives.params",
    "ckks_mod": "client",
    "open_model": "sealed",
}
__getattr__, __dir__ = lazy_face(__name__, _HOMES)

__all__ = [
    "CKKSClientMod",
    "CKKSParameters",
    "COMPACT",
    "EncryptedSum",
    "HE_MESSAGE_TYPE",
    "HomomorphicAggregation",
    "KEY_GENERATOR_CONFIG",
    "MAX_MODULUS_BITS_128",
    "PARAMETER_SETS",
    "Stage",
    "WIDE",
    "ckks_mod",
    "open_model",
]

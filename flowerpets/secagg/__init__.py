"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020) as a client mod and a server mod.

The server learns the (weighted) sum of the cohort's updates and nothing more
about any one of them, even when up to a chosen fraction of the nodes drop out
at any stage, and even when it colludes with up to a chosen fraction of
semi-honest nodes; with ``threat="malicious"`` and a PKI of node identity keys
(:func:`enroll`, :class:`NodeIdentities`) also against a server that deviates
from the protocol (signed keys, a consistency check before unmasking). See
``docs/secagg.md`` for what it protects against and what it does not.

.. code-block:: python

    from flowerpets.secagg import SecAggPlus, secaggplus_mod

    client_app = ClientApp(mods=[secaggplus_mod])        # outermost client mod
    server_app = ServerApp(strategy=FedAvg(), num_rounds=10, initial_arrays=arrays,
                           mods=[SecAggPlus(dropout_rate=0.1, corrupted_fraction=0.1)])
"""

from typing import TYPE_CHECKING

from flowerpets._lazy import lazy_face

if TYPE_CHECKING:
    from flowerpets.secagg.client import Phase, SecAggPlusClientMod, secaggplus_mod
    from flowerpets.secagg.graph import HararyGraph
    from flowerpets.secagg.identity import (
        Enrolment,
        IdentityKey,
        Keyring,
        NodeConfigKey,
        NodeIdentities,
        enroll,
    )
    from flowerpets.secagg.parameters import (
        GraphParameters,
        Threat,
        check_parameters,
        cohort_quorum,
        find_parameters,
    )
    from flowerpets.secagg.protocol import RoundConfig, Stage
    from flowerpets.secagg.server import SecAggPlus, ServerPhase

# Where each name lives, imported on first use: a node loads the client mod only.
_HOMES = {
    "Enrolment": "identity",
    "GraphParameters": "parameters",
    "HararyGraph": "graph",
    "IdentityKey": "identity",
    "Keyring": "identity",
    "NodeConfigKey": "identity",
    "NodeIdentities": "identity",
    "Phase": "client",
    "RoundConfig": "protocol",
    "SecAggPlus": "server",
    "SecAggPlusClientMod": "client",
    "ServerPhase": "server",
    "Stage": "protocol",
    "Threat": "parameters",
    "check_parameters": "parameters",
    "cohort_quorum": "parameters",
    "enroll": "identity",
    "find_parameters": "parameters",
    "secaggplus_mod": "client",
}
__getattr__, __dir__ = lazy_face(__name__, _HOMES)

__all__ = [
    "Enrolment",
    "GraphParameters",
    "HararyGraph",
    "IdentityKey",
    "Keyring",
    "NodeConfigKey",
    "NodeIdentities",
    "Phase",
    "RoundConfig",
    "SecAggPlus",
    "SecAggPlusClientMod",
    "ServerPhase",
    "Stage",
    "Threat",
    "check_parameters",
    "cohort_quorum",
    "enroll",
    "find_parameters",
    "secaggplus_mod",
]

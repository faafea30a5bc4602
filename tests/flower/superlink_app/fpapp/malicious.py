"""SecAgg+ in malicious mode on the plain app of ``apps.py``, identities provisioned with it.

As docs/secagg.md's Flower identities say: each SuperNode's Ed25519 key is a PEM
file named in its node config (``secagg-identity-key``, read by
``NodeConfigKey``), and the PKI ships with the app, here as ``identities.json``
beside this module (a FAB carries ``.json``, not ``.txt``), which the test
writes into its copy of the app once the SuperLink has given the nodes their
ids. Both sides read the PKI from the app, never from a message. Both mods keep the
malicious mode's defaults, the cohort quorum included: the server asks for it on a
sparse graph and the nodes require it (the complete graph of a few nodes needs none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowerpets.core import Context, Message
from flowerpets.flower import client_app, server_app
from flowerpets.secagg import NodeConfigKey, NodeIdentities, SecAggPlus, SecAggPlusClientMod

from .apps import numpy_client, numpy_server, values

PKI = Path(__file__).with_name("identities.json")


def identities() -> NodeIdentities:
    """The PKI shipped with the app: ``{"identities": NodeIdentities.to_text()}``."""
    return NodeIdentities.from_text(json.loads(PKI.read_text(encoding="utf-8"))["identities"])


class ShippedIdentities:
    """The malicious-mode client mod, built at the first message: importing this module
    needs no PKI (the repository's copy of the app has none; the test writes it into
    the copy it runs)."""

    def __init__(self) -> None:
        self.mod: SecAggPlusClientMod | None = None

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        if self.mod is None:
            self.mod = SecAggPlusClientMod(identities=identities(), identity=NodeConfigKey())
        return self.mod(msg, context, call_next)


ours = numpy_client([ShippedIdentities()])
build = numpy_server(lambda: [SecAggPlus(identities=identities())], evaluate_fn=values)
client = client_app(ours)
server = server_app(build)

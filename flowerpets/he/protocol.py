"""What HE messages carry: the key set-up's stages, message type, and config keys.

Imported by the node's mod (:mod:`flowerpets.he.client`), the server's mod
(:mod:`flowerpets.he.server`) and the state machines (:mod:`flowerpets.he._state`)
alike, so neither side imports the other. The array layout of an encrypted
update and its wire form live in :mod:`flowerpets.he._primitives.packing` and
:mod:`flowerpets.he._primitives.ciphertexts`.
"""

from __future__ import annotations

import re

from flowerpets.core.protocol import StageName
from flowerpets.he._primitives.packing import RESERVED_PREFIX

__all__ = [
    "CONFIG_COHORT_SIZE",
    "CONFIG_ENCRYPT",
    "CONFIG_KEY_ID",
    "CONFIG_WEIGHT_KEY",
    "HE_MESSAGE_TYPE",
    "KEY_GENERATOR_CONFIG",
    "KEY_ID",
    "PUBLIC_KEY_BYTES",
    "RESERVED_PREFIX",
    "Stage",
]

HE_MESSAGE_TYPE = "he-keys"
"""Message type of every key set-up message (a client mod answers them itself)."""

KEY_GENERATOR_CONFIG = "he-key-generator"
"""Node config flag: ``True`` volunteers the node to generate the run's CKKS key."""


class Stage(StageName):
    """The key set-up stages, as they appear in ``Metadata.stage``."""

    ADVERTISE = "he/advertise"
    KEYGEN = "he/keygen"
    SHARE = "he/share"
    INSTALL = "he/install"


# Config keys the server mod puts in a train request (all under the reserved "he." prefix).
CONFIG_KEY_ID = RESERVED_PREFIX + "key-id"
CONFIG_ENCRYPT = RESERVED_PREFIX + "encrypt"
CONFIG_WEIGHT_KEY = RESERVED_PREFIX + "weight-key"
CONFIG_COHORT_SIZE = RESERVED_PREFIX + "cohort-size"

KEY_ID = re.compile(r"[0-9a-f]{32}")
"""A CKKS key's id on the wire: 32 lowercase hex digits."""

PUBLIC_KEY_BYTES = 32
"""An X25519 transport public key, as a node advertises it."""

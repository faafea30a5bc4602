"""What HE messages carry: the key set-up's stages, message type, records and fields.

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
    "FIELD_PARAMS",
    "FIELD_PUBLIC_CONTEXT",
    "FIELD_PUBLIC_KEY",
    "FIELD_RECIPIENTS",
    "FIELD_RECIPIENT_KEYS",
    "FIELD_SENDER",
    "FIELD_VOLUNTEER",
    "FIELD_WRAPPED",
    "HE_MESSAGE_TYPE",
    "KEY_GENERATOR_CONFIG",
    "KEY_ID",
    "PUBLIC_KEY_BYTES",
    "RESERVED_PREFIX",
    "SETUP_RECORD",
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


SETUP_RECORD = "config"
"""The ConfigRecord every key set-up request and reply carries its fields in."""

# Config keys the server mod puts in a train request, all under the reserved "he." prefix. The
# key id names the CKKS key there (the round's key) and in the set-up stages' fields alike.
CONFIG_KEY_ID = RESERVED_PREFIX + "key-id"
CONFIG_ENCRYPT = RESERVED_PREFIX + "encrypt"  # the arrays to encrypt
CONFIG_WEIGHT_KEY = RESERVED_PREFIX + "weight-key"  # the metric to weigh by ("": unweighted)
CONFIG_COHORT_SIZE = RESERVED_PREFIX + "cohort-size"  # how many share the capacity

# The fields of the key set-up stages' record (see :mod:`flowerpets.he._state`), under "he." too.
FIELD_PUBLIC_KEY = RESERVED_PREFIX + "public-key"  # advertise reply: the X25519 key
FIELD_VOLUNTEER = RESERVED_PREFIX + "volunteer"  # advertise reply: offers to make the key
FIELD_PARAMS = RESERVED_PREFIX + "params"  # CKKSParameters.to_list()
FIELD_RECIPIENTS = RESERVED_PREFIX + "recipients"  # the nodes a key is wrapped for
FIELD_RECIPIENT_KEYS = RESERVED_PREFIX + "recipient-keys"  # their X25519 keys, in order
FIELD_WRAPPED = RESERVED_PREFIX + "wrapped"  # wrapped keys (a list; one in an install)
FIELD_PUBLIC_CONTEXT = RESERVED_PREFIX + "public-context"  # the parameters, no key
FIELD_SENDER = RESERVED_PREFIX + "sender"  # install: the node that wrapped the key

KEY_ID = re.compile(r"[0-9a-f]{32}")
"""A CKKS key's id on the wire: 32 lowercase hex digits."""

PUBLIC_KEY_BYTES = 32
"""An X25519 transport public key, as a node advertises it."""

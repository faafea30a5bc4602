"""Every reason the HE client mod can send leaks no private value (issue 9, item 2).

Error replies travel in the clear. A dishonest server drives one node through
every refusal path of :class:`CKKSClientMod` (key set-up, opening a sealed
model, sealing the reply) with hand-built requests, while the node's handler
returns an update holding sentinel values and a sentinel weight. No reason may
carry them (or the node's transport key) in any common format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from flowerpets import (
    SEALED_WEIGHT_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flowerpets.he import COMPACT, HE_MESSAGE_TYPE, WIDE, CKKSClientMod, Stage
from flowerpets.he._primitives.ciphertexts import HEADER_NAME, Header, encrypt_flat, wire_arrays
from flowerpets.he._primitives.keywrap import KeyBinding, TransportKeys, wrap
from flowerpets.he._primitives.packing import Layout
from flowerpets.he._primitives.params import (
    context_digest,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from flowerpets.he._state import ClientKeys, ClientPhase
from tests.sentinels import renderings

NODE, RUN = 7, 3
KEY_ID = "ab" * 16  # no digits: a sentinel's digits cannot appear in it by chance
OTHER_KEY_ID = "cd" * 16
VALUE = 98765.4321  # one value of the private update
WEIGHT = 123456.789  # the private weight (num-examples)
LOSS = 4321.98765  # a private metric a server may name as the weight
SENTINELS = (VALUE, WEIGHT, LOSS, VALUE * WEIGHT, VALUE * LOSS, -VALUE * WEIGHT)

_SECRET = new_secret_context(COMPACT)
SECRET_CONTEXT = secret_context_bytes(_SECRET)
PUBLIC_CONTEXT = public_context_bytes(_SECRET)
TRANSPORT = TransportKeys.generate()
PEER = TransportKeys.generate()


FORBIDDEN = frozenset(
    {f for x in SENTINELS for f in renderings(x)}
    | {TRANSPORT.private.hex(), TRANSPORT.private.hex()[:16], repr(TRANSPORT.private)}
)


_BYTES_LITERAL = re.compile(r"(?<![\w'\"])b['\"]")


def leaks(reason: str) -> list[str]:
    found = [f for f in FORBIDDEN if f in reason]
    if _BYTES_LITERAL.search(reason):  # key material has no business in a reason
        found.append("a bytes literal")
    return found


# -- the node ----------------------------------------------------------------------------------
def update(case: str) -> RecordDict:
    """The handler's reply: ``w`` holds VALUE (and -VALUE), weighted by WEIGHT."""
    w = np.linspace(-1.0, 1.0, 30 * 70).reshape(30, 70)
    w[3, 4], w[5, 6] = VALUE, -VALUE
    arrays: dict[str, np.ndarray] = {"w": w, "b": np.full(7, VALUE / 7, np.float32)}
    metrics: dict[str, Any] = {"num-examples": WEIGHT, "loss": LOSS}
    if case == "nan":
        w[0, 0] = np.nan
    elif case == "int-array":
        arrays["w"] = np.full((30, 70), int(VALUE), np.int64)
    elif case == "infinite-weight":
        metrics["num-examples"] = math.inf
    elif case == "list-weight":
        metrics["num-examples"] = [WEIGHT, VALUE]
    body = RecordDict({"arrays": ArrayRecord.from_numpy(arrays)})
    if case != "no-metrics":
        body["metrics"] = MetricRecord(metrics)
    return body


def node_app() -> ClientApp:
    app = ClientApp(mods=[CKKSClientMod()])

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        case = msg.require_content().get_typed("config", ConfigRecord).get("test.case", "")
        return update(str(case))

    return app


def node_context(phase: ClientPhase = ClientPhase.HOLDS_KEY) -> Context:
    context = Context(node_id=NODE, run_id=RUN)
    keys = ClientKeys(phase=phase)
    if phase is not ClientPhase.NEW:
        keys = ClientKeys(
            phase=phase, transport_private=TRANSPORT.private, transport_public=TRANSPORT.public
        )
    if phase is ClientPhase.HOLDS_KEY:
        keys = ClientKeys(
            phase=phase,
            transport_private=TRANSPORT.private,
            transport_public=TRANSPORT.public,
            key_id=KEY_ID,
            params=COMPACT,
            secret_context=SECRET_CONTEXT,
        )
    keys.store(context.state)
    return context


# -- what a dishonest server sends ---------------------------------------------------------------
def train_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "he.key-id": KEY_ID,
        "he.encrypt": ["w", "b"],
        "he.weight-key": "num-examples",
        "he.cohort-size": 3,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def train(config: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    model = arrays or ArrayRecord.from_numpy(
        {"w": np.zeros((30, 70)), "b": np.zeros(7, np.float32)}
    )
    return Message.create(
        RecordDict({"arrays": model, "config": ConfigRecord(config)}),
        message_type="train",
        dst_node_id=NODE,
        round=1,
        run_id=RUN,
    )


def setup(stage: str, config: dict[str, Any]) -> Message:
    return Message.create(
        RecordDict({"config": ConfigRecord(config)}),
        message_type=HE_MESSAGE_TYPE,
        dst_node_id=NODE,
        round=1,
        run_id=RUN,
        stage=stage,
    )


def _install(**changes: Any) -> dict[str, Any]:
    binding = KeyBinding(
        run_id=RUN,
        sender=5,
        recipient=NODE,
        key_id=bytes.fromhex(KEY_ID),
        context_digest=context_digest(PUBLIC_CONTEXT),
    )
    config: dict[str, Any] = {
        "he.key-id": KEY_ID,
        "he.params": COMPACT.to_list(),
        "he.public-context": PUBLIC_CONTEXT,
        "he.sender": 5,
        "he.wrapped": wrap(SECRET_CONTEXT, TRANSPORT.public, binding),
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def _foreign_install() -> Message:
    """A correctly wrapped key of *other* parameters than the announced public context."""
    other = new_secret_context(WIDE)
    binding = KeyBinding(
        run_id=RUN,
        sender=5,
        recipient=NODE,
        key_id=bytes.fromhex(KEY_ID),
        context_digest=context_digest(PUBLIC_CONTEXT),
    )
    wrapped = wrap(secret_context_bytes(other), TRANSPORT.public, binding)
    return setup(Stage.INSTALL, _install(**{"he.wrapped": wrapped}))


def _keygen(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "he.params": COMPACT.to_list(),
        "he.recipients": [5],
        "he.recipient-keys": [PEER.public],
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def _sealed(**changes: Any) -> ArrayRecord:
    """A sealed model as the server relays it (its ciphertexts are the node's own kind)."""
    layout = Layout.of({"w": np.zeros((30, 70))}, ["w"])
    header = Header(
        key_id=changes.pop("key_id", KEY_ID), params=COMPACT, layout=layout, order=("w", "b")
    )
    flat = np.zeros(layout.size)
    arrays = wire_arrays(header, encrypt_flat(_SECRET, flat, COMPACT.slots))
    arrays["b"] = np.zeros(7, np.float32)
    arrays[SEALED_WEIGHT_KEY] = np.array(changes.pop("weight", 3.0))
    if changes.pop("drop_header", False):
        del arrays[HEADER_NAME]
    assert not changes
    return arrays


Case = tuple[Callable[[], Message], ClientPhase]
CASES: MappingProxyType[str, Case] = MappingProxyType(
    {
        # -- sealing the reply (the update and its weight are private) --
        "over capacity": (lambda: train(train_config()), ClientPhase.HOLDS_KEY),
        "over capacity, a huge cohort": (
            lambda: train(train_config(**{"he.cohort-size": 10**9})),
            ClientPhase.HOLDS_KEY,
        ),
        "over capacity, weighed by a private metric": (
            lambda: train(train_config(**{"he.weight-key": "loss"})),
            ClientPhase.HOLDS_KEY,
        ),
        "over capacity, unweighted": (
            lambda: train(train_config(**{"he.weight-key": "", "he.cohort-size": 10**6})),
            ClientPhase.HOLDS_KEY,
        ),
        "encryption not asked for": (
            lambda: train(train_config(**{"he.key-id": None})),
            ClientPhase.HOLDS_KEY,
        ),
        "another key": (
            lambda: train(train_config(**{"he.key-id": OTHER_KEY_ID})),
            ClientPhase.HOLDS_KEY,
        ),
        "no key held": (lambda: train(train_config()), ClientPhase.ADVERTISED),
        "malformed key id": (
            lambda: train(train_config(**{"he.key-id": "zz"})),
            ClientPhase.HOLDS_KEY,
        ),
        "part in the clear": (
            lambda: train(train_config(**{"he.encrypt": ["w"]})),
            ClientPhase.HOLDS_KEY,
        ),
        "an array the reply lacks": (
            lambda: train(train_config(**{"he.encrypt": ["w", "b", "nope"]})),
            ClientPhase.HOLDS_KEY,
        ),
        "no encrypt list": (
            lambda: train(train_config(**{"he.encrypt": None})),
            ClientPhase.HOLDS_KEY,
        ),
        "a weight metric the reply lacks": (
            lambda: train(train_config(**{"he.weight-key": "nope"})),
            ClientPhase.HOLDS_KEY,
        ),
        "a cohort size of the wrong type": (
            lambda: train(train_config(**{"he.cohort-size": "3"})),
            ClientPhase.HOLDS_KEY,
        ),
        "a NaN in the update": (
            lambda: train(train_config(**{"test.case": "nan"})),
            ClientPhase.HOLDS_KEY,
        ),
        "an integer array": (
            lambda: train(train_config(**{"test.case": "int-array"})),
            ClientPhase.HOLDS_KEY,
        ),
        "an infinite weight": (
            lambda: train(train_config(**{"test.case": "infinite-weight"})),
            ClientPhase.HOLDS_KEY,
        ),
        "a list as the weight": (
            lambda: train(train_config(**{"test.case": "list-weight"})),
            ClientPhase.HOLDS_KEY,
        ),
        "no metrics": (
            lambda: train(train_config(**{"test.case": "no-metrics"})),
            ClientPhase.HOLDS_KEY,
        ),
        # -- opening a sealed model --
        "a sealed model under another key": (
            lambda: train(train_config(), _sealed(key_id=OTHER_KEY_ID)),
            ClientPhase.HOLDS_KEY,
        ),
        "a sealed model without a key": (
            lambda: train(train_config(), _sealed()),
            ClientPhase.ADVERTISED,
        ),
        "a sealed model of zero weight": (
            lambda: train(train_config(), _sealed(weight=0.0)),
            ClientPhase.HOLDS_KEY,
        ),
        "a sealed model without its header": (
            lambda: train(train_config(), _sealed(drop_header=True)),
            ClientPhase.HOLDS_KEY,
        ),
        # -- key set-up (the transport key and the CKKS secret are private) --
        "an unknown stage": (lambda: setup("he-evil", {}), ClientPhase.HOLDS_KEY),
        "keygen before advertising": (lambda: setup(Stage.KEYGEN, _keygen()), ClientPhase.NEW),
        "keygen without parameters": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.params": None})),
            ClientPhase.ADVERTISED,
        ),
        "keygen with insecure parameters": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.params": [4096, 40, 60, 60]})),
            ClientPhase.ADVERTISED,
        ),
        "keygen for unpaired recipients": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.recipients": [5, 6]})),
            ClientPhase.ADVERTISED,
        ),
        "keygen for itself": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.recipients": [NODE]})),
            ClientPhase.ADVERTISED,
        ),
        "keygen for a bad public key": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.recipient-keys": [b"\x01" * 5]})),
            ClientPhase.ADVERTISED,
        ),
        "keygen for a small-order public key": (
            lambda: setup(Stage.KEYGEN, _keygen(**{"he.recipient-keys": [bytes(32)]})),
            ClientPhase.ADVERTISED,
        ),
        "share another key": (
            lambda: setup(Stage.SHARE, {**_keygen(), "he.key-id": OTHER_KEY_ID}),
            ClientPhase.HOLDS_KEY,
        ),
        "share without a key": (
            lambda: setup(Stage.SHARE, {**_keygen(), "he.key-id": KEY_ID}),
            ClientPhase.ADVERTISED,
        ),
        "install without a transport key": (
            lambda: setup(Stage.INSTALL, _install()),
            ClientPhase.NEW,
        ),
        "install a tampered key": (
            lambda: setup(Stage.INSTALL, _install(**{"he.wrapped": b"\x01" + bytes(80)})),
            ClientPhase.ADVERTISED,
        ),
        "install from another sender": (
            lambda: setup(Stage.INSTALL, _install(**{"he.sender": 6})),
            ClientPhase.ADVERTISED,
        ),
        "install with a bad public context": (
            lambda: setup(Stage.INSTALL, _install(**{"he.public-context": b"junk"})),
            ClientPhase.ADVERTISED,
        ),
        "install a key of other parameters": (_foreign_install, ClientPhase.ADVERTISED),
        "install without a sender": (
            lambda: setup(Stage.INSTALL, _install(**{"he.sender": None})),
            ClientPhase.ADVERTISED,
        ),
    }
)


def test_the_check_would_catch_a_leak() -> None:
    assert leaks(f"a weighted value of {VALUE * WEIGHT:.4g} exceeds 4.369e+04")
    assert leaks(f"weight {WEIGHT!r} is outside [0, 1]")
    assert leaks(f"got values in [{-VALUE}, {VALUE}]")
    assert leaks(f"key {TRANSPORT.private!r}") and leaks(f"got {b'xyz'!r}")
    assert not leaks("would take ['b'] in the clear")
    assert not leaks("a weighted value exceeds 4.369e+04, this node's share of the capacity")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_no_refusal_reason_carries_a_private_value(case: str) -> None:
    make, phase = CASES[case]
    context = node_context(phase)
    reply = node_app()(make(), context)
    assert reply.error is not None, f"{case}: expected a refusal, got a reply"
    reason = reply.error.reason
    assert not leaks(reason), f"{case}: the reason {reason!r} carries {leaks(reason)}"
    assert len(reason) < 1000


def test_an_accepted_reply_carries_no_private_value_in_the_clear() -> None:
    """The control: within capacity (weight 1) the same update goes out encrypted."""
    config = train_config(**{"he.weight-key": "", "he.cohort-size": 1})
    reply = node_app()(train(config), node_context())
    assert reply.error is None
    arrays = reply.require_content().get_typed("arrays", ArrayRecord)
    assert "w" not in arrays and "b" not in arrays and HEADER_NAME in arrays

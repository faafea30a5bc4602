"""The key set-up state machines: every transition checked, state kept in typed records."""

from __future__ import annotations

import itertools

import pytest

from flowerpets.core import ConfigRecord, MetricRecord, RecordDict
from flowerpets.core.state import VERSION_KEY
from flowerpets.exceptions import (
    CorruptStateError,
    RequestRefusedError,
    StateError,
    StateTypeError,
)
from flowerpets.he import COMPACT
from flowerpets.he._state import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    ClientKeys,
    ClientPhase,
    ServerEvent,
    ServerKeys,
    ServerPhase,
    Stage,
    client_transition,
)

ALLOWED_CLIENT = {
    (ClientPhase.NEW, Stage.ADVERTISE),
    (ClientPhase.ADVERTISED, Stage.ADVERTISE),
    (ClientPhase.HOLDS_KEY, Stage.ADVERTISE),
    (ClientPhase.ADVERTISED, Stage.KEYGEN),
    (ClientPhase.HOLDS_KEY, Stage.KEYGEN),
    (ClientPhase.HOLDS_KEY, Stage.SHARE),
    (ClientPhase.ADVERTISED, Stage.INSTALL),
    (ClientPhase.HOLDS_KEY, Stage.INSTALL),
}


@pytest.mark.parametrize(("phase", "stage"), list(itertools.product(ClientPhase, Stage)))
def test_every_client_transition_is_in_the_table_or_refused(
    phase: ClientPhase, stage: Stage
) -> None:
    if (phase, stage) in ALLOWED_CLIENT:
        after = client_transition(phase, stage)
        expected = ClientPhase.ADVERTISED if stage is Stage.ADVERTISE else ClientPhase.HOLDS_KEY
        assert after is (ClientPhase.HOLDS_KEY if phase is ClientPhase.HOLDS_KEY else expected)
    else:
        # A node without a key cannot share one; one never advertised cannot unwrap.
        with pytest.raises(RequestRefusedError, match="not allowed"):
            client_transition(phase, stage)
    assert set(CLIENT_TRANSITIONS) == ALLOWED_CLIENT


@pytest.mark.parametrize(("phase", "event"), list(itertools.product(ServerPhase, ServerEvent)))
def test_every_server_transition_is_in_the_table_or_refused(
    phase: ServerPhase, event: ServerEvent
) -> None:
    keys = ServerKeys(phase=phase)
    if (phase, event) in SERVER_TRANSITIONS:
        assert keys.after(event).phase is SERVER_TRANSITIONS[(phase, event)]
    else:
        with pytest.raises(RuntimeError, match="cannot go through"):
            keys.after(event)
    assert SERVER_TRANSITIONS == {
        (ServerPhase.NO_KEY, ServerEvent.GENERATED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.ONBOARDED): ServerPhase.KEYED,
        (ServerPhase.KEYED, ServerEvent.RESET): ServerPhase.NO_KEY,
        (ServerPhase.KEYED, ServerEvent.RESUMED): ServerPhase.RESUMED,
        (ServerPhase.RESUMED, ServerEvent.RESUMED): ServerPhase.RESUMED,
        (ServerPhase.RESUMED, ServerEvent.CONFIRMED): ServerPhase.KEYED,
        (ServerPhase.RESUMED, ServerEvent.RESET): ServerPhase.NO_KEY,
    }


def test_client_state_round_trips_through_a_config_record() -> None:
    state = RecordDict()
    assert ClientKeys.load(state) == ClientKeys()
    keys = ClientKeys(
        phase=ClientPhase.HOLDS_KEY,
        transport_private=b"p" * 32,
        transport_public=b"q" * 32,
        key_id="ab" * 16,
        params=COMPACT,
        secret_context=b"secret",
    )
    keys.store(state)
    assert isinstance(state["he.client"], ConfigRecord)
    assert ClientKeys.load(state) == keys
    assert "secret" not in repr(keys) and "p" * 32 not in repr(keys)


def test_server_state_round_trips_and_holds_no_secret_field() -> None:
    state = RecordDict()
    keys = ServerKeys().after(
        ServerEvent.GENERATED,
        key_id="ab" * 16,
        params=COMPACT,
        public_context=b"params",
        holders=(5, 3),
        generator=5,
    )
    keys.store(state)
    assert ServerKeys.load(state) == keys
    assert set(state["he.server"]) == {
        VERSION_KEY,
        "phase",
        "key-id",
        "public-context",
        "holders",
        "generator",
        "params",
    }


def _stored(keys: ClientKeys | ServerKeys) -> RecordDict:
    state = RecordDict()
    keys.store(state)
    return state


CLIENT = ClientKeys(
    phase=ClientPhase.HOLDS_KEY, key_id="ab" * 16, params=COMPACT, secret_context=b"s"
)
SERVER = ServerKeys(phase=ServerPhase.KEYED, key_id="ab" * 16, holders=(5, 3), generator=5)


@pytest.mark.parametrize(
    ("keys", "key", "value", "error"),
    [
        (CLIENT, "secret-context", None, CorruptStateError),  # dropped: never a key-less node
        (CLIENT, "phase", "owns-key", CorruptStateError),
        (CLIENT, "params", [1, 2], CorruptStateError),  # not CKKS parameters
        (CLIENT, "transport-private", "p", StateTypeError),
        (CLIENT, VERSION_KEY, 2, CorruptStateError),
        (SERVER, "holders", [True], StateTypeError),
        (SERVER, "generator", 5.0, StateTypeError),
        (SERVER, "phase", None, CorruptStateError),
        (SERVER, "epoch", 1, CorruptStateError),  # a field this build does not know
    ],
)
def test_a_corrupt_key_state_raises_and_is_never_read_as_a_fresh_one(
    keys: ClientKeys | ServerKeys, key: str, value: object, error: type[StateError]
) -> None:
    state = _stored(keys)
    name = "he.client" if isinstance(keys, ClientKeys) else "he.server"
    record = state[name]
    assert isinstance(record, ConfigRecord)
    if value is None:
        del record[key]
    else:
        record[key] = value
    with pytest.raises(error):
        type(keys).load(state)
    state[name] = MetricRecord({"phase": 1})
    with pytest.raises(StateTypeError, match="must be a ConfigRecord"):
        type(keys).load(state)


def test_the_servers_model_layout_is_kept_by_a_state_slot_and_never_forgotten() -> None:
    import numpy as np

    from flowerpets.he._aggregation import ModelLayout
    from flowerpets.he._primitives.packing import Layout

    arrays = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2)}
    model = ModelLayout(order=("w", "b"), layout=Layout.of(arrays, ["w"]))
    state = RecordDict()
    assert ModelLayout.load(state) is None  # a server that never saw the model
    model.store(state)
    assert ModelLayout.load(state) == model and model.plain == ("b",)
    record = state["he.model"]
    assert isinstance(record, ConfigRecord)
    for corrupt in ("[[", '[["w", "<i8", [3, 2]]]', 5):  # not JSON, not CKKS, not text
        record["layout"] = corrupt
        with pytest.raises(StateError):
            ModelLayout.load(state)

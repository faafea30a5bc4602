"""HomomorphicAggregation's state in a run store: what it keeps, what a resume refuses, and why.

The state is the key's public side and the model's layout, nothing secret
(``tests/store/test_faults.py`` searches the store for the nodes' secret
contexts). A resume restores it without a new key set-up and asks the nodes for
the key in its first round. Here the simulated nodes keep their key records
across the two simulations (:class:`KeptKeys`), as node processes that outlive
the server do (``tests/transport/test_he_store.py`` does it with real ones).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from flowerpets.core import ArrayRecord, ConfigRecord, Context, Message, RecordDict, ServerContext
from flowerpets.core.codec import decode_record_dict, encode_record_dict
from flowerpets.exceptions import KeyHoldersGoneError, StoredKeyStateError
from flowerpets.he import COMPACT, WIDE, HomomorphicAggregation, ckks_mod, open_model
from flowerpets.he._aggregation import ModelLayout
from flowerpets.he._primitives.packing import Layout
from flowerpets.he._primitives.params import public_context_bytes, secret_context_bytes
from flowerpets.he._state import ClientKeys, ServerKeys, ServerPhase
from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore
from tests.store import faulty_runs
from tests.store.test_resume import ROUNDS, CrashError, local_training, simulate

KEY_ID = "ab" * 16


def keyed_context(secret: ts.Context) -> ServerContext:
    """A server context holding a key state and a layout, as after a round."""
    context = ServerContext()
    ServerKeys(
        phase=ServerPhase.KEYED,
        key_id=KEY_ID,
        params=COMPACT,
        public_context=public_context_bytes(secret),
        holders=(5, 3),
        generator=5,
    ).store(context.state)
    arrays = ArrayRecord({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)})
    ModelLayout(order=("w", "b"), layout=Layout.of(arrays, ["w", "b"])).store(context.state)
    return context


def restored(state: bytes | None, *, round: int = 2, **mod: object) -> ServerContext:
    context = ServerContext()
    HomomorphicAggregation(**mod).restore(context, state, round=round)  # type: ignore[arg-type]
    return context


def test_the_state_is_the_key_state_and_layout_and_restores_resumed(secret: ts.Context) -> None:
    context = keyed_context(secret)
    state = HomomorphicAggregation().durable_state(context)
    assert set(decode_record_dict(state)) == {"he.server", "he.model", "he.settings"}
    back = restored(state)
    keys, before = ServerKeys.load(back.state), ServerKeys.load(context.state)
    assert keys.phase is ServerPhase.RESUMED  # its holders are asked again before any round
    assert (keys.key_id, keys.holders, keys.generator) == (KEY_ID, (5, 3), 5)
    assert (keys.params, keys.public_context) == (before.params, before.public_context)
    assert ModelLayout.load(back.state) == ModelLayout.load(context.state)
    # Killed again before its holders were asked: still to be asked.
    again = HomomorphicAggregation().durable_state(back)
    assert ServerKeys.load(restored(again).state).phase is ServerPhase.RESUMED


def test_a_new_run_restores_nothing_and_a_run_before_any_key_restores_no_key() -> None:
    assert set(restored(None, round=0).state) == set()
    state = HomomorphicAggregation().durable_state(ServerContext())  # killed before any key
    assert ServerKeys.load(restored(state, round=1).state) == ServerKeys()


def _replaced(state: bytes, record: str, key: str, value: object) -> bytes:
    records = decode_record_dict(state)
    changed = records[record].copy()
    assert isinstance(changed, ConfigRecord)
    changed[key] = value  # type: ignore[assignment]
    records[record] = changed
    return encode_record_dict(records)


def _with_record(state: bytes) -> bytes:
    records = decode_record_dict(state)
    records["he.extra"] = ConfigRecord({"x": 1})
    return encode_record_dict(records)


REFUSED: dict[str, tuple[Callable[[bytes, ts.Context], bytes | None], dict[str, object], str]] = {
    "missing": (lambda s, k: None, {}, "committed 2 round.s. but stored no HomomorphicAggregation"),
    "garbage": (lambda s, k: b"\x00" * 40, {}, "malformed .CorruptMessageError"),
    "truncated": (lambda s, k: s[: len(s) // 2], {}, "malformed .TruncatedMessageError"),
    "a record too many": (lambda s, k: _with_record(s), {}, "malformed$"),
    "another version": (
        lambda s, k: _replaced(s, "he.settings", "version", 2),
        {},
        "malformed$",
    ),
    "a corrupt key state": (
        lambda s, k: _replaced(s, "he.server", "holders", "5,3"),
        {},
        "malformed .StateTypeError",
    ),
    "other parameters": (lambda s, k: s, {"params": WIDE}, r"other .* settings \(params differ"),
    "other arrays encrypted": (lambda s, k: s, {"encrypt": ["w"]}, r"\(encrypt differ"),
    "a secret key as the public context": (
        lambda s, k: _replaced(s, "he.server", "public-context", secret_context_bytes(k)),
        {},
        "stored public context: the public context holds a secret key",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_state_that_cannot_be_continued_is_refused(secret: ts.Context, case: str) -> None:
    damage, mod, reason = REFUSED[case]
    state = damage(HomomorphicAggregation().durable_state(keyed_context(secret)), secret)
    with pytest.raises(StoredKeyStateError, match=reason) as refused:
        restored(state, **mod)
    assert KEY_ID not in str(refused.value)  # the reason names fields, never stored values


# -- resumed runs whose nodes kept (some of) their key records -------------------------------------
class KeptKeys:
    """The outermost client mod: each node's HE key record outlives the simulation, or not.

    Only the nodes of ``keep`` (all if None) get theirs back in the next
    simulation; a test may swap ``records`` for another run's.
    """

    def __init__(self) -> None:
        self.records: dict[int, ConfigRecord] = {}
        self.keep: set[int] | None = None

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        node = context.node_id
        returning = self.keep is None or node in self.keep
        if "he.client" not in context.state and node in self.records and returning:
            context.state["he.client"] = self.records[node]
        try:
            return call_next(msg, context)
        finally:
            if "he.client" in context.state:
                self.records[node] = context.state["he.client"]  # type: ignore[assignment]


def he_run(kept: KeptKeys, store: object = None, **options: object) -> SimulationResult:
    return simulate(
        faulty_runs.server("he", store),  # type: ignore[arg-type]
        client=local_training([kept, ckks_mod]),
        **options,
    )


def crash_after_round_two(record: object) -> None:
    if getattr(record, "round", 0) == 2:
        raise CrashError


def killed_after_round_two(path: Path, kept: KeptKeys) -> RecordDict:
    with (
        RunStore(path) as store,
        store.start_run("r", config={}) as writer,
        pytest.raises(CrashError),
    ):
        he_run(kept, writer, on_round=crash_after_round_two)
    with RunStore(path) as store:
        state = store.load("r").pet_states["he"]
    assert isinstance(state, bytes)
    return decode_record_dict(state)


def key_of(result: SimulationResult) -> str:
    return ClientKeys.load(result.contexts[0].state).key_id


@pytest.fixture(scope="module")
def uninterrupted() -> np.ndarray:
    whole = he_run(KeptKeys())
    assert [r.ok for r in whole.history.rounds] == [True] * ROUNDS
    return open_model(whole.arrays, whole.contexts[0])["w"].numpy()


@pytest.mark.parametrize("kept_by", ["every node", "two nodes"])
def test_a_resumed_run_whose_nodes_kept_the_key_ends_with_the_uninterrupted_model(
    tmp_path: Path, uninterrupted: np.ndarray, kept_by: str
) -> None:
    kept = KeptKeys()
    state = killed_after_round_two(tmp_path / "runs.db", kept)
    key_id = ServerKeys.require(RecordDict({"he.server": state["he.server"]})).key_id
    if kept_by == "two nodes":
        kept.keep = set(list(kept.records)[:2])  # the others come back without it
    with RunStore(tmp_path / "runs.db") as store, store.resume_run("r") as writer:
        resumed = he_run(kept, writer)
    assert [(r.round, r.ok) for r in resumed.history.rounds] == [
        (rnd, True) for rnd in range(1, ROUNDS + 1)
    ]
    # No new key: every node holds the key the run started with (the others got it shared).
    assert {ClientKeys.load(c.state).key_id for c in resumed.contexts} == {key_id}
    got = open_model(resumed.arrays, resumed.contexts[0])["w"].numpy()
    np.testing.assert_allclose(got, uninterrupted, rtol=0, atol=1e-4)


def test_nodes_that_hold_another_key_refuse_the_resume_and_the_store_is_unchanged(
    tmp_path: Path,
) -> None:
    kept = KeptKeys()
    killed_after_round_two(tmp_path / "runs.db", kept)
    other = KeptKeys()
    another = key_of(he_run(other))  # the same nodes, in another run: another key
    kept.records = other.records
    with RunStore(tmp_path / "runs.db") as store:
        before = store.load("r")
        with store.resume_run("r") as writer, pytest.raises(KeyHoldersGoneError) as refused:
            he_run(kept, writer)
        after = store.load("r")
    assert f"0 of 6 hold no key, the others hold key(s) {another}" in str(refused.value)
    assert after.round == before.round == 2
    assert after.pet_states == before.pet_states

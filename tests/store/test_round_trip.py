"""What is committed is read back exactly: arrays bit for bit, the history, the sampler's state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpets.core import (
    ArrayRecord,
    Error,
    ErrorCode,
    Failure,
    FailureKind,
    History,
    RoundRecord,
)
from flowerpets.exceptions import (
    MissingRunError,
    ParameterTypeError,
    ParameterValueError,
    RoundSequenceError,
    RunConfigMismatchError,
    RunExistsError,
)
from flowerpets.store import RunStore
from flowerpets.store.encoding import generator_from_state, generator_state
from tests.store.stored_runs import StoredRun, model, record, same_bits, write_run


def test_the_last_round_reads_back_exactly(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store:
        snapshot = store.load(stored_run.run_id)
    assert snapshot.round == 3 and snapshot.info.last_round == 3
    assert snapshot.arrays is not None and same_bits(snapshot.arrays, stored_run.arrays[3])
    assert snapshot.history.rounds == stored_run.records
    assert snapshot.sampler_state == stored_run.sampler_states[-1]
    assert snapshot.pet_states == {"dp/ledger": {"steps": 3}, "he/public": b"\x00pk" * 3}
    assert snapshot.info.config == {"rounds": 3, "lr": 0.05}


def test_a_restored_sampler_draws_what_the_original_would(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store:
        state = store.load(stored_run.run_id).sampler_state
    assert state is not None
    original = np.random.default_rng(7)
    for _ in range(3):
        original.choice(10, size=3, replace=False)
    restored = generator_from_state(state)
    assert restored.choice(1000, size=50).tolist() == original.choice(1000, size=50).tolist()


@pytest.mark.parametrize("kind", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_every_numpy_bit_generator_survives_json(kind: str) -> None:
    import json

    rng = np.random.Generator(getattr(np.random, kind)(1234))
    rng.random(17)
    state = json.loads(json.dumps(generator_state(rng)))
    assert generator_from_state(state).random(8).tolist() == rng.random(8).tolist()


def test_arrays_are_kept_every_n_rounds_plus_the_last(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs.db", rounds=5, keep_arrays_every=2)
    with RunStore(run.path) as store:
        for rnd in (0, 2, 4, 5):
            assert same_bits(store.arrays_at(run.run_id, rnd), run.arrays[rnd])
        for rnd in (1, 3):
            with pytest.raises(MissingRunError):
                store.arrays_at(run.run_id, rnd)


def test_only_the_last_round_s_arrays_are_kept_when_asked(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs.db", rounds=4, keep_arrays_every=None)
    with RunStore(run.path) as store:
        assert store.run(run.run_id).keep_arrays_every == 0
        for rnd in (0, 4):
            assert same_bits(store.arrays_at(run.run_id, rnd), run.arrays[rnd])
        for rnd in (1, 2, 3):
            with pytest.raises(MissingRunError):
                store.arrays_at(run.run_id, rnd)


def test_rounds_commit_in_order_only(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store, store.start_run("r", config={}) as writer:
        rng = np.random.default_rng(0)
        with pytest.raises(RoundSequenceError):
            writer.commit_round(record(2), arrays=model(2), sampler=rng)
        writer.commit_round(record(1), arrays=model(1), sampler=rng)
        with pytest.raises(RoundSequenceError):
            writer.commit_round(record(1), arrays=model(1), sampler=rng)
        assert writer.last_round == 1


def test_a_run_id_is_taken_once_and_resumed_only_with_its_config(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store:
        with pytest.raises(RunExistsError):
            store.start_run(stored_run.run_id, config={})
        with pytest.raises(RunConfigMismatchError):
            store.resume_run(stored_run.run_id, config={"rounds": 3, "lr": 0.5})
        with pytest.raises(MissingRunError):
            store.resume_run("no-such-run")
        with store.resume_run(stored_run.run_id, config={"lr": 0.05, "rounds": 3}) as writer:
            writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(1))
        assert store.run(stored_run.run_id).last_round == 4


def test_values_json_cannot_hold_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        with pytest.raises(ParameterTypeError):
            store.start_run("r", config={"key": b"bytes"})
        with pytest.raises(ParameterValueError):
            store.start_run("r", config={"clip": float("nan")})
        assert store.runs() == []
        with store.start_run("r", config={}) as writer:
            with pytest.raises(ParameterTypeError):
                writer.commit_round(
                    record(1),
                    arrays=model(1),
                    sampler=np.random.default_rng(0),
                    pet_states={"x": {1, 2}},
                )
            assert writer.last_round == 0


def test_the_privacy_ledger_composes_across_runs_of_one_population(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        for run_id in ("first", "second"):
            with store.start_run(run_id, config={}, population_id="hospital-a") as writer:
                writer.record_spend({"kind": "gaussian", "sigma": 1.0}, round=1)
        with store.start_run("other", config={}) as writer:
            writer.record_spend({"kind": "laplace"}, round=1)
        spends = store.spends("hospital-a")
        assert [(s.seq, s.run_id) for s in spends] == [(1, "first"), (2, "second")]
        assert store.populations() == ["hospital-a", "run:other"]


# -- properties ----------------------------------------------------------------------------------
_DTYPES = ["<f4", "<f8", "<f2", "<i1", "<i8", "<u2", "<u8", "|b1", "<c8", "<c16"]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrays=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8),
        st.sampled_from(_DTYPES).flatmap(
            lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_side=5))
        ),
        max_size=4,
    )
)
def test_any_arrays_read_back_bit_for_bit(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    given_arrays = ArrayRecord.from_numpy(arrays)
    path = tmp_path / f"p{abs(hash(tuple(arrays)))}.db"
    path.unlink(missing_ok=True)
    with RunStore(path) as store:
        with store.start_run("r", config={}) as writer:
            writer.commit_round(record(1), arrays=given_arrays, sampler=np.random.default_rng(0))
        stored = store.load("r").arrays
    assert stored is not None and same_bits(stored, given_arrays)


_floats = st.floats(allow_nan=False, allow_infinity=True, width=64)
_failures = st.dictionaries(
    st.integers(0, 2**63 - 1),
    st.builds(
        Failure,
        stage=st.text(max_size=10),
        error=st.builds(Error, st.sampled_from(list(ErrorCode)), st.text(max_size=20)),
        kind=st.sampled_from(list(FailureKind)),
    ),
    max_size=3,
)
_records = st.builds(
    RoundRecord,
    round=st.integers(1, 10_000),
    cohort_size=st.integers(0, 1000),
    participants=st.lists(st.integers(0, 2**63 - 1), max_size=5).map(tuple),
    failures=_failures,
    evaluate_failures=_failures,
    train_metrics=st.dictionaries(st.text(max_size=8), _floats, max_size=3),
    evaluate_metrics=st.dictionaries(st.text(max_size=8), _floats, max_size=3),
    server_metrics=st.dictionaries(st.text(max_size=8), _floats, max_size=3),
    seconds=st.floats(0, 1e6),
    error=st.none() | st.text(max_size=20),
    stopped=st.booleans(),
)


@given(st.lists(_records, max_size=4))
def test_history_json_is_lossless(records: list[RoundRecord]) -> None:
    import json

    history = History(list(records))
    text = json.dumps(history.to_json_dicts())
    assert History.from_json_dicts(json.loads(text)).rounds == history.rounds


def test_reading_what_is_not_there_is_a_typed_refusal(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store:
        with pytest.raises(MissingRunError):
            store.spends("nobody")
        with pytest.raises(MissingRunError):
            store.load("no-such-run")
        writer = store.resume_run(stored_run.run_id)
        with pytest.raises(ParameterTypeError):
            writer.record_spend({"sigma": b"\x00"}, round=4)
        assert len(store.spends("run:run-a")) == 3
        writer.close()
        with pytest.raises(ParameterValueError, match="closed"):
            writer.record_spend({"kind": "gaussian"}, round=4)

"""State in a context: frozen dataclasses round-trip through records; a bad record never loads."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowerpets.core import ConfigRecord, MetricRecord, RecordDict
from flowerpets.core.codec import decode_record_dict, encode_record_dict
from flowerpets.core.state import VERSION_KEY, StateSlot, convert
from flowerpets.exceptions import (
    CorruptStateError,
    FlowerpetsError,
    MissingStateError,
    RecordTypeError,
    StateError,
    StateTypeError,
)


class Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int


def _points(points: tuple[Point, ...]) -> list[str]:
    return [json.dumps([p.x, p.y]) for p in points]


def _read_points(texts: Any) -> tuple[Point, ...]:
    return tuple(Point(*json.loads(t)) for t in texts)


@dataclass(frozen=True, slots=True)
class Everything:
    count: int
    rate: float
    name: str
    blob: bytes
    flag: bool
    colour: Colour = Colour.RED
    level: Level = Level.LOW
    ids: tuple[int, ...] = ()
    keys: tuple[bytes, ...] = ()
    names: list[str] = dataclasses.field(default_factory=list)
    rates: tuple[float, ...] = ()
    flags: tuple[bool, ...] = ()
    note: str | None = None
    points: tuple[Point, ...] = dataclasses.field(
        default=(), metadata=convert(_points, _read_points)
    )

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


SLOT = StateSlot(Everything, "test.everything")

ints = st.integers(min_value=0, max_value=2**62)
floats = st.floats(allow_nan=False)
everything = st.builds(
    Everything,
    count=ints,
    rate=floats,
    name=st.text(),
    blob=st.binary(),
    flag=st.booleans(),
    colour=st.sampled_from(Colour),
    level=st.sampled_from(Level),
    ids=st.lists(st.integers(-(2**63), 2**63 - 1)).map(tuple),
    keys=st.lists(st.binary(max_size=40)).map(tuple),
    names=st.lists(st.text(max_size=10)),
    rates=st.lists(floats).map(tuple),
    flags=st.lists(st.booleans()).map(tuple),
    note=st.none() | st.text(),
    points=st.lists(st.builds(Point, x=st.integers(), y=st.integers())).map(tuple),
)


@given(everything)
def test_every_state_round_trips_through_its_record(value: Everything) -> None:
    state = RecordDict()
    SLOT.store(state, value)
    assert SLOT.load(state) == value
    assert SLOT.get(state) == value
    record = state[SLOT.key]
    assert isinstance(record, ConfigRecord) and record[VERSION_KEY] == 1
    assert ("note" in record) is (value.note is not None)  # None is an absent key


@given(everything)
def test_a_state_survives_the_wire_format_as_durable_runs_store_it(value: Everything) -> None:
    state = RecordDict()
    SLOT.store(state, value)
    assert SLOT.load(decode_record_dict(encode_record_dict(state))) == value


def test_field_names_become_kebab_case_keys() -> None:
    record = SLOT.to_record(Everything(count=1, rate=2, name="n", blob=b"b", flag=True))
    assert list(record) == [
        VERSION_KEY,
        *("count", "rate", "name", "blob", "flag", "colour", "level", "ids", "keys", "names"),
        *("rates", "flags", "points"),
    ]
    assert record["rate"] == 2.0 and isinstance(record["rate"], float)  # an int is stored a float
    assert record["colour"] == "red" and record["level"] == 1


def test_absent_is_the_default_or_missing_and_nothing_else() -> None:
    state = RecordDict()
    default = Everything(count=0, rate=0.0, name="", blob=b"", flag=False)
    assert SLOT.get(state) is None
    assert SLOT.get(state, default) is default
    with pytest.raises(MissingStateError, match=r"no state 'test\.everything'"):
        SLOT.load(state)
    SLOT.store(state, default)
    SLOT.clear(state)
    assert SLOT.key not in state
    SLOT.clear(state)  # nothing to clear


def _valid() -> ConfigRecord:
    return SLOT.to_record(
        Everything(count=3, rate=0.5, name="n", blob=b"secret", flag=True, ids=(1, 2), note="x")
    )


def _with(**changes: Any) -> ConfigRecord:
    record = _valid()
    for key, value in changes.items():
        record[key] = value
    return record


def _without(key: str) -> ConfigRecord:
    record = _valid()
    del record[key]
    return record


CORRUPT: list[tuple[str, ConfigRecord, type[StateError], str]] = [
    ("no version", _without(VERSION_KEY), CorruptStateError, "no version"),
    ("another version", _with(**{VERSION_KEY: 2}), CorruptStateError, "version 2"),
    ("a bool version", _with(**{VERSION_KEY: True}), StateTypeError, "version"),
    ("a field missing", _without("count"), CorruptStateError, "'count'] is missing"),
    ("a list field missing", _without("ids"), CorruptStateError, "'ids'] is missing"),
    ("an unknown field", _with(epsilon=3.0), CorruptStateError, "unknown fields ['epsilon']"),
    ("a bool for an int", _with(count=True), StateTypeError, "'count'] must hold a int"),
    ("an int for a float", _with(rate=1), StateTypeError, "'rate'] must hold a float"),
    ("an int for a bool", _with(flag=1), StateTypeError, "'flag'] must hold a bool"),
    ("str for bytes", _with(blob="secret"), StateTypeError, "'blob'] must hold a bytes"),
    ("a scalar for a list", _with(ids=1), StateTypeError, "'ids'] must hold a list"),
    ("a list item mistyped", _with(ids=[True]), StateTypeError, "'ids'] must hold a int"),
    ("a list for a scalar", _with(name=["n"]), StateTypeError, "'name'] must hold a str"),
    ("an unknown enum value", _with(colour="blue"), CorruptStateError, "holds no Colour"),
    ("an enum of the wrong type", _with(level="1"), StateTypeError, "'level'] must hold a int"),
    ("a converter's garbage", _with(points=["{"]), CorruptStateError, "'points'] cannot be read"),
    ("a lax converter's read", _with(points=""), CorruptStateError, "does not read back"),
    ("the dataclass refuses it", _with(count=-1), CorruptStateError, "not a valid Everything"),
]


@pytest.mark.parametrize(
    ("record", "error", "match"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT]
)
def test_a_corrupt_record_never_loads_not_even_as_the_default(
    record: ConfigRecord, error: type[StateError], match: str
) -> None:
    state = RecordDict({SLOT.key: record})
    default = Everything(count=0, rate=0.0, name="", blob=b"", flag=False)
    for read in (SLOT.load, lambda s: SLOT.get(s, default), SLOT.get):
        with pytest.raises(error, match=re.escape(match)) as raised:
            read(state)
        assert isinstance(raised.value, FlowerpetsError)
        assert "secret" not in str(raised.value)  # a reason names the field, never its value


def test_a_record_of_another_kind_is_mistyped_state() -> None:
    with pytest.raises(StateTypeError, match="must be a ConfigRecord"):
        SLOT.load(RecordDict({SLOT.key: MetricRecord({"count": 1})}))


def test_state_errors_are_the_built_ins_callers_expect() -> None:
    assert issubclass(MissingStateError, LookupError) and issubclass(MissingStateError, ValueError)
    assert issubclass(StateTypeError, TypeError) and issubclass(CorruptStateError, ValueError)


scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.booleans()
)
config_values = scalars | st.lists(st.integers(0, 9)) | st.lists(st.text(max_size=3))


@given(everything, st.data())
def test_a_mutated_record_loads_exactly_what_it_holds_or_raises_a_state_error(
    value: Everything, data: st.DataObject
) -> None:
    # Whatever a corruption does (drop a field, add one, change a value's type or value),
    # a load either raises a StateError or returns a state that writes back the same record:
    # nothing is silently coerced, defaulted or dropped.
    record = SLOT.to_record(value)
    keys = [*record, "extra"]
    key = data.draw(st.sampled_from(keys))
    if data.draw(st.booleans()) and key in record:
        del record[key]
    else:
        record[key] = data.draw(config_values)
    try:
        loaded = SLOT.from_record(record)
    except StateError:
        return
    assert SLOT.to_record(loaded) == record


def test_a_write_of_the_wrong_type_fails_where_it_is_written() -> None:
    with pytest.raises(RecordTypeError, match="'count'] must be a int"):
        SLOT.to_record(Everything(count=True, rate=0.0, name="", blob=b"", flag=False))
    with pytest.raises(RecordTypeError, match="must be a Colour"):
        SLOT.to_record(
            Everything(count=1, rate=0.0, name="", blob=b"", flag=False, colour="red")  # type: ignore[arg-type]
        )
    with pytest.raises(RecordTypeError, match="holds a Everything"):
        SLOT.to_record(Point(1, 2))  # type: ignore[arg-type]


def test_only_frozen_dataclasses_of_storable_fields_get_a_slot() -> None:
    @dataclass
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class Nested:
        point: Point

    @dataclass(frozen=True)
    class Union:
        x: int | str

    for cls, match in [
        (Mutable, "must be frozen"),
        (Nested, "use convert"),
        (Union, "only 'X | None'"),
        (dict, "frozen dataclass"),
    ]:
        with pytest.raises(RecordTypeError, match=match):
            StateSlot(cls, "k")
    with pytest.raises(RecordTypeError, match="version"):
        StateSlot(Point, "k", version=0)

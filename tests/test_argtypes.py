"""The argparse value types every command line uses (``flowerpets._argtypes``)."""

from __future__ import annotations

import argparse
import ast
import inspect
import math
from collections.abc import Callable

import pytest

from flowerpets import _argtypes
from flowerpets._argtypes import (
    checked,
    integer,
    non_negative_float,
    non_negative_int,
    number,
    positive_int,
)


def _parse(value_type: Callable[[str], object], text: str) -> object:
    """What argparse makes of ``--x text``, or the message it would print."""
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument("--x", type=value_type)
    try:
        return parser.parse_args(["--x", text]).x
    except argparse.ArgumentError as error:
        return str(error)


def test_all_is_sorted_and_the_module_stands_alone() -> None:
    assert _argtypes.__all__ == sorted(_argtypes.__all__)
    tree = ast.parse(inspect.getsource(_argtypes))
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "flowerpets"]


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("-3", -3), ("1_000_000", 1_000_000), (" 7 ", 7)]
)
def test_integer_reads_what_int_reads(text: str, value: int) -> None:
    assert integer(text) == value and type(integer(text)) is int


@pytest.mark.parametrize("text", ["", "abc", "1.5", "1e3", "0x10"])
def test_integer_refuses_other_text_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        integer(text)
    assert str(caught.value) == f"expected an integer, got {text!r}"


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0.0), ("-1.5", -1.5), ("1e-3", 0.001), ("inf", math.inf)]
)
def test_number_reads_what_float_reads(text: str, value: float) -> None:
    assert number(text) == value and type(number(text)) is float


def test_number_reads_nan_and_refuses_other_text() -> None:
    assert math.isnan(number("nan"))
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        number("one")
    assert str(caught.value) == "expected a number, got 'one'"


def test_checked_formats_the_text_as_given_and_the_value_as_parsed() -> None:
    half_open = checked(number, lambda v: 0 <= v < 1, "text {text} value {value} repr {text!r}")
    assert half_open("0") == 0.0
    assert half_open("0.999") == 0.999
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        half_open("1e0")
    assert str(caught.value) == "text 1e0 value 1.0 repr '1e0'"


def test_checked_passes_the_parsers_refusal_through() -> None:
    positive = checked(number, lambda v: v > 0, "must be > 0, got {text}")
    below_one = checked(positive, lambda v: v < 1, "must be < 1, got {text}")
    assert below_one("0.5") == 0.5
    assert _parse(below_one, "x") == "argument --x: expected a number, got 'x'"
    assert _parse(below_one, "0") == "argument --x: must be > 0, got 0"
    assert _parse(below_one, "1") == "argument --x: must be < 1, got 1"


def test_a_plain_value_error_is_argparses_message_with_the_given_name() -> None:
    named = checked(int, lambda v: v >= 1, "must be >= 1, got {value}", name="_positive_int")
    assert named.__name__ == "_positive_int"
    assert _parse(named, "abc") == "argument --x: invalid _positive_int value: 'abc'"
    assert _parse(named, "00") == "argument --x: must be >= 1, got 0"
    unnamed = checked(int, lambda v: v >= 1, "must be >= 1, got {value}")
    assert _parse(unnamed, "abc") == "argument --x: invalid checked value: 'abc'"


@pytest.mark.parametrize(
    ("value_type", "accepted", "refused", "message"),
    [
        (positive_int, ["1", "1_000_000"], "0", "expected an integer >= 1, got 0"),
        (positive_int, [], "-5", "expected an integer >= 1, got -5"),
        (positive_int, [], "1.0", "expected an integer, got '1.0'"),
        (non_negative_int, ["0", "3"], "-1", "expected an integer >= 0, got -1"),
        (non_negative_int, [], "x", "expected an integer, got 'x'"),
        (non_negative_float, ["0", "0.0", "-0.0", "2.5"], "-0.001", "got -0.001"),
        (non_negative_float, [], "inf", "expected a finite number >= 0, got inf"),
        (non_negative_float, [], "nan", "expected a finite number >= 0, got nan"),
        (non_negative_float, [], "", "expected a number, got ''"),
    ],
)
def test_the_ready_made_types_at_their_boundaries(
    value_type: Callable[[str], float],
    accepted: list[str],
    refused: str,
    message: str,
) -> None:
    for text in accepted:
        assert value_type(text) == float(text)
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        value_type(refused)
    assert str(caught.value).endswith(message)
    assert str(caught.value).startswith("expected ")


def test_a_refused_value_is_exit_status_2_with_one_line_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--repeats", type=positive_int, default=5)
    assert parser.parse_args([]).repeats == 5
    assert parser.parse_args(["--repeats", "2"]).repeats == 2
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--repeats", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "bench: error: argument --repeats: expected an integer >= 1, got 0"
    )

"""argparse value types for the command lines (``flowerpets ...`` and ``bench/``).

A value type is what ``parser.add_argument(..., type=...)`` takes: a callable
from the option's text to its value that raises
:class:`argparse.ArgumentTypeError` with a one-line reason, which argparse
prints as ``prog: error: argument --option: <reason>`` (exit status 2).

* :func:`integer` and :func:`number` parse, and refuse text that is no number
  (``expected an integer, got 'x'``, ``expected a number, got 'x'``);
* :func:`checked` puts a range check with its own message on any parser,
  including another checked type, so each command line keeps its own wording;
* :data:`positive_int`, :data:`non_negative_int` and :data:`non_negative_float`
  are the ready-made ones more than one command line uses.

This module imports nothing from the rest of flowerpets, so any layer may use it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "checked",
    "integer",
    "non_negative_float",
    "non_negative_int",
    "number",
    "positive_int",
]

T = TypeVar("T")


def integer(text: str) -> int:
    """An integer, as :class:`int` reads it (underscores allowed, as in 1_000_000)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    """A number, as :class:`float` reads it (``inf`` and ``nan`` included)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def checked(
    parse: Callable[[str], T],
    accept: Callable[[T], bool],
    message: str,
    *,
    name: str = "checked",
) -> Callable[[str], T]:
    """A value type: ``parse(text)``, refused with ``message`` unless ``accept`` takes it.

    ``message`` is formatted with ``text`` (the option's text as given) and
    ``value`` (what ``parse`` made of it), e.g. ``"must be > 0, got {text}"``.
    What ``parse`` raises passes through: an ``ArgumentTypeError`` is its own
    message; a plain ``ValueError`` (from ``int`` or ``float`` themselves) is
    argparse's ``invalid <name> value: 'x'``, so ``name`` is the name argparse
    shows there.
    """

    def value_type(text: str) -> T:
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(message.format(text=text, value=value))
        return value

    value_type.__name__ = value_type.__qualname__ = name
    return value_type


#: An integer >= 1: ``expected an integer >= 1, got 0``.
positive_int = checked(
    integer, lambda v: v >= 1, "expected an integer >= 1, got {value}", name="positive_int"
)

#: An integer >= 0: ``expected an integer >= 0, got -1``.
non_negative_int = checked(
    integer, lambda v: v >= 0, "expected an integer >= 0, got {value}", name="non_negative_int"
)

#: A finite number >= 0: ``expected a finite number >= 0, got inf``.
non_negative_float = checked(
    number,
    lambda v: math.isfinite(v) and v >= 0,
    "expected a finite number >= 0, got {value}",
    name="non_negative_float",
)

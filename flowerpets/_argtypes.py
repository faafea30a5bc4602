"""argparse value types and parser for the command lines (``flowerpets ...`` and ``bench/``).

A value type is what ``parser.add_argument(..., type=...)`` takes: a callable
from the option's text to its value that raises
:class:`argparse.ArgumentTypeError` with a one-line reason, which argparse
prints as ``prog: error: argument --option: <reason>`` (exit status 2).

* :func:`integer` and :func:`number` parse, and refuse text that is no number
  (``expected an integer, got 'x'``, ``expected a number, got 'x'``);
* :func:`checked` puts a range check with its own message on any parser,
  including another checked type, so each command line keeps its own wording;
* :data:`positive_int`, :data:`non_negative_int` and :data:`non_negative_float`
  are the ready-made ones more than one command line uses;
* :class:`OneLineParser` is the parser every ``flowerpets`` command uses: an
  error is one line on stderr with exit status 2, and options are never
  matched by prefix (``--round`` is not ``--rounds``).

This module imports nothing from the rest of flowerpets, so any layer may use it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

__all__ = [
    "OneLineParser",
    "checked",
    "integer",
    "non_negative_float",
    "non_negative_int",
    "number",
    "one_line",
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


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), with no abbreviations.

    Prefix matching is off (``allow_abbrev=False``): an abbreviation that works
    today silently changes meaning when a longer option is added tomorrow. Its
    subparsers are of the same class unless ``parser_class`` says otherwise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """``message`` as one line: its lines joined by ``"; "``, blank ones dropped."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())

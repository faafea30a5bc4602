"""The argument checks every layer shares: one place, one wording, our errors.

A check takes the argument's name and value and returns the value as the type
it stands for (an ``int`` stays an ``int``, an ``int`` given for a real number
becomes a ``float``). It raises

* :class:`~flowerpets.exceptions.ParameterTypeError` (a :class:`TypeError`)
  when the value is of the wrong type; ``bool`` is never taken for a number,
  although Python's ``True`` is an ``int``;
* :class:`~flowerpets.exceptions.ParameterValueError` (a :class:`ValueError`)
  when it is of the right type and out of range.

Both are :class:`~flowerpets.exceptions.FlowerpetsError`. Messages name the
argument and what it must be. Pass ``secret=True`` where the value protects
privacy (a weight, a clip learnt from data): the message then leaves it out.

Values read from a message (a peer's config record) go through
:mod:`flowerpets.core.fields` instead, which raises a protocol error: a bad
value from a peer is not a programming mistake of the caller.

This module imports nothing from flowerpets but its exceptions, so any layer
may use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Iterable
from fractions import Fraction
from typing import Any, TypeVar

from flowerpets.exceptions import ParameterTypeError, ParameterValueError

__all__ = [
    "boolean",
    "instance",
    "integer",
    "is_integer",
    "is_real",
    "one_of",
    "probability",
    "rational",
    "real",
    "string",
    "strings",
]

T = TypeVar("T")


def is_integer(value: object) -> bool:
    """``value`` is an ``int`` (or NumPy integer) and not a ``bool``."""
    return _is_int(value)


def is_real(value: object) -> bool:
    """``value`` is an ``int`` or ``float`` (or a NumPy one) and not a ``bool``."""
    return _is_int(value) or _is_float(value)


def _is_int(value: object) -> bool:
    # NumPy integers register as Integral; bool (and NumPy's bool_) never count as numbers.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral | bool)


def _shown(value: object, secret: bool) -> str:
    return "" if secret else f", got {value!r}"


def _range_text(
    *,
    above: float | None,
    at_least: float | None,
    below: float | None,
    at_most: float | None,
) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {above}")
    if at_least is not None:
        parts.append(f">= {at_least}")
    if below is not None:
        parts.append(f"< {below}")
    if at_most is not None:
        parts.append(f"<= {at_most}")
    return " and ".join(parts)


def _check_range(
    name: str,
    value: float | Fraction,
    noun: str,
    *,
    above: float | None,
    at_least: float | None,
    below: float | None,
    at_most: float | None,
    secret: bool,
) -> None:
    ok = (
        (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        bounds = _range_text(above=above, at_least=at_least, below=below, at_most=at_most)
        raise ParameterValueError(f"{name} must be {noun} {bounds}{_shown(value, secret)}")


def integer(
    name: str,
    value: object,
    *,
    above: int | None = None,
    at_least: int | None = None,
    below: int | None = None,
    at_most: int | None = None,
    secret: bool = False,
) -> int:
    """``value`` as an ``int`` within the bounds given (all optional, inclusive or not)."""
    if not _is_int(value):
        raise ParameterTypeError(f"{name} must be an int{_type_shown(value, secret)}")
    number: int = int(value)  # type: ignore[call-overload]  # an Integral
    _check_range(
        name,
        number,
        "an int",
        above=above,
        at_least=at_least,
        below=below,
        at_most=at_most,
        secret=secret,
    )
    return number


def real(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    finite: bool = True,
    secret: bool = False,
) -> float:
    """``value`` as a ``float`` within the bounds given.

    NaN never passes; an infinity passes only if ``finite`` is false.
    """
    if not (_is_int(value) or _is_float(value)):
        raise ParameterTypeError(f"{name} must be a number{_type_shown(value, secret)}")
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ParameterValueError(
            f"{name} must be a {'finite ' if finite else ''}number{_shown(value, secret)}"
        )
    _check_range(
        name,
        number,
        "a number",
        above=above,
        at_least=at_least,
        below=below,
        at_most=at_most,
        secret=secret,
    )
    return number


def rational(
    name: str,
    value: object,
    *,
    above: int | None = None,
    at_most: int | None = None,
    secret: bool = False,
) -> Fraction:
    """``value``, an ``int`` or a :class:`~fractions.Fraction`, as a ``Fraction`` within the bounds.

    A float is refused, although it is a rational number: where a check wants
    an exact rational, ``0.1`` (which is not 1/10) is more likely a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Rational):
        raise ParameterTypeError(
            f"{name} must be an int or a fractions.Fraction{_type_shown(value, secret)}"
        )
    number = Fraction(value)
    _check_range(
        name,
        number,
        "a rational",
        above=above,
        at_least=None,
        below=None,
        at_most=at_most,
        secret=secret,
    )
    return number


def probability(
    name: str, value: object, *, zero: bool = True, one: bool = True, secret: bool = False
) -> float:
    """``value`` as a ``float`` in [0, 1]; ``zero=False`` or ``one=False`` open that end."""
    number = real(name, value, secret=secret)
    low_ok = number > 0 or (zero and number == 0)
    high_ok = number < 1 or (one and number == 1)
    if not (low_ok and high_ok):
        interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise ParameterValueError(f"{name} must be in {interval}{_shown(value, secret)}")
    return number


def boolean(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (not merely truthy: ``1`` and ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise ParameterTypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def instance(name: str, value: object, kind: type[T] | tuple[type[T], ...]) -> T:
    """``value`` if it is an instance of ``kind``."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join(k.__name__ for k in kinds)
        raise ParameterTypeError(f"{name} must be {wanted}, got {type(value).__name__}")
    return value


def one_of(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices`` (a typed error listing them otherwise)."""
    try:
        known = value in choices
    except TypeError:  # an unhashable value asked of a set
        known = False
    if not known:
        listed = ", ".join(repr(c) for c in sorted(choices, key=repr))
        raise ParameterValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def string(name: str, value: object, *, non_empty: bool = False) -> str:
    """``value`` if it is a ``str`` (``non_empty``: and not ``""``)."""
    if not isinstance(value, str):
        raise ParameterTypeError(f"{name} must be a str, got {type(value).__name__}")
    if non_empty and not value:
        raise ParameterValueError(f"{name} must be a non-empty str")
    return value


def strings(
    name: str,
    value: object,
    *,
    non_empty: bool = False,
    unique: bool = False,
    check: Callable[[str], Any] | None = None,
) -> tuple[str, ...]:
    """``value`` as a tuple of ``str``: any iterable of strings, but never one bare string.

    ``check`` runs on each item and may raise its own error (a pattern that does
    not compile, a name the wire format keeps).
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ParameterTypeError(
            f"{name} must be a sequence of str (not one str), got {type(value).__name__}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ParameterTypeError(
                f"every item of {name} must be a str, got {type(item).__name__}"
            )
        if check is not None:
            check(item)
    if non_empty and not items:
        raise ParameterValueError(f"{name} must not be empty")
    if unique and len(set(items)) != len(items):
        raise ParameterValueError(f"{name} must not repeat an item")
    return items


def _type_shown(value: object, secret: bool) -> str:
    # The type is never secret; the value may be (a bool or str is shown, a float is not if secret).
    return f", got {type(value).__name__}" + ("" if secret else f" {value!r}")

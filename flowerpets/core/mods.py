"""Mod chains: the one fold that both the client and the server side use.

A mod wraps the next callable in the chain: ``mod(x, context, call_next)``.
The first mod listed is the outermost: it sees the input first and the output
last. On the client ``x`` is a :class:`~flowerpets.core.message.Message`; on
the server it is a :class:`~flowerpets.core.round.RoundRequest`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

from flowerpets.exceptions import ParameterTypeError

__all__ = ["chain"]

In = TypeVar("In")
Ctx = TypeVar("Ctx")
Out = TypeVar("Out")


def _call_mod(
    mod: Callable[[In, Ctx, Callable[[In, Ctx], Out]], Out],
    call_next: Callable[[In, Ctx], Out],
    x: In,
    context: Ctx,
) -> Out:
    return mod(x, context, call_next)


def chain(
    mods: Sequence[Callable[[In, Ctx, Callable[[In, Ctx], Out]], Out]],
    innermost: Callable[[In, Ctx], Out],
) -> Callable[[In, Ctx], Out]:
    """Fold ``mods`` around ``innermost``; ``mods[0]`` ends up outermost."""
    call = innermost
    for mod in reversed(mods):
        if not callable(mod):
            raise ParameterTypeError(
                f"a mod must be callable as mod(x, context, call_next), got {mod!r}"
            )
        call = partial(_call_mod, mod, call)
    return call

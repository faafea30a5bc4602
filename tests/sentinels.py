"""Sentinel search for the refusal-reason tests: how a private number may show in a reason.

Error replies travel in the clear, so the tests plant distinctive private values
(weights, losses, update values, norms) and look for every common rendering of
them in each reason a mod can send.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def renderings(value: float) -> set[str]:
    """The ways ``value`` commonly ends up in a message (at least 3 characters long)."""
    x = float(value)
    shown = {
        repr(value),
        str(value),
        f"{x:g}",
        f"{x:.3g}",
        f"{x:.4g}",
        f"{x:.6g}",
        f"{abs(x):.4g}",
        f"{x:.2f}",
        f"{x:e}",
        f"{x:.1e}",
        f"{x:.3e}",
        f"{x:.4e}",
        f"{x:,.0f}",
        repr(np.float32(x)),
        str(np.float32(x)),
        str(int(x)),
        str(abs(int(x))),
        str(round(x)),
    }
    return {s for s in shown if len(s.lstrip("-")) >= 3}


def leaks(reason: str, sentinels: Iterable[float]) -> list[str]:
    """Every rendering of a sentinel that ``reason`` contains."""
    return sorted({s for v in sentinels for s in renderings(v) if s in reason})


def assert_no_secret(reason: str, *sentinels: float) -> None:
    leaked = leaks(reason, sentinels)
    assert not leaked, f"the reason {reason!r} carries {leaked}"

"""Distributed DP's privacy events, and the noise multiplier for a target epsilon.

A round's release is the secure sum of the nodes' encoded updates, each carrying
a noise share; the event counts the shares the policy says the sum holds
(:class:`~flowerpets.dp.accountant.DropoutPolicy`), with the pipeline's
sensitivities (:meth:`~flowerpets.dp.accountant.DistributedEvent.from_pipeline`).
With adaptive clipping the clipped count is a second release: a sum of the
nodes' clipped bits (sensitivity 1) with its own shares, composed beside it.

The epsilon is that of the events on the run's ledger, composed by
:func:`~flowerpets.dp.central._ledger.spent` (the accountant CentralDp uses).
No amplification by sampling is claimed: the server, which the mechanism
protects against, knows who took part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from flowerpets.dp.accountant import AccountantFactory, PrivacyEvent
from flowerpets.dp.central import _ledger
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.exceptions import InfeasibleParametersError

__all__ = ["calibrated_multiplier", "count_event", "epsilon_of", "update_event"]


def update_event(
    mechanism: Mechanism,
    *,
    clip: float,
    scale: float,
    padded: int,
    beta: float,
    share: float,
    counted: int,
) -> PrivacyEvent:
    """The event of a sum of ``counted`` encoded updates, each with a share ``share``."""
    event: PrivacyEvent = mechanism.event.from_pipeline(
        clip=clip,
        scale=scale,
        dimension=padded,
        local_variance=share,
        clients_in_sum=counted,
        beta=beta,
    )
    return event


def count_event(mechanism: Mechanism, *, share: float, counted: int) -> PrivacyEvent:
    """The event of a sum of ``counted`` clipped bits (+1 or -1 each: under zero-out, a
    contribution of 0 against +-1, sensitivity 1), each with a noise share ``share``."""
    event: PrivacyEvent = mechanism.event(
        local_variance=share,
        clients_in_sum=counted,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        dimension=1,
    )
    return event


def epsilon_of(
    events: Sequence[PrivacyEvent], rounds: int, factory: AccountantFactory | None, delta: float
) -> float:
    """The epsilon of ``rounds`` rounds, each releasing ``events``."""
    ledger: _ledger.Ledger = ()
    for event in events:
        ledger = _ledger.added(ledger, event, rounds)
    return _ledger.spent(ledger, factory, delta)


def calibrated_multiplier(
    events_at: Callable[[float], Sequence[PrivacyEvent]],
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    factory: AccountantFactory | None,
    rel_tol: float = 1e-3,
    start: float = 1.0,
    below: float = math.inf,
) -> float:
    """The smallest noise multiplier ``z`` (within ``rel_tol``, on the safe side) whose
    ``rounds`` rounds of ``events_at(z)`` stay within ``target_epsilon``.

    A bisection over the accountant's answers (epsilon falls as ``z`` grows); the
    accountant is the one the run's ledger uses, so the run's epsilon after
    ``rounds`` rounds is at most the target when every round's events are these.
    The search starts at ``start`` and doubles from there, staying ``below`` (with
    adaptive clipping the total multiplier must stay below ``2 sigma_b``).
    """

    def epsilon(z: float) -> float:
        return epsilon_of(events_at(z), rounds, factory, delta)

    high = start
    for _ in range(40):
        if epsilon(high) <= target_epsilon:
            break
        high = high * 2 if high * 2 < below else high + (below - high) / 2
    else:
        limit = "2^40" if math.isinf(below) else f"{below:g} (twice the count's noise)"
        raise InfeasibleParametersError(
            f"no noise multiplier below {limit} reaches epsilon {target_epsilon:g} at "
            f"delta {delta:g} in {rounds} round(s): raise the target"
            + ("" if math.isinf(below) else ", or adaptive clipping's count_stddev")
        )
    low = high / 2
    while epsilon(low) <= target_epsilon:
        high, low = low, low / 2
        if low < 1e-6:
            return high
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if epsilon(middle) <= target_epsilon else (middle, high)
    return high

"""Choosing the degree ``k`` and the threshold ``t`` of SecAgg+ for a cohort.

Bell et al. (CCS 2020) replace SecAgg's complete graph by a random ``k``-regular
graph; the threshold ``t`` of the Shamir sharing must then be large enough that
the corrupted neighbours of an honest node cannot pool ``t`` shares, and small
enough that every node keeps ``t`` live neighbours despite dropouts.
:func:`find_parameters` follows the paper's analysis for a Harary graph under a
uniformly random ordering (as in Google's reference parameter finder), with a
cohort of ``n`` nodes of which at most ``C = floor(gamma * n)`` are corrupted
(they collude with the server) and at most ``D = floor(delta * n)`` drop out;
``B = C + D`` nodes are "bad" and ``S = n - D`` survive. It returns the smallest
even ``k`` (``2 <= k < n - 1``) for which all three inequalities hold, and the
smallest ``t >= 2`` satisfying (2):

1. **The honest survivors stay connected** (else the server learns the sums of
   the pieces, not only the total). Cutting the ring of ``H(n, k)`` twice needs
   two runs of ``k/2`` consecutive bad nodes: at most ``n (n - k - 1) / 2`` pairs
   of places, each all-bad with probability ``[B! / (B - k)!] / [n! / (n - k)!]``.
   Required: that union bound ``<= 2**-(sigma + 1)`` (or ``k > B``: impossible).
2. **No honest node has ``t`` corrupted neighbours** (else they and the server
   would hold ``t`` shares of both of its secrets). A node's ``k`` neighbours are
   a uniform draw from the other ``n - 1`` nodes, so their corrupted count is
   hypergeometric ``Hyp(n - 1, C, k)``. Required:
   ``n * P[Hyp(n - 1, C, k) >= t] <= 2**-(sigma + 1)``.
3. **Every node keeps ``t`` surviving neighbours** (else its secrets cannot be
   reconstructed and the round fails). Required:
   ``n * P[Hyp(n - 1, S - 1, k) < t] <= 2**-eta``.

(1) and (2) bound the probability that the server learns more than the sum of
the honest survivors by ``2**-sigma`` (``security_bits``, default 40), (3) the
probability that the round fails with at most ``D`` dropouts by ``2**-eta``
(``correctness_bits``, default 40; Google's finder uses 20). If no ``k < n - 1``
works (small cohorts), the complete graph ``k = n - 1`` is used with
``t = max(C + 1, 2)``, which needs ``t <= S - 1``; if that fails too, the
requirements are infeasible and :class:`~flowerpets.exceptions.InfeasibleParametersError`
says so. In practice ``gamma + delta`` must stay well below 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from flowerpets.exceptions import InfeasibleParametersError

__all__ = ["GraphParameters", "check_parameters", "find_parameters"]

_LN2 = math.log(2.0)
_SMALL = 1e-12  # keeps floor(0.1 * 10) at 1 despite floating point


@dataclass(frozen=True, slots=True)
class GraphParameters:
    """The degree and threshold for a cohort of ``cohort_size`` nodes.

    When found by :func:`find_parameters`, the ``log2_*`` fields are the base-2
    logarithms of the bounds in its docstring (``-inf``: impossible): the
    probability that the honest survivors are disconnected, that some honest
    node has ``threshold`` corrupted neighbours, and that some node has fewer
    than ``threshold`` surviving neighbours. They are ``None`` for parameters
    given by hand.
    """

    cohort_size: int
    degree: int
    threshold: int
    dropout_rate: float | None = None
    corrupted_fraction: float | None = None
    log2_disconnected: float | None = None
    log2_leak: float | None = None
    log2_failure: float | None = None

    @property
    def is_complete(self) -> bool:
        return self.degree == self.cohort_size - 1


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_bits(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise ValueError(f"{name} must be an integer in [1, 128], got {value!r}")
    return value


def _check_size(cohort_size: int) -> int:
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 2:
        raise InfeasibleParametersError(
            f"secure aggregation needs a cohort of at least 2 nodes, got {cohort_size!r}"
        )
    return cohort_size


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeometric_log_pmf(population: int, successes: int, draws: int) -> list[float]:
    """``log P[X = x]`` for ``x = 0..draws`` (``-inf`` where impossible)."""
    total = _log_choose(population, draws)
    out = []
    for x in range(draws + 1):
        if x > successes or draws - x > population - successes:
            out.append(-math.inf)
        else:
            out.append(
                _log_choose(successes, x) + _log_choose(population - successes, draws - x) - total
            )
    return out


def _log_sum(values: list[float]) -> float:
    finite = [v for v in values if v > -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def _log_disconnected(n: int, k: int, bad: int) -> float:
    """Inequality (1): log of the union bound on a disconnected honest-survivor graph."""
    if k > bad:
        return -math.inf
    pairs = math.log(n) + math.log(n - k - 1) - _LN2
    runs = (math.lgamma(bad + 1) - math.lgamma(bad - k + 1)) - (
        math.lgamma(n + 1) - math.lgamma(n - k + 1)
    )
    return pairs + runs


@lru_cache(maxsize=256)
def find_parameters(
    cohort_size: int,
    *,
    dropout_rate: float = 0.1,
    corrupted_fraction: float = 0.1,
    security_bits: int = 40,
    correctness_bits: int = 40,
) -> GraphParameters:
    """The smallest degree, and its threshold, meeting the three inequalities above."""
    n = _check_size(cohort_size)
    delta = _check_rate("dropout_rate", dropout_rate)
    gamma = _check_rate("corrupted_fraction", corrupted_fraction)
    sigma = _check_bits("security_bits", security_bits)
    eta = _check_bits("correctness_bits", correctness_bits)
    corrupted = math.floor(gamma * n + _SMALL)
    dropped = math.floor(delta * n + _SMALL)
    survivors = n - dropped
    leak_budget = -(sigma + 1) * _LN2 - math.log(n)  # per node, for (2)
    fail_budget = -eta * _LN2 - math.log(n)  # per node, for (3)
    for k in range(2, n - 1, 2):
        disconnected = _log_disconnected(n, k, corrupted + dropped)
        if disconnected > -(sigma + 1) * _LN2:
            continue
        corrupt_pmf = _hypergeometric_log_pmf(n - 1, corrupted, k)
        # Smallest t with log P[corrupted neighbours >= t] <= the budget.
        t = next(t for t in range(k + 2) if _log_sum(corrupt_pmf[t:]) <= leak_budget)
        t = max(t, 2)
        if t > k:
            continue
        survive_pmf = _hypergeometric_log_pmf(n - 1, survivors - 1, k)
        fail = _log_sum(survive_pmf[:t])
        if fail <= fail_budget:
            return GraphParameters(
                cohort_size=n,
                degree=k,
                threshold=t,
                dropout_rate=delta,
                corrupted_fraction=gamma,
                log2_disconnected=disconnected / _LN2,
                log2_leak=(math.log(n) + _log_sum(corrupt_pmf[t:])) / _LN2,
                log2_failure=(math.log(n) + fail) / _LN2,
            )
    t = max(corrupted + 1, 2)
    if t <= survivors - 1:
        return GraphParameters(
            cohort_size=n,
            degree=n - 1,
            threshold=t,
            dropout_rate=delta,
            corrupted_fraction=gamma,
            log2_disconnected=-math.inf,
            log2_leak=-math.inf,
            log2_failure=-math.inf,
        )
    raise InfeasibleParametersError(
        f"no degree and threshold for a cohort of {n} with up to {corrupted} corrupted node(s) "
        f"(corrupted_fraction={gamma}) and {dropped} dropout(s) (dropout_rate={delta}): even the "
        f"complete graph would need a threshold of {t} with only {survivors - 1} surviving "
        "neighbours per node; lower the rates or grow the cohort"
    )


def check_parameters(cohort_size: int, degree: int, threshold: int) -> GraphParameters:
    """Hand-picked ``degree`` and ``threshold`` made to fit a cohort, or a clear error.

    A degree of ``cohort_size - 1`` or more means the complete graph. No
    probability is claimed for hand-picked values.
    """
    n = _check_size(cohort_size)
    for name, value in (("degree", degree), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    k = min(degree, n - 1)
    if k != n - 1 and k % 2:
        raise ValueError(f"degree must be even (a Harary graph), got {degree}")
    if threshold > k:
        raise InfeasibleParametersError(
            f"threshold={threshold} exceeds the degree {k} for a cohort of {n}: no node could "
            "ever collect enough shares"
        )
    return GraphParameters(cohort_size=n, degree=k, threshold=threshold)

"""Choosing the degree ``k`` and the threshold ``t`` of SecAgg+ for a cohort.

Bell et al. (CCS 2020) replace SecAgg's complete graph by a random ``k``-regular
graph; the threshold ``t`` of the Shamir sharing must be large enough that the
server and the corrupted neighbours of an honest node can never hold ``t``
shares of *both* of its secrets, and small enough that every node keeps ``t``
live neighbours despite dropouts. :func:`find_parameters` works on a Harary
graph ``H(n, k)`` over a uniformly random ring order. The model: at most
``C = floor(gamma * n)`` nodes are corrupted (they collude with the server);
every node drops out independently with probability ``delta`` (the dropout
*rate*, not a cap on the count). It returns the smallest even ``k``
(``2 <= k <= n - 2``) for which these hold, each with the smallest ``t``:

1. **The honest survivors stay connected** (else the server learns the sums of
   the pieces, not only the total). Cutting the ring of ``H(n, k)`` twice needs
   two runs of ``k/2`` consecutive bad (corrupted or dropped) nodes: at most
   ``n (n - k - 1) / 2`` pairs of places, each holding a uniformly random set of
   ``k`` nodes, all bad with probability ``E[delta ** (k - X)]``,
   ``X ~ Hyp(n, C, k)`` the corrupted ones among them. Required: that union
   bound ``<= 2**-(sigma + 1)``.
2. **No honest node has more than ``c`` corrupted neighbours**, ``c`` the
   smallest count with ``n * P[Hyp(n - 1, C, k) > c] <= 2**-(sigma + 1)`` (a
   node's ``k`` neighbours are a uniform draw from the other ``n - 1``).
3. **Threshold** ``t = floor((k + c) / 2) + 1``, i.e. the smallest ``t`` with
   ``2 t > k + c`` (which implies ``t > c``). ``t > c``: the corrupted neighbours
   alone never pool ``t`` shares. ``2 t > k + c``: the server, which relays
   every share and every survivor list, learns an honest node's input if it can
   collect ``t`` shares of its self-mask seed and ``t`` shares of its mask key
   (or of the keys of every neighbour it masked with) from two *disjoint* sets
   of honest neighbours, each set topped up by the ``c_i <= c`` corrupted ones:
   one set told "it survived", the other "it dropped" (a split view), or told
   that the only ``t`` neighbours whose shares it forwarded to the node dropped
   (selective forwarding). Each honest node's view is consistent, so no local
   check catches it; two disjoint sets of ``t - c_i`` among the node's
   ``k - c_i`` honest neighbours exist exactly when ``k - c_i >= 2 (t - c_i)``,
   i.e. ``2 t <= k + c_i``. Google's reference finder for this protocol
   (fcp, ``secagg/server/graph_parameter_finder.cc``) picks the same ``t`` in
   its semi-malicious-server mode.
4. **Every node keeps ``t`` surviving neighbours** (else the round fails): its
   ``k`` neighbours survive independently, so the count is
   ``Bin(k, 1 - delta)``. Required: ``n * P[Bin(k, 1 - delta) < t] <= 2**-eta``.

(1) and (2) bound the probability that the server learns more than the sum of
the honest survivors by ``2**-sigma`` (``security_bits``, default 40); (4) bounds
the probability that the round fails by ``2**-eta`` (``correctness_bits``,
default 40). (4) needs ``1 - delta > (1 + gamma) / 2`` asymptotically: the
dropout rate must stay below ``(1 - gamma) / 2``.

**Against an actively malicious server** (``threat=Threat.MALICIOUS``, for the
protocol with signed key advertisements and a consistency round), rule (3)
becomes

3M. **Threshold** ``t = floor(k / 2) + c + 1``, the smallest ``t`` with
   ``2 t > k + 2 c`` (so ``2 t > k + c`` too: 3M's ``t`` is never below 3's,
   and above it once ``c >= 1`` at an even ``k``). Such a server picks which honest nodes
   appear dropped and whose round-1 shares it forwards to whom, so it need not
   attack one node's two secrets: it can try to cut a group ``K`` of honest
   survivors off the rest and learn ``sum(K)``. The pairwise masks inside
   ``sum(K)`` cancel only if no member of ``K`` masked with an honest survivor
   outside ``K`` (``S`` is the same everywhere, so no honest node releases the
   key shares of a survivor). A member ``r`` of ``K`` that answers the
   unmasking request lists only neighbours it masked with (a node refuses a
   list naming one that never shared keys with it), so its honest surviving
   neighbours are all in ``K``; the holders of its self-mask seed's shares
   that answer are then answering members of ``K``, and it needs ``t`` holders
   of which at most ``c_r`` are corrupted. So the answering members ``A`` of
   ``K`` (someone must answer, or no seed is rebuilt) each have at least
   ``t - c_r`` neighbours in ``A``; under 3M, more than ``k / 2``. In
   ``H(n, k)`` such a set leaves no ``k / 2`` consecutive ring places out (the
   last member before such a gap would have at most ``k / 2`` neighbours in
   it), and two of them cannot be cut apart (the last member of one before
   the other would again see at most ``k / 2``): the server learns one sum at
   most, over ``|K| >= |A| >= m (k / 2 + 2)`` honest nodes: ``A`` holds
   ``m = floor((n - k - 1) / (3 k / 2)) + 1`` disjoint windows of ``k + 1``
   places, each around a member and its ``k / 2 + 1`` neighbours in ``A``
   (:func:`least_summed`; ``floor(k / 2) + 2`` for the complete graph). One
   below 3M, at ``t = k / 2 + c``, a run of ``k / 2 + 1`` consecutive honest
   nodes, each with ``c`` corrupted neighbours, already qualifies. That
   count assumes one survivor set ``S`` for every honest node that releases
   shares, which the consistency check gives in the complete graph and, with
   the cohort quorum (:func:`cohort_quorum`, the malicious mode's default), in
   a sparse one; without the quorum a sparse node counts its neighbours'
   signatures only, so far-apart parts of the ring can be shown different
   sets, and at ``t = k / 2 + 1`` a server with two such views learns the sum
   of ``k / 2 + 2`` consecutive honest nodes (found for ``k`` from 8 to 14;
   ``tests/secagg/test_malicious.py`` plays it at n = 40). What the local check
   alone gives (docs/secagg.md) is that each honest input the server learns is
   summed with at least ``2t - k - c`` other honest ones: under 3M, at least
   ``c + 1`` (:attr:`GraphParameters.least_summed` without the quorum, ``1 + 2t
   - k - c``). (4) then needs ``1 - delta > 1/2 + c / k``: the dropout rate
   must stay below about ``1/2 - gamma``. With the quorum ``q`` a sparse round
   also fails when at most ``q`` nodes survive to sign, and (4) becomes ``n
   P[Bin(k, 1 - delta) < t] + P[Bin(n, 1 - delta) <= q] <= 2**-eta`` (the
   second term needs only ``1 - delta > (1 + gamma) / 2``, which (4) already
   implies since ``c / k`` exceeds about ``gamma``). (1), (2) and (4) are
   unchanged otherwise: (2) still assumes the ring order is uniformly random
   and independent of which nodes are corrupted (a server choosing the order
   could surround a node with all ``C``), and (4) is correctness against honest
   dropouts (a malicious server can always fail a round). This is a derivation
   for the Harary graph and this protocol's checks, not a bound copied from
   Bell et al., whose malicious-setting guarantee has the same shape (the
   server learns the sum of one large group of honest nodes only). fcp's finder
   has no such mode (its semi-malicious mode is rule 3).

If no ``k <= n - 2`` meets them (small cohorts), the complete graph
``k = n - 1`` is used with ``c = C`` and ``t = max(floor((n - 1 + C) / 2) + 1, 2)``,
which needs ``t <= n - 1``; it fails exactly when at most ``t`` nodes survive.
Small cohorts cannot reach ``2**-eta`` at a real dropout rate (all 5 nodes of a
cohort of 5 drop with probability ``delta**5``): then the complete graph is
used as the best effort, its true failure probability is reported in
``log2_failure`` and logged as a warning. If even the complete graph fails more
often than not, :class:`~flowerpets.exceptions.InfeasibleParametersError` says
so.

The search is exact and fast: (1) is monotone in ``k`` (bisection); ``c`` grows
with ``k``, and for a fixed ``h``, ``P[Bin(k, p) <= k/2 + h]`` decreases in even
``k`` when ``p >= 1/2``, so once (4) fails at ``k`` with ``h = floor(c / 2)``,
every degree before the first ``k'`` where that lower bound passes fails too
(bisection again). Tails are summed in log space (``scipy.special``).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flowerpets._validation import boolean, instance, integer, one_of, probability
from flowerpets.exceptions import InfeasibleParametersError, ParameterValueError

__all__ = [
    "GraphParameters",
    "Threat",
    "check_parameters",
    "check_size",
    "check_threshold",
    "cohort_quorum",
    "find_parameters",
    "least_summed",
    "minimum_threshold",
]

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)
_SMALL = 1e-12  # keeps floor(0.1 * 10) at 1 despite floating point
_DEFAULT_CORRUPTED = 0.1
_DEFAULT_SECURITY_BITS = 40
MAX_BITS = 128  # security_bits and correctness_bits are in [1, MAX_BITS]
# What a node assumes when it checks a server's threshold: no collusion level, since the
# round configuration does not declare the server's, and a server assuming less than the
# node would otherwise have every round refused. t > k/2 then, whatever the server chose.
_NODE_CORRUPTED = 0.0


class Threat(enum.StrEnum):
    """What the server may do: the rule (3) or (3M) the threshold must meet."""

    SEMI_HONEST = "semi-honest"  # follows the protocol; t > (k + c) / 2
    MALICIOUS = "malicious"  # actively malicious, with the consistency round; t > k/2 + c


# A StrEnum member hashes and compares as its value: one mapping takes both spellings.
_THREATS = {threat.value: threat for threat in Threat}


def threat_model(threat: object) -> Threat:
    """``threat`` as a :class:`Threat`: a member or its value (``"malicious"``)."""
    return _THREATS[one_of("threat", instance("threat", threat, str), _THREATS)]


@dataclass(frozen=True, slots=True)
class GraphParameters:
    """The degree and threshold for a cohort of ``cohort_size`` nodes.

    When found by :func:`find_parameters`, the ``log2_*`` fields are the base-2
    logarithms of the bounds in its docstring (``-inf``: impossible): that the
    honest survivors are disconnected, that some honest node has more than
    ``corrupted_neighbours`` corrupted neighbours, and that some node has fewer
    than ``threshold`` surviving neighbours (for the complete graph: the exact
    probability that the round fails). They are ``None`` for parameters given
    by hand.
    """

    cohort_size: int
    degree: int
    threshold: int
    dropout_rate: float | None = None
    corrupted_fraction: float | None = None
    log2_disconnected: float | None = None
    log2_leak: float | None = None
    log2_failure: float | None = None
    corrupted_neighbours: int | None = None
    threat: Threat = Threat.SEMI_HONEST
    quorum: int = 0  # cohort signatures a node needs besides its own (0: none asked for)

    @property
    def is_complete(self) -> bool:
        return self.degree == self.cohort_size - 1

    @property
    def tolerated_dropouts(self) -> int:
        """How many dropouts the round survives whichever nodes they hit: ``k - t``, and
        with a cohort quorum ``q`` at most ``n - q - 1`` (a node needs ``q`` others' signatures)."""
        if self.quorum:
            return max(min(self.degree - self.threshold, self.cohort_size - self.quorum - 1), 0)
        return self.degree - self.threshold

    @property
    def least_summed(self) -> int | None:
        """For ``threat=Threat.MALICIOUS``, the fewest honest nodes in any sum the server
        can learn; ``None`` for a semi-honest server, which learns only the sum of the
        honest survivors.

        For the complete graph, :func:`least_summed` (the consistency check then gives
        every releasing node one survivor set). For a sparse graph the check is local (a
        node counts its neighbours' signatures), far-apart parts of the ring can be shown
        different sets, and what holds is ``1 + 2t - k - c``: each honest input is summed
        with at least ``2t - k - c`` other honest ones (docs/secagg.md, *Malicious mode*),
        with ``c`` the corrupted-neighbour bound (0 for hand-picked parameters, which
        assume none). At ``t = k/2 + 1`` (which nodes accept, whatever the finder
        chose) a server with regional views learns the sum of ``k/2 + 2`` consecutive
        honest nodes for ``k >= 8`` (``tests/secagg/test_malicious.py``). With the
        cohort quorum (``quorum`` above 0: the malicious mode's default, which the
        finder assumes unless told ``quorum=False``) every node that unmasks saw one set
        and :func:`least_summed` holds."""
        if self.threat is not Threat.MALICIOUS:
            return None
        if self.is_complete or self.quorum:
            return least_summed(self.cohort_size, self.degree)
        return 1 + 2 * self.threshold - self.degree - (self.corrupted_neighbours or 0)


def check_size(cohort_size: int) -> int:
    """``cohort_size`` if it is an int of at least 2 (InfeasibleParametersError if smaller)."""
    if integer("cohort_size", cohort_size) < 2:
        raise InfeasibleParametersError(
            f"secure aggregation needs a cohort of at least 2 nodes, got {cohort_size!r}"
        )
    return cohort_size


def _corrupted(gamma: float, n: int) -> int:
    return math.floor(gamma * n + _SMALL)


def cohort_quorum(cohort_size: int, corrupted_fraction: float = _DEFAULT_CORRUPTED) -> int:
    """``floor((n + C) / 2) + 1`` with ``C = floor(corrupted_fraction * n)``: how many other
    nodes of the cohort must sign a node's survivor set before it unmasks (malicious mode,
    sparse graph). Two sets cannot both gather it, since the ``n - C`` honest nodes sign
    one set each per round: ``2 (q - C) > n - C``."""
    n = check_size(cohort_size)
    gamma = probability("corrupted_fraction", corrupted_fraction, one=False)
    return (n + _corrupted(gamma, n)) // 2 + 1


# -- tails, in log space ----------------------------------------------------------------------
def _hypergeometric_support(population: int, successes: int, draws: int) -> tuple[int, int]:
    return max(0, draws - (population - successes)), min(draws, successes)


def _hypergeometric_log_pmf(population: int, successes: int, draws: int) -> list[float]:
    """``log P[X = x]`` for ``x = 0..draws`` (``-inf`` where impossible)."""
    values: list[float] = _log_pmf_array(population, successes, draws).tolist()
    return values


def _log_pmf_array(population: int, successes: int, draws: int) -> np.ndarray:
    lo, hi = _hypergeometric_support(population, successes, draws)
    out = np.full(draws + 1, -math.inf)
    if lo > hi:
        return out
    from scipy import special  # imported late: a node's client mod never needs scipy

    x = np.arange(lo, hi + 1, dtype=np.float64)
    failures = population - successes
    gl = special.gammaln
    total = gl(population + 1) - gl(draws + 1) - gl(population - draws + 1)
    out[lo : hi + 1] = (
        gl(successes + 1)
        - gl(x + 1)
        - gl(successes - x + 1)
        + gl(failures + 1)
        - gl(draws - x + 1)
        - gl(failures - draws + x + 1)
        - total
    )
    return out


def _hypergeometric_log_sf(population: int, successes: int, draws: int) -> np.ndarray:
    """``log P[X >= x]`` for ``x = 0..draws + 1`` (the last entry is ``-inf``)."""
    pmf = _log_pmf_array(population, successes, draws)
    tail = np.logaddexp.accumulate(pmf[::-1])[::-1]
    return np.append(np.minimum(tail, 0.0), -math.inf)


def _corrupted_tail(n: int, corrupted: int, k: int, log_budget: float) -> tuple[int, float]:
    """The smallest ``c`` with ``log(n * P[Hyp(n - 1, C, k) > c]) <= log_budget``, and that log."""
    sf = math.log(n) + _hypergeometric_log_sf(n - 1, corrupted, k)  # sf[x] = log n P[X >= x]
    c = int(np.argmax(sf[1:] <= log_budget))  # sf[k + 1] = -inf, so one always passes
    return c, float(sf[c + 1])


def _log_binomial_cdf(x: int, trials: int, p: float) -> float:
    """``log P[Bin(trials, p) <= x]``."""
    if x < 0:
        return -math.inf
    if x >= trials:
        return 0.0
    from scipy import special

    value = float(special.bdtr(x, trials, p))
    return math.log(value) if value > 0 else -math.inf


def _log_disconnected(n: int, k: int, corrupted: int, delta: float) -> float:
    """Inequality (1): log of the union bound on a disconnected honest-survivor graph."""
    pmf = _log_pmf_array(n, corrupted, k)
    x = np.arange(k + 1)
    if delta == 0:
        all_bad = float(pmf[k])
    else:
        all_bad = float(np.logaddexp.reduce(pmf + (k - x) * math.log(delta)))
    if all_bad == -math.inf:
        return -math.inf
    return math.log(n) + math.log(n - k - 1) - _LN2 + all_bad


def _first_even(lo: int, hi: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest even ``k`` in ``[lo, hi]`` (both even) where a monotone test passes."""
    if lo > hi or not passes(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 4 * 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 2
    return lo


def _majority_bound_passes(h: int, p: float, log_budget: float) -> Callable[[int], bool]:
    """``k -> log P[Bin(k, p) <= k/2 + h] <= log_budget``; monotone in even ``k`` (p >= 1/2)."""
    return lambda k: _log_binomial_cdf(k // 2 + h, k, p) <= log_budget


# -- the finder ------------------------------------------------------------------------------
# Rule (3) and rule (3M): the smallest t with 2t > k + c, and with 2t > k + 2c.
_RULES: dict[Threat, Callable[[int, int], int]] = {
    Threat.SEMI_HONEST: lambda k, c: (k + c) // 2 + 1,
    Threat.MALICIOUS: lambda k, c: k // 2 + c + 1,
}
_RULE_TEXT = {Threat.SEMI_HONEST: "(k + c) / 2", Threat.MALICIOUS: "k / 2 + c"}
_COMPLETE_RULE_TEXT = {Threat.SEMI_HONEST: "(n - 1 + C) / 2", Threat.MALICIOUS: "(n - 1) / 2 + C"}
# The dropout rate (4) tolerates at most, asymptotically, for the infeasibility message.
_DROPOUT_LIMIT = {
    Threat.SEMI_HONEST: "(1 - corrupted_fraction) / 2",
    Threat.MALICIOUS: "1/2 - corrupted_fraction",
}


def _threshold(k: int, c: int, threat: Threat = Threat.SEMI_HONEST) -> int:
    return max(_RULES[threat](k, c), 2)


def least_summed(cohort_size: int, degree: int) -> int:
    """The fewest honest nodes in the sum a malicious server learns, under rule (3M), *if
    every node that releases shares was shown one survivor set*.

    ``m (k / 2 + 2)`` with ``m = floor((n - k - 1) / (3 k / 2)) + 1`` for an
    even ``k <= n - 2``, ``floor(k / 2) + 2`` for the complete graph: the least
    size of a set whose every member has more than ``k / 2`` neighbours inside
    it (module docstring, rule 3M). The consistency check guarantees one set
    only in the complete graph; in a sparse one it is local, and a server that
    shows far-apart parts of the ring different sets learns smaller sums
    (:attr:`GraphParameters.least_summed` says what holds).
    """
    n = check_size(cohort_size)
    k = integer("degree", degree, at_least=1, at_most=n - 1)
    if k == n - 1:
        return k // 2 + 2
    # Disjoint windows of k + 1 places, each centred on a member: the next centre is the
    # first member at least k + 1 places on, and at most 3k/2 (no gap of k/2 places).
    windows = (n - k - 1) // (3 * k // 2) + 1
    return windows * (k // 2 + 2)


def _least_summed_sparse(cohort_size: int, degree: int, threshold: int, c: int) -> int:
    """:attr:`GraphParameters.least_summed` for these values."""
    if degree >= cohort_size - 1:
        return least_summed(cohort_size, cohort_size - 1)
    return 1 + 2 * threshold - degree - c


def _first_passing(lo: int, hi: int, passes: Callable[[np.ndarray], np.ndarray]) -> int | None:
    """The smallest even ``k`` in ``[lo, hi]`` where a vectorised test passes (no monotonicity
    assumed): chunks that double, so a near answer costs little and a far one O(n)."""
    size = 64
    while lo <= hi:
        ks = np.arange(lo, min(lo + 2 * size, hi + 2), 2)
        hits = np.flatnonzero(passes(ks))
        if hits.size:
            return int(ks[hits[0]])
        lo, size = int(ks[-1]) + 2, size * 2
    return None


def _malicious_bound_passes(
    c: int, p: float, log_budget: float
) -> Callable[[np.ndarray], np.ndarray]:
    """``k -> log P[Bin(k, p) < t(k, c)] <= log_budget`` for rule (3M) at a fixed ``c``: a
    necessary condition for (4) at every ``k`` whose own tail ``c' >= c``."""
    from scipy import special

    def passes(ks: np.ndarray) -> np.ndarray:
        t = np.maximum(ks // 2 + c + 1, 2)
        with np.errstate(divide="ignore"):
            fail = np.log(special.bdtr(t - 1, ks, p))
        ok: np.ndarray = (t <= ks) & (fail <= log_budget)
        return ok

    return passes


# The failure exponents (2**-eta) whose small cohorts were warned about.
_WARNED_COMPLETE: set[int] = set()


@lru_cache(maxsize=256)
def find_parameters(
    cohort_size: int,
    *,
    dropout_rate: float = 0.1,
    corrupted_fraction: float = _DEFAULT_CORRUPTED,
    security_bits: int = _DEFAULT_SECURITY_BITS,
    correctness_bits: int = 40,
    threat: Threat | str = Threat.SEMI_HONEST,
    quorum: bool | None = None,
) -> GraphParameters:
    """The smallest degree, with its threshold, meeting the inequalities above.

    ``threat=Threat.MALICIOUS`` (or ``"malicious"``) applies rule (3M) instead of
    (3): a larger threshold, and so a larger degree for the same rates. It also
    asks, on a sparse graph, for the cohort quorum ``q`` (:func:`cohort_quorum`;
    ``quorum=None`` means yes in malicious mode, no otherwise): the round then
    also fails when at most ``q`` nodes survive, and (4) must hold together with
    that: ``n P[Bin(k, 1 - delta) < t] + P[Bin(n, 1 - delta) <= q] <= 2**-eta``.
    When the quorum's tail alone exceeds the budget, no sparse graph is chosen
    (the complete graph asks no quorum: its threshold is already cohort-wide).
    ``quorum=True`` with a semi-honest server is a ParameterValueError.
    """
    n = check_size(cohort_size)
    model = threat_model(threat)
    if quorum is not None and boolean("quorum", quorum) and model is not Threat.MALICIOUS:
        raise ParameterValueError("quorum=True needs threat='malicious'")
    wants_quorum = model is Threat.MALICIOUS and quorum is not False
    delta = probability("dropout_rate", dropout_rate, one=False)
    gamma = probability("corrupted_fraction", corrupted_fraction, one=False)
    sigma = integer("security_bits", security_bits, at_least=1, at_most=MAX_BITS)
    eta = integer("correctness_bits", correctness_bits, at_least=1, at_most=MAX_BITS)
    corrupted = _corrupted(gamma, n)
    p = 1.0 - delta
    log_n = math.log(n)
    secure_budget = -(sigma + 1) * _LN2  # for (1) and for (2), each
    fail_budget = -eta * _LN2 - log_n  # per node, for (4)
    sparse_quorum = cohort_quorum(n, gamma) if wants_quorum else 0
    # The round also fails when at most q nodes survive to sign: (4) gets what is left.
    log_short = _log_binomial_cdf(sparse_quorum, n, p) if sparse_quorum else -math.inf
    if log_short >= -eta * _LN2:
        fail_budget = -math.inf  # no sparse graph can meet the budget
    elif log_short > -math.inf:
        fail_budget = math.log(2.0**-eta - math.exp(log_short)) - log_n
    found = None
    last_even = (n - 2) // 2 * 2
    # With p <= 1/2, P[Bin(k, p) <= k/2] >= 1/2 for every even k: (4) never holds.
    if last_even >= 2 and p > 0.5 and fail_budget > -math.inf:  # (3M) asks more than (3)
        # E[delta ** (k - X)] <= q ** k (Hoeffding 1963, Theorem 4: sampling without
        # replacement is dominated in convex order), a closed form that bounds the search.
        q = corrupted / n + delta * (1 - corrupted / n)
        log_q = math.log(q) if q > 0 else -math.inf
        upper = _first_even(
            2,
            last_even,
            lambda k: log_n + math.log(n - k - 1) - _LN2 + k * log_q <= secure_budget,
        )
        k = _first_even(
            2,
            last_even if upper is None else upper,
            lambda k: _log_disconnected(n, k, corrupted, delta) <= secure_budget,
        )
        while k is not None:
            c, leak = _corrupted_tail(n, corrupted, k, secure_budget)
            t = _threshold(k, c, model)
            fail = _log_binomial_cdf(t - 1, k, p)
            if t <= k and fail <= fail_budget:
                found = (k, c, t, leak, fail)
                break
            k = _next_degree(model, k, c, p, last_even, fail_budget)
    if found is not None:
        k, c, t, leak, fail = found
        return GraphParameters(
            cohort_size=n,
            degree=k,
            threshold=t,
            dropout_rate=delta,
            corrupted_fraction=gamma,
            log2_disconnected=_log_disconnected(n, k, corrupted, delta) / _LN2,
            log2_leak=leak / _LN2,
            log2_failure=float(np.logaddexp(log_n + fail, log_short)) / _LN2,
            corrupted_neighbours=c,
            threat=model,
            quorum=sparse_quorum,
        )
    # The complete graph: every honest node has the C corrupted nodes as neighbours, and
    # the round fails exactly when at most t nodes survive (a survivor then has < t others).
    t = _threshold(n - 1, corrupted, model)
    log_fail = _log_binomial_cdf(t, n, p)
    if t <= n - 1 and log_fail <= -_LN2:
        if log_fail > -eta * _LN2 and eta not in _WARNED_COMPLETE:
            # Once per process: a run asks for a cohort every round, Poisson-sampled
            # cohorts differ in size, and each GraphParameters keeps its log2_failure.
            _WARNED_COMPLETE.add(eta)
            log.warning(
                "SecAgg+ for a cohort of %d at dropout_rate=%g: even the complete graph "
                "(k=%d, t=%d; up to %d dropouts always survivable) fails a round with "
                "probability %.3g, above the 2**-%d asked for (said once; other small "
                "cohorts fall short too, each round's parameters keep their own figure)",
                n,
                delta,
                n - 1,
                t,
                n - 1 - t,
                math.exp(log_fail),
                eta,
            )
        return GraphParameters(
            cohort_size=n,
            degree=n - 1,
            threshold=t,
            dropout_rate=delta,
            corrupted_fraction=gamma,
            log2_disconnected=-math.inf,
            log2_leak=-math.inf,
            log2_failure=log_fail / _LN2,
            corrupted_neighbours=corrupted,
            threat=model,
        )
    rule = _COMPLETE_RULE_TEXT[model]
    raise InfeasibleParametersError(
        f"no degree and threshold for a cohort of {n} with up to {corrupted} corrupted node(s) "
        f"(corrupted_fraction={gamma}) at dropout_rate={delta} against a {model} server: even "
        f"the complete graph would need a threshold of {t} (more than {rule}) and fail more "
        f"often than not; lower the rates (dropout_rate must stay below "
        f"{_DROPOUT_LIMIT[model]}) or grow the cohort"
        + (", or assume a semi-honest server" if model is Threat.MALICIOUS else "")
    )


def _next_degree(
    model: Threat, k: int, c: int, p: float, last_even: int, fail_budget: float
) -> int | None:
    """The next even degree after ``k`` where (4) can hold, given that ``c`` only grows."""
    if model is Threat.SEMI_HONEST:
        # For k' > k, t' - 1 >= k'/2 + h and (4) at k' fails while P[Bin(k', p) <= k'/2 + h]
        # does; that bound decreases in k'. Skip (bisecting) to where it passes.
        return _first_even(k + 2, last_even, _majority_bound_passes(c // 2, p, fail_budget))
    # (3M): t' >= t(k', c); scan for the first k' where even that threshold survives (4).
    return _first_passing(k + 2, last_even, _malicious_bound_passes(c, p, fail_budget))


# -- what a node accepts -----------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _least_threshold(n: int, k: int, gamma: float, sigma: int, threat: Threat) -> tuple[int, int]:
    """``(t, c)``: rule (3)'s or (3M)'s threshold for ``degree = k`` and the tail behind it."""
    corrupted = _corrupted(gamma, n)
    c = corrupted if k == n - 1 else _corrupted_tail(n, corrupted, k, -(sigma + 1) * _LN2)[0]
    return _threshold(k, c, threat), c


def minimum_threshold(
    cohort_size: int,
    degree: int,
    *,
    corrupted_fraction: float = _NODE_CORRUPTED,
    security_bits: int = _DEFAULT_SECURITY_BITS,
    threat: Threat | str = Threat.SEMI_HONEST,
) -> int:
    """The smallest threshold :func:`find_parameters` would pair with ``degree`` for the cohort.

    ``floor((k + c) / 2) + 1`` (``floor(k / 2) + c + 1`` for
    ``threat=Threat.MALICIOUS``) with ``c`` the corrupted-neighbour tail of (2)
    (``C = floor(corrupted_fraction * n)`` for the complete graph ``k = n - 1``).
    It does not depend on the dropout rate. By default ``corrupted_fraction`` is
    0, what a node can check without knowing the server's assumption: ``t > k/2``
    (both rules agree at ``c = 0``), which every threshold the finder picks meets.
    It may exceed ``degree``: then no threshold is safe.
    """
    return _node_bound(cohort_size, degree, corrupted_fraction, security_bits, threat)[0]


def _node_bound(n: int, degree: int, gamma: float, sigma: int, threat: object) -> tuple[int, int]:
    n = check_size(n)
    gamma = probability("corrupted_fraction", gamma, one=False)
    sigma = integer("security_bits", sigma, at_least=1, at_most=MAX_BITS)
    degree = integer("degree", degree, at_least=1, at_most=n - 1)
    return _least_threshold(n, degree, gamma, sigma, threat_model(threat))


def check_threshold(
    cohort_size: int,
    degree: int,
    threshold: int,
    *,
    corrupted_fraction: float = _NODE_CORRUPTED,
    security_bits: int = _DEFAULT_SECURITY_BITS,
    threat: Threat | str = Threat.SEMI_HONEST,
) -> None:
    """Raise :class:`~flowerpets.exceptions.InfeasibleParametersError` if ``threshold`` is
    below :func:`minimum_threshold`.

    A node calls this on the round configuration a server sends: at or below
    ``(k + c) / 2``, a server that relays shares selectively can rebuild an
    honest node's input from its honest neighbours' shares alone; at or below
    ``k / 2 + c``, a malicious one (``threat=Threat.MALICIOUS``) can learn the
    sum of a small group of honest nodes it cuts off by claiming their
    neighbours dropped.
    """
    model = threat_model(threat)
    least, c = _node_bound(cohort_size, degree, corrupted_fraction, security_bits, model)
    if integer("threshold", threshold) >= least:
        return
    reason = (
        f"threshold {threshold} is below {least}, the least that keeps a node's inputs "
        f"private against a {model} server in a cohort of {cohort_size} with degree {degree}: "
        f"it must exceed {_RULE_TEXT[model]} with c = {c} corrupted neighbours "
        f"(corrupted_fraction={corrupted_fraction})"
    )
    semi_honest = _node_bound(
        cohort_size, degree, corrupted_fraction, security_bits, Threat.SEMI_HONEST
    )[0]
    if model is Threat.MALICIOUS and threshold >= semi_honest:
        reason += (
            "; it meets the semi-honest rule t > (k + c) / 2, but against a malicious server, "
            "which chooses whose shares it forwards and which nodes it lists as dropped, only "
            "rule (3M), t > k / 2 + c, guarantees that any sum it can learn covers at least "
            f"{_least_summed_sparse(cohort_size, degree, least, c)} honest nodes (below it, a "
            "small group cut off from the rest can be enough)"
        )
    raise InfeasibleParametersError(reason)


def check_parameters(
    cohort_size: int,
    degree: int,
    threshold: int,
    *,
    threat: Threat | str = Threat.SEMI_HONEST,
) -> GraphParameters:
    """Hand-picked ``degree`` and ``threshold`` made to fit a cohort, or a clear error.

    A degree of ``cohort_size - 1`` or more means the complete graph. No
    probability is claimed for hand-picked values, but a threshold the nodes
    would refuse (:func:`check_threshold`, for ``threat``) is refused here,
    before any node is contacted.
    """
    n = check_size(cohort_size)
    model = threat_model(threat)
    integer("degree", degree, at_least=2)
    integer("threshold", threshold, at_least=2)
    k = min(degree, n - 1)
    if k != n - 1 and k % 2:
        raise ParameterValueError(f"degree must be even (a Harary graph), got {degree}")
    if threshold > k:
        raise InfeasibleParametersError(
            f"threshold={threshold} exceeds the degree {k} for a cohort of {n}: no node could "
            "ever collect enough shares"
        )
    try:
        check_threshold(n, k, threshold, threat=model)
    except InfeasibleParametersError as exc:
        raise InfeasibleParametersError(f"{exc}; the nodes would refuse it") from None
    return GraphParameters(cohort_size=n, degree=k, threshold=threshold, threat=model)

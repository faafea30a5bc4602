"""The Harary graph and the (k, t) parameter finder."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.exceptions import InfeasibleParametersError
from flowerpets.secagg import HararyGraph, check_parameters, find_parameters
from flowerpets.secagg.parameters import _hypergeometric_log_pmf, _log_disconnected


# -- the graph -----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 60), half=st.integers(1, 30), seed=st.integers(0, 1000))
def test_harary_graph_is_regular_symmetric_and_deals_points_1_to_k(
    n: int, half: int, seed: int
) -> None:
    k = 2 * half if 2 * half < n - 1 else n - 1
    order = [int(x) for x in np.random.default_rng(seed).permutation(np.arange(1000, 1000 + n))]
    graph = HararyGraph(order, k)
    for node in order:
        nbrs = graph.neighbours(node)
        assert len(nbrs) == len(set(nbrs)) == k and node not in nbrs
        assert all(graph.are_neighbours(node, j) and node in graph.neighbours(j) for j in nbrs)
        # Each dealer's shares sit at points 1..k, in neighbour order.
        assert [graph.share_point(node, j) for j in nbrs] == list(range(1, k + 1))
    outsiders = [j for j in order if j != order[0] and j not in graph.neighbours(order[0])]
    assert len(outsiders) == n - 1 - k
    for j in outsiders:
        assert not graph.are_neighbours(order[0], j)
        with pytest.raises(ValueError, match="not a neighbour"):
            graph.share_point(order[0], j)


def test_harary_neighbours_are_the_ring_around_the_node() -> None:
    graph = HararyGraph([10, 11, 12, 13, 14, 15, 16], 4)
    assert graph.neighbours(10) == (11, 12, 15, 16)
    assert graph.neighbours(13) == (14, 15, 11, 12)
    assert HararyGraph([1, 2, 3, 4], 3).neighbours(3) == (4, 1, 2)  # complete


@pytest.mark.parametrize(
    ("order", "degree", "match"),
    [
        ([1], 0, "at least 2"),
        ([1, 2, 2], 2, "twice"),
        ([1, 2, 3, 4, 5], 3, "even"),
        ([1, 2, 3, 4, 5], 5, "even"),
        ([1, 2, 3, 4, 5], 0, "even"),
    ],
)
def test_harary_graph_refuses_bad_shapes(order: list[int], degree: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HararyGraph(order, degree)


# -- the finder -------------------------------------------------------------------------------
def exact_tail(population: int, successes: int, draws: int, at_least: int) -> Fraction:
    total = math.comb(population, draws)
    return Fraction(
        sum(
            math.comb(successes, x) * math.comb(population - successes, draws - x)
            for x in range(at_least, draws + 1)
        ),
        total,
    )


@pytest.mark.parametrize(
    ("n", "rates"),
    [(100, (0.1, 0.1)), (1000, (0.05, 0.05)), (500, (0.1, 0.2)), (10_000, (0.1, 0.1))],
)
def test_found_parameters_meet_the_three_inequalities_exactly(
    n: int, rates: tuple[float, float]
) -> None:
    gamma, delta = rates
    params = find_parameters(n, corrupted_fraction=gamma, dropout_rate=delta)
    k, t = params.degree, params.threshold
    corrupted, dropped = math.floor(gamma * n + 1e-12), math.floor(delta * n + 1e-12)
    # (2) and (3), recomputed with exact rational arithmetic.
    leak = n * exact_tail(n - 1, corrupted, k, t)
    fail = n * (1 - exact_tail(n - 1, n - dropped - 1, k, t))
    assert leak <= Fraction(1, 2**41) and fail <= Fraction(1, 2**40)
    assert params.log2_leak is not None and params.log2_leak <= -41
    if leak == 0:  # fewer corrupted nodes than t: impossible, not just unlikely
        assert params.log2_leak == -math.inf and corrupted < t
    else:
        assert params.log2_leak == pytest.approx(math.log2(leak), abs=1e-6)
    # (1), recomputed exactly.
    bad = corrupted + dropped
    if k <= bad:
        runs = Fraction(math.perm(bad, k), math.perm(n, k))
        assert Fraction(n * (n - k - 1), 2) * runs <= Fraction(1, 2**41)
    # Minimality: the next smaller even degree breaks one of them.
    smaller = k - 2
    if smaller >= 2:
        broken = _log_disconnected(n, smaller, bad) > -41 * math.log(2)
        if not broken:
            for t2 in range(2, smaller + 1):
                if n * exact_tail(n - 1, corrupted, smaller, t2) <= Fraction(1, 2**41):
                    broken = n * (1 - exact_tail(n - 1, n - dropped - 1, smaller, t2)) > Fraction(
                        1, 2**40
                    )
                    break
            else:
                broken = True
        assert broken


def test_known_parameters() -> None:
    # A regression table (checked against the exact recomputation above).
    assert (find_parameters(100).degree, find_parameters(100).threshold) == (22, 11)
    assert (find_parameters(1000).degree, find_parameters(1000).threshold) == (58, 30)
    small = find_parameters(20)
    assert small.degree < 19 and 2 <= small.threshold <= small.degree


def test_log_pmf_matches_exact_hypergeometric() -> None:
    logs = _hypergeometric_log_pmf(50, 7, 10)
    exact = [
        Fraction(math.comb(7, x) * math.comb(43, 10 - x), math.comb(50, 10)) for x in range(11)
    ]
    for lg, ex in zip(logs, exact, strict=True):
        assert (lg == -math.inf) if ex == 0 else math.isclose(math.exp(lg), float(ex), rel_tol=1e-9)


def test_union_bounds_hold_in_simulation() -> None:
    """With a weak security target the bounds are large enough to check by sampling:
    random orderings, corrupted sets and dropout sets break (2) or (3) no more often
    than the finder's bounds say."""
    n, gamma, delta = 60, 0.1, 0.1
    params = find_parameters(
        n, corrupted_fraction=gamma, dropout_rate=delta, security_bits=3, correctness_bits=3
    )
    k, t = params.degree, params.threshold
    rng = np.random.default_rng(0)
    corrupted_n, dropped_n = math.floor(gamma * n), math.floor(delta * n)
    leaks = fails = 0
    trials = 2000
    for _ in range(trials):
        graph = HararyGraph([int(x) for x in rng.permutation(n)], k)
        roles = rng.permutation(n)
        corrupted = set(roles[:corrupted_n].tolist())
        dropped = set(roles[corrupted_n : corrupted_n + dropped_n].tolist())
        honest = [i for i in range(n) if i not in corrupted]
        leaks += any(sum(j in corrupted for j in graph.neighbours(i)) >= t for i in honest)
        fails += any(
            sum(j not in dropped for j in graph.neighbours(i)) < t
            for i in range(n)
            if i not in dropped
        )
    assert params.log2_leak is not None and params.log2_failure is not None
    assert leaks / trials <= 2**params.log2_leak + 0.02
    assert fails / trials <= 2**params.log2_failure + 0.02


def test_small_cohorts_fall_back_to_the_complete_graph_or_refuse() -> None:
    params = find_parameters(5, corrupted_fraction=0.2, dropout_rate=0.2)
    assert params.is_complete and params.degree == 4 and params.threshold == 2
    with pytest.raises(InfeasibleParametersError, match="cohort of 2"):
        find_parameters(2)
    with pytest.raises(InfeasibleParametersError, match="complete graph"):
        find_parameters(10, corrupted_fraction=0.5, dropout_rate=0.45)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout_rate": 1.0},
        {"dropout_rate": -0.1},
        {"corrupted_fraction": 1.5},
        {"security_bits": 0},
        {"correctness_bits": 200},
    ],
)
def test_finder_validates_its_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        find_parameters(100, **kwargs)  # type: ignore[arg-type]


def test_hand_picked_parameters_fit_the_cohort_or_fail_clearly() -> None:
    assert check_parameters(10, 4, 3).degree == 4
    assert check_parameters(4, 8, 3).degree == 3  # a small cohort: the complete graph
    with pytest.raises(InfeasibleParametersError, match="exceeds the degree"):
        check_parameters(3, 8, 3)
    with pytest.raises(ValueError, match="even"):
        check_parameters(10, 5, 3)
    with pytest.raises(ValueError, match=">= 2"):
        check_parameters(10, 4, 1)

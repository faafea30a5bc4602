"""The finder against an actively malicious server: ``Threat`` and rule (3M), ``2t > k + 2c``.

Run as a script, it prints the table of docs/secagg.md's "Parameters in the
malicious setting" (a test checks that the docs hold exactly that text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from flowerpets.exceptions import (
    InfeasibleParametersError,
    ParameterTypeError,
    ParameterValueError,
)
from flowerpets.secagg import HararyGraph, Stage, Threat, check_parameters, find_parameters
from flowerpets.secagg._node_state import SLOT
from flowerpets.secagg._primitives import keys, prg, shamir
from flowerpets.secagg.parameters import check_threshold, least_summed, minimum_threshold
from flowerpets.secagg.protocol import MASKED_ARRAY, MASKED_RECORD, RECORD, pair_mask_seed

MAL = Threat.MALICIOUS
SEMI = Threat.SEMI_HONEST


# -- the switch --------------------------------------------------------------------------------
def test_threat_takes_the_member_or_its_value_and_defaults_to_semi_honest() -> None:
    assert [t.value for t in Threat] == ["semi-honest", "malicious"]
    by_name = find_parameters(1000, threat="malicious")
    assert by_name == find_parameters(1000, threat=MAL) and by_name.threat is MAL
    assert find_parameters(1000) == find_parameters(1000, threat="semi-honest")
    assert find_parameters(1000).threat is SEMI
    assert minimum_threshold(100, 10, threat="malicious") == minimum_threshold(100, 10, threat=MAL)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda v: find_parameters(100, threat=v), ParameterValueError, "'malicious'"),
        (lambda v: minimum_threshold(100, 10, threat=v), ParameterValueError, "semi-honest"),
        (lambda v: check_threshold(100, 10, 9, threat=v), ParameterValueError, "threat"),
        (lambda v: check_parameters(100, 10, 9, threat=v), ParameterValueError, "threat"),
    ],
)
def test_an_unknown_threat_is_refused_by_every_entry_point(
    call: Callable[[object], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call("byzantine")
    with pytest.raises(ParameterTypeError, match="threat must be str"):
        call(1)
    with pytest.raises(ParameterValueError, match="got 'MALICIOUS'"):
        call("MALICIOUS")  # the value, not the member's name


# -- rule 3M by hand ---------------------------------------------------------------------------
def test_known_small_answers_by_hand() -> None:
    # n = 5, C = 1: no sparse degree (k = 2 leaves the survivors connected with
    # probability 1 - 5 * 2 / 2 * 0.25**2 only), so k = 4; rule 3M: 2t > 4 + 2, t = 4
    # (rule 3: 2t > 5, t = 3); the round fails when 1 or more of the 5 drop.
    p = find_parameters(5, dropout_rate=0.05, corrupted_fraction=0.2, threat=MAL)
    assert (p.degree, p.threshold, p.corrupted_neighbours) == (4, 4, 1)
    assert p.log2_failure == pytest.approx(math.log2(1 - 0.95**5))
    assert find_parameters(5, dropout_rate=0.05, corrupted_fraction=0.2).threshold == 3
    # n = 20, C = 2: k = 19, t = 9 + 2 + 1 = 12 (rule 3: 11); fails when 8 or more drop.
    p = find_parameters(20, dropout_rate=0.05, corrupted_fraction=0.1, threat=MAL)
    assert (p.degree, p.threshold, p.corrupted_neighbours) == (19, 12, 2)
    fail = sum(math.comb(20, x) * 0.95**x * 0.05 ** (20 - x) for x in range(13))
    assert p.log2_failure == pytest.approx(math.log2(fail))
    assert find_parameters(20, dropout_rate=0.05, corrupted_fraction=0.1).threshold == 11
    # The node's rule: with no corrupted neighbour both rules say t > k/2; with c, 3M
    # adds all of c where rule 3 adds half (k = 148 at n = 1,000 and 10%: c = 46).
    for threat in Threat:
        assert [minimum_threshold(1000, k, threat=threat) for k in (2, 4, 6, 100)] == [2, 3, 4, 51]
    assert minimum_threshold(1000, 148, corrupted_fraction=0.1, threat=MAL) == 74 + 46 + 1
    assert minimum_threshold(1000, 148, corrupted_fraction=0.1) == (148 + 46) // 2 + 1


def test_the_degree_is_of_the_order_bell_et_al_quote() -> None:
    """Bell et al.'s abstract: at 10,000 clients with 5% corrupted and 5% dropouts, each
    talks to about 3% of the cohort in their malicious setting (a sanity check of the
    order of magnitude: their bound is not this one)."""
    p = find_parameters(10_000, dropout_rate=0.05, corrupted_fraction=0.05, threat=MAL)
    semi = find_parameters(10_000, dropout_rate=0.05, corrupted_fraction=0.05)
    assert 0.01 <= p.degree / 10_000 <= 0.05 and semi.degree < p.degree
    # With the cohort quorum (the default) every node that unmasks saw one survivor set.
    assert p.quorum == (10_000 + 500) // 2 + 1 and p.least_summed == least_summed(10_000, 150)
    local = find_parameters(
        10_000, dropout_rate=0.05, corrupted_fraction=0.05, threat=MAL, quorum=False
    )
    assert (local.degree, local.threshold, local.quorum) == (p.degree, p.threshold, 0)
    assert local.least_summed == 1 + 2 * 113 - 150 - 37 == 40  # local check: 2t - k - c others
    assert semi.least_summed is None and semi.quorum == 0


@pytest.mark.parametrize(
    ("n", "delta", "gamma"), [(100, 0.1, 0.1), (1000, 0.3, 0.05), (2000, 0.2, 0.0)]
)
def test_the_finder_counts_the_cohort_quorum_in_the_failure_bound(
    n: int, delta: float, gamma: float
) -> None:
    """In malicious mode a sparse round also fails when at most q nodes survive to sign (a
    node needs q others' signatures): the reported failure bound is rule 4's plus that
    binomial tail, and the dropouts the round always survives are at most n - q - 1."""
    p = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
    assert not p.is_complete and p.log2_failure is not None
    q = (n + math.floor(gamma * n)) // 2 + 1
    assert p.quorum == q
    rule_4 = n * stats.binom.cdf(p.threshold - 1, p.degree, 1 - delta)
    short = stats.binom.cdf(q, n, 1 - delta)
    assert 2**p.log2_failure == pytest.approx(rule_4 + short, rel=1e-6)
    assert p.log2_failure <= -40
    assert p.tolerated_dropouts == min(p.degree - p.threshold, n - q - 1)
    local = find_parameters(
        n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL, quorum=False
    )
    assert local.quorum == 0 and 2**local.log2_failure == pytest.approx(rule_4, rel=1e-6)
    with pytest.raises(ParameterValueError, match="needs threat='malicious'"):
        find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, quorum=True)


# -- the refusals ------------------------------------------------------------------------------
def test_infeasible_malicious_settings_say_what_to_change() -> None:
    # 1/2 - 0.1 = 40%: at 42% no degree keeps 1/2 + c/k of the neighbours (rule 3: 45%).
    find_parameters(100_000, dropout_rate=0.42, corrupted_fraction=0.1)  # semi-honest: fine
    with pytest.raises(InfeasibleParametersError) as caught:
        find_parameters(100_000, dropout_rate=0.42, corrupted_fraction=0.1, threat=MAL)
    text = str(caught.value)
    assert "malicious server" in text and "1/2 - corrupted_fraction" in text
    assert "lower the rates" in text and "grow the cohort" in text and "semi-honest" in text
    with pytest.raises(InfeasibleParametersError, match=r"more than \(n - 1\) / 2 \+ C\)"):
        find_parameters(10, dropout_rate=0.3, corrupted_fraction=0.3, threat=MAL)


def test_a_threshold_secure_only_semi_honestly_is_refused_with_the_reason() -> None:
    semi = find_parameters(1000)  # k = 148, t = 98, c = 46 at 10%
    check_threshold(1000, semi.degree, semi.threshold, corrupted_fraction=0.1)
    with pytest.raises(InfeasibleParametersError) as caught:
        check_threshold(1000, semi.degree, semi.threshold, corrupted_fraction=0.1, threat=MAL)
    text = str(caught.value)
    least = minimum_threshold(1000, semi.degree, corrupted_fraction=0.1, threat=MAL)
    assert least == 148 // 2 + 46 + 1 == 121
    assert f"threshold 98 is below {least}" in text and "exceed k / 2 + c with c = 46" in text
    assert "meets the semi-honest rule" in text and "at least 49 honest" in text  # 1 + 2t - k - c
    # Below even the semi-honest rule, the message does not claim it meets it.
    with pytest.raises(InfeasibleParametersError) as caught:
        check_threshold(1000, 148, 60, threat=MAL)
    assert "meets the semi-honest rule" not in str(caught.value)
    # Hand-picked parameters are checked by the node's rule (no corrupted neighbour
    # assumed), where both rules agree; the result says which threat they are for.
    assert check_parameters(10, 4, 3).threat is SEMI
    assert check_parameters(10, 4, 3, threat="malicious").threat is MAL
    with pytest.raises(InfeasibleParametersError, match=r"threshold 2 is below 3.*would refuse"):
        check_parameters(10, 4, 2, threat=MAL)


# -- properties --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 50_000),
    half=st.integers(1, 400),
    gamma=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3]),
)
def test_the_malicious_threshold_is_never_below_the_semi_honest_one(
    n: int, half: int, gamma: float
) -> None:
    k = min(2 * half, n - 1)
    semi = minimum_threshold(n, k, corrupted_fraction=gamma)
    mal = minimum_threshold(n, k, corrupted_fraction=gamma, threat=MAL)
    assert mal >= semi
    # Both are the least with their inequality for one corrupted-neighbour count c, here
    # recomputed with scipy: the least c with n P[Hyp(n - 1, C, k) > c] <= 2**-41.
    corrupted = math.floor(gamma * n + 1e-12)
    c = corrupted if k == n - 1 else corrupted_tail(n, corrupted, k)
    assert semi == max((k + c) // 2 + 1, 2) and mal == max(k // 2 + c + 1, 2)
    if c >= 2 or (c == 1 and k % 2 == 0):
        assert mal > semi


def corrupted_tail(n: int, corrupted: int, k: int) -> int:
    """The least c with n P[Hyp(n - 1, C, k) > c] <= 2**-41 (tails summed from the end)."""
    pmf = stats.hypergeom(n - 1, corrupted, k).pmf(np.arange(k + 1))
    above = n * np.append(np.cumsum(pmf[::-1])[::-1][1:], 0.0)  # above[c] = n P[X > c]
    return int(np.argmax(above <= 2.0**-41))  # above[k] = 0: one always passes


def degree_or_refusal(n: int, delta: float, gamma: float, sigma: int = 40, eta: int = 40) -> float:
    rates = {"dropout_rate": delta, "corrupted_fraction": gamma}
    try:
        p = find_parameters(n, **rates, security_bits=sigma, correctness_bits=eta, threat=MAL)
    except InfeasibleParametersError:
        return math.inf
    return p.degree + p.threshold / (p.degree + 1)  # the degree first, then the threshold


@settings(max_examples=20, deadline=None)
@given(n=st.integers(3, 50_000))
def test_the_malicious_degree_never_falls_across_a_grid_of_rates_and_bits(n: int) -> None:
    """More dropouts or more corruption only shrink the set of valid degrees: along every
    row and column of the (gamma, delta) grid, k (then t, at an equal k) never falls."""
    grid = np.array(
        [[degree_or_refusal(n, d, g) for d in (0.0, 0.05, 0.1, 0.15)] for g in (0.0, 0.03, 0.1)]
    )
    assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)
    base = degree_or_refusal(n, 0.05, 0.05)
    assert degree_or_refusal(n, 0.05, 0.05, sigma=50) >= base
    assert math.floor(degree_or_refusal(n, 0.05, 0.05, eta=50)) >= math.floor(base)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(3, 200_000),
    delta=st.sampled_from([0.0, 0.05, 0.1, 0.15]),
    gamma=st.sampled_from([0.0, 0.05, 0.1]),
)
def test_every_malicious_choice_meets_rule_3m_exactly_and_the_nodes_accept_it(
    n: int, delta: float, gamma: float
) -> None:
    try:
        p = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
    except InfeasibleParametersError:
        with pytest.raises(InfeasibleParametersError):
            find_parameters(n, dropout_rate=delta + 0.05, corrupted_fraction=gamma, threat=MAL)
        return
    k, t, c = p.degree, p.threshold, p.corrupted_neighbours
    assert c is not None and t <= k
    assert 2 * t > k + 2 * c and (t == 2 or 2 * (t - 1) <= k + 2 * c)
    assert 2 * t > k + c  # rule 3 too
    check_threshold(n, k, t, threat=MAL)  # a node assumes no corrupted neighbour
    check_threshold(n, k, t, corrupted_fraction=gamma, threat=MAL)
    check_threshold(n, k, t, corrupted_fraction=gamma)
    # Every degree rule 3M accepts, rule 3 accepts (its t is smaller): k only grows.
    semi = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma)
    if not p.is_complete:
        assert not semi.is_complete and semi.degree <= p.degree


# -- the group lemma, exhaustively -------------------------------------------------------------
def smallest_dense_set(n: int, k: int, inside: int) -> int:
    """The fewest nodes of ``H(n, k)`` in a nonempty set whose every member has at least
    ``inside`` neighbours in it: the answering members of a group whose sum a malicious
    server learns need ``t - c_r`` (module docstring of parameters, rule 3M). All node
    sets, as bitmasks."""
    graph = HararyGraph(list(range(n)), k)
    nbr = [sum(1 << j for j in graph.neighbours(i)) for i in range(n)]
    masks = np.arange(1, 1 << n, dtype=np.int64)
    bits = (masks[:, None] >> np.arange(n)) & 1
    degrees = np.stack([np.bitwise_count(masks & nbr[i]) for i in range(n)], axis=1)
    dense = np.all((bits == 0) | (degrees >= inside), axis=1)
    return int(bits[dense].sum(1).min())


@pytest.mark.parametrize(
    ("n", "k", "c"),
    [(12, 4, 1), (12, 6, 1), (14, 6, 2), (14, 8, 1), (16, 8, 3), (16, 6, 0), (16, 6, 1)],
)
def test_under_3m_no_small_group_is_cut_off_one_below_a_run_is(n: int, k: int, c: int) -> None:
    t = k // 2 + c + 1  # rule 3M
    assert t <= k and 2 * t > k + c
    smallest = smallest_dense_set(n, k, t - c)
    assert smallest >= least_summed(n, k) > k // 2 + 1
    # Negative control, one below 3M (rule 3 still holds there once c >= 1): a run of
    # k/2 + 1 consecutive honest nodes, each with c corrupted neighbours, qualifies.
    weak = t - 1
    assert c == 0 or 2 * weak > k + c
    assert smallest_dense_set(n, k, weak - c) == k // 2 + 1


@settings(max_examples=80, deadline=None)
@given(n=st.integers(4, 10**6), half=st.integers(1, 5000))
def test_least_summed_fits_the_ring(n: int, half: int) -> None:
    """The windows it counts are disjoint: m (k + 1) places fit in the ring of n."""
    k = min(2 * half, (n - 2) // 2 * 2) if n >= 4 else n - 1
    least = least_summed(n, k)
    m = (n - k - 1) // (3 * k // 2) + 1
    assert least == m * (k // 2 + 2) and m * (k + 1) <= n and k // 2 + 2 <= least <= n


def test_least_summed_formula() -> None:
    assert least_summed(10, 9) == 4 + 2  # complete: floor(9 / 2) + 2
    assert least_summed(16, 4) == ((16 - 5) // 6 + 1) * 4 == 8
    assert least_summed(10_000, 366) == (9633 // 549 + 1) * 185 == 3330
    with pytest.raises(ValueError, match="degree"):
        least_summed(10, 10)


# -- the group attack, through real nodes ------------------------------------------------------
def cut_off_a_run(fed: Any) -> tuple[list[int], np.ndarray] | str:
    """A malicious server with one survivor list for everyone (what the consistency round
    enforces) cuts off a run of ``k/2 + 1`` consecutive honest nodes whose ring ends touch
    one corrupted node each (every honest node has at most one corrupted neighbour): it
    forwards to the run only the shares of the run and of the corrupted nodes, lists the
    run and the corrupted nodes as survivors (their other neighbours are neither listed
    nor masked with), rebuilds the run's self-mask seeds from the run's replies and the
    corrupted nodes' shares, and removes the masks with the corrupted nodes, whose keys
    it has. Returns the run and its unmasked sum, or the refusal that stopped it."""
    k, n = fed.config.degree, len(fed.ids)
    order = list(fed.config.order)
    run = [order[i] for i in range(k // 2 + 1)]
    # Just before the run, and k/2 - 1 after it: each run member sees exactly one of them,
    # and no node sees both (they are more than k apart).
    corrupted = [order[-1], order[k + 0]]
    assert n > 2 * k + 2 and not set(corrupted) & set(run)
    seen = {i: len(set(fed.graph.neighbours(i)) & set(corrupted)) for i in fed.ids}
    assert max(seen.values()) == 1 and all(seen[i] == 1 for i in run)
    fed.advertise()
    fed.share()
    inside = set(run) | set(corrupted)
    masked = {}
    for node in run:
        senders = [j for j in fed.graph.neighbours(node) if j in inside]
        fields = fed.collect_fields(node, senders=senders)
        reply = fed.ask(node, Stage.COLLECT_MASKED_INPUT, fields, extra=fed.train_content())
        if reply.error is not None:
            return reply.error.reason
        masked[node] = fed.ok(reply)[MASKED_RECORD][MASKED_ARRAY].numpy().copy()
    fed.collect(corrupted)  # the corrupted nodes decrypt their shares: the server reads them
    stolen = {j: SLOT.get(fed.contexts[j].state) for j in corrupted}
    b_shares: dict[int, dict[int, bytes]] = {i: {} for i in run}
    for node in run:
        body = fed.ok(fed.unmask(node, survivors=run + corrupted, dropped=[]))[RECORD]
        for owner, share in zip(body["b-nodes"], body["b-shares"], strict=True):
            if owner in b_shares:
                b_shares[owner][node] = share
    for j, state in stolen.items():
        for owner, share in zip(state.senders, state.b_shares, strict=True):
            if owner in b_shares:
                b_shares[owner][j] = share
    field, t = shamir.Shamir(), fed.config.threshold
    total = np.sum(np.stack(list(masked.values())), axis=0, dtype=np.uint32)
    add, subtract = [], []
    for owner, shares in b_shares.items():
        holders = sorted(shares)[:t]
        assert len(holders) == t, "too few self-mask shares"
        ys = np.stack([np.frombuffer(shares[m], "<u4").astype(np.uint64) for m in holders])
        points = [fed.graph.share_point(owner, m) for m in holders]
        subtract.append(shamir.elements_to_bytes(field.combine(points, ys)))
        for j, state in stolen.items():
            if j in fed.graph.neighbours(owner):
                key = keys.load_private_key(state.s_sk)
                seed = pair_mask_seed(key, fed.pks[owner][1], session=fed.config.session, round=1)
                (subtract if owner < j else add).append(seed)  # undo what the owner applied
    prg.apply_masks(total, add=add, subtract=subtract)
    return run, total


def test_one_below_3m_a_malicious_server_learns_a_small_groups_sum(federation: Any) -> None:
    """n = 16, k = 6, at most one corrupted neighbour per node (c = 1): rule 3's t = 4
    (which the nodes accept) lets the server read the sum of 4 honest nodes, exactly."""
    fed = federation(n=16, degree=6, threshold=4, seed=3)
    assert 2 * 4 > 6 + 1 and minimum_threshold(16, 6) == 4  # rule 3 at c = 1, the node's rule
    result = cut_off_a_run(fed)
    assert not isinstance(result, str), result
    run, total = result
    rows = [fed.index[i] for i in run]
    weight = sum(fed.weights[i] for i in rows)
    assert int(total[-2]) == weight  # the run's total weight, exactly
    scale = fed.config.quantization.scale
    words = total.view(np.int32).astype(np.float64)[:-2] / scale
    expected = sum(fed.weights[i] * fed.updates[i].astype(np.float64) for i in rows)
    np.testing.assert_allclose(words, expected, atol=len(run) / scale)


def test_at_3m_the_same_server_is_refused(federation: Any) -> None:
    """Rule 3M at c = 1 (t = k/2 + 2 = 5): a run member now needs 5 neighbours' shares, and
    its run and corrupted neighbours are only 4: it refuses before masking anything (that no
    other cut works either is the exhaustive search above, at n = 16, k = 6, c = 1)."""
    assert minimum_threshold(16, 6, corrupted_fraction=2 / 16, threat=MAL) >= 5
    fed = federation(n=16, degree=6, threshold=5, seed=3)
    reason = cut_off_a_run(fed)
    assert isinstance(reason, str) and "fewer than the threshold" in reason


# -- the claimed bounds, recomputed independently ----------------------------------------------
def bounds(n: int, k: int, t: int, c: int, gamma: float, delta: float) -> tuple[float, ...]:
    """log2 of (disconnected, leak, failure) from scipy.stats' hypergeometric and binomial
    laws (the first in log space: it underflows a float at large k)."""
    corrupted = math.floor(gamma * n + 1e-12)
    x = np.arange(k + 1)
    log_pmf = stats.hypergeom(n, corrupted, k).logpmf(x)
    log_delta = math.log(delta) if delta > 0 else -math.inf  # no dropouts: all k corrupted
    with np.errstate(invalid="ignore"):  # 0 * -inf where x = k, replaced by 0
        log_all_bad = special.logsumexp(log_pmf + np.where(x == k, 0.0, (k - x) * log_delta))
    disconnected = (math.log(n * (n - k - 1) / 2) + log_all_bad) / math.log(2)
    with np.errstate(divide="ignore"):  # a tail of 0 (c = C) is -inf, as the finder says
        leak = float(np.log2(n * stats.hypergeom(n - 1, corrupted, k).sf(c)))
    return disconnected, leak, log2_failure(n, k, t, delta)


def log2_failure(n: int, k: int, t: int, delta: float) -> float:
    with np.errstate(divide="ignore"):  # no dropouts: -inf
        return float(np.log2(n * stats.binom(k, 1 - delta).cdf(t - 1)))


@pytest.mark.parametrize(
    ("n", "gamma", "delta"),
    [(1000, 0.05, 0.05), (1000, 0.1, 0.1), (10_000, 0.05, 0.05), (5000, 0.0, 0.1)],
)
def test_the_claimed_union_bounds_match_an_independent_computation(
    n: int, gamma: float, delta: float
) -> None:
    p = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
    k, t, c = p.degree, p.threshold, p.corrupted_neighbours
    assert c is not None and not p.is_complete
    disconnected, leak, failure = bounds(n, k, t, c, gamma, delta)
    assert disconnected <= -41 and leak <= -41 and failure <= -40
    assert p.log2_disconnected == pytest.approx(disconnected, abs=1e-6)
    assert p.log2_leak == pytest.approx(leak, abs=1e-6)
    assert p.log2_failure == pytest.approx(failure, abs=1e-6)
    # c is the least count that meets the budget, and k - 2 fails a rule (the exhaustive
    # comparison below checks every smaller degree, for small cohorts).
    assert bounds(n, k, t, c - 1, gamma, delta)[1] > -41
    assert reference(n, delta, gamma, first=k - 2) != (k - 2,)


def reference(n: int, delta: float, gamma: float, first: int = 2) -> tuple[int, ...] | None:
    """Rule 3M's choice by scanning every even degree from ``first`` with scipy's tails:
    ``(k, t, c)``, ``(k,)`` if only ``first`` was asked and it qualifies, None to refuse."""
    corrupted = math.floor(gamma * n + 1e-12)
    for k in range(first, n - 1, 2):
        t0 = max(k // 2 + 1, 2)  # t only grows with c: if even t0 fails (4), k fails
        if t0 > k or log2_failure(n, k, t0, delta) > -40:
            continue
        c = corrupted_tail(n, corrupted, k)
        t = max(k // 2 + c + 1, 2)
        disconnected, _, fail = bounds(n, k, t, c, gamma, delta)
        if disconnected <= -41 and t <= k and fail <= -40:
            return (k,) if first > 2 else (k, t, c)
        if first > 2:
            return None
    t = max((n - 1) // 2 + corrupted + 1, 2)
    if first == 2 and t <= n - 1 and stats.binom(n, 1 - delta).cdf(t) <= 0.5:
        return n - 1, t, corrupted
    return None


SCAN_N = (3, 4, 5, 6, 9, 10, 16, 25, 40, 64, 101, 128)
SCAN_RATES = ((0.05, 0.05), (0.1, 0.0), (0.02, 0.1), (0.0, 0.2), (0.1, 0.3), (0.4, 0.15))


@pytest.mark.parametrize("n", SCAN_N)
@pytest.mark.parametrize("rates", SCAN_RATES)
def test_the_malicious_finder_matches_an_exhaustive_scan(
    n: int, rates: tuple[float, float]
) -> None:
    delta, gamma = rates
    expected = reference(n, delta, gamma)
    if expected is None:
        with pytest.raises(InfeasibleParametersError):
            find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
        return
    p = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
    assert (p.degree, p.threshold, p.corrupted_neighbours) == expected


def test_the_exhaustive_scan_covers_sparse_complete_and_refused() -> None:
    kinds = set()
    for n in SCAN_N:
        for delta, gamma in SCAN_RATES:
            try:
                p = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
            except InfeasibleParametersError:
                kinds.add("refused")
                continue
            kinds.add("complete" if p.is_complete else "sparse")
    assert kinds == {"sparse", "complete", "refused"}


# -- the docs' table ---------------------------------------------------------------------------
TABLE_N = (100, 1000, 10_000)
TABLE_RATES = ((0.05, 0.05), (0.1, 0.1))


def table_markdown() -> str:
    rows = [
        "| n | `gamma` | `delta` | semi-honest `k` | `t` | malicious `k` | `t` | `c` "
        "| `log2` failure | fewest summed | without the quorum |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in TABLE_N:
        for gamma, delta in TABLE_RATES:
            semi = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma)
            mal = find_parameters(n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL)
            local = find_parameters(
                n, dropout_rate=delta, corrupted_fraction=gamma, threat=MAL, quorum=False
            )
            assert mal.log2_failure is not None and local.least_summed is not None
            rows.append(
                f"| {n:,} | {gamma} | {delta} | {semi.degree} | {semi.threshold} "
                f"| {mal.degree} | {mal.threshold} | {mal.corrupted_neighbours} "
                f"| {mal.log2_failure:.1f} | {mal.least_summed:,} | {local.least_summed:,} |"
            )
    return "\n".join(rows) + "\n"


def test_the_docs_table_is_the_code_output() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "secagg.md").read_text()
    assert table_markdown() in docs, "regenerate: python tests/secagg/test_parameters_malicious.py"


if __name__ == "__main__":
    print(table_markdown(), end="")

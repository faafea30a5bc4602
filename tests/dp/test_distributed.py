"""DistributedDp and DistributedDpMod under attack: what the server sees, the noise, the epsilon.

The server plays dishonest here: it records every message it receives (the grid),
and every test checks what the guarantee rests on, not what the code happens to do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpets.core import ArrayRecord
from flowerpets.dp import DistributedDp, Mechanism
from flowerpets.dp._primitives.calibration import rounded_l2_bound
from flowerpets.dp._primitives.rotation import padded_dimension
from flowerpets.dp._protocol import CLIPPED, RESIDUES
from flowerpets.dp.accountant import (
    DistributedDiscreteGaussianEvent,
    DropoutPolicy,
    Neighbouring,
    RdpAccountant,
    SkellamEvent,
)
from flowerpets.dp.central import AdaptiveClipping
from flowerpets.dp.distributed import _client
from flowerpets.dp.distributed._round_config import RoundEncoding
from flowerpets.exceptions import ProtocolViolationError
from flowerpets.secagg import SecAggPlus
from flowerpets.secagg.protocol import Stage
from flowerpets.simulation import Dropout
from tests.dp.distributed_kit import NODES, arrays_seen, federate, steady

CLIP = 0.5
DELTA = 1e-5
# SecAgg+ for 8 nodes at its defaults: the complete graph, t = 4; a sum holds >= 5 inputs.
FEWEST = SecAggPlus().parameters(NODES).threshold + 1


def independent_event(
    event_type: type[SkellamEvent] | type[DistributedDiscreteGaussianEvent],
    *,
    z: float,
    scale: float,
    dimension: int,
    planned: int,
    counted: int,
) -> SkellamEvent | DistributedDiscreteGaussianEvent:
    """One round's event, computed from the papers' pipeline, not the mod."""
    padded = padded_dimension(dimension)
    l2 = rounded_l2_bound(CLIP * scale, dimension=padded, beta=math.exp(-0.5))
    share = (z * l2) ** 2 / planned
    return event_type.from_pipeline(
        clip=CLIP,
        scale=scale,
        dimension=padded,
        local_variance=share,
        clients_in_sum=counted,
        beta=math.exp(-0.5),
    )


def independent_epsilon(
    event_type: type[SkellamEvent] | type[DistributedDiscreteGaussianEvent],
    *,
    rounds: int = 1,
    **pipeline: Any,
) -> float:
    """The epsilon of ``rounds`` rounds of :func:`independent_event`."""
    event = independent_event(event_type, **pipeline)
    accountant = RdpAccountant(neighbouring=Neighbouring.ZERO_OUT)
    return accountant.compose(event, rounds).get_epsilon(DELTA)


def dp(**kwargs: object) -> DistributedDp:
    settings: dict[str, object] = {"noise_multiplier": 1.0, "clipping_norm": CLIP, "delta": DELTA}
    settings.update(kwargs)
    return DistributedDp(**settings)  # type: ignore[arg-type]


# -- the dishonest server's view ------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [None, AdaptiveClipping(count_stddev=4.0)])
def test_the_server_receives_only_masked_vectors_and_unmasks_only_the_noised_sum(
    adaptive: AdaptiveClipping | None,
) -> None:
    fed = federate(dp(adaptive=adaptive), dimension=16, rounds=2)
    assert all(r.ok for r in fed.result.history.rounds), fed.result.history.rounds[0].error
    seen = arrays_seen(fed.grid.received)
    assert seen  # the masked inputs
    for residues in fed.spies.residues.values():
        # No node's residues (noised, yet one node's) reach the server, in any array.
        assert not any(a.size == residues.size and np.array_equal(a, residues) for a in seen)
    for msg in fed.grid.received:
        if msg.content is not None:
            for record in msg.content.values():
                names = list(record) if hasattr(record, "keys") else []
                assert RESIDUES not in names and CLIPPED not in names and "w" not in names
    for rnd, total in fed.spies.sums.items():
        # What SecAgg+ unmasked is exactly the sum of the nodes' noised residues, mod 2**32.
        pids = [fed.pid(n) for n in fed.spies.participants[rnd]]
        expected = sum(fed.spies.residues[(rnd, p)].astype(np.uint64) for p in pids)
        np.testing.assert_array_equal(total, np.asarray(expected) % (1 << 32))


def test_no_metric_of_a_node_is_summed_un_noised_under_the_masks() -> None:
    # SecAgg+ would release the exact sum of a secure metric: the nodes send none, so a
    # round that asks for one fails instead of revealing it.
    secagg = SecAggPlus(secure_metrics=("num-examples",))
    fed = federate(dp(keep_client_metrics=True), dimension=16, secagg=secagg)
    record = fed.result.history.round(1)
    assert not record.ok
    assert "num-examples" not in record.train_metrics
    assert fed.spies.residues  # the nodes did encode their updates: only the metric is missing


def test_every_reply_arrives_masked_as_a_secagg_stage() -> None:
    fed = federate(dp(), dimension=16)
    stages = {msg.metadata.stage for msg in fed.grid.received}
    assert stages <= set(Stage.ALL)


# -- the noise in the released sum ----------------------------------------------------------------
DIM = 8192  # coordinates of noise to measure
# The sample variance of N = 8192 near-Gaussian coordinates has relative standard error
# sqrt(2 / N) = 0.0156; a band of 6 standard errors (0.094) fails a correct mechanism with
# probability below 1e-8 (Gaussian tail, the Skellam's excess kurtosis 1 / (n mu) ~ 1e-8).
BAND = 6 * math.sqrt(2 / DIM)


def measured_noise_variance(dp_mod: object = None) -> tuple[float, float]:
    """(measured, calibrated) variance per coordinate of the noise in the released sum."""
    fed = federate(dp(), dimension=DIM, dp_mod=dp_mod)
    record = fed.result.history.round(1)
    assert record.ok, record.error
    (encoding,) = fed.grid.encodings()
    true_sum = sum(steady(DIM)(p, 1) for p in range(NODES))
    released = fed.result.arrays["w"].numpy()
    noise = (released - fed.model) * NODES - true_sum  # the fixed denominator is m = 8
    survivors = len(record.participants)
    # Each node's share, plus its rounding (variance at most 1/4 per coordinate, integer units).
    calibrated = survivors * encoding.share / encoding.scale**2
    rounding = survivors * 0.25 / encoding.scale**2
    assert rounding < 1e-6 * calibrated
    return float(np.var(noise)), calibrated


def test_the_released_sum_carries_the_calibrated_noise_variance() -> None:
    measured, calibrated = measured_noise_variance()
    assert abs(measured / calibrated - 1) < BAND


def test_a_client_that_skips_its_noise_fails_the_variance_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mutation check: the same measurement catches a pipeline without noise.
    monkeypatch.setattr(_client, "draw_share", lambda m, v, size, s: np.zeros(size, np.int64))
    measured, calibrated = measured_noise_variance()
    assert not abs(measured / calibrated - 1) < BAND


def test_the_shares_sum_to_the_calibrated_variance_for_the_fewest_inputs() -> None:
    fed = federate(dp(noise_multiplier=1.3), dimension=16)
    (encoding,) = fed.grid.encodings()
    padded = padded_dimension(16)
    l2 = rounded_l2_bound(CLIP * encoding.scale, dimension=padded, beta=math.exp(-0.5))
    # WORST_CASE: FEWEST shares carry (z l2)^2, whoever else survives.
    assert FEWEST * encoding.share == pytest.approx((1.3 * l2) ** 2, rel=1e-9)


# -- epsilon ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mechanism", "event_type", "z"),
    [
        (Mechanism.SKELLAM, SkellamEvent, 1.0),
        (Mechanism.DISCRETE_GAUSSIAN, DistributedDiscreteGaussianEvent, 1.0),
    ],
)
def test_epsilon_per_round_is_the_accountants_for_the_papers_pipeline(
    mechanism: Mechanism, event_type: type[SkellamEvent], z: float
) -> None:
    fed = federate(dp(noise_multiplier=z, mechanism=mechanism), dimension=16, rounds=3)
    for rnd in (1, 2, 3):
        record = fed.result.history.round(rnd)
        assert record.ok, record.error
        scale = record.train_metrics["dp-scale"]
        expected = independent_epsilon(
            event_type, z=z, scale=scale, dimension=16, planned=FEWEST, counted=FEWEST, rounds=rnd
        )
        assert record.train_metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert record.train_metrics["dp-counted-clients"] == FEWEST


@pytest.mark.parametrize(
    ("target", "settings"),
    [
        (4.0, {}),
        (40.0, {}),  # 40 needs a multiplier below 1
        (4.0, {"colluding": 2}),
        (4.0, {"colluding": 2, "dropouts": DropoutPolicy.SURVIVORS}),
    ],
)
def test_target_epsilon_is_met_by_the_run(target: float, settings: dict[str, Any]) -> None:
    calibrated = dp(noise_multiplier=None, target_epsilon=target, rounds=3, **settings)
    fed = federate(calibrated, dimension=16, rounds=3)
    epsilons = [r.train_metrics["epsilon"] for r in fed.result.history.rounds]
    assert 0.97 * target <= epsilons[-1] <= target


# -- dropouts ----------------------------------------------------------------------------------
STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_INPUT, Stage.UNMASK]


@pytest.mark.parametrize("stage", STAGES)
def test_worst_case_epsilon_is_unchanged_by_dropouts_at_any_stage(stage: str) -> None:
    calm = federate(dp(), dimension=16)
    stormy = federate(dp(), dimension=16, faults=[Dropout(node=2, round=1, stage=stage)])
    record = stormy.result.history.round(1)
    assert record.ok, record.error
    survivors = len(record.participants)
    assert survivors == (NODES if stage == Stage.UNMASK else NODES - 1)  # unmask: input is in
    assert record.train_metrics["epsilon"] == calm.result.history.round(1).train_metrics["epsilon"]
    (encoding,) = stormy.grid.encodings()
    (calm_encoding,) = calm.grid.encodings()
    assert encoding.share == calm_encoding.share  # sized for FEWEST, not for who came


@pytest.mark.parametrize("stage", STAGES)
def test_survivors_epsilon_counts_the_shares_in_the_sum(stage: str) -> None:
    policy = DropoutPolicy.SURVIVORS
    calm = federate(dp(dropouts=policy), dimension=16)
    faults = [Dropout(node=p, round=1, stage=stage) for p in (2, 5)]
    stormy = federate(dp(dropouts=policy), dimension=16, faults=faults)
    record = stormy.result.history.round(1)
    assert record.ok, record.error
    survivors = len(record.participants)
    scale = record.train_metrics["dp-scale"]
    expected = independent_epsilon(
        SkellamEvent, z=1.0, scale=scale, dimension=16, planned=NODES, counted=survivors
    )
    assert record.train_metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert record.train_metrics["dp-counted-clients"] == survivors
    calm_epsilon = calm.result.history.round(1).train_metrics["epsilon"]
    if survivors < NODES:
        assert record.train_metrics["epsilon"] > calm_epsilon
    else:
        assert record.train_metrics["epsilon"] == pytest.approx(calm_epsilon)


def test_survivors_does_not_count_the_colluding_nodes_shares() -> None:
    record = federate(dp(dropouts=DropoutPolicy.SURVIVORS, colluding=2), dimension=16)
    round_one = record.result.history.round(1)
    assert round_one.ok, round_one.error
    assert len(round_one.participants) == NODES
    scale = round_one.train_metrics["dp-scale"]
    expected = independent_epsilon(
        SkellamEvent, z=1.0, scale=scale, dimension=16, planned=NODES, counted=NODES - 2
    )
    assert round_one.train_metrics["dp-counted-clients"] == NODES - 2
    assert round_one.train_metrics["epsilon"] == pytest.approx(expected, rel=1e-9)


class _Boastful(SecAggPlus):
    """Promises sums of the whole cohort; releases, as SecAgg+ does, sums of t + 1 or more."""

    def fewest_inputs(self, cohort_size: int) -> int:
        return cohort_size


def test_a_broken_promise_is_charged_for_the_honest_survivors_only() -> None:
    # The aggregator promised 8 inputs and released 6 in round 1; 2 may collude: 4 honest
    # shares in that sum, each sized for 6.
    faults = [Dropout(node=p, round=1, stage=Stage.ADVERTISE_KEYS) for p in (2, 5)]
    fed = federate(dp(colluding=2), dimension=16, rounds=2, faults=faults, secagg=_Boastful())
    first, second = fed.result.history.rounds
    assert not first.ok and "promised" in str(first.error)
    assert second.ok, second.error
    scale = second.train_metrics["dp-scale"]

    def event(counted: int) -> SkellamEvent | DistributedDiscreteGaussianEvent:
        pipeline = {"z": 1.0, "scale": scale, "dimension": 16, "planned": NODES - 2}
        return independent_event(SkellamEvent, counted=counted, **pipeline)

    accountant = RdpAccountant(neighbouring=Neighbouring.ZERO_OUT)
    # Round 1 as committed (6 shares), then as released (4), then round 2 (6).
    accountant.compose(event(NODES - 2)).compose(event(4)).compose(event(NODES - 2))
    assert second.train_metrics["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA))


def test_a_sum_of_colluding_inputs_only_is_charged_as_noiseless(tmp_path: Path) -> None:
    from flowerpets.store import RunStore

    # Promised 8, released 5, all of whom may collude: no share in the sum is secret.
    faults = [Dropout(node=p, round=1, stage=Stage.ADVERTISE_KEYS) for p in (1, 2, 5)]
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer:
            fed = federate(dp(colluding=5), faults=faults, secagg=_Boastful(), store=writer)
        spends = store.spends(store.run("r").population_id)
    assert "promised" in str(fed.result.history.round(1).error)
    shares = [s.event["event"]["local_variance"] for s in spends]
    assert shares[0] > 0 and shares[-1] == 0  # committed, then charged as released


def test_worst_case_pays_in_noise_what_survivors_pays_in_epsilon() -> None:
    # With everyone present both claim the epsilon of (z l2)^2 in the sum, but WORST_CASE
    # has each node add the share of one in FEWEST (the sum holds 8 / 5 of the noise),
    # SURVIVORS one in 8 (and would claim more epsilon had anyone dropped out).
    worst = federate(dp(), dimension=16)
    counted = federate(dp(dropouts=DropoutPolicy.SURVIVORS), dimension=16)
    (worst_encoding,) = worst.grid.encodings()
    (counted_encoding,) = counted.grid.encodings()

    def summed_multiplier(encoding: RoundEncoding, shares: int) -> float:
        l2 = rounded_l2_bound(CLIP * encoding.scale, dimension=16, beta=math.exp(-0.5))
        return math.sqrt(shares * encoding.share) / l2

    # Each calibrated so that its planned shares carry noise multiplier 1 ...
    assert summed_multiplier(worst_encoding, FEWEST) == pytest.approx(1.0)
    assert summed_multiplier(counted_encoding, NODES) == pytest.approx(1.0)
    # ... so with all 8 in the sum the worst case's carries sqrt(8 / 5) times more noise.
    assert summed_multiplier(worst_encoding, NODES) == pytest.approx(math.sqrt(NODES / FEWEST))
    epsilons = [f.result.history.round(1).train_metrics["epsilon"] for f in (worst, counted)]
    assert epsilons[0] == pytest.approx(epsilons[1], rel=1e-6)


# -- the budget --------------------------------------------------------------------------------
def test_a_round_over_max_epsilon_is_refused_before_any_node_sees_it() -> None:
    one = federate(dp(), dimension=16).result.history.round(1).train_metrics["epsilon"]
    fed = federate(dp(max_epsilon=one * 1.2), dimension=16, rounds=3)
    assert fed.result.stopped is not None and "max_epsilon" in fed.result.stopped
    ok = [r for r in fed.result.history.rounds if r.ok]
    assert len(ok) == 1
    assert {msg.round for msg in fed.grid.sent} == {1}  # round 2 never reached a node


# -- the run store --------------------------------------------------------------------------
class CrashError(BaseException):
    """The server process dies (not an Exception: no round catches it)."""


def test_the_budget_survives_a_restart_in_the_population_ledger(tmp_path: Path) -> None:
    from flowerpets.store import RunStore

    def crash(record: Any) -> None:
        if record.round == 2:
            raise CrashError

    whole = federate(dp(), dimension=16, rounds=3).result
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer, pytest.raises(CrashError):
            federate(dp(), dimension=16, rounds=3, store=writer, on_round=crash)
        with store.resume_run("r") as writer:
            resumed = federate(dp(), dimension=16, rounds=3, store=writer).result
        spends = store.spends(store.run("r").population_id)
    assert [r.train_metrics["epsilon"] for r in resumed.history.rounds] == [
        r.train_metrics["epsilon"] for r in whole.history.rounds
    ]
    assert [(s.round, s.event["mechanism"], s.event["event"]["type"]) for s in spends] == [
        (r, "DistributedDp", "SkellamEvent") for r in (1, 2, 3)
    ]


# -- the scale ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "z", "dimension"), [(32, 1.0, 650), (20, 1.0, 4096), (16, 3.0, 1000)]
)
def test_the_scale_is_the_largest_that_keeps_the_wrap_bound_and_the_share_cap(
    bits: int, z: float, dimension: int
) -> None:
    from flowerpets.dp._primitives.distributed import Encoding, wrap_probability
    from flowerpets.dp.distributed._plan import MAX_SHARE, plan

    chosen = plan(
        noise_multiplier=z,
        dimension=dimension,
        beta=math.exp(-0.5),
        cohort=20,
        planned=12,
        modulus_bits=bits,
        mechanism=Mechanism.SKELLAM,
    )

    def at(units: float) -> tuple[float, float]:
        encoding = Encoding(scale=units, clip=1.0, dimension=dimension, modulus_bits=bits)
        share = (z * encoding.norm_bound) ** 2 / 12
        return share, wrap_probability(encoding, clients=20, local_variance=share)

    share, wrap = at(chosen.units)
    assert wrap <= 1e-6 and share <= MAX_SHARE and chosen.wrap == wrap
    bigger_share, bigger_wrap = at(chosen.units * 1.001)
    assert bigger_wrap > 1e-6 or bigger_share > MAX_SHARE  # no larger scale would do


def test_every_round_reports_its_wrap_bound_below_the_limit() -> None:
    fed = federate(dp(modulus_bits=20), dimension=16, rounds=2)
    for record in fed.result.history.rounds:
        assert record.ok, record.error
        assert record.train_metrics["dp-wrap-bound"] <= 1e-6


def test_survivors_charges_a_failed_round_as_the_worst_case() -> None:
    from flowerpets.simulation import ErrorReply

    # Four of eight fail at collect-masked-input: SecAgg+ (t = 4) cannot unmask round 1.
    faults = [ErrorReply(node=p, round=1, stage=Stage.COLLECT_MASKED_INPUT) for p in range(4)]
    fed = federate(dp(dropouts=DropoutPolicy.SURVIVORS), dimension=16, rounds=2, faults=faults)
    first, second = fed.result.history.rounds
    assert not first.ok and second.ok, (first.error, second.error)
    scale = second.train_metrics["dp-scale"]

    def event(counted: int) -> SkellamEvent | DistributedDiscreteGaussianEvent:
        pipeline = {"z": 1.0, "scale": scale, "dimension": 16, "planned": NODES}
        return independent_event(SkellamEvent, counted=counted, **pipeline)

    accountant = RdpAccountant(neighbouring=Neighbouring.ZERO_OUT)
    accountant.compose(event(FEWEST)).compose(event(NODES))  # the failed round, the full one
    assert second.train_metrics["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA))


class _FailsAfterUnmasking(SecAggPlus):
    """Unmasks the sum, then fails with an error that is no RoundFailedError."""

    def __call__(self, request: Any, context: Any, call_next: Any) -> Any:
        super().__call__(request, context, call_next)
        raise ProtocolViolationError("failed after unmasking")


class _LosesTheResidues(SecAggPlus):
    """Unmasks the sum, then returns a result without it."""

    def __call__(self, request: Any, context: Any, call_next: Any) -> Any:
        return super().__call__(request, context, call_next).replace(aggregate=ArrayRecord())


@pytest.mark.parametrize("secagg", [_FailsAfterUnmasking, _LosesTheResidues])
def test_survivors_charges_a_round_that_fails_after_unmasking_whatever_failed(
    tmp_path: Path, secagg: type[SecAggPlus]
) -> None:
    from flowerpets.store import RunStore

    policy = DropoutPolicy.SURVIVORS
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer:
            fed = federate(dp(dropouts=policy), secagg=secagg(), store=writer)
        spends = store.spends(store.run("r").population_id)
    assert not fed.result.history.round(1).ok
    assert [s.event["event"]["clients_in_sum"] for s in spends] == [FEWEST]


# -- adaptive clipping -------------------------------------------------------------------------
@pytest.mark.parametrize(("norm", "unclipped"), [(0.5, 1.0), (50.0, 0.0)])
def test_adaptive_clipping_follows_the_noised_count_of_the_secure_sum(
    norm: float, unclipped: float
) -> None:
    # Every update below the clip (0.5: steady's largest is exactly 0.5), or all far above.
    adaptive = AdaptiveClipping(count_stddev=0.6)
    fed = federate(dp(adaptive=adaptive), dimension=16, rounds=2, delta=steady(16, norm))
    first, second = fed.result.history.rounds
    assert first.ok and second.ok, (first.error, second.error)
    fraction = first.train_metrics["dp-unclipped-fraction"]
    # The +-1 sum's noise: 8 shares of (2 * 0.6)^2 / 5 each, std 1.52; on the fraction
    # (over 2 m = 16) std 0.095: 6 of them fail a correct count with probability < 2e-9.
    assert abs(fraction - unclipped) < 6 * 0.095
    assert second.train_metrics["dp-clip"] == pytest.approx(adaptive.next_clip(CLIP, fraction))


def test_target_epsilon_with_adaptive_clipping_covers_the_count_too() -> None:
    adaptive = AdaptiveClipping(count_stddev=4.0)
    settings = {"noise_multiplier": None, "target_epsilon": 6.0, "rounds": 3, "adaptive": adaptive}
    fed = federate(dp(**settings), dimension=16, rounds=3)
    assert all(r.ok for r in fed.result.history.rounds)
    assert 0.97 * 6.0 <= fed.result.history.rounds[-1].train_metrics["epsilon"] <= 6.0


def test_a_target_the_count_alone_exceeds_is_refused() -> None:
    from flowerpets.exceptions import InfeasibleParametersError

    adaptive = AdaptiveClipping(count_stddev=0.6)  # z must stay below 1.2
    settings = {"noise_multiplier": None, "target_epsilon": 1.0, "rounds": 3, "adaptive": adaptive}
    with pytest.raises(InfeasibleParametersError, match="count_stddev"):
        federate(dp(**settings), dimension=16)

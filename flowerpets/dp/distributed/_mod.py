"""The DistributedDp server mod: one round from its plan to the released, noised mean.

The package's docstring (:mod:`flowerpets.dp.distributed`) says what the mod
releases and whom it protects against; here is the order a round runs in:
refuse without a secure aggregator, plan the round (:mod:`._plan`: the scale
from the modulus, each node's share), account for it or refuse it
(:mod:`._budget`, through the ledger CentralDp keeps: :class:`BudgetedMod`),
send the public encoding, let SecAgg+ sum the residues, decode the noised sum,
divide by the fixed denominator, report epsilon, and with adaptive clipping set
the next round's clip from the noised count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
import warnings
from collections.abc import Callable

import numpy as np

from flowerpets._validation import boolean, instance, integer, probability, real
from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    QuantizedDomain,
    RoundRequest,
    RoundResult,
    ServerContext,
    is_sealed,
)
from flowerpets.dp._primitives.distributed import DEFAULT_BETA, Encoding, decode, lift
from flowerpets.dp._primitives.rotation import padded_dimension
from flowerpets.dp._protocol import CLIPPED, ENCODING_KEY, RESERVED_PREFIX, RESIDUES
from flowerpets.dp.accountant import AccountantFactory, DropoutPolicy, PrivacyEvent
from flowerpets.dp.central._adaptive import AdaptiveClipping
from flowerpets.dp.central._budgeted import BudgetedMod
from flowerpets.dp.central._durable import DISTRIBUTED
from flowerpets.dp.central._ledger import RunState
from flowerpets.dp.central._release import update_multiplier
from flowerpets.dp.distributed._budget import (
    calibrated_multiplier,
    count_event,
    epsilon_of,
    update_event,
)
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.dp.distributed._plan import WRAP_LIMIT, Plan, plan
from flowerpets.dp.distributed._round_config import SEED_BYTES, RoundEncoding
from flowerpets.exceptions import (
    IncompatibleModsError,
    InfeasibleParametersError,
    ModelMismatchError,
    ParameterValueError,
    RoundFailedError,
)

__all__ = ["STATE_KEY", "DistributedDp"]

log = logging.getLogger(__name__)

STATE_KEY = "dp.distributed"

CallNext = Callable[[RoundRequest, ServerContext], RoundResult]

# Below this sigma^2 the distributed discrete Gaussian's bound says nothing (KLS21).
_DG_MIN_SHARE = 0.25
# How close (relatively) the calibrated multiplier is to the smallest that meets the target.
_MULTIPLIER_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True, slots=True)
class _Round:
    """What the mod decided for one round before any node sees it."""

    encoding: RoundEncoding
    plan: Plan
    fewest: int  # the fewest shares the released sum can hold (the aggregator's promise)
    expected: float  # the fixed denominator


class DistributedDp(BudgetedMod):
    """Server mod: distributed DP for FedAvg (see :mod:`flowerpets.dp.distributed`).

    Keyword-only settings, validated here:

    ``noise_multiplier`` *or* ``target_epsilon`` (with ``rounds``)
        ``z``: the summed noise's standard deviation over the rounded L2
        sensitivity (:attr:`~flowerpets.dp.accountant.DistributedEvent.noise_multiplier`),
        counting the shares the dropout policy counts on. Or the epsilon the
        whole run of ``rounds`` rounds must stay within: ``z`` is then found at
        the first round (when the model's size and the cohort are known).
    ``clipping_norm``, ``delta``, ``max_epsilon``
        The L2 clip of an update (the initial one with ``adaptive``), the delta
        epsilon is reported at, and the budget: a round that could raise epsilon
        above ``max_epsilon`` is refused before any node sees it
        (:class:`~flowerpets.exceptions.StopRunError`).
    ``mechanism``
        :attr:`Mechanism.SKELLAM` (default) or :attr:`Mechanism.DISCRETE_GAUSSIAN`.
    ``dropouts``
        :attr:`DropoutPolicy.WORST_CASE` (default): each node's share is sized so
        that the fewest inputs the secure aggregator releases a sum of (SecAgg+:
        ``t + 1``), less ``colluding``, carry the whole noise. ``SURVIVORS``:
        sized for the expected cohort, and each round's epsilon counts the
        shares actually in the sum.
    ``colluding``
        Nodes whose noise the server may know (they collude with it): their
        shares are not counted.
    ``modulus_bits``
        SecAgg+'s ring for the residues (2 to 32; default 32).
    ``adaptive``
        :class:`~flowerpets.dp.AdaptiveClipping`: the nodes' clipped bits are
        summed inside the secure sum with their own noise shares (total standard
        deviation ``adaptive.count_noise(m)``), and the clip follows the paper's
        geometric rule.
    ``beta``, ``max_wrap``
        Conditional rounding's parameter (default ``exp(-0.5)``, KLS21's) and
        the bound on the probability that a round's sum wraps around the
        modulus (default :data:`~flowerpets.dp.distributed._plan.WRAP_LIMIT`).
    ``keep_client_metrics``
        Keep the metrics the inner chain returns (default: dropped, they are not
        noised).
    ``population``, ``accountant``
        As :class:`~flowerpets.dp.CentralDp`'s: the run store's population
        whose budget this is, and the accountant's factory (default: RDP).
    """

    state_key = STATE_KEY
    mechanism_name = DISTRIBUTED

    def __init__(
        self,
        *,
        clipping_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        mechanism: Mechanism = Mechanism.SKELLAM,
        dropouts: DropoutPolicy = DropoutPolicy.WORST_CASE,
        colluding: int = 0,
        modulus_bits: int = 32,
        adaptive: AdaptiveClipping | None = None,
        beta: float = DEFAULT_BETA,
        max_wrap: float = WRAP_LIMIT,
        keep_client_metrics: bool = False,
        population: str | None = None,
        accountant: AccountantFactory | None = None,
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ParameterValueError("give exactly one of noise_multiplier and target_epsilon")
        if noise_multiplier is not None:
            noise_multiplier = real("noise_multiplier", noise_multiplier, at_least=0)
            if rounds is not None:
                raise ParameterValueError("rounds calibrates target_epsilon: give it with that")
        else:
            target_epsilon = real("target_epsilon", target_epsilon, above=0)
            if rounds is None:
                raise ParameterValueError("target_epsilon needs rounds (the run's length)")
            rounds = integer("rounds", rounds, at_least=1)
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.rounds = rounds
        self.clipping_norm = real("clipping_norm", clipping_norm, above=0)
        self.delta = probability("delta", delta, zero=False, one=False)
        self.max_epsilon = (
            None if max_epsilon is None else real("max_epsilon", max_epsilon, above=0)
        )
        self.mechanism = instance("mechanism", mechanism, Mechanism)
        self.dropouts = instance("dropouts", dropouts, DropoutPolicy)
        self.colluding = integer("colluding", colluding, at_least=0)
        self.modulus_bits = integer("modulus_bits", modulus_bits, at_least=2, at_most=32)
        self.adaptive = (
            None if adaptive is None else instance("adaptive", adaptive, AdaptiveClipping)
        )
        self.beta = probability("beta", beta, one=False)
        self.max_wrap = probability("max_wrap", max_wrap, zero=False, one=False)
        self.keep_client_metrics = boolean("keep_client_metrics", keep_client_metrics)
        if population is not None and (not isinstance(population, str) or not population):
            raise ParameterValueError("population must be a non-empty str (a population id)")
        self.population = population
        if accountant is not None and not callable(accountant):
            raise ParameterValueError("accountant must make an Accountant")
        self.accountant = accountant
        if noise_multiplier == 0:
            warnings.warn(
                "DistributedDp(noise_multiplier=0) adds no noise: the run is not private "
                "(epsilon is infinite)",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        noise = (
            f"noise_multiplier={self.noise_multiplier}"
            if self.noise_multiplier is not None
            else f"target_epsilon={self.target_epsilon}, rounds={self.rounds}"
        )
        return (
            f"DistributedDp({noise}, clipping_norm={self.clipping_norm}, delta={self.delta}, "
            f"max_epsilon={self.max_epsilon}, mechanism={self.mechanism.name}, "
            f"dropouts={self.dropouts.name}, modulus_bits={self.modulus_bits}, "
            f"adaptive={self.adaptive})"
        )

    def settings(self) -> dict[str, object]:
        """What the budget a run spent depends on: a resume must run with the same."""
        return self.settings_of(
            target_epsilon=self.target_epsilon,
            rounds=self.rounds,
            mechanism=self.mechanism.value,
            dropouts=self.dropouts.value,
            colluding=self.colluding,
            modulus_bits=self.modulus_bits,
            beta=self.beta,
            max_wrap=self.max_wrap,
        )

    # -- one round -------------------------------------------------------------------------------
    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: CallNext
    ) -> RoundResult:
        fewest_inputs = context.fewest_inputs
        if not context.secure_aggregation or fewest_inputs is None:
            raise IncompatibleModsError(
                "DistributedDp needs a secure aggregator that sums residues (SecAgg+) inside "
                "it: without one every node's noised update would reach the server on its own"
            )
        dimension = self._check_model(request)
        if request.population < 1:
            raise RoundFailedError(f"round {request.round}: no nodes are available")
        cohort = len(request.cohort)
        if cohort < 1:
            raise RoundFailedError(f"round {request.round}: the cohort is empty")
        fewest = int(fewest_inputs(cohort)) - self.colluding
        if fewest < 1:
            raise InfeasibleParametersError(
                f"the secure aggregator releases sums of {fewest + self.colluding} input(s) for "
                f"a cohort of {cohort}, no more than the {self.colluding} colluding node(s): "
                "no noise share would be secret"
            )
        run = self.load(context)
        expected = float(request.sampling.expected_size(request.population))
        planned = self._planned(fewest, expected)
        chosen = self._plan(run.clip, dimension, cohort, planned, fewest, expected)
        worst = self._events(chosen, counted=fewest)  # the fewest shares the sum can hold

        if self.dropouts is DropoutPolicy.WORST_CASE:
            # Committed before any node sees the round: whoever survives, this is the cost.
            run, epsilon = self.charge(
                context, run, worst, round=request.round, max_epsilon=self.max_epsilon
            )
            self.store(context, run)
        else:
            # The cost depends on who survives: refuse now what the worst case would exceed.
            self.charge(
                context, run, worst, round=request.round, max_epsilon=self.max_epsilon, dry=True
            )

        try:
            result = call_next(self._inner(request, chosen), context)
            survivors = len(result.participants)
            if RESIDUES not in result.aggregate or survivors == 0:
                raise RoundFailedError(
                    f"round {request.round}: the secure sum holds no {RESIDUES!r} residues",
                    failures=result.failures,
                )
        except Exception:
            if self.dropouts is DropoutPolicy.SURVIVORS:
                # The secure sum may have been unmasked before the round failed, whatever
                # failed: charge the most it could have cost (over-counts, never under).
                run, _ = self.charge(context, run, worst, round=request.round, max_epsilon=None)
                self.store(context, run)
            raise
        # The colluding nodes may be among the survivors: their shares are no secret noise.
        honest = survivors - self.colluding
        if honest < 1:
            # No share in the sum is secret: what it cost is unbounded.
            counted, released = 1, self._noiseless(chosen)
        else:
            counted = self.dropouts.counted(honest, fewest)
            released = self._events(chosen, counted=counted)
        if honest < fewest or self.dropouts is DropoutPolicy.SURVIVORS:
            # SURVIVORS: the shares actually in the sum. WORST_CASE with fewer survivors than
            # the aggregator promised: the sum was released with less noise; count it too.
            run, epsilon = self.charge(
                context,
                run,
                released,
                round=request.round,
                max_epsilon=None,  # the sum is out: record what it cost, whatever it was
            )
            self.store(context, run)
            if honest < fewest:
                raise RoundFailedError(
                    f"round {request.round}: the secure aggregator released a sum of "
                    f"{survivors} input(s), fewer than the {fewest + self.colluding} it "
                    "promised: not released",
                    failures=result.failures,
                )
        return self._release(request, result, chosen, run, context, epsilon, counted)

    def _check_model(self, request: RoundRequest) -> int:
        """The model's dimension; refuses a model the pipeline cannot encode."""
        if is_sealed(request.arrays):
            raise IncompatibleModsError(
                "DistributedDp computes updates against the global model: it cannot be sealed"
            )
        reserved = [n for n in (*request.arrays, *request.config) if n.startswith(RESERVED_PREFIX)]
        if reserved:
            raise ModelMismatchError(
                f"names {reserved} are reserved for the DP mods ({RESERVED_PREFIX}*)"
            )
        not_float = [n for n, a in request.arrays.items() if a.dtype.kind != "f"]
        if not_float or not len(request.arrays):
            raise ModelMismatchError(
                f"DistributedDp encodes float arrays only; {not_float or 'no array'} is not"
            )
        return sum(int(np.prod(a.shape)) for a in request.arrays.values())

    def _planned(self, fewest: int, expected: float) -> int:
        """How many shares the calibrated variance is split into."""
        if self.dropouts is DropoutPolicy.WORST_CASE:
            return fewest
        return max(1, round(expected))

    def _multiplier(
        self, dimension: int, cohort: int, planned: int, fewest: int, expected: float
    ) -> float:
        """``z``: the one given, or the one that keeps ``rounds`` such rounds within the target."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None and self.rounds is not None
        target, rounds = self.target_epsilon, self.rounds
        # SURVIVORS: the expected cohort's shares, but for the colluding nodes' (never counted).
        counted = (
            fewest
            if self.dropouts is DropoutPolicy.WORST_CASE
            else max(1, planned - self.colluding)
        )
        # With adaptive clipping z covers the count too, so it must stay below 2 sigma_b.
        z = 1.0 if self.adaptive is None else min(1.0, self.adaptive.count_noise(expected))
        count_share = self._count_share(expected, planned)
        below = math.inf if self.adaptive is None else 2 * self.adaptive.count_noise(expected)

        def events_at(candidate: float, units: float) -> list[PrivacyEvent]:
            l2 = Encoding(scale=units, clip=1.0, dimension=dimension, beta=self.beta).norm_bound
            share = (self._update_multiplier(candidate, expected) * l2) ** 2 / planned
            return self._events_for(units, 1.0, dimension, share, count_share, counted)

        # The scale depends on z, and epsilon (a little) on the scale: iterate z to its fixed
        # point, from above or below, then check the answer at its own scale.
        for _ in range(24):
            units = self._scaled(z, dimension, cohort, planned, expected).units
            found = calibrated_multiplier(
                functools.partial(events_at, units=units),
                target_epsilon=target,
                delta=self.delta,
                rounds=rounds,
                factory=self.accountant,
                start=z,
                below=below,
            )
            if abs(found - z) > _MULTIPLIER_TOLERANCE * z:
                z = found
                continue
            z = max(found, z)
            own = self._scaled(z, dimension, cohort, planned, expected).units
            if epsilon_of(events_at(z, own), rounds, self.accountant, self.delta) <= target:
                return z
            z *= 1 + _MULTIPLIER_TOLERANCE  # its own scale costs a little more: step up
        raise InfeasibleParametersError(
            f"DistributedDp found no noise multiplier for epsilon {target:g} in {rounds} rounds "
            "that the modulus can carry: raise modulus_bits or target_epsilon"
        )

    def _update_multiplier(self, z: float, expected: float) -> float:
        """The update's share of the total ``z`` (all of it without adaptive clipping): the
        split CentralDp makes (:func:`~flowerpets.dp.central._release.update_multiplier`)."""
        if z == 0:
            return 0.0
        return update_multiplier(z, self.adaptive, expected)

    def _scaled(self, z: float, dimension: int, cohort: int, planned: int, expected: float) -> Plan:
        return plan(
            noise_multiplier=self._update_multiplier(z, expected),
            dimension=dimension,
            beta=self.beta,
            cohort=cohort,
            planned=planned,
            modulus_bits=self.modulus_bits,
            mechanism=self.mechanism,
            max_wrap=self.max_wrap,
        )

    def _plan(
        self, clip: float, dimension: int, cohort: int, planned: int, fewest: int, expected: float
    ) -> _Round:
        z = self._multiplier(dimension, cohort, planned, fewest, expected)
        chosen = self._scaled(z, dimension, cohort, planned, expected)
        count_share = self._count_share(expected, planned)
        if (
            self.mechanism is Mechanism.DISCRETE_GAUSSIAN
            and min(chosen.share, _DG_MIN_SHARE if count_share is None else count_share)
            < _DG_MIN_SHARE
        ):
            raise InfeasibleParametersError(
                "the distributed discrete Gaussian needs each node's share to have sigma >= 1/2: "
                "add noise (or use Mechanism.SKELLAM)"
            )
        encoding = RoundEncoding(
            seed=secrets.token_bytes(SEED_BYTES),  # fresh each round, public
            scale=chosen.units / clip,
            clip=clip,
            dimension=dimension,
            modulus_bits=self.modulus_bits,
            beta=self.beta,
            mechanism=self.mechanism,
            share=chosen.share,
            count_share=count_share,
        )
        return _Round(encoding=encoding, plan=chosen, fewest=fewest, expected=expected)

    def _events(self, chosen: _Round, *, counted: int) -> list[PrivacyEvent]:
        e = chosen.encoding
        return self._events_for(e.clip, e.scale, e.dimension, e.share, e.count_share, counted)

    def _noiseless(self, chosen: _Round) -> list[PrivacyEvent]:
        """The round's events with no secret share in the sum (infinite epsilon)."""
        e = chosen.encoding
        count = None if e.count_share is None else 0.0
        return self._events_for(e.clip, e.scale, e.dimension, 0.0, count, 1)

    def _count_share(self, expected: float, planned: int) -> float | None:
        """Each node's share of the clipped count's noise (None without adaptive clipping).

        A node sends ``+1`` if it clipped, ``-1`` if not (sensitivity 1): the count of
        CentralDp's ``b - 1/2`` doubled, so its noise is ``2 sigma_b`` in total.
        """
        if self.adaptive is None:
            return None
        return (2 * self.adaptive.count_noise(expected)) ** 2 / planned

    def _events_for(
        self,
        clip: float,
        scale: float,
        dimension: int,
        share: float,
        count_share: float | None,
        counted: int,
    ) -> list[PrivacyEvent]:
        """The round's events: the update's sum, and (adaptive clipping) the clipped count's."""
        events = [
            update_event(
                self.mechanism,
                clip=clip,
                scale=scale,
                padded=padded_dimension(dimension),
                beta=self.beta,
                share=share,
                counted=counted,
            )
        ]
        if count_share is not None:
            events.append(count_event(self.mechanism, share=count_share, counted=counted))
        return events

    def _inner(self, request: RoundRequest, chosen: _Round) -> RoundRequest:
        config = ConfigRecord(request.config)
        config[ENCODING_KEY] = chosen.encoding.to_json()
        names = (RESIDUES, CLIPPED) if self.adaptive is not None else (RESIDUES,)
        return request.replace(
            config=config,
            weight_key=None,
            quantized=QuantizedDomain(
                modulus_bits=self.modulus_bits, names=names, binding=chosen.encoding.binding()
            ),
        )

    def _release(
        self,
        request: RoundRequest,
        result: RoundResult,
        chosen: _Round,
        run: RunState,
        context: ServerContext,
        epsilon: float,
        counted: int,
    ) -> RoundResult:
        e = chosen.encoding
        encoding, rotation = e.pipeline(), e.rotation()
        residues = np.asarray(result.aggregate[RESIDUES].numpy(), dtype=np.uint64)
        total = decode(residues, encoding=encoding, rotation=rotation)
        m = chosen.expected
        aggregate = ArrayRecord()
        at = 0
        for name, array in request.arrays.items():
            size = int(np.prod(array.shape))
            part = total[at : at + size].reshape(array.shape)
            at += size
            aggregate[name] = part + m * np.asarray(array.numpy(), dtype=np.float64)
        metrics = MetricRecord(result.metrics) if self.keep_client_metrics else MetricRecord()
        survivors = len(result.participants)
        metrics["epsilon"] = epsilon
        metrics["delta"] = self.delta
        metrics["dp-clip"] = e.clip
        metrics["dp-scale"] = e.scale
        metrics["dp-counted-clients"] = counted
        metrics["dp-wrap-bound"] = chosen.plan.wrap
        metrics["dp-noise-std"] = math.sqrt(survivors * e.share) / e.scale / m
        metrics["dp-expected-cohort"] = m
        if self.adaptive is not None:
            if CLIPPED not in result.aggregate:
                raise RoundFailedError(
                    f"round {request.round}: the secure sum holds no {CLIPPED!r} count",
                    failures=result.failures,
                )
            count = lift(
                np.asarray(result.aggregate[CLIPPED].numpy(), dtype=np.uint64), e.modulus_bits
            )
            # The sum of +-1 is (clipped - unclipped): the noised unclipped count is
            # (survivors - sum) / 2, over the fixed denominator.
            fraction = (survivors - float(np.sum(count))) / 2 / m
            following = self.adaptive.next_clip(e.clip, fraction)
            metrics["dp-unclipped-fraction"] = fraction
            self.store(context, dataclasses.replace(run, clip=following))
        return result.replace(
            aggregate=aggregate, total_weight=m, fixed_denominator=True, metrics=metrics
        )

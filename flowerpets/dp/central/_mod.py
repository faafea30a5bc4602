"""The CentralDp server mod: a round from its privacy event to the noised release.

The package's docstring (:mod:`flowerpets.dp.central`) says what the mod
releases and protects; here is the order a round runs in: account (or refuse)
before any node sees the round, let the inner chain sum the clipped updates
where :mod:`._sites` says, release the sum noised (:mod:`._release`), report
epsilon, and with adaptive clipping set the next round's clip
(:mod:`._adaptive`). The run's state lives in its context (:mod:`._ledger`),
and with a run store also on disk, its spends on the population's ledger
(:mod:`._durable`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np

from flowerpets._validation import boolean, instance, integer, probability, real
from flowerpets.core import (
    ConfigRecord,
    FixedSizeSampling,
    FullParticipation,
    MetricRecord,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.core.round import is_sealed
from flowerpets.dp._primitives.noise import (
    GaussianSource,
    GeneratorGaussian,
    lazy_gaussian_source,
)
from flowerpets.dp._protocol import REPLY_MODEL_KEY, RESERVED_PREFIX
from flowerpets.dp.accountant import AccountantFactory, event_for_round
from flowerpets.dp.central._adaptive import AdaptiveClipping, next_clip
from flowerpets.dp.central._budgeted import BudgetedMod
from flowerpets.dp.central._durable import MECHANISM
from flowerpets.dp.central._ledger import STATE_KEY
from flowerpets.dp.central._release import noised, noised_models, update_multiplier
from flowerpets.dp.central._sites import SITES, CallNext, ClipOn
from flowerpets.exceptions import (
    IncompatibleModsError,
    InsecureRandomnessWarning,
    ModelMismatchError,
    ParameterTypeError,
    ParameterValueError,
    RoundFailedError,
)

__all__ = ["CentralDp"]

log = logging.getLogger(__name__)

# Samplings whose cohort is drawn without looking at the data and of a size fixed in advance.
_COHORT_FIXED_IN_ADVANCE = frozenset({FullParticipation, FixedSizeSampling})


class CentralDp(BudgetedMod):
    """Server mod: user-level central DP for FedAvg (see :mod:`flowerpets.dp.central`).

    ``noise_multiplier`` (z) is the total: with adaptive clipping it covers the
    update and the unclipped count together. ``clipping_norm`` is C (the initial
    C with adaptive clipping). ``delta`` is the delta at which epsilon is
    reported; ``max_epsilon`` is the budget (None: report, never refuse).
    ``accountant`` makes a fresh accountant for a neighbouring relation (None:
    PLD, or RDP for fixed-size cohorts; see
    :func:`~flowerpets.dp.accountant.default_accountant`). ``rng`` replaces the
    secure noise source with a seeded generator, for tests only (it warns).
    ``noise_seed``, also for tests only (it warns), draws each round's noise
    from ``numpy.random.default_rng([noise_seed, round])`` instead: the noise of
    a round depends on nothing drawn before it, so a run resumed from a store
    draws the noise the uninterrupted run drew (a generator's state is never
    stored). Give ``rng`` or ``noise_seed``, not both.

    With a run store (``ServerApp(..., store=writer)``) the budget is the
    population's: each round's event is committed to the run's population
    ledger before any node sees the round, epsilon is that of every run's
    events on it, and a resume continues the run's stored state or refuses
    (see :mod:`flowerpets.dp.central._durable`). ``population``, if given,
    must be the store run's population id; it needs a store.

    The mod keeps no per-run state (each run's lives in its context), so one
    instance serves any number of runs; it pickles, and builds its secure noise
    source on first use (a copy draws under a key of its own).
    """

    state_key = STATE_KEY
    mechanism_name = MECHANISM
    noise_multiplier: float

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        clip_on: ClipOn = ClipOn.CLIENTS,
        adaptive: AdaptiveClipping | None = None,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        accountant: AccountantFactory | None = None,
        rng: np.random.Generator | None = None,
        keep_client_metrics: bool = False,
        population: str | None = None,
        noise_seed: int | None = None,
    ) -> None:
        self.noise_multiplier = real("noise_multiplier", noise_multiplier, at_least=0)
        self.clipping_norm = real("clipping_norm", clipping_norm, above=0)
        self.clip_on = instance("clip_on", clip_on, ClipOn)
        if adaptive is not None:
            adaptive = instance("adaptive", adaptive, AdaptiveClipping)
            if self.noise_multiplier == 0:
                raise ParameterValueError(
                    "adaptive clipping splits the noise: it needs noise_multiplier > 0"
                )
        self.adaptive = adaptive
        self.delta = probability("delta", delta, zero=False, one=False)
        if max_epsilon is not None:
            max_epsilon = real("max_epsilon", max_epsilon, above=0)
        self.max_epsilon = max_epsilon
        if accountant is not None and not callable(accountant):
            raise ParameterTypeError(
                f"accountant must make an Accountant, got {type(accountant).__name__}"
            )
        self.accountant = accountant
        self.keep_client_metrics = boolean("keep_client_metrics", keep_client_metrics)
        if population is not None and (not isinstance(population, str) or not population):
            raise ParameterTypeError("population must be a non-empty str (a population id)")
        self.population = population
        if noise_seed is not None:
            noise_seed = integer("noise_seed", noise_seed, at_least=0)
            if rng is not None:
                raise ParameterValueError("give rng or noise_seed, not both")
            warnings.warn(
                "CentralDp: noise drawn from numpy generators seeded by noise_seed and the round "
                "is not cryptographically secure; use noise_seed= for tests only",
                InsecureRandomnessWarning,
                stacklevel=2,
            )
        self._noise_seed = noise_seed
        # The secure source is built on first use and never pickled: the mod pickles.
        self._noise: GaussianSource = lazy_gaussian_source(rng, owner="CentralDp")
        if self.noise_multiplier == 0:
            warnings.warn(
                "CentralDp(noise_multiplier=0) adds no noise: the run is not private "
                "(epsilon is infinite)",
                UserWarning,
                stacklevel=2,
            )
        if keep_client_metrics:
            warnings.warn(
                "CentralDp(keep_client_metrics=True) releases the clients' train metrics "
                "without noise: they are not covered by the privacy guarantee",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"CentralDp(noise_multiplier={self.noise_multiplier}, clipping_norm="
            f"{self.clipping_norm}, clip_on={self.clip_on.name}, adaptive={self.adaptive}, "
            f"delta={self.delta}, max_epsilon={self.max_epsilon})"
        )

    # -- the run's state (spent, durable_state, restore: BudgetedMod's) ---------------------
    def settings(self) -> dict[str, object]:
        """What the budget a run spent depends on: a resume must run with the same."""
        return self.settings_of(clip_on=self.clip_on.value)

    # -- one round -------------------------------------------------------------------------------
    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: CallNext
    ) -> RoundResult:
        if request.population < 1:
            raise RoundFailedError(f"round {request.round}: no nodes are available")
        sealed_model = is_sealed(request.arrays)
        if sealed_model:
            self._check_sealed_model(request)
        reserved = [n for n in (*request.arrays, *request.config) if n.startswith(RESERVED_PREFIX)]
        if reserved:
            raise ModelMismatchError(
                f"names {reserved} are reserved for the DP mods ({RESERVED_PREFIX}*)"
            )
        run = self.load(context)
        expected = float(request.sampling.expected_size(request.population))
        if run.rounds == 0 and self.delta >= 1.0 / request.population:
            log.warning(
                "CentralDp: delta=%g is not below 1/population (%d nodes): such a delta allows "
                "releasing one client's data outright",
                self.delta,
                request.population,
            )
        multiplier = update_multiplier(self.noise_multiplier, self.adaptive, expected)
        event = event_for_round(request.sampling, request.population, self.noise_multiplier)
        run, epsilon = self.charge(
            context, run, [event], round=request.round, max_epsilon=self.max_epsilon
        )
        self.store(context, run)  # accounted before any node sees the round

        clip = run.clip
        noise = self._round_noise(request.round)
        site = SITES[self.clip_on]
        inner = request.replace(weight_key=None)
        if sealed_model:
            inner = inner.replace(config=ConfigRecord({**request.config, REPLY_MODEL_KEY: True}))
        result, unclipped = site(inner, context, call_next, clip, self.adaptive is not None)
        if sealed_model:
            result = noised_models(result, multiplier * clip, noise)
        else:
            result = noised(result, request.arrays, multiplier * clip, expected, noise)

        metrics = MetricRecord(result.metrics) if self.keep_client_metrics else MetricRecord()
        metrics["epsilon"] = epsilon
        metrics["delta"] = self.delta
        metrics["dp-clip"] = clip
        metrics["dp-noise-std"] = multiplier * clip / result.total_weight
        metrics["dp-expected-cohort"] = expected
        if self.adaptive is not None:
            following, fraction = next_clip(
                self.adaptive, clip, unclipped, expected=expected, noise=noise
            )
            metrics["dp-unclipped-fraction"] = fraction
            self.store(context, dataclasses.replace(run, clip=following))
        return result.replace(metrics=metrics)

    def _round_noise(self, rnd: int) -> GaussianSource:
        """Where round ``rnd``'s noise comes from: the mod's source, or one of the round's."""
        if self._noise_seed is None:
            return self._noise
        return GeneratorGaussian(np.random.default_rng([self._noise_seed, rnd]))

    def _check_sealed_model(self, request: RoundRequest) -> None:
        """A sealed global model is supported only where the number of replies is public."""
        if self.clip_on is ClipOn.SERVER:
            raise IncompatibleModsError(
                "CentralDp(clip_on=ClipOn.SERVER) cannot compute updates against a global model "
                "it cannot read (it is sealed): clip on the clients instead"
            )
        if type(request.sampling) not in _COHORT_FIXED_IN_ADVANCE:
            raise IncompatibleModsError(
                f"with a sealed global model CentralDp divides by the number of replies, which "
                f"{request.sampling!r} makes private: use FullParticipation or FixedSizeSampling"
            )

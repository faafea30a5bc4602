"""What a privacy accountant composes: the mechanisms our runs apply, as frozen events.

Every Gaussian event states its noise as a **noise multiplier**: the noise's
standard deviation divided by the L2 bound on one participant's contribution
(the clipping norm C). That is the number a mod is configured with; the
accountants translate it to each library's convention for the neighbouring
relation in use (see :class:`Neighbouring`).

The distributed events (:class:`SkellamEvent`,
:class:`DistributedDiscreteGaussianEvent`) describe a sum of integer noise
shares, one per client whose noise is in the released sum: they carry the
share, the number of shares, and the sensitivities after scaling and rounding
(see :mod:`flowerpets.dp.accountant._discrete` for the bounds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Self

from flowerpets._validation import integer, probability, real
from flowerpets.core.sampling import (
    CohortSampling,
    FixedSizeSampling,
    FullParticipation,
    PoissonSampling,
)
from flowerpets.dp._primitives.calibration import rounded_l1_bound, rounded_l2_bound
from flowerpets.exceptions import ParameterValueError, PrivacyAccountingError

__all__ = [
    "DistributedDiscreteGaussianEvent",
    "DistributedEvent",
    "DropoutPolicy",
    "FixedSizeSampledGaussian",
    "FullParticipationGaussian",
    "Laplace",
    "Neighbouring",
    "PoissonSampledGaussian",
    "PrivacyEvent",
    "SkellamEvent",
]


class Neighbouring(Enum):
    """Which datasets count as neighbours: what the epsilon protects.

    ``ADD_OR_REMOVE``: one participant (a client, or a training example) is
    present or absent; the L2 sensitivity of a sum clipped to C is C. The natural
    relation for Poisson sampling and full participation.

    ``REPLACE_ONE``: one participant's data is swapped for anything else, and
    the population size is public; the sensitivity of a clipped sum is 2C. The
    relation under which fixed-size sampling without replacement is analysed.

    ``ZERO_OUT``: one participant's contribution is replaced by zeros, the
    participant still taking part; the sensitivity is C. The relation for
    distributed DP, where each client's noise share is in the sum whatever its
    data: under add-or-remove the number of shares itself would differ, which
    the distributed bounds do not cover (and the server sees who takes part
    anyway). For the central events the two output laws are the same as under
    add-or-remove (the server's noise does not depend on who takes part), so
    they are accounted the same way.
    """

    ADD_OR_REMOVE = "add-or-remove"
    REPLACE_ONE = "replace-one"
    ZERO_OUT = "zero-out"

    @property
    def sensitivity_factor(self) -> float:
        """L2 sensitivity of a sum of contributions clipped to C, in units of C."""
        return 2.0 if self is Neighbouring.REPLACE_ONE else 1.0


def _check_noise(kind: str, value: float) -> None:
    real(f"{kind}.noise_multiplier", value, at_least=0)


@dataclass(frozen=True, slots=True)
class FullParticipationGaussian:
    """A Gaussian sum over every participant: no amplification by sampling."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_noise("FullParticipationGaussian", self.noise_multiplier)


@dataclass(frozen=True, slots=True)
class PoissonSampledGaussian:
    """A Gaussian sum over a Poisson sample: each participant is in with ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float

    def __post_init__(self) -> None:
        _check_noise("PoissonSampledGaussian", self.noise_multiplier)
        probability("PoissonSampledGaussian.sample_rate", self.sample_rate, zero=False)


@dataclass(frozen=True, slots=True)
class FixedSizeSampledGaussian:
    """A Gaussian sum over ``sample_size`` of ``population`` participants (without replacement).

    Accounted under :attr:`Neighbouring.REPLACE_ONE` (the population size is
    public), where the sum's sensitivity is 2C.
    """

    noise_multiplier: float
    sample_size: int
    population: int

    def __post_init__(self) -> None:
        _check_noise("FixedSizeSampledGaussian", self.noise_multiplier)
        for name in ("sample_size", "population"):
            integer(f"FixedSizeSampledGaussian.{name}", getattr(self, name), at_least=1)
        if self.sample_size > self.population:
            raise ParameterValueError(
                f"FixedSizeSampledGaussian: sample_size {self.sample_size} exceeds the "
                f"population {self.population}"
            )

    @property
    def sample_rate(self) -> float:
        return self.sample_size / self.population


@dataclass(frozen=True, slots=True)
class Laplace:
    """The Laplace mechanism; ``noise_multiplier`` is its scale over the L1 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_noise("Laplace", self.noise_multiplier)


class DropoutPolicy(Enum):
    """Which clients a distributed-DP round's epsilon counts, when some drop out.

    A client that drops out takes its noise share with it: the released sum
    holds the shares of the survivors only.

    ``WORST_CASE`` (the default): each client adds enough noise for the fewest
    survivors SecAgg+ still unmasks a sum with (its threshold), and the
    epsilon counts that many shares, whatever survives. The promise made
    before the run holds however many drop out (or are dropped: the server
    declares the dropouts), every round costs the same, and a client can check
    its own share against it without trusting the server's accounting.

    ``SURVIVORS``: the noise is calibrated for the clients expected in the
    sum, and each round's epsilon counts the shares actually in it, so
    dropouts raise the epsilon (and a budget stops the run sooner).

    Either way the count never exceeds the shares really in the sum.
    """

    WORST_CASE = "worst-case"
    SURVIVORS = "survivors"

    def counted(self, survivors: int, minimum: int) -> int:
        """The clients a round's epsilon counts: never more than the ``survivors`` in the sum."""
        survivors = integer("survivors", survivors, at_least=1)
        minimum = integer("minimum", minimum, at_least=1)
        return min(survivors, minimum) if self is DropoutPolicy.WORST_CASE else survivors


@dataclass(frozen=True)  # no slots: with slots, a frozen subclass's setattr breaks (3.11)
class DistributedEvent:
    """A sum of integer noise shares, one per client counted: what both distributed events share.

    Everything is in the integer domain the clients' updates are rounded to
    (model units times ``scale``):

    ``local_variance``
        One client's noise parameter (see each event for its exact meaning).
    ``clients_in_sum``
        How many clients' noise shares are in the released sum (survivors
        only: see :class:`DropoutPolicy`). Count only clients whose noise the
        adversary does not know: a client colluding with the server is not
        noise.
    ``l2_sensitivity``, ``l1_sensitivity``
        Bounds on one client's rounded update's L2 and L1 norms (conditional
        randomized rounding's norm bound, and its L1 consequence:
        :meth:`from_pipeline` computes both). The accountant doubles them
        under replace-one neighbouring.
    ``dimension``
        The dimension of the rounded vector (after any padding for the rotation).
    ``scale``
        What the clipped update was multiplied by before rounding (``1 / gamma``):
        the noise's standard deviation in model units is ``sqrt(variance) / scale``.
    ``cohort_size``, ``population``
        A cohort drawn uniformly at random, ``cohort_size`` of ``population``
        (fixed-size sampling, or Poisson sampling given the size it drew):
        amplification against whoever does not know who took part. The server
        running SecAgg+ does know; :meth:`unamplified` is the event that
        holds against it. Both None: every client counted was going to take
        part (no amplification).
    """

    local_variance: float
    clients_in_sum: int
    l2_sensitivity: float
    l1_sensitivity: float
    dimension: int
    scale: float = 1.0
    cohort_size: int | None = None
    population: int | None = None

    def __post_init__(self) -> None:
        kind = type(self).__name__
        real(f"{kind}.local_variance", self.local_variance, at_least=0)
        integer(f"{kind}.clients_in_sum", self.clients_in_sum, at_least=1)
        real(f"{kind}.l2_sensitivity", self.l2_sensitivity, above=0)
        real(f"{kind}.l1_sensitivity", self.l1_sensitivity, above=0)
        integer(f"{kind}.dimension", self.dimension, at_least=1)
        real(f"{kind}.scale", self.scale, above=0)
        if (self.cohort_size is None) != (self.population is None):
            raise ParameterValueError(
                f"{kind}: give both cohort_size and population, or neither "
                f"(got {self.cohort_size!r} and {self.population!r})"
            )
        if self.cohort_size is not None and self.population is not None:
            integer(f"{kind}.cohort_size", self.cohort_size, at_least=1)
            integer(f"{kind}.population", self.population, at_least=self.cohort_size)
            if self.clients_in_sum > self.cohort_size:
                raise ParameterValueError(
                    f"{kind}: {self.clients_in_sum} clients in the sum but a cohort of "
                    f"{self.cohort_size}"
                )

    @property
    def total_variance(self) -> float:
        """The summed noise's parameter: the shares of every client counted."""
        return self.clients_in_sum * self.local_variance

    @property
    def noise_multiplier(self) -> float:
        """The summed noise's standard deviation over the L2 sensitivity (0: no noise).

        The Gaussian this mechanism tends to as the noise grows has this noise multiplier.
        """
        return math.sqrt(self.total_variance) / self.l2_sensitivity

    @property
    def sample_rate(self) -> float:
        """The cohort's share of the population (1 without amplification)."""
        if self.cohort_size is None or self.population is None:
            return 1.0
        return self.cohort_size / self.population

    def with_noise_multiplier(self, noise_multiplier: float) -> Self:
        """This event with each share set so the summed noise has ``noise_multiplier``.

        The share is ``(noise_multiplier * l2_sensitivity)^2 / clients_in_sum``:
        the way to configure distributed noise as a central mechanism's noise
        multiplier (relative to the rounded sensitivity).
        """
        z = real(f"{type(self).__name__} noise_multiplier", noise_multiplier, at_least=0)
        share = (z * self.l2_sensitivity) ** 2 / self.clients_in_sum
        return dataclasses.replace(self, local_variance=share)

    def unamplified(self) -> Self:
        """The same sum without amplification by sampling: the epsilon against the server."""
        return dataclasses.replace(self, cohort_size=None, population=None)

    @classmethod
    def from_pipeline(
        cls,
        *,
        clip: float,
        scale: float,
        dimension: int,
        local_variance: float,
        clients_in_sum: int,
        beta: float = 0.0,
        sampling: CohortSampling | None = None,
        population: int | None = None,
        cohort_size: int | None = None,
    ) -> Self:
        """One round of the distributed pipeline, its sensitivities as the papers have them.

        ``clip`` is the L2 clip in model units, ``scale`` what the clipped update
        is multiplied by before rounding, ``dimension`` the rounded vector's
        (padded) dimension and ``beta`` conditional rounding's parameter (0:
        plain randomized rounding). The L2 sensitivity is
        :func:`~flowerpets.dp._primitives.calibration.rounded_l2_bound` of
        ``clip * scale``, the L1 one its
        :func:`~flowerpets.dp._primitives.calibration.rounded_l1_bound`.

        ``sampling`` (with ``population``) says how the cohort was drawn:
        fixed-size sampling amplifies at ``size / population``, Poisson
        sampling at the size it drew (``cohort_size``, required), full
        participation (or None) not at all.
        """
        clip = real("clip", clip, above=0)
        scale = real("scale", scale, above=0)
        l2 = rounded_l2_bound(clip * scale, dimension=dimension, beta=beta)
        cohort = _cohort(sampling, population, cohort_size)
        return cls(
            local_variance=local_variance,
            clients_in_sum=clients_in_sum,
            l2_sensitivity=l2,
            l1_sensitivity=rounded_l1_bound(l2, dimension=dimension),
            dimension=dimension,
            scale=scale,
            cohort_size=cohort[0],
            population=cohort[1],
        )


def _cohort(
    sampling: CohortSampling | None, population: int | None, cohort_size: int | None
) -> tuple[int | None, int | None]:
    """(cohort size, population) for amplification, or (None, None) for none."""
    if sampling is None or isinstance(sampling, FullParticipation):
        return None, None
    if population is None:
        raise ParameterValueError(f"amplification by {sampling!r} needs the population size")
    if isinstance(sampling, FixedSizeSampling):
        return min(sampling.size, population), population
    if isinstance(sampling, PoissonSampling):
        if cohort_size is None:
            raise ParameterValueError(
                "Poisson sampling amplifies at the cohort size it drew: give cohort_size"
            )
        return cohort_size, population
    raise PrivacyAccountingError(
        f"cannot tell how much {sampling!r} amplifies privacy: use FullParticipation, "
        "FixedSizeSampling or PoissonSampling"
    )


@dataclass(frozen=True)
class SkellamEvent(DistributedEvent):
    """A sum of Skellam noise shares (Agarwal, Kairouz and Liu, NeurIPS 2021): the default.

    Each client adds ``Poisson(mu / 2) - Poisson(mu / 2)`` to every coordinate,
    ``mu = local_variance`` being the share's variance; the sum of
    ``clients_in_sum`` shares is Skellam of variance ``clients_in_sum * mu``,
    exactly. Accounted by the paper's RDP bound (Theorem 3.5), under zero-out
    or replace-one neighbouring. See :class:`DistributedEvent` for the fields.
    """


@dataclass(frozen=True)
class DistributedDiscreteGaussianEvent(DistributedEvent):
    """A sum of discrete Gaussian shares (Kairouz, Liu and Steinke, ICML 2021).

    Each client adds ``N_Z(0, sigma^2)`` to every coordinate, with
    ``sigma^2 = local_variance`` the discrete Gaussian's parameter (its true
    variance is slightly below). A sum of discrete Gaussians is not one: the
    paper's bound (Theorem 1, Proposition 14) pays for the difference, and
    needs ``sigma >= 1/2`` (below it the epsilon is infinite). See
    :class:`DistributedEvent` for the fields.
    """


PrivacyEvent = (
    FullParticipationGaussian
    | PoissonSampledGaussian
    | FixedSizeSampledGaussian
    | Laplace
    | SkellamEvent
    | DistributedDiscreteGaussianEvent
)
"""Any event an accountant composes."""

"""What a privacy accountant composes: the mechanisms our runs apply, as frozen events.

Every Gaussian event states its noise as a **noise multiplier**: the noise's
standard deviation divided by the L2 bound on one participant's contribution
(the clipping norm C). That is the number a mod is configured with; the
accountants translate it to each library's convention for the neighbouring
relation in use (see :class:`Neighbouring`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from flowerpets._validation import integer, probability, real
from flowerpets.exceptions import ParameterValueError

__all__ = [
    "FixedSizeSampledGaussian",
    "FullParticipationGaussian",
    "Laplace",
    "Neighbouring",
    "PoissonSampledGaussian",
    "PrivacyEvent",
]


class Neighbouring(Enum):
    """Which datasets count as neighbours: what the epsilon protects.

    ``ADD_OR_REMOVE``: one participant (a client, or a training example) is
    present or absent; the L2 sensitivity of a sum clipped to C is C. The natural
    relation for Poisson sampling and full participation.

    ``REPLACE_ONE``: one participant's data is swapped for anything else, and
    the population size is public; the sensitivity of a clipped sum is 2C. The
    relation under which fixed-size sampling without replacement is analysed.
    """

    ADD_OR_REMOVE = "add-or-remove"
    REPLACE_ONE = "replace-one"

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


PrivacyEvent = (
    FullParticipationGaussian | PoissonSampledGaussian | FixedSizeSampledGaussian | Laplace
)
"""Any event an accountant composes."""

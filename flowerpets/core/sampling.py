"""How a round's cohort is drawn from the available nodes.

The sampling is an object, not a flag, because privacy accounting depends on
it: Poisson sampling and fixed-size sampling without replacement amplify
privacy differently, and full participation not at all. A server mod reads
``request.sampling`` to know which one really happened.

Draws use the generator the server passes in. The server seeds it from the
OS's secure source unless a run asks for a seed, so which nodes take part in a
round cannot be predicted by an outsider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from flowerpets._validation import integer, probability
from flowerpets.exceptions import ParameterValueError

__all__ = ["CohortSampling", "FixedSizeSampling", "FullParticipation", "PoissonSampling"]


@runtime_checkable
class CohortSampling(Protocol):
    """Draws a cohort from the node ids available in a round."""

    def sample(self, node_ids: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]: ...

    def expected_size(self, population: int) -> float:
        """The expected cohort size for a population of ``population`` nodes."""
        ...


@dataclass(frozen=True, slots=True)
class FullParticipation:
    """Every available node takes part in every round."""

    def sample(self, node_ids: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(node_ids)

    def expected_size(self, population: int) -> float:
        return float(population)


@dataclass(frozen=True, slots=True)
class FixedSizeSampling:
    """``size`` nodes drawn uniformly without replacement each round."""

    size: int

    def __post_init__(self) -> None:
        integer("FixedSizeSampling size", self.size, at_least=1)

    def sample(self, node_ids: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        if self.size > len(node_ids):
            raise ParameterValueError(
                f"cannot sample a cohort of {self.size} from {len(node_ids)} available nodes"
            )
        picked = rng.choice(len(node_ids), size=self.size, replace=False)
        return tuple(node_ids[i] for i in sorted(picked.tolist()))

    def expected_size(self, population: int) -> float:
        return float(min(self.size, population))


@dataclass(frozen=True, slots=True)
class PoissonSampling:
    """Each node takes part independently with probability ``rate`` (cohorts may be empty)."""

    rate: float

    def __post_init__(self) -> None:
        probability("PoissonSampling rate", self.rate, zero=False)

    def sample(self, node_ids: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        keep = rng.random(len(node_ids)) < self.rate
        return tuple(node for node, k in zip(node_ids, keep.tolist(), strict=True) if k)

    def expected_size(self, population: int) -> float:
        return self.rate * population

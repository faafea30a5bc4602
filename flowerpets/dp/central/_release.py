"""The noise a central-DP round releases: its calibration, and the noised sum.

Each round releases ``w + (sum of clipped updates + N(0, (z_update C)^2)) / m``
with the fixed denominator ``m``, the *expected* cohort (McMahan et al., ICLR
2018). With adaptive clipping the unclipped count is a second Gaussian release,
and the total noise multiplier ``z`` is split between the two (Andrew et al.,
2021; :func:`~flowerpets.dp._primitives.calibration.split_noise_multiplier`).
The noise goes in through :meth:`RoundResult.add_to_sum`, so it works on a plain
sum and on a sealed one (homomorphic encryption) alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowerpets.core import ArrayRecord, RoundResult
from flowerpets.dp._primitives.calibration import split_noise_multiplier
from flowerpets.dp._primitives.noise import GaussianSource
from flowerpets.dp.central._adaptive import AdaptiveClipping
from flowerpets.exceptions import RoundFailedError

__all__ = ["noised", "noised_models", "update_multiplier"]


def update_multiplier(
    noise_multiplier: float, adaptive: AdaptiveClipping | None, expected: float
) -> float:
    """The update's share of the total ``noise_multiplier`` (all of it without adaptive clipping).

    Raises :class:`~flowerpets.exceptions.InfeasibleParametersError` if the
    count's noise is too small to leave the update any.
    """
    if adaptive is None:
        return noise_multiplier
    return split_noise_multiplier(noise_multiplier, adaptive.count_noise(expected))


def noised(
    result: RoundResult, model: ArrayRecord, std: float, expected: float, noise: GaussianSource
) -> RoundResult:
    """``result`` with N(0, std^2) and ``expected * model`` added, total weight ``expected``."""
    if result.sealed is None and any(name not in result.aggregate for name in model):
        # Nobody replied: the release is still the model plus noise, as the DP analysis says.
        aggregate = ArrayRecord(result.aggregate)
        for name, array in model.items():
            if name not in aggregate:
                aggregate[name] = np.zeros(array.shape)
        result = result.replace(aggregate=aggregate)
    additions: dict[str, Any] = {}
    for name, array in model.items():
        values = noise.normal(std, array.shape)
        values += expected * np.asarray(array.numpy(), dtype=np.float64)
        additions[name] = values
    # The release is w + (sum + noise) / m whoever replied, none included: FedAvg must not
    # fail the round for too few replies (min_nodes), which would reveal how many replied.
    return result.add_to_sum(additions).replace(total_weight=expected, fixed_denominator=True)


def noised_models(result: RoundResult, std: float, noise: GaussianSource) -> RoundResult:
    """The sealed-model variant: the replies are models, so the mean divides by their count.

    The server cannot add ``m`` times a model it cannot read. Each client sent
    ``received + clipped update`` instead, so the sum holds ``m'`` copies of
    the model, and the denominator must be ``m'``, the number of replies. That
    is post-processing of the noised sum only if ``m'`` is public: true when the
    cohort is fixed in advance and dropping out does not depend on the data,
    which is why Poisson sampling is refused here.
    """
    if not result.participants:
        raise RoundFailedError(f"round {result.round}: no node replied", failures=result.failures)
    additions = {name: noise.normal(std, shape) for name, shape in result.shapes().items()}
    return result.add_to_sum(additions).replace(total_weight=float(len(result.participants)))

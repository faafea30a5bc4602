"""Privacy accounting: the events our runs produce, and accountants over dp-accounting.

.. code-block:: python

    from flowerpets.dp.accountant import PldAccountant, PoissonSampledGaussian

    accountant = PldAccountant()
    accountant.compose(PoissonSampledGaussian(noise_multiplier=1.1, sample_rate=0.01), 1000)
    accountant.get_epsilon(1e-5)  # ~1.5

:class:`PldAccountant` is the default and the tightest, also for fixed-size
cohorts (sampling without replacement, under replace-one neighbouring);
:class:`RdpAccountant` is faster and looser. :func:`calibrate_noise_multiplier`
finds the noise for a target epsilon through either. The ``flowerpets
accountant`` command line wraps the same functions.

Distributed DP (each client adds a discrete noise share before SecAgg+):
:class:`SkellamEvent` and :class:`DistributedDiscreteGaussianEvent`, built with
``from_pipeline(...)``, accounted by :class:`RdpAccountant` under zero-out
neighbouring; :func:`calibrate_distributed_noise` finds each client's share,
and :class:`DropoutPolicy` says how dropouts are counted.
"""

from __future__ import annotations

from flowerpets.dp.accountant.accountants import (
    ACCOUNTANTS,
    Accountant,
    AccountantFactory,
    PldAccountant,
    RdpAccountant,
    calibrate_distributed_noise,
    calibrate_noise_multiplier,
    default_accountant,
    default_neighbouring,
    event_for_round,
)
from flowerpets.dp.accountant.events import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    DropoutPolicy,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "AccountantFactory",
    "DistributedDiscreteGaussianEvent",
    "DistributedEvent",
    "DropoutPolicy",
    "FixedSizeSampledGaussian",
    "FullParticipationGaussian",
    "Laplace",
    "Neighbouring",
    "PldAccountant",
    "PoissonSampledGaussian",
    "PrivacyEvent",
    "RdpAccountant",
    "SkellamEvent",
    "calibrate_distributed_noise",
    "calibrate_noise_multiplier",
    "default_accountant",
    "default_neighbouring",
    "event_for_round",
]

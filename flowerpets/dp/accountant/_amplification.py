"""Amplification by a random cohort for any RDP curve: general bounds, at integer orders.

dp-accounting amplifies only Gaussians; the distributed mechanisms have their
own RDP curves (:mod:`._discrete`), so the amplification is computed here, by
two published bounds that hold for *any* mechanism. The cohort is a uniformly
random ``m`` of the ``N`` clients (``gamma = m / N``), and the mechanism runs on
the cohort.

**Sampling without replacement** (Wang, Balle and Kasiviswanathan, "Subsampled
Renyi differential privacy and analytical moments accountant", AISTATS 2019,
Theorem 9). If the mechanism is ``(alpha, eps(alpha))``-RDP for cohorts that
differ in one client replaced by another, then for integer ``alpha >= 2`` the
sampled mechanism is RDP under replace-one with

    eps'(alpha) <= 1 / (alpha - 1) log(1
                       + gamma^2 C(alpha, 2) min(4 (e^eps(2) - 1), 2 e^eps(2))
                       + sum_{j=3}^{alpha} 2 gamma^j C(alpha, j) e^{(j - 1) eps(j)}).

This is the theorem with ``eps(inf) = inf`` (the terms ``min(2, (e^eps(inf) -
1)^j)`` are 2), which holds for every mechanism; dp-accounting's
``SampledWithoutReplacementDpEvent`` computes the same sum with a sharper
Gaussian-only term (their Theorem 27), which the tests compare against.

**Joint convexity.** Couple the two runs on the same cohort: with probability
``1 - gamma`` the client that differs is not in it and the outputs have the
same law; otherwise they are the mechanism on two cohorts that differ in that
one client's data. ``E_Q[(P / Q)^alpha]`` is an f-divergence, jointly convex, so

    eps'(alpha) <= 1 / (alpha - 1) log(1 - gamma + gamma e^{(alpha - 1) eps(alpha)}),

with ``eps`` the divergence for cohorts that differ only in that client's data
(not in who is in them). It is weaker than the first at small ``gamma`` but
holds under zero-out neighbouring with the zero-out sensitivity, where the
first needs the replace-one one; the accountant takes the smaller.

Neither bound is ever above the unamplified ``eps(alpha)``, and the accountant
also takes the minimum with it.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from flowerpets.dp.accountant._discrete import Floats, IntegerRdp

__all__ = ["mixed_cohort_rdp", "without_replacement_rdp"]


def without_replacement_rdp(base: IntegerRdp, gamma: float) -> IntegerRdp:
    """WBK19's Theorem 9 for a cohort drawn without replacement at rate ``gamma``."""
    from scipy.special import gammaln, logsumexp  # scipy: loaded with dp-accounting anyway

    def rdp(alphas: NDArray[np.int64]) -> Floats:
        top = int(alphas.max())
        j = np.arange(2, top + 1, dtype=np.int64)
        eps = base(j)  # eps[k] is eps(k + 2)
        if gamma == 1.0:
            return np.asarray(eps[alphas - 2], dtype=np.float64)
        eps2 = float(eps[0])
        if math.isinf(eps2):
            return np.full(alphas.shape, np.inf)
        log_gamma = math.log(gamma)
        # log min(4 (e^eps2 - 1), 2 e^eps2); e^eps2 - 1 computed without cancellation.
        log_second = min(
            math.log(4) + eps2 + math.log(-math.expm1(-eps2)) if eps2 > 0 else -math.inf,
            math.log(2) + eps2,
        )
        out = np.empty(alphas.shape, dtype=np.float64)
        for i, alpha in enumerate(alphas.tolist()):
            terms = [0.0]
            log_comb2 = float(gammaln(alpha + 1) - gammaln(3) - gammaln(alpha - 1))
            terms.append(2 * log_gamma + log_comb2 + log_second)
            if alpha >= 3:
                k = np.arange(3, alpha + 1, dtype=np.float64)
                log_comb = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
                rest = math.log(2) + k * log_gamma + log_comb + (k - 1) * eps[1 : alpha - 1]
                terms.extend(rest.tolist())
            out[i] = float(logsumexp(terms)) / (alpha - 1)
        return out

    return rdp


def mixed_cohort_rdp(base: IntegerRdp, gamma: float) -> IntegerRdp:
    """The joint-convexity bound, the differing client in the cohort with probability ``gamma``."""

    def rdp(alphas: NDArray[np.int64]) -> Floats:
        eps = base(alphas)
        a = alphas.astype(np.float64)
        if gamma == 1.0:
            return eps
        with np.errstate(over="ignore"):
            mixed = np.logaddexp(math.log1p(-gamma), math.log(gamma) + (a - 1) * eps)
        return np.asarray(mixed / (a - 1), dtype=np.float64)

    return rdp

"""RDP of a sum of discrete noise shares: the Skellam and distributed discrete Gaussian bounds.

Each client adds integer noise to its rounded integer update; the server sees
only the sum. The papers bound the Renyi divergence between the summed noise
and the summed noise shifted by an integer vector ``Delta`` with
``||Delta||_2 <= Delta_2`` and ``||Delta||_1 <= Delta_1`` (the sensitivities
after scaling and rounding: :func:`~flowerpets.dp._primitives.calibration.rounded_l2_bound`).
Both bounds grow with ``Delta_2`` and ``Delta_1``, so bounds on the norms give
bounds on the divergence.

**Skellam** (Agarwal, Kairouz and Liu, "The Skellam mechanism for
differentially private federated learning", NeurIPS 2021, Theorem 3.5). Noise
``Poisson(mu / 2) - Poisson(mu / 2)`` per coordinate has variance ``mu``; a sum
of independent Skellams is Skellam, so ``n`` clients adding variance ``mu_i``
each give variance ``V = n mu_i`` exactly. For integer ``alpha > 1``:

    eps(alpha) <= alpha Delta_2^2 / (2 V)
                  + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 V^2), 3 Delta_1 / (2 V)).

The first term is the Gaussian mechanism's with variance ``V``; the rest is
the price of being discrete, which vanishes as ``V`` grows. (Written with the
two Poissons' mean ``lambda = V / 2`` the same bound reads
``alpha Delta_2^2 / (4 lambda) + min(... / (16 lambda^2), 3 Delta_1 / (4 lambda))``.)

**Distributed discrete Gaussian** (Kairouz, Liu and Steinke, "The distributed
discrete Gaussian mechanism for federated learning with secure aggregation",
ICML 2021, Theorem 1 and Proposition 14). A sum of ``n`` discrete Gaussians
``N_Z(0, sigma^2)`` (``sigma >= 1/2``) is not a discrete Gaussian, but close to
one: with ``s^2 = n sigma^2`` and

    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)),

for every ``alpha >= 1``, ``eps(alpha)`` is at most each of

    alpha Delta_2^2 / (2 s^2) + alpha tau d / 4           (Theorem 1, first branch)
    alpha / 2 (Delta_2 / s + tau sqrt(d))^2               (Theorem 1, second branch)
    alpha Delta_2^2 / (2 s^2) + tau d                     (Proposition 14)
    alpha / 2 (Delta_2^2 / s^2 + 2 tau Delta_1 / s + tau^2 d)   (Proposition 14)

in dimension ``d``. ``tau`` grows with ``n`` while the Gaussian term shrinks,
so at tiny ``sigma`` the bound for ``n`` clients can exceed the bound for
fewer; but the sum of ``n`` shares is the sum of ``m < n`` shares plus
independent noise (post-processing), so the bound for any ``m <= n`` holds for
``n`` too, and the smallest over a few ``m`` is used. Below ``sigma = 1/2`` the
theorem says nothing, and the divergence is reported as infinite.

Both are evaluated at integer orders (as the Skellam theorem is stated);
Theorem 1, stated for every real order, is also evaluated at the fractional
ones. At a fractional order ``alpha`` the cumulant ``(alpha - 1) eps(alpha)`` is convex in
``alpha`` (it is the log of a moment generating function), so interpolating it
linearly between the integers around ``alpha`` is again an upper bound (as
Wang, Balle and Kasiviswanathan, AISTATS 2019, Corollary 10, do for sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "IntegerRdp",
    "at_orders",
    "distributed_discrete_gaussian_rdp",
    "skellam_rdp",
]

Floats = NDArray[np.float64]
IntegerRdp = Callable[[NDArray[np.int64]], Floats]
"""An RDP bound as a function of integer orders (each at least 2)."""

# KLS21's Theorem 1 needs sigma >= 1/2.
_DG_MIN_SIGMA_SQUARED = 0.25


def skellam_rdp(variance: float, l2: float, l1: float) -> IntegerRdp:
    """AKL21's bound for Skellam noise of total variance ``variance`` per coordinate."""

    def rdp(alphas: NDArray[np.int64]) -> Floats:
        a = alphas.astype(np.float64)
        if variance == 0:
            return np.full_like(a, np.inf)
        discrete = np.minimum(
            ((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance)
        )
        return np.asarray(a * l2**2 / (2 * variance) + discrete, dtype=np.float64)

    return rdp


def _tau(sigma_squared: float, clients: int) -> float:
    k = np.arange(1, clients, dtype=np.float64)
    return float(10 * np.exp(-2 * math.pi**2 * sigma_squared * k / (k + 1)).sum())


def _counts_to_try(clients: int) -> list[int]:
    """``clients`` and the powers of two below it: each is a valid count to bound with."""
    counts = {clients}
    power = 1
    while power < clients:
        counts.add(power)
        power *= 2
    return sorted(counts)


def distributed_discrete_gaussian_rdp(
    sigma_squared: float,
    clients: int,
    l2: float,
    l1: float,
    dimension: int,
    *,
    theorem_1_only: bool = False,
) -> Callable[[NDArray[np.generic]], Floats]:
    """KLS21's bound for ``clients`` discrete Gaussian shares ``N_Z(0, sigma_squared)``.

    ``theorem_1_only``: only Theorem 1's two branches, which the paper states
    for every real ``alpha >= 1`` (so they may be evaluated at fractional orders
    directly); otherwise all four bounds, at integer orders.
    """

    def one_count(a: Floats, count: int) -> Floats:
        s2 = count * sigma_squared
        s = math.sqrt(s2)
        tau = _tau(sigma_squared, count)
        d = float(dimension)
        gaussian = a * l2**2 / (2 * s2)
        theorem_1 = [gaussian + a * tau * d / 4, a / 2 * (l2 / s + tau * math.sqrt(d)) ** 2]
        proposition_14 = [
            gaussian + tau * d,
            a / 2 * (l2**2 / s2 + 2 * tau * l1 / s + tau**2 * d),
        ]
        bounds = theorem_1 if theorem_1_only else theorem_1 + proposition_14
        return np.asarray(np.minimum.reduce(bounds), dtype=np.float64)

    def rdp(alphas: NDArray[np.generic]) -> Floats:
        a = alphas.astype(np.float64)
        if sigma_squared < _DG_MIN_SIGMA_SQUARED:
            return np.full_like(a, np.inf)
        bounds = [one_count(a, m) for m in _counts_to_try(clients)]
        return np.asarray(np.minimum.reduce(bounds), dtype=np.float64)

    return rdp


def at_orders(bound: IntegerRdp, orders: NDArray[np.float64]) -> Floats:
    """``bound`` at any orders > 1: exact at integers, the interpolated cumulant between them."""
    orders = np.asarray(orders, dtype=np.float64)
    low = np.floor(orders).astype(np.int64)
    high = np.ceil(orders).astype(np.int64)
    integers = np.unique(np.concatenate([low, high]))
    integers = integers[integers >= 2]
    values = dict(zip(integers.tolist(), bound(integers).tolist(), strict=True))

    def cumulant(alpha: int) -> float:
        # (alpha - 1) eps(alpha); zero at alpha = 1, where the divergence vanishes.
        return 0.0 if alpha == 1 else (alpha - 1) * values[alpha]

    result = np.empty_like(orders)
    for i, (order, lo, hi) in enumerate(
        zip(orders.tolist(), low.tolist(), high.tolist(), strict=True)
    ):
        if lo == hi:
            result[i] = values[lo]
        else:
            t = order - lo
            result[i] = ((1 - t) * cumulant(lo) + t * cumulant(hi)) / (order - 1)
    return result

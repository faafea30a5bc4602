"""Distributed DP's integer pipeline: a client's update to residues mod ``m``, a sum back.

The pipeline of Kairouz, Liu and Steinke ("The distributed discrete Gaussian
mechanism for federated learning with secure aggregation", ICML 2021,
Algorithm 1; KLS21 below) and Agarwal, Kairouz and Liu ("The Skellam
mechanism for differentially private federated learning", NeurIPS 2021; AKL21),
with ``gamma = 1 / scale``:

**A client** (:func:`encode`):

1. **Clip** the update to L2 norm ``clip`` (:func:`~.clip.clip_update`, whose
   bound holds after its own rounding); the returned flag says whether it
   was scaled down, for adaptive clipping.
2. **Rotate** by the round's randomized Hadamard ``U`` (:mod:`.rotation`),
   padding ``d`` coordinates to ``D``: norms are kept, the mass is spread.
3. **Scale** by ``scale``: one integer step is worth ``1 / scale``.
4. **Round** each coordinate to an integer, up with probability its
   fractional part (unbiased), from the secure source; *conditionally*: again,
   until the rounded vector's L2 norm is at most :attr:`Encoding.norm_bound`
   (:func:`conditional_round`). That bound is the sum's L2 sensitivity, so
   it is enforced exactly (in integers), whatever the floating point did.
5. **Noise**: add the caller's integer noise share (Skellam or the discrete
   Gaussian, from :mod:`.discrete`).
6. **Wrap** modulo ``m = 2**modulus_bits``: ``uint32`` residues, what a
   :class:`~flowerpets.core.QuantizedDomain` names and SecAgg+ sums modulo ``m``.

**The server** (:func:`decode`) receives only the residues' sum mod ``m``
(SecAgg+ unmasks nothing else): it lifts it to the centred interval
``(-m/2, m/2]``, divides by ``scale`` and unrotates. The result is the sum of
the clipped updates plus the rounding errors and the noise, both rotated
back and divided by ``scale``: per coordinate, in expectation over the
rotation, variance ``n (local noise variance + 1/4) / scale^2`` at most for
``n`` clients (each rounding error has variance at most 1/4; the unrotation
keeps the total).

**Wrap-around** (:func:`wrap_probability`). If a coordinate of the true
integer sum leaves ``(-m/2, m/2]``, the lift returns it off by a multiple of
``m``: an accuracy failure (never a privacy one: the residues' sum is a
function of the noised sum). The bound is a union bound over the ``D``
coordinates of a Chernoff bound on each: see the function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, integer, probability, real
from flowerpets.core.quantized import MAX_MODULUS_BITS, MIN_MODULUS_BITS
from flowerpets.dp._primitives.calibration import rounded_l1_bound, rounded_l2_bound
from flowerpets.dp._primitives.clip import clip_update
from flowerpets.dp._primitives.discrete import RandomWords
from flowerpets.dp._primitives.rotation import RandomizedHadamard, padded_dimension
from flowerpets.dp.accountant.events import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    SkellamEvent,
)
from flowerpets.exceptions import (
    ConditionalRoundingError,
    InvalidUpdateError,
    ParameterTypeError,
    ParameterValueError,
)

__all__ = [
    "DEFAULT_BETA",
    "MAX_MODULUS_BITS",
    "Encoding",
    "conditional_round",
    "coordinate_wrap_probability",
    "decode",
    "encode",
    "fits_modulus",
    "lift",
    "wrap_probability",
]

DEFAULT_BETA = math.exp(-0.5)  # KLS21's experiments
# The scaled clip's cap: every rounded value and its float stay exact integers below 2**53.
_MAX_SCALED_CLIP = float(2**50)
# Conditional rounding retries until the chance that every try failed is below 2**-40.
_ROUNDING_FAILURE_BITS = 40
_NAME = "update"
_ROUND_BLOCK = 1 << 16  # values per block of the rounding: its temporaries stay in the cache


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """How one round maps updates to integers mod ``2**modulus_bits``, shared by all its clients.

    ``scale`` is ``1 / gamma``: one integer step is worth ``1 / scale`` in model
    units. ``clip`` is the L2 bound on an update before scaling, ``dimension``
    the update's length ``d`` (rotated and rounded in :attr:`padded` ``= D``
    coordinates), ``modulus_bits`` the ring's (2 to 32, the core's
    :class:`~flowerpets.core.QuantizedDomain` range), ``beta`` conditional
    rounding's parameter, in [0, 1) (0: plain randomized rounding, whose bound
    ``clip * scale + sqrt(D)`` needs no retry; KLS21 use ``exp(-0.5)``, the default).
    """

    scale: float
    clip: float
    dimension: int
    modulus_bits: int = MAX_MODULUS_BITS
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        real("scale", self.scale, above=0)
        real("clip", self.clip, above=0, secret=True)  # adaptive clipping learns it from data
        integer("dimension", self.dimension, at_least=1)
        integer(
            "modulus_bits", self.modulus_bits, at_least=MIN_MODULUS_BITS, at_most=MAX_MODULUS_BITS
        )
        probability("beta", self.beta, one=False)
        if not self.scaled_clip <= _MAX_SCALED_CLIP:
            raise ParameterValueError(
                "clip * scale must be at most 2**50 for exact integer rounding (lower the scale)"
            )

    @property
    def padded(self) -> int:
        """``D``: the rotated and rounded vector's dimension (the accounting's)."""
        return padded_dimension(self.dimension)

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def scaled_clip(self) -> float:
        """The clipped update's L2 bound in integer steps: ``clip * scale``."""
        return self.clip * self.scale

    @functools.cached_property  # every client's encode asks
    def norm_bound(self) -> float:
        """The L2 bound after rounding (:func:`~.calibration.rounded_l2_bound`): the sensitivity."""
        return rounded_l2_bound(self.scaled_clip, dimension=self.padded, beta=self.beta)

    @functools.cached_property
    def l1_bound(self) -> float:
        """The rounded vector's L1 bound (:func:`~.calibration.rounded_l1_bound`)."""
        return rounded_l1_bound(self.norm_bound, dimension=self.padded)

    @property
    def rounding_tries(self) -> int:
        """How many roundings :func:`encode` tries before giving up (:func:`conditional_round`)."""
        return _tries(self.beta)


def _tries(beta: float) -> int:
    # Each try fails with probability at most beta (KLS21): all fail with at most 2**-40.
    if beta == 0:
        return 2  # the bound always holds; a second try only for float-level doubt
    return max(1, math.ceil(_ROUNDING_FAILURE_BITS * math.log(2) / -math.log(beta)))


class _RoundingScratch:
    """The rounding's per-block temporaries, allocated once per call and reused by each block."""

    def __init__(self, size: int) -> None:
        self.low = np.empty(size)
        self.limit = np.empty(size)
        self.up = np.empty(size, dtype=np.bool_)


def _round_block(
    x: NDArray[np.float64], out: NDArray[np.int64], source: RandomWords, scratch: _RoundingScratch
) -> float:
    """``out = floor(x) + 1`` with probability ``x - floor(x)``, a word each; returns ``||out||^2``.

    A word rounds up when its top 53 bits, ``t``, are below ``f 2**53`` (``f`` the fractional
    part, exact for ``|x| < 2**53``; times a power of two, exact too): for an integer ``t``
    that is ``t < ceil(f 2**53)``, so the chance of rounding up is the fractional part
    rounded up to a multiple of ``2**-53`` (exact for every fraction with 53 bits after the
    point). Every step is exact: ``t`` converts to float64 exactly, and so do the rounded
    integers (below ``2**53``), both ways.
    """
    n = x.size
    low, limit, up = scratch.low[:n], scratch.limit[:n], scratch.up[:n]
    np.floor(x, out=low)
    np.subtract(x, low, out=limit)
    limit *= 2.0**53
    top = source.words(n) >> np.uint64(11)  # a new array: the words may be read-only
    np.less(top, limit, out=up)
    low += up
    np.copyto(out, low, casting="unsafe")  # integers below 2**53: exact
    # Squared and summed by numpy, not BLAS (see clip._sum_of_squares); the caller bounds
    # the error (_within).
    np.multiply(low, low, out=limit)
    return float(np.add.reduce(limit))


def _within(rounded: NDArray[np.int64], squares: float, bound: float) -> bool:
    """``||rounded||_2 <= bound``, decided exactly; ``squares`` is its float sum of squares.

    ``squares`` (summed block by block) is within a relative ``D 2**-52`` of the true
    sum, so only a sum within that slack of ``bound**2`` is decided in exact integers.
    """
    limit = bound * bound
    slack = 4 * rounded.size * 2.0**-52 * max(limit, 1.0)
    if squares < limit - slack:
        return True
    if squares > limit + slack:
        return False
    exact = sum(int(v) * int(v) for v in rounded.tolist())
    return Fraction(exact) <= Fraction(bound) ** 2


def conditional_round(
    x: NDArray[np.float64], *, norm_bound: float, source: RandomWords, tries: int
) -> NDArray[np.int64]:
    """Randomized rounding of ``x``, repeated until the result's L2 norm is at most ``norm_bound``.

    KLS21 (Section 4.1) show that the norm of one randomized rounding exceeds
    :func:`~.calibration.rounded_l2_bound` with probability at most ``beta``;
    so ``tries`` attempts (:attr:`Encoding.rounding_tries`) all fail with
    probability at most ``beta**tries``, and then
    :class:`~flowerpets.exceptions.ConditionalRoundingError` is raised (it
    carries no value). Conditioning biases the rounding slightly towards zero;
    with ``beta = 0`` (a bound that always holds) it is unbiased.

    Each try reads one word of ``source`` per value, in order; the values are rounded
    block by block (:func:`_round_block`), so the temporaries stay in the cache.
    """
    tries = integer("tries", tries, at_least=1)
    array = np.asarray(x, dtype=np.float64)
    values = array.reshape(-1)
    rounded = np.empty(values.size, dtype=np.int64)
    scratch = _RoundingScratch(min(values.size, _ROUND_BLOCK))
    for _ in range(tries):
        squares = 0.0
        for start in range(0, values.size, _ROUND_BLOCK):
            stop = start + _ROUND_BLOCK
            squares += _round_block(values[start:stop], rounded[start:stop], source, scratch)
        if _within(rounded, squares, norm_bound):
            return rounded.reshape(array.shape)
    raise ConditionalRoundingError(
        f"conditional randomized rounding exceeded its L2 bound {tries} times in a row"
    )


def _check_pair(encoding: Encoding, rotation: RandomizedHadamard) -> None:
    instance("encoding", encoding, Encoding)
    instance("rotation", rotation, RandomizedHadamard)
    if rotation.dimension != encoding.dimension:
        raise ParameterValueError(
            f"the rotation is for {rotation.dimension} coordinates, the encoding for "
            f"{encoding.dimension}"
        )


def encode(
    update: NDArray[np.float64],
    *,
    encoding: Encoding,
    rotation: RandomizedHadamard,
    noise: Callable[[int], NDArray[np.int64]],
    source: RandomWords,
) -> tuple[NDArray[np.uint32], bool]:
    """One client's update as ``D`` residues mod ``2**modulus_bits``, and whether it was clipped.

    The steps of the module docstring: clip to ``encoding.clip``, rotate,
    scale, round conditionally (its words from ``source``: pass the secure
    source outside tests), add ``noise(D)`` (``D`` int64 values: a closure over
    :func:`~.discrete.sample_skellam` or
    :func:`~.discrete.sample_discrete_gaussian`), wrap. The flag is True when
    the update's norm exceeded the clip (the adaptive-clipping indicator is its
    negation).

    Raises :class:`~flowerpets.exceptions.InvalidUpdateError` for an update
    of the wrong shape or holding NaN or infinity (the message carries no
    value), and :class:`~flowerpets.exceptions.ConditionalRoundingError` if
    rounding failed every try.
    """
    _check_pair(encoding, rotation)
    array = np.asarray(update)
    if array.shape != (encoding.dimension,) or array.dtype.kind not in "fiu":
        raise InvalidUpdateError(
            f"the update must be a real vector of shape ({encoding.dimension},), "
            f"got {array.dtype} {array.shape}"
        )
    clipped = clip_update({_NAME: array}, encoding.clip)  # refuses NaN and infinity
    flat = rotation.rotate(clipped.arrays[_NAME])
    flat *= encoding.scale
    rounded = conditional_round(
        flat, norm_bound=encoding.norm_bound, source=source, tries=encoding.rounding_tries
    )
    shares = np.asarray(noise(encoding.padded))
    if shares.shape != (encoding.padded,) or shares.dtype.kind not in "iu":
        raise ParameterValueError(
            f"the noise must be {encoding.padded} integers, got {shares.dtype} {shares.shape}"
        )
    rounded += shares.astype(np.int64, copy=False)
    # Two's complement is arithmetic mod 2**64, so its low bits are the value mod 2**bits:
    # the cast to uint32 keeps the low 32 (integer casts wrap), the mask the rest.
    residues = rounded.astype(np.uint32)
    if encoding.modulus_bits < MAX_MODULUS_BITS:
        residues &= np.uint32(encoding.modulus - 1)
    return residues, clipped.norm > encoding.clip


def lift(residues: NDArray[np.unsignedinteger], modulus_bits: int) -> NDArray[np.int64]:
    """Residues mod ``m = 2**modulus_bits`` as the integers in ``(-m/2, m/2]`` they stand for."""
    bits = integer(
        "modulus_bits", modulus_bits, at_least=MIN_MODULUS_BITS, at_most=MAX_MODULUS_BITS
    )
    array = np.asarray(residues)
    if array.dtype.kind != "u":
        raise ParameterTypeError(f"residues must be unsigned integers, got {array.dtype}")
    m = 1 << bits
    reduced = np.bitwise_and(array, np.uint64(m - 1), dtype=np.uint64)
    out = reduced.view(np.int64)  # below 2**32: the same values
    np.subtract(out, m, out=out, where=out > m // 2)
    return out


def decode(
    residue_sum: NDArray[np.uint64], *, encoding: Encoding, rotation: RandomizedHadamard
) -> NDArray[np.float64]:
    """The sum of the clients' noised updates, in model units, from their residues' sum.

    ``residue_sum`` holds ``D`` unsigned integers (any width; only their value
    mod ``2**modulus_bits`` counts): the sum, not a mean. It is lifted to
    ``(-m/2, m/2]``, divided by ``scale`` and unrotated to ``d`` coordinates.
    Exact unless a coordinate of the true integer sum left that interval
    (:func:`wrap_probability`).
    """
    _check_pair(encoding, rotation)
    array = np.asarray(residue_sum)
    if array.shape != (encoding.padded,):
        raise ParameterValueError(
            f"the residues' sum must have shape ({encoding.padded},), got {array.shape}"
        )
    centred = lift(array, encoding.modulus_bits).astype(np.float64)
    centred /= encoding.scale
    return rotation.unrotate(centred, overwrite_input=True)


# -- wrap-around ---------------------------------------------------------------------------------
def _skellam_log_mgf(total: float, t: float) -> float:
    # A share of variance v is Poisson(v/2) - Poisson(v/2): log E[e^(tX)] = v (cosh t - 1),
    # written 2 v sinh(t/2)^2 so that a small t loses no digits.
    return 2.0 * total * math.sinh(t / 2.0) ** 2


def _skellam_slope(total: float, t: float) -> float:
    return total * math.sinh(t)


def _gaussian_log_mgf(total: float, t: float) -> float:
    # Canonne, Kamath and Steinke (NeurIPS 2020): N_Z(0, s^2)'s MGF is at most N(0, s^2)'s.
    return total * t * t / 2.0


def _gaussian_slope(total: float, t: float) -> float:
    return total * t


_Curve = tuple[Callable[[float, float], float], Callable[[float, float], float]]
_NOISE_MGF: dict[type[DistributedEvent], _Curve] = {
    SkellamEvent: (_skellam_log_mgf, _skellam_slope),
    DistributedDiscreteGaussianEvent: (_gaussian_log_mgf, _gaussian_slope),
}


def _log_tail(margin: float, proxy: float, noise_total: float, curve: _Curve) -> float:
    """``min_t [-t margin + t^2 proxy / 2 + K(t)]``: the log Chernoff bound on ``P[X >= margin]``.

    ``X`` is a sub-Gaussian term of variance proxy ``proxy`` plus the summed
    noise, of log-MGF ``K`` (the noise's total parameter ``noise_total``). The
    exponent is convex in ``t``; its slope is found zero by bisection.
    """
    if margin <= 0:
        return 0.0
    log_mgf, slope = curve
    if proxy == 0 and noise_total == 0:
        return -math.inf  # nothing random, and the margin is positive
    if curve is _NOISE_MGF[DistributedDiscreteGaussianEvent] or noise_total == 0:
        return -(margin**2) / (2.0 * (proxy + noise_total))  # Gaussian: the closed form
    if proxy == 0:  # Skellam alone: at sinh t = margin / total, cosh t = sqrt(1 + ...)
        ratio = margin / noise_total
        # sqrt(1 + r^2) - 1, without cancelling digits for a small r.
        rise = ratio * ratio / (math.hypot(1.0, ratio) + 1.0)
        return -margin * math.asinh(ratio) + noise_total * rise
    low, high = 0.0, min(margin / proxy, math.asinh(margin / noise_total))
    for _ in range(200):
        middle = (low + high) / 2
        if -margin + middle * proxy + slope(noise_total, middle) > 0:
            high = middle
        else:
            low = middle
    t = (low + high) / 2
    return -t * margin + t * t * proxy / 2.0 + log_mgf(noise_total, t)


def coordinate_wrap_probability(
    encoding: Encoding,
    *,
    clients: int,
    local_variance: float,
    mechanism: type[DistributedEvent] = SkellamEvent,
) -> float:
    """An upper bound on the chance that one given coordinate of the summed integers wraps.

    ``clients`` is the most clients whose residues are summed, each adding
    noise of ``local_variance`` in integer units, in the accountant's
    convention: for ``mechanism`` :class:`~flowerpets.dp.accountant.SkellamEvent`
    the Skellam share's variance, for
    :class:`~flowerpets.dp.accountant.DistributedDiscreteGaussianEvent` the
    discrete Gaussian's ``sigma^2``.

    Coordinate ``j`` of the true sum is ``S_j = Z_j + R_j + N_j``: the rotated
    scaled clipped updates, the rounding errors and the noise. It wraps iff
    ``|S_j| >= m/2`` (``-m/2`` lifts to ``+m/2``), and:

    * ``|R_j| < n``: each rounding moves a coordinate by less than 1;
    * ``Z_j`` is sub-Gaussian with variance proxy ``(n clip scale)^2 / D``
      (the rotation's random signs, Hoeffding's lemma; KLS21 Section 4 and
      AKL21 Section 4 flatten with the same bound), for updates chosen
      independently of the round's seed;
    * ``N_j`` is a sum of ``n`` shares: Skellam, log-MGF ``n v (cosh t - 1)``
      exactly; discrete Gaussian, at most ``n sigma^2 t^2 / 2`` (Canonne,
      Kamath and Steinke, NeurIPS 2020). It is independent of ``Z_j``.

    So ``P[|S_j| >= m/2] <= 2 min_t exp(-t a + t^2 proxy / 2 + K(t))`` with
    ``a = m/2 - n`` (the Chernoff bound on both tails of symmetric terms). A
    second bound needs no rotation: ``|Z_j + R_j| <= n min(clip scale + 1,
    norm_bound)`` always, leaving the noise alone against the rest of the
    margin. The result is the smaller of the two, at most 1.
    """
    instance("encoding", encoding, Encoding)
    n = integer("clients", clients, at_least=1)
    variance = real("local_variance", local_variance, at_least=0)
    curve = _NOISE_MGF.get(mechanism) if isinstance(mechanism, type) else None
    if curve is None:
        raise ParameterTypeError(
            f"mechanism must be SkellamEvent or DistributedDiscreteGaussianEvent, got {mechanism!r}"
        )
    return math.exp(_log_coordinate_bound(encoding, n, n * variance, curve))


def _log_coordinate_bound(encoding: Encoding, n: int, noise_total: float, curve: _Curve) -> float:
    half = encoding.modulus / 2
    proxy = (n * encoding.scaled_clip) ** 2 / encoding.padded
    rotated = _log_tail(half - n, proxy, noise_total, curve)
    # A coordinate of a rounded vector is within 1 of the scaled clip (the float's doubt: 2**-40).
    reach = min(encoding.scaled_clip * (1 + 2.0**-40) + 1, encoding.norm_bound)
    bounded = _log_tail(half - n * reach, 0.0, noise_total, curve)
    return min(0.0, math.log(2) + min(rotated, bounded))


def wrap_probability(
    encoding: Encoding,
    *,
    clients: int,
    local_variance: float,
    mechanism: type[DistributedEvent] = SkellamEvent,
) -> float:
    """An upper bound on the chance that *any* coordinate of the summed integers wraps.

    The union bound: ``D`` times :func:`coordinate_wrap_probability` (whose
    docstring gives the tail bound and the arguments), at most 1. It is also
    a bound on the expected number of wrapped coordinates, when below 1.
    """
    one = coordinate_wrap_probability(
        encoding, clients=clients, local_variance=local_variance, mechanism=mechanism
    )
    return min(1.0, encoding.padded * one)


def fits_modulus(
    encoding: Encoding,
    *,
    clients: int,
    local_variance: float,
    mechanism: type[DistributedEvent] = SkellamEvent,
    limit: float = 1e-6,
) -> bool:
    """True if :func:`wrap_probability` is at most ``limit``: the configuration to accept."""
    limit = probability("limit", limit)
    bound = wrap_probability(
        encoding, clients=clients, local_variance=local_variance, mechanism=mechanism
    )
    return bound <= limit

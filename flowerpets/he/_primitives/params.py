"""CKKS parameter sets and TenSEAL contexts made, serialized and loaded with checks.

Parameters are chosen for *aggregation*, not for general computation: the
clients pre-multiply their update by their weight and the server only adds
ciphertexts (and plaintexts), so no multiplicative depth is needed. A ring of
degree ``N`` has ``N / 2`` slots; the coefficient modulus is a chain of primes
whose last one is the "special" prime that SEAL keeps for key switching, so a
fresh ciphertext lives modulo the product of the others (the *data* primes).

* **Size.** A ciphertext is two polynomials of ``N`` coefficients per data
  prime, 8 bytes each, for ``N / 2`` values: ``32 * (number of data primes)``
  bytes per value. One data prime gives 8x float32, the floor for CKKS as
  TenSEAL serializes it.
* **Security.** The total coefficient modulus must stay within the
  HomomorphicEncryption.org standard's bound for 128-bit classical security
  with ternary secrets (:data:`MAX_MODULUS_BITS_128`); SEAL refuses more, and
  so do we, before SEAL is asked.
* **Capacity.** A value ``v`` is encoded as ``round(v * 2**scale_bits)`` spread
  over the coefficients, whose magnitude never exceeds ``max |v| * 2**scale_bits``;
  decryption is exact while that plus the noise stays below half the data
  modulus, which is at least ``2**(data_bits - data_primes - 1)``. We keep a
  further factor of two for noise and for what central DP adds, so a sum is
  safe while ``|sum| <= capacity = 2**(data_bits - data_primes - 2 - scale_bits)``.
  Larger sums wrap around silently, so clients check their share first.
* **Precision.** The absolute error of a decrypted sum is about the fresh
  encryption noise over the scale (measured values in :data:`COMPACT` and
  :data:`WIDE`); dividing by the total weight divides it too.

Clients encrypt with the secret key (SEAL's symmetric encryption: half the
time of public-key encryption, and less noise), so the context the server
holds is the parameters alone: no public key, no secret key, no Galois or
relinearization keys. It can load, add and serialize ciphertexts and add
plaintexts; it can neither encrypt nor decrypt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tenseal as ts  # imported where used: loading TenSEAL is paid only by CKKS work

from flowerpets._validation import integer, is_integer
from flowerpets.exceptions import (
    KeyMaterialError,
    MissingKeyError,
    ParameterTypeError,
    ParameterValueError,
)
from flowerpets.he._primitives.canonical import canonical_context

__all__ = [
    "COMPACT",
    "MAX_MODULUS_BITS_128",
    "PARAMETER_SETS",
    "WIDE",
    "CKKSParameters",
    "context_digest",
    "load_public_context",
    "load_secret_context",
    "new_secret_context",
    "public_context_bytes",
    "secret_context_bytes",
]

MAX_MODULUS_BITS_128 = MappingProxyType({4096: 109, 8192: 218, 16384: 438, 32768: 881})
"""Largest total coefficient modulus (bits) for 128-bit security, by ring degree.

From the HomomorphicEncryption.org security standard (2018), table for
ternary secrets, classical attacks; SEAL enforces the same table. Degrees below
4096 are left out: 2048 holds a single 54-bit prime, too little for a scale
that gives useful precision plus headroom for a sum.
"""

_MIN_PRIME_BITS = 20
_MAX_PRIME_BITS = 60  # SEAL's limit on one prime
_MIN_SCALE_BITS = 20
# Serialized contexts are small (a few hundred bytes public, tens of KB secret);
# anything much larger is not one of ours and is refused before parsing.
MAX_CONTEXT_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class CKKSParameters:
    """One CKKS parameter set: ring degree, coefficient modulus primes, scale.

    ``coeff_mod_bit_sizes`` lists the primes' bit sizes, the special (key
    switching) prime last. Construction checks the 128-bit security bound and
    that the scale leaves capacity for a sum; the error names the bad value.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    name: str = field(default="", compare=False)  # a label: equal parameters are equal sets

    def __post_init__(self) -> None:
        degree, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits
        # A value check first: True (like 2048) is not one of the degrees, whatever its type.
        if degree not in MAX_MODULUS_BITS_128:
            raise ParameterValueError(
                f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS_128)}, got {degree!r}"
            )
        integer("poly_modulus_degree", degree)  # 4096.0 is not a degree either
        if not isinstance(bits, tuple) or len(bits) < 2:
            raise ParameterValueError(
                "coeff_mod_bit_sizes must be a tuple of at least two prime sizes (data primes, "
                f"then the special prime), got {bits!r}"
            )
        for b in bits:
            if not is_integer(b):
                raise ParameterTypeError(f"coeff_mod_bit_sizes holds integers, got {b!r}")
            if not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS:
                raise ParameterValueError(
                    f"each prime must have {_MIN_PRIME_BITS} to {_MAX_PRIME_BITS} bits, got {b} "
                    f"in {bits!r}"
                )
        bound = MAX_MODULUS_BITS_128[degree]
        if sum(bits) > bound:
            raise ParameterValueError(
                f"coeff_mod_bit_sizes {bits!r} total {sum(bits)} bits, above the {bound} bits "
                f"that ring degree {degree} allows for 128-bit security"
            )
        integer("scale_bits", scale, at_least=_MIN_SCALE_BITS)
        if self.capacity_bits < 1:
            raise ParameterValueError(
                f"scale_bits={scale} leaves no room for a sum in {self.data_bits} data bits "
                f"(capacity 2**{self.capacity_bits}); lower the scale or add a data prime"
            )

    # -- derived quantities --------------------------------------------------
    @property
    def slots(self) -> int:
        """Values per ciphertext: half the ring degree."""
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def capacity_bits(self) -> int:
        return self.data_bits - self.data_primes - 2 - self.scale_bits

    @property
    def capacity(self) -> float:
        """Largest ``|value|`` a decrypted *sum* may hold (see the module docstring)."""
        return float(2**self.capacity_bits)

    @property
    def ciphertext_bytes(self) -> int:
        """Raw size of one ciphertext's coefficients (two polynomials, data primes only)."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8

    @property
    def bytes_per_value(self) -> float:
        return self.ciphertext_bytes / self.slots

    # -- wire form -------------------------------------------------------------
    def to_list(self) -> list[int]:
        """``[degree, scale_bits, *coeff_mod_bit_sizes]``: what a config record carries."""
        return [self.poly_modulus_degree, self.scale_bits, *self.coeff_mod_bit_sizes]

    @classmethod
    def from_list(cls, values: Any) -> CKKSParameters:
        """Parse :meth:`to_list`'s output; every check of the constructor applies."""
        if not isinstance(values, list) or len(values) < 4 or not all(map(is_integer, values)):
            raise ParameterValueError(
                f"CKKS parameters are a list of at least 4 integers, got {values!r}"
            )
        return cls(values[0], tuple(values[2:]), values[1])

    def describe(self) -> str:
        return (
            f"CKKS N={self.poly_modulus_degree} q={list(self.coeff_mod_bit_sizes)} "
            f"scale=2^{self.scale_bits}"
        )


COMPACT = CKKSParameters(4096, (60, 49), 40, name="compact")
"""The default: ring 4096, one 60-bit data prime (+ a 49-bit special prime), scale 2^40.

109 of 109 modulus bits (128-bit secure). 2,048 values per ciphertext, 32 bytes
per value (8x float32). Capacity 2^17 = 131,072 for ``|sum of weighted
updates|``. Measured: the sum of ten encrypted vectors of size ~1,000 has a
maximum absolute error of about 2e-9 (about 1e-12 relative to the sum), before
the division by the total weight.
"""

WIDE = CKKSParameters(8192, (60, 60, 60), 50, name="wide")
"""For very large weights or values: ring 8192, two 60-bit data primes, scale 2^50.

180 of 218 modulus bits (128-bit secure). 4,096 values per ciphertext, 64 bytes
per value (16x float32). Capacity 2^66. Measured: maximum absolute error of
about 3e-12 on the same sum of ten, float64-grade precision.
"""

PARAMETER_SETS = MappingProxyType({p.name: p for p in (COMPACT, WIDE)})


# -- contexts ----------------------------------------------------------------------------------
def new_secret_context(params: CKKSParameters) -> ts.Context:
    """A fresh context holding a new secret key (symmetric encryption), no other keys."""
    import tenseal as ts

    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.global_scale = params.scale
    return context


def public_context_bytes(context: ts.Context) -> bytes:
    """The parameters alone: no secret, public, Galois or relinearization key."""
    data: bytes = context.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return data


def secret_context_bytes(context: ts.Context) -> bytes:
    """The parameters and the secret key (all a peer needs to encrypt and decrypt)."""
    if not context.is_private():
        raise MissingKeyError("this CKKS context holds no secret key")
    data: bytes = context.serialize(
        save_public_key=False,
        save_secret_key=True,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return data


def context_digest(public_bytes: bytes) -> bytes:
    """SHA-256 of a public context's bytes: what key transport binds the parameters with."""
    return hashlib.sha256(public_bytes).digest()


def _parse(data: bytes, params: CKKSParameters, what: str) -> ts.Context:
    if not isinstance(data, bytes | bytearray):
        raise KeyMaterialError(f"{what} must be bytes, got {type(data).__name__}")
    if not 0 < len(data) <= MAX_CONTEXT_BYTES:
        raise KeyMaterialError(f"{what} of {len(data)} bytes is not a serialized context")
    import tenseal as ts

    flat = canonical_context(bytes(data), params, what)  # SEAL never inflates a peer's bytes
    try:
        context = ts.context_from(flat)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyMaterialError(f"{what} does not parse as a TenSEAL context: {exc}") from None
    return context


def check_context(context: ts.Context, params: CKKSParameters, what: str) -> None:
    """Raise :class:`KeyMaterialError` unless ``context`` is CKKS of exactly ``params``."""
    import tenseal as ts

    seal = context.seal_context().data
    key_level = seal.key_context_data()
    data_level = seal.first_context_data()
    found = (
        str(key_level.parms().scheme()),
        key_level.parms().poly_modulus_degree(),
        key_level.total_coeff_modulus_bit_count(),
        data_level.total_coeff_modulus_bit_count(),
        data_level.chain_index() + 1,
    )
    expected = (
        str(ts.SCHEME_TYPE.CKKS),
        params.poly_modulus_degree,
        params.modulus_bits,
        params.data_bits,
        params.data_primes,
    )
    if found != expected:
        raise KeyMaterialError(
            f"{what} has (scheme, degree, modulus bits, data bits, data primes) {found}, "
            f"expected {expected} for {params.describe()}"
        )
    try:
        scale = context.global_scale
    except ValueError:
        scale = None
    if scale != params.scale:
        raise KeyMaterialError(f"{what} has scale {scale}, expected 2^{params.scale_bits}")


def load_public_context(data: bytes, params: CKKSParameters) -> ts.Context:
    """Load a context the server may hold; refuse one that carries a secret key."""
    context = _parse(data, params, "public context")
    if context.is_private():
        raise KeyMaterialError(
            "the public context holds a secret key: refusing to load it as public"
        )
    check_context(context, params, "public context")
    return context


def load_secret_context(data: bytes, params: CKKSParameters) -> ts.Context:
    """Load a node's secret context; refuse one without a secret key or of other parameters."""
    context = _parse(data, params, "secret context")
    if not context.is_private():
        raise MissingKeyError("the secret context holds no secret key")
    check_context(context, params, "secret context")
    return context

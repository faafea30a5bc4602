"""CKKS parameter sets: the 128-bit bounds, capacity and precision as documented, and contexts
that hold exactly the keys they should."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from flowerpets.exceptions import MissingKeyError
from flowerpets.he import COMPACT, MAX_MODULUS_BITS_128, PARAMETER_SETS, WIDE, CKKSParameters
from flowerpets.he._primitives.params import (
    context_digest,
    load_public_context,
    load_secret_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)


def test_security_bounds_are_the_he_standard_table() -> None:
    # HomomorphicEncryption.org standard, 128-bit classical security, ternary secrets.
    assert dict(MAX_MODULUS_BITS_128) == {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((4096, (60, 50), 40), "above the 109 bits"),
        ((8192, (60, 60, 60, 40), 40), "above the 218 bits"),
        ((2048, (27, 27), 20), "poly_modulus_degree"),
        ((4096, (60,), 40), "at least two"),
        ((4096, (61, 40), 40), "20 to 60 bits"),
        ((4096, (60, 49), 19), "scale_bits"),
        ((4096, (60, 49), 57), "no room"),
        ((4096, [60, 49], 40), "tuple"),
        ((True, (60, 49), 40), "poly_modulus_degree"),
    ],
)
def test_bad_parameters_are_refused_with_the_value_named(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CKKSParameters(*args)


def test_documented_sets() -> None:
    assert PARAMETER_SETS == {"compact": COMPACT, "wide": WIDE}
    assert (COMPACT.slots, COMPACT.modulus_bits, COMPACT.data_bits) == (2048, 109, 60)
    assert COMPACT.capacity == 2.0**17
    assert COMPACT.bytes_per_value == 32.0  # 8x float32
    assert (WIDE.slots, WIDE.modulus_bits, WIDE.data_bits) == (4096, 180, 120)
    assert WIDE.capacity == 2.0**66
    assert WIDE.bytes_per_value == 64.0
    assert CKKSParameters.from_list(COMPACT.to_list()) == COMPACT
    with pytest.raises(ValueError, match="list of at least 4"):
        CKKSParameters.from_list([4096, 40, 60])


def _sum_of_encryptions(params: CKKSParameters, values: list[np.ndarray]) -> np.ndarray:
    context = new_secret_context(params)
    public = ts.context_from(public_context_bytes(context))
    total = None
    for v in values:
        ct = ts.ckks_vector_from(public, ts.ckks_vector(context, v).serialize())
        total = ct if total is None else total + ct
    assert total is not None
    return np.asarray(ts.ckks_vector_from(context, total.serialize()).decrypt())


@pytest.mark.parametrize(("params", "bound"), [(COMPACT, 1e-8), (WIDE, 1e-10)])
def test_measured_precision_of_a_sum_of_ten(params: CKKSParameters, bound: float) -> None:
    # What the docs promise: ten weighted updates (|values| ~ 100), summed by a public context.
    # Statistical: SEAL's encryption noise is its own, unseeded. Over 200 runs the worst error
    # was 2.0e-9 (compact) and 3.1e-12 (wide), per-slot sd 4.3e-10 and 5.9e-13: the bounds are
    # 23 and 168 sd, so P(fail) < 1e-100 for an error (a sum of many small terms) with
    # Gaussian tails, a union bound over the slots.
    rng = np.random.default_rng(0)
    values = [100 * rng.standard_normal(params.slots) for _ in range(10)]
    error = np.max(np.abs(_sum_of_encryptions(params, values) - np.sum(values, axis=0)))
    assert error < bound


def test_capacity_is_safe_and_not_far_from_the_real_limit() -> None:
    at_capacity = np.full(COMPACT.slots, COMPACT.capacity)
    got = _sum_of_encryptions(COMPACT, [at_capacity / 2, at_capacity / 2])
    np.testing.assert_allclose(got, at_capacity, rtol=1e-9)
    # Eight times over, the sum wraps around the data modulus and decrypts to garbage
    # (each addend alone still encodes: the client-side check is what catches this).
    over = np.full(COMPACT.slots, 2 * COMPACT.capacity)
    wrapped = _sum_of_encryptions(COMPACT, [over] * 4)
    assert np.max(np.abs(wrapped - 4 * over)) > COMPACT.capacity


def test_public_context_holds_no_key_and_cannot_decrypt_or_encrypt() -> None:
    context = new_secret_context(COMPACT)
    public_bytes = public_context_bytes(context)
    assert len(public_bytes) < 1024  # the parameters only
    public = load_public_context(public_bytes, COMPACT)
    assert not public.is_private()
    assert not public.has_galois_keys() and not public.has_relin_keys()
    ct = ts.ckks_vector_from(public, ts.ckks_vector(context, [1.0, 2.0]).serialize())
    with pytest.raises(ValueError, match="secret_key"):
        ct.decrypt()
    with pytest.raises(ValueError, match="encryption"):
        ts.ckks_vector(public, [1.0])
    summed = ct + ct + np.array([0.5, 0.5])  # adding is all it can do
    decrypted = ts.ckks_vector_from(context, summed.serialize()).decrypt()
    np.testing.assert_allclose(decrypted, [2.5, 4.5], atol=1e-8)
    assert context_digest(public_bytes) == context_digest(public_context_bytes(public))


def test_secret_context_round_trip_and_checks() -> None:
    context = new_secret_context(COMPACT)
    secret = secret_context_bytes(context)
    loaded = load_secret_context(secret, COMPACT)
    assert loaded.is_private() and not loaded.has_relin_keys() and not loaded.has_galois_keys()
    assert public_context_bytes(loaded) == public_context_bytes(context)
    with pytest.raises(ValueError, match="holds a secret key"):
        load_public_context(secret, COMPACT)  # the server refuses to keep a secret
    with pytest.raises(MissingKeyError):
        load_secret_context(public_context_bytes(context), COMPACT)
    with pytest.raises(ValueError, match="expected"):
        load_secret_context(secret, WIDE)
    other_scale = CKKSParameters(4096, (60, 49), 30)
    with pytest.raises(ValueError, match="scale"):
        load_public_context(public_context_bytes(context), other_scale)
    for junk in (b"", b"not a context", b"\x00" * 100):
        with pytest.raises(ValueError):
            load_public_context(junk, COMPACT)
    with pytest.raises(MissingKeyError):
        secret_context_bytes(load_public_context(public_context_bytes(context), COMPACT))

"""What the server sees looks uniform, unless it is the whole cohort's sum.

Chi-square tests at a false-alarm rate of about 1e-6 per check, on masks from
seeded (so reproducible) randomness; hypothesis picks the inputs and subsets.
Each test also runs its statistic on a non-uniform vector, to show that it can
fail.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import ConfigRecord
from flowerpets.secagg._primitives import prg, quantize

Z_1E6 = 4.753  # one-sided standard normal quantile for p = 1e-6


def chi_square_limit(df: int, z: float = Z_1E6) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def looks_uniform(words: np.ndarray) -> bool:
    """Bytes uniform over 256 values, and words uniform over 64 ranges of 2**26."""
    data = np.ascontiguousarray(words, dtype=np.uint32)
    byte_counts = np.bincount(data.view(np.uint8), minlength=256)
    top_counts = np.bincount(data >> np.uint32(26), minlength=64)
    for counts in (byte_counts, top_counts):
        expected = counts.sum() / counts.size
        if float(((counts - expected) ** 2 / expected).sum()) > chi_square_limit(counts.size - 1):
            return False
    return True


INPUTS = st.sampled_from(["zeros", "constant", "extreme", "random", "ramp"])


def make_inputs(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return {
        "zeros": np.zeros(shape),
        "constant": np.full(shape, 0.25),
        "extreme": np.where(rng.random(shape) < 0.5, -8.0, 8.0),
        "random": rng.uniform(-8, 8, shape),
        "ramp": np.tile(np.linspace(-8, 8, shape[1]), (shape[0], 1)),
    }[kind].astype(np.float32)


def masked_round(federation: Any, kind: str, seed: int, params: int = 4096) -> Any:
    fed = federation(n=6, degree=4, threshold=3, params=params, seed=seed)
    fed.updates[:] = make_inputs(kind, fed.updates.shape, seed)
    fed.honest_until_collect()
    return fed


def self_mask(fed: Any, node: int, length: int) -> np.ndarray:
    state = fed.contexts[node].state.get_typed("secagg+/client-state", ConfigRecord)
    return prg.expand(state["self-seed"], length)  # white box: the test reads the node's seed


@settings(max_examples=12, deadline=None, derandomize=True)
@given(kind=INPUTS, seed=st.integers(0, 10_000))
def test_one_masked_vector_looks_uniform_whatever_the_input(
    federation: Any, kind: str, seed: int
) -> None:
    fed = masked_round(federation, kind, seed)
    for vector in fed.masked.values():
        assert looks_uniform(vector)
    # Control: the statistic rejects the plain encoding of the same inputs.
    quant = fed.config.quantization
    weight = fed.weights[0]
    encoded = np.zeros(fed.updates.shape[1], dtype=np.uint32)
    quantize.quantize_into(
        encoded,
        fed.updates[0],
        factor=quant.float_factor(weight),
        limit=quant.float_limit(weight),
        uniform=prg.UniformStream(bytes(32)),
    )
    if kind != "random":
        assert not looks_uniform(encoded)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(kind=INPUTS, seed=st.integers(0, 10_000), subset=st.integers(1, 2**6 - 2))
def test_any_proper_subset_stays_masked_even_without_its_self_masks(
    federation: Any, kind: str, seed: int, subset: int
) -> None:
    """Even a server that learned the self-mask seeds of a proper subset S (as it does
    for survivors) sees a uniform sum over S: the pairwise masks across the cut between S
    and the others do not cancel. Only the whole cohort's sum comes out."""
    fed = masked_round(federation, kind, seed)
    members = [node for i, node in enumerate(fed.ids) if subset >> i & 1]
    length = next(iter(fed.masked.values())).size
    partial = np.zeros(length, dtype=np.uint32)
    for node in members:
        partial += fed.masked[node] - self_mask(fed, node, length)
    assert looks_uniform(partial)
    with_self_masks = sum((fed.masked[node] for node in members), np.zeros(length, np.uint32))
    assert looks_uniform(with_self_masks)
    # Control: over the whole cohort the pairwise masks cancel and the plain encoding remains.
    whole = np.zeros(length, dtype=np.uint32)
    for node in fed.ids:
        whole += fed.masked[node] - self_mask(fed, node, length)
    signed = whole.view(np.int32)[: fed.updates.shape[1]]
    scale = fed.config.quantization.scale
    expected = (fed.updates.astype(np.float64) * np.asarray(fed.weights)[:, None]).sum(0)
    assert np.max(np.abs(signed / scale - expected)) <= len(fed.ids) / scale
    if kind != "random":
        assert not looks_uniform(whole)

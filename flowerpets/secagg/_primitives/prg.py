"""AES-256-CTR as a pseudo-random generator: a 32-byte seed becomes a stream of words.

The seed is the AES-256 key, whole (all 256 bits; compare Flower 1.42, whose masks
came from a 32-bit-seeded Mersenne Twister). The initial counter block is zero
and the counter is the full 128-bit block, incremented big-endian (NIST SP
800-38A's standard incrementing function), so the stream is the AES-CTR
encryption of zeros: ``stream[16j : 16j + 16] = AES_seed(j)``. Word ``i`` of the
stream is the little-endian ``uint32`` of bytes ``[4i, 4i + 4)``. Each seed is
used for one stream only, which is what makes the zero counter safe.

The keystream comes from OpenSSL through ``cryptography`` (AES-NI: several GB/s).
:func:`apply_masks` consumes many streams together, block by block, so each block
of the vector and of the keystream stays in the CPU cache while every stream is
added to it: the cost is close to the raw keystream generation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from numpy.typing import NDArray

from flowerpets.exceptions import ParameterValueError

__all__ = [
    "SEED_BYTES",
    "WORD",
    "UniformStream",
    "apply_masks",
    "expand",
    "keystream",
]

SEED_BYTES = 32
WORD = np.dtype("<u4")  # the stream's words: little-endian uint32, whatever the platform
_ZERO_COUNTER = bytes(16)
# Words per block: 256 KiB of keystream, which stays in a 2 MiB L2 cache with the vector's block.
BLOCK_WORDS = 1 << 16
# ``update_into`` wants room for one more cipher block than it writes.
_SLACK = 16


def _encryptor(seed: bytes, counter: bytes = _ZERO_COUNTER) -> CipherContext:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ParameterValueError(f"a PRG seed is {SEED_BYTES} bytes, got {_describe(seed)}")
    if len(counter) != 16:
        raise ParameterValueError(f"the initial counter block is 16 bytes, got {len(counter)}")
    return Cipher(algorithms.AES(bytes(seed)), modes.CTR(counter)).encryptor()


def _describe(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    return type(value).__name__


def keystream(seed: bytes, nbytes: int, *, counter: bytes = _ZERO_COUNTER) -> bytes:
    """The first ``nbytes`` of the stream (``counter`` is for known-answer tests only)."""
    if nbytes < 0:
        raise ParameterValueError(f"nbytes must be >= 0, got {nbytes}")
    return _encryptor(seed, counter).update(bytes(nbytes))


def expand(seed: bytes, words: int) -> NDArray[np.uint32]:
    """The first ``words`` words of the stream, as a new array."""
    if words < 0:
        raise ParameterValueError(f"words must be >= 0, got {words}")
    buffer = np.empty(4 * words + _SLACK, dtype=np.uint8)
    _encryptor(seed).update_into(bytes(4 * words), buffer.data)
    out: NDArray[np.uint32] = buffer[: 4 * words].view(WORD).astype(np.uint32, copy=True)
    return out


class _Blocks:
    """Reusable zero input and keystream output of one block."""

    def __init__(self, block_words: int) -> None:
        if block_words < 1:
            raise ParameterValueError(f"block_words must be >= 1, got {block_words}")
        self.words = block_words
        self.zeros = memoryview(bytes(4 * block_words))
        raw = np.empty(4 * block_words + _SLACK, dtype=np.uint8)
        self.raw = raw.data
        self.stream = raw[: 4 * block_words].view(WORD)

    def next(self, encryptor: CipherContext, count: int) -> NDArray[np.uint32]:
        """The stream's next ``count`` words (a view of the reused buffer)."""
        encryptor.update_into(self.zeros[: 4 * count], self.raw)
        return self.stream[:count]


def apply_masks(
    vector: NDArray[np.uint32],
    *,
    add: Sequence[bytes] = (),
    subtract: Sequence[bytes] = (),
    block_words: int = BLOCK_WORDS,
) -> None:
    """``vector += sum(expand(s) for s in add) - sum(expand(s) for s in subtract)`` mod 2**32.

    In place, one block at a time, with one open AES context per seed.
    """
    if vector.dtype != np.uint32 or vector.ndim != 1 or not vector.flags.c_contiguous:
        raise ParameterValueError("apply_masks works on a contiguous 1-d uint32 vector")
    adders = [_encryptor(seed) for seed in add]
    subtractors = [_encryptor(seed) for seed in subtract]
    if not adders and not subtractors:
        return
    blocks = _Blocks(min(block_words, max(vector.size, 1)))
    for start in range(0, vector.size, blocks.words):
        part = vector[start : start + blocks.words]
        count = part.size
        for encryptor in adders:
            np.add(part, blocks.next(encryptor, count), out=part)
        for encryptor in subtractors:
            np.subtract(part, blocks.next(encryptor, count), out=part)


class UniformStream:
    """Uniform ``uint32`` words from a PRG stream, handed out block by block.

    Used for stochastic rounding: the seed comes from the OS's secure source (or
    a test's injected entropy), and the words are consumed in order.
    """

    def __init__(self, seed: bytes, *, block_words: int = BLOCK_WORDS) -> None:
        self._encryptor = _encryptor(seed)
        self._blocks = _Blocks(block_words)

    @property
    def block_words(self) -> int:
        return self._blocks.words

    def next(self, count: int) -> NDArray[np.uint32]:
        """The next ``count`` words (at most ``block_words``), valid until the next call."""
        if not 0 <= count <= self._blocks.words:
            raise ParameterValueError(f"count must be in [0, {self._blocks.words}], got {count}")
        return self._blocks.next(self._encryptor, count)

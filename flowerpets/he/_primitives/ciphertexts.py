"""Encrypting a flat vector chunk by chunk, and loading ciphertexts with every check.

The wire form of an encrypted vector inside an :class:`ArrayRecord`:

``he.header``
    uint8 array: canonical JSON ``{"v": 1, "key": <key id, hex>, "params":
    [degree, scale_bits, *prime bits], "layout": [[name, dtype, shape], ...],
    "chunks": k}``, plus ``"order": [every model array name]`` in a sealed
    global model. At most :data:`MAX_HEADER_BYTES`; unknown fields are refused.
``he.ct.000000`` ... ``he.ct.<k-1>``
    uint8 arrays: one serialized TenSEAL ``CKKSVector`` each, holding exactly
    one ciphertext of ``slots`` values (the last one the rest).

Loading checks, before anything is added: the byte length (a ciphertext of
these parameters, not a bomb); that its SEAL object is one ciphertext of these
parameters, read and inflated here and handed to TenSEAL uncompressed (SEAL's
own inflating of crafted bytes can end the process: see ``canonical.py``);
that TenSEAL parses it under *our* context (SEAL validates the parameters id
and the coefficient ranges); that it holds exactly one ciphertext of two
polynomials, at the data level, at the agreed scale (both SEAL's and the one
TenSEAL serializes beside it, which plaintext additions use), of the expected
number of values, and not transparent (a "ciphertext" with no encryption).
Any failure is a :class:`CiphertextError`. What no check can tell is a
ciphertext of the right parameters under *another key*: the header's key id
catches honest mistakes, not forgeries (CKKS has no integrity; see
``docs/he.md``).
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import is_integer
from flowerpets.core import Array, ArrayRecord
from flowerpets.exceptions import CiphertextError, ParameterValueError
from flowerpets.he._primitives.canonical import (
    LENGTH,
    WORD,
    Message,
    canonical_ciphertext,
    proto_fields,
    proto_message,
)
from flowerpets.he._primitives.packing import RESERVED_PREFIX, Layout, chunk_views
from flowerpets.he._primitives.params import CKKSParameters

if TYPE_CHECKING:
    import tenseal as ts  # imported where used: loading TenSEAL is paid only by CKKS work

__all__ = [
    "HEADER_NAME",
    "Header",
    "chunk_name",
    "decrypt_vectors",
    "encrypt_flat",
    "load_vector",
    "load_vectors",
    "split_wire",
    "tenseal_scale",
    "wire_arrays",
]

WIRE_VERSION = 1
HEADER_NAME = RESERVED_PREFIX + "header"
_CHUNK_PREFIX = RESERVED_PREFIX + "ct."
MAX_HEADER_BYTES = 16 << 20
_SERIALIZATION_SLACK = 4096  # TenSEAL's and SEAL's headers around the coefficients
_KEY_ID_HEX = re.compile(r"[0-9a-f]{32}")
_REQUIRED = frozenset({"v", "key", "params", "layout", "chunks"})
_FIELDS = _REQUIRED | {"order"}
_CHUNK_NAME = re.compile(re.escape(_CHUNK_PREFIX) + r"([0-9]{6,18})")


def chunk_name(index: int) -> str:
    return f"{_CHUNK_PREFIX}{index:06d}"


@dataclass(frozen=True, slots=True)
class Header:
    """What an encrypted vector's ciphertexts are: under which key and parameters, of what."""

    key_id: str
    params: CKKSParameters
    layout: Layout
    order: tuple[str, ...] | None = None  # every model array, in order (sealed models only)

    def __post_init__(self) -> None:
        # Raised as CiphertextError: a header decoded from a peer's bytes is built here too.
        if not isinstance(self.key_id, str) or not _KEY_ID_HEX.fullmatch(self.key_id):
            raise CiphertextError(f"a key id is 32 lowercase hex digits, got {self.key_id!r}")
        if self.order is not None and (
            len(set(self.order)) != len(self.order) or not set(self.layout.names) <= set(self.order)
        ):
            raise CiphertextError("the model order must name every array once, encrypted ones too")

    @property
    def chunks(self) -> int:
        return self.layout.chunk_count(self.params.slots)

    def require_like(self, expected: Header) -> None:
        """Raise :class:`CiphertextError` unless key, parameters and layout are ``expected``'s.

        The reasons stay short whatever a forged layout holds.
        """
        if self.key_id != expected.key_id:
            raise CiphertextError(
                f"the update is under key {self.key_id}, the round's key is {expected.key_id}"
            )
        if self.params != expected.params:
            raise CiphertextError(
                f"the update uses {self.params.describe()}, the round {expected.params.describe()}"
            )
        if self.layout != expected.layout:
            raise CiphertextError(
                f"the update packs {self.layout.describe()}, the round {expected.layout.describe()}"
            )

    def encode(self) -> Array:
        body: dict[str, Any] = {
            "v": WIRE_VERSION,
            "key": self.key_id,
            "params": self.params.to_list(),
            "layout": self.layout.to_json(),
            "chunks": self.chunks,
        }
        if self.order is not None:
            body["order"] = list(self.order)
        text = json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
        return Array(np.frombuffer(text.encode("ascii"), dtype=np.uint8), copy=False)

    @classmethod
    def decode(cls, array: Array, *, max_bytes: int = MAX_HEADER_BYTES) -> Header:
        """Parse :meth:`encode`'s output; anything else raises :class:`CiphertextError`."""
        data = array.numpy()
        if data.dtype != np.uint8 or data.ndim != 1 or not 0 < data.size <= max_bytes:
            raise CiphertextError(
                f"{HEADER_NAME} must be 1-D uint8 of at most {max_bytes} bytes, "
                f"got {data.dtype} {data.shape}"
            )
        malformed = f"malformed {HEADER_NAME}"
        try:
            body = json.loads(data.tobytes().decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CiphertextError(f"{malformed}: {exc}") from None
        if not isinstance(body, dict) or set(body) - _FIELDS or not set(body) >= _REQUIRED:
            fields = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise CiphertextError(f"{malformed}: unknown or missing fields in {fields}")
        if not is_integer(body["v"]) or body["v"] != WIRE_VERSION:
            raise CiphertextError(f"{malformed}: wire version {body['v']!r} is not {WIRE_VERSION}")
        order = body.get("order")
        if order is not None and not (
            isinstance(order, list) and all(isinstance(n, str) for n in order)
        ):
            raise CiphertextError(f"{malformed}: order must be a list of names")
        try:
            # What the parsers of parameters and layouts raise for a value they refuse.
            params = CKKSParameters.from_list(body["params"])
            layout = Layout.from_json(body["layout"])
        except (ValueError, TypeError) as exc:
            raise CiphertextError(f"{malformed}: {exc}") from None
        header = cls(
            key_id=body["key"],
            params=params,
            layout=layout,
            order=None if order is None else tuple(order),
        )
        chunks = body["chunks"]
        if not is_integer(chunks) or chunks != header.chunks:
            raise CiphertextError(
                f"{malformed}: chunks {chunks!r}, the layout needs {header.chunks}"
            )
        return header


def wire_arrays(header: Header, chunks: Iterable[bytes]) -> ArrayRecord:
    """The header and the serialized ciphertexts as an ArrayRecord (no copies of the bytes)."""
    record = ArrayRecord({HEADER_NAME: header.encode()})
    for index, blob in enumerate(chunks):
        record[chunk_name(index)] = Array(np.frombuffer(blob, dtype=np.uint8), copy=False)
    if len(record) - 1 != header.chunks:
        raise ParameterValueError(
            f"{len(record) - 1} ciphertexts for a header that says {header.chunks}"
        )
    return record


def split_wire(
    arrays: Mapping[str, Array], expected: Header | None = None
) -> tuple[dict[str, Array], Header | None, list[Array]]:
    """Split a record into its plain arrays, its header (None if absent) and its ciphertexts.

    Reserved names other than the header and its exact chunk names raise
    :class:`CiphertextError`, as do chunks without a header or missing chunks.
    With ``expected`` (the round's header), the record's header must be of the
    same key, parameters and layout (:meth:`Header.require_like`), checked
    before anything else. Nothing is sized by what a header claims: its chunk
    count is compared with the arrays the record holds (a header can claim
    2^40 values in a few bytes).
    """
    plain = {n: a for n, a in arrays.items() if not n.startswith(RESERVED_PREFIX)}
    reserved = [n for n in arrays if n.startswith(RESERVED_PREFIX)]
    if not reserved:
        return plain, None, []
    if HEADER_NAME not in arrays:
        raise CiphertextError(f"ciphertexts without a {HEADER_NAME}")
    if expected is None:
        header = Header.decode(arrays[HEADER_NAME])
    else:
        header = Header.decode(arrays[HEADER_NAME], max_bytes=_header_bound(expected))
        header.require_like(expected)
    claimed = header.chunks
    if claimed == len(reserved) - 1:  # bounded by the record: only now are chunks named
        names = [chunk_name(i) for i in range(claimed)]
        if set(reserved).issuperset(names):
            return plain, header, [arrays[name] for name in names]
    unexpected, found = [], 0  # the reason: one pass over what the record holds
    for name in reserved:
        match = _CHUNK_NAME.fullmatch(name)
        if match and name == chunk_name(int(match.group(1))) and int(match.group(1)) < claimed:
            found += 1
        elif name != HEADER_NAME:
            unexpected.append(name)
    raise CiphertextError(
        f"the encrypted part does not match its header: unexpected {sorted(unexpected)[:5]}, "
        f"{claimed - found} of the {claimed} ciphertexts it claims missing"
    )


@functools.lru_cache(maxsize=16)
def _header_bound(expected: Header) -> int:
    """The most bytes a header like ``expected`` (but without a model order) may take."""
    return min(MAX_HEADER_BYTES, 2 * expected.encode().numpy().size + 1024)


# -- encryption ----------------------------------------------------------------------------------
def encrypt_flat(context: ts.Context, flat: NDArray[np.float64], slots: int) -> list[bytes]:
    """One serialized ciphertext per ``slots`` values of ``flat`` (the last one shorter)."""
    import tenseal as ts

    return [ts.ckks_vector(context, chunk).serialize() for chunk in chunk_views(flat, slots)]


def _blob(chunk: Array | bytes) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    data = chunk.numpy()
    if data.dtype != np.uint8 or data.ndim != 1:
        raise CiphertextError(f"a ciphertext is a 1-D uint8 array, got {data.dtype} {data.shape}")
    return data.tobytes()


# TenSEAL's CKKSVectorProto (tenseal/proto/tensors.proto) of one ciphertext: the chunk sizes
# (packed), the SEAL ciphertext and the scale, each once, in that order, nothing after.
_VECTOR = {1: LENGTH, 2: LENGTH, 3: WORD}
_NOT_OURS = "not a ciphertext"


def _vector_fields(blob: bytes) -> Message:
    vector = proto_fields(blob, _VECTOR, CiphertextError, _NOT_OURS)
    if len(vector.blobs) != len(_VECTOR):
        raise CiphertextError(f"{_NOT_OURS}: not TenSEAL's form of one CKKS ciphertext")
    return vector


def tenseal_scale(blob: bytes) -> float:
    """The scale TenSEAL serializes beside SEAL's ciphertext (``CKKSVectorProto.scale``).

    TenSEAL's binding does not expose it, yet it, not SEAL's ``ct.scale``, is
    the scale at which a plaintext added to the vector is encoded: a forged one
    in the first update of a sum made adding central DP's noise fail. Only
    TenSEAL's own layout of a one-ciphertext vector is accepted
    (``tenseal/proto/tensors.proto``): field 1 (sizes) and field 2 (the
    ciphertext), length-delimited, then field 3 (the scale), a double, once
    each and nothing after.
    """
    return _scale(_vector_fields(blob))


def _scale(vector: Message) -> float:
    scale: float = struct.unpack("<d", vector.blobs[3])[0]
    return scale


def load_vector(
    context: ts.Context, chunk: Array | bytes, params: CKKSParameters, size: int
) -> ts.CKKSVector:
    """Parse one ciphertext under ``context`` and check it is one of ours (module docstring)."""
    limit = params.ciphertext_bytes + _SERIALIZATION_SLACK
    blob = _blob(chunk)
    if not 0 < len(blob) <= limit:
        raise CiphertextError(f"a ciphertext of {len(blob)} bytes (at most {limit} expected)")
    fields = _vector_fields(blob)
    scale = _scale(fields)
    if scale != params.scale:
        raise CiphertextError(
            f"a ciphertext whose TenSEAL scale is {scale!r}, expected 2^{params.scale_bits}"
        )
    import tenseal as ts

    # SEAL reads only the flat form: it never inflates a peer's bytes (see canonical.py).
    fields.blobs[2] = canonical_ciphertext(fields.blobs[2], params)
    try:
        vector = ts.ckks_vector_from(context, proto_message(_VECTOR, fields))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CiphertextError(f"not a ciphertext of these parameters: {exc}") from None
    if vector.size() != size:
        raise CiphertextError(f"a ciphertext of {vector.size()} values, expected {size}")
    parts = vector.ciphertext()
    if len(parts) != 1:
        raise CiphertextError(f"a chunk holds {len(parts)} ciphertexts, expected 1")
    ct = parts[0]
    if ct.size() != 2 or not ct.is_ntt_form() or ct.is_transparent():
        raise CiphertextError("not a fresh two-part ciphertext (or transparent: not encrypted)")
    if ct.parms_id() != context.seal_context().data.first_parms_id():
        raise CiphertextError("a ciphertext at another level of the modulus chain")
    if ct.scale != params.scale:  # SEAL's, checked as well as TenSEAL's above
        raise CiphertextError(f"a ciphertext at scale {ct.scale}, expected 2^{params.scale_bits}")
    return vector


def load_vectors(
    context: ts.Context, chunks: Sequence[Array | bytes], header: Header
) -> list[ts.CKKSVector]:
    """Every ciphertext of an encrypted vector, checked (all or nothing)."""
    sizes = header.layout.chunk_sizes(header.params.slots)
    if len(chunks) != len(sizes):
        raise CiphertextError(f"{len(chunks)} ciphertexts, the layout needs {len(sizes)}")
    return [
        load_vector(context, chunk, header.params, size)
        for chunk, size in zip(chunks, sizes, strict=True)
    ]


def decrypt_vectors(vectors: Iterable[ts.CKKSVector], size: int) -> NDArray[np.float64]:
    """Decrypt and concatenate into a float64 vector of ``size`` values.

    The vectors must be linked to a context holding the secret key.
    """
    flat = np.empty(size, dtype=np.float64)
    offset = 0
    for vector in vectors:
        values = np.asarray(vector.decrypt(), dtype=np.float64)
        if offset + values.size > size:
            raise CiphertextError(f"the ciphertexts hold more than the {size} values expected")
        flat[offset : offset + values.size] = values
        offset += values.size
    if offset != size:
        raise CiphertextError(f"decrypted {offset} values, expected {size}")
    return flat

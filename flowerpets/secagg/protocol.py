"""What SecAgg+ messages carry: stage names, record names, and the round's configuration.

Every stage message is a message of the round's own type (``train`` or
``query``) whose metadata names its stage (:class:`Stage`); the simulation's
fault injection can therefore drop a node at exactly one stage. Its protocol
fields travel in a :class:`~flowerpets.core.ConfigRecord` named
:data:`RECORD`; the masked vector travels in an ``ArrayRecord`` named
:data:`MASKED_RECORD`. Wire formats are explicit: fixed-size byte strings for
keys and shares, lists of node ids, and nothing pickled.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from flowerpets.core import ArrayRecord, ConfigRecord, RecordDict
from flowerpets.core.protocol import StageName
from flowerpets.secagg._primitives import aead, keys, shamir
from flowerpets.secagg._primitives.quantize import Quantization
from flowerpets.secagg.graph import HararyGraph

__all__ = [
    "MASKED_ARRAY",
    "MASKED_RECORD",
    "PROTOCOL_VERSION",
    "RECORD",
    "SESSION_BYTES",
    "SHARE_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "Layout",
    "RoundConfig",
    "Stage",
]

PROTOCOL_VERSION = 1
RECORD = "secagg+"
MASKED_RECORD = "secagg+/masked"
MASKED_ARRAY = "vector"
SESSION_BYTES = 16

# HKDF "info" strings: one purpose each, so one X25519 output never serves two.
INFO_SHARE_KEY = b"flowerpets/secagg+/v1/share-encryption-key"
INFO_PAIR_MASK = b"flowerpets/secagg+/v1/pairwise-mask-seed"

# One share of a 32-byte secret: 16 field elements as little-endian uint32.
SHARE_BYTES = 4 * shamir.SECRET_BYTES * 8 // shamir.CHUNK_BITS
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES  # a self-mask seed share, then a key share
SHARE_CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + aead.OVERHEAD


# Derivations both sides compute: a node for its masks and shares, the server to
# remove a dropped node's pairwise masks.
def pair_mask_seed(
    private: X25519PrivateKey, peer_public: bytes, *, session: bytes, round: int
) -> bytes:
    """The seed of the pairwise mask two nodes share (symmetric in the two)."""
    info = INFO_PAIR_MASK + round.to_bytes(8, "little")
    return keys.agree(private, peer_public, salt=session, info=info)


def share_key(private: X25519PrivateKey, peer_public: bytes, *, session: bytes) -> bytes:
    """The AES-GCM key for the shares two nodes exchange (symmetric in the two)."""
    return keys.agree(private, peer_public, salt=session, info=INFO_SHARE_KEY)


def elements_to_share(elements: NDArray[np.uint64]) -> bytes:
    return np.asarray(elements, dtype="<u4").tobytes()


class Stage(StageName):
    """The four stages of a SecAgg+ round, as they appear in ``Metadata.stage``.

    Fault injection names them, e.g. ``Dropout(node=3, round=2, stage=Stage.UNMASK)``.
    """

    ADVERTISE_KEYS = "secagg+/advertise-keys"
    SHARE_KEYS = "secagg+/share-keys"
    COLLECT_MASKED_INPUT = "secagg+/collect-masked-input"
    UNMASK = "secagg+/unmask"

    ALL = enum.nonmember((ADVERTISE_KEYS, SHARE_KEYS, COLLECT_MASKED_INPUT, UNMASK))
    PREFIX = enum.nonmember("secagg+/")


T = TypeVar("T")


def field(record: ConfigRecord, key: str, kind: type[T]) -> T:
    """``record[key]``, checked to be of ``kind`` (ValueError naming the field otherwise)."""
    if key not in record:
        raise ValueError(f"the {RECORD!r} record lacks {key!r}")
    value = record[key]
    if kind is int and isinstance(value, bool):
        raise ValueError(f"{RECORD}[{key!r}] must be an int, got a bool")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ValueError(f"{RECORD}[{key!r}] must be {kind.__name__}, got {type(value).__name__}")
    return value


def int_list(record: ConfigRecord, key: str) -> list[int]:
    values = field(record, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{RECORD}[{key!r}] must be a list of ints")
    return [int(v) for v in values]


def bytes_list(record: ConfigRecord, key: str, *, size: int | None = None) -> list[bytes]:
    values = field(record, key, list)
    if not all(isinstance(v, bytes) for v in values):
        raise ValueError(f"{RECORD}[{key!r}] must be a list of bytes")
    if size is not None and any(len(v) != size for v in values):
        raise ValueError(f"every item of {RECORD}[{key!r}] must be {size} bytes")
    return list(values)


def str_list(record: ConfigRecord, key: str) -> list[str]:
    values = field(record, key, list)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{RECORD}[{key!r}] must be a list of str")
    return list(values)


def protocol_record(content: RecordDict) -> ConfigRecord:
    """The :data:`RECORD` of a stage message or reply (ValueError if it is missing)."""
    if RECORD not in content:
        raise ValueError(f"the message carries no {RECORD!r} record")
    record = content[RECORD]
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"{RECORD!r} must be a ConfigRecord, got {type(record).__name__}")
    return record


@dataclass(frozen=True)
class RoundConfig:
    """Everything a node needs to know about a round, sent with the first stage.

    ``order`` is the cohort in ring order (the Harary graph's random labelling);
    the node derives its own neighbourhood from it. ``weight_key`` is the reply
    metric that weighs the update (None: unweighted), ``secure_metrics`` the
    reply metrics summed under the masks too.
    """

    session: bytes
    order: tuple[int, ...]
    degree: int
    threshold: int
    clipping_range: float
    max_weight: int
    weight_key: str | None
    secure_metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or len(self.session) != SESSION_BYTES:
            raise ValueError(f"the session id must be {SESSION_BYTES} bytes")
        self.graph  # noqa: B018  (validates order and degree)
        if not 2 <= self.threshold <= self.degree:
            raise ValueError(
                f"threshold must be in [2, degree={self.degree}], got {self.threshold}"
            )
        self.quantization  # noqa: B018  (validates the encoding, refuses overflow)
        if len(set(self.secure_metrics)) != len(self.secure_metrics):
            raise ValueError("secure_metrics lists a metric twice")

    @cached_property
    def graph(self) -> HararyGraph:
        return HararyGraph(self.order, self.degree)

    @cached_property
    def quantization(self) -> Quantization:
        return Quantization(
            cohort_size=len(self.order),
            clipping_range=self.clipping_range,
            max_weight=self.max_weight,
        )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "version": PROTOCOL_VERSION,
                "session": self.session,
                "order": list(self.order),
                "degree": self.degree,
                "threshold": self.threshold,
                "clipping-range": float(self.clipping_range),
                "max-weight": self.max_weight,
                "weight-key": self.weight_key or "",
                "secure-metrics": list(self.secure_metrics),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        """Parse and validate; anything malformed raises ``ValueError`` naming it."""
        version = field(record, "version", int)
        if version != PROTOCOL_VERSION:
            raise ValueError(f"unsupported SecAgg+ protocol version {version}")
        clipping = field(record, "clipping-range", float)
        if not (math.isfinite(clipping) and clipping > 0):
            raise ValueError(f"clipping-range must be finite and > 0, got {clipping}")
        weight_key = field(record, "weight-key", str)
        return cls(
            session=field(record, "session", bytes),
            order=tuple(int_list(record, "order")),
            degree=field(record, "degree", int),
            threshold=field(record, "threshold", int),
            clipping_range=clipping,
            max_weight=field(record, "max-weight", int),
            weight_key=weight_key or None,
            secure_metrics=tuple(str_list(record, "secure-metrics")),
        )


# Array kinds as the vector encodes them: quantized floats, or exact integers.
FLOAT, INTEGER = "f", "i"
_KINDS = {"f": FLOAT, "b": INTEGER, "i": INTEGER, "u": INTEGER}


def kind_of(dtype_kind: str, name: str) -> str:
    try:
        return _KINDS[dtype_kind]
    except KeyError:
        raise ValueError(
            f"array {name!r} of dtype kind {dtype_kind!r} cannot be securely aggregated "
            "(only float, integer and bool arrays can)"
        ) from None


@dataclass(frozen=True, slots=True)
class Layout:
    """How a masked vector is laid out: the arrays (flattened, in order), then a tail.

    Not a core :class:`~flowerpets.core.ArrayLayout`: the wire carries each
    array's kind (quantized float or exact integer), never its dtype.

    The tail is the weight (an exact integer), the secure metrics (quantized
    like float arrays) and a clipping flag (1 if the node clipped anything).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...]
    metrics: tuple[str, ...] = ()

    @classmethod
    def of_arrays(cls, arrays: ArrayRecord, metrics: Sequence[str] = ()) -> Layout:
        return cls(
            names=tuple(arrays),
            shapes=tuple(a.shape for a in arrays.values()),
            kinds=tuple(kind_of(a.dtype.kind, name) for name, a in arrays.items()),
            metrics=tuple(metrics),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def weight_index(self) -> int:
        return sum(self.sizes)

    @property
    def clip_index(self) -> int:
        return self.weight_index + 1 + len(self.metrics)

    @property
    def length(self) -> int:
        return self.clip_index + 1

    def signature(self) -> tuple[Any, ...]:
        return (self.names, self.shapes, self.kinds, self.metrics)

    def write(self, record: ConfigRecord) -> None:
        record["names"] = list(self.names)
        record["ndims"] = [len(shape) for shape in self.shapes]
        record["dims"] = [d for shape in self.shapes for d in shape]
        record["kinds"] = list(self.kinds)
        record["length"] = self.length

    @classmethod
    def read(cls, record: ConfigRecord, metrics: Sequence[str]) -> Layout:
        names = str_list(record, "names")
        ndims = int_list(record, "ndims")
        dims = int_list(record, "dims")
        kinds = str_list(record, "kinds")
        if not len(names) == len(ndims) == len(kinds) or sum(ndims) != len(dims):
            raise ValueError("the layout's names, ndims, dims and kinds do not match")
        if any(d < 0 for d in dims) or any(k not in (FLOAT, INTEGER) for k in kinds):
            raise ValueError("the layout has a negative dimension or an unknown kind")
        shapes, at = [], 0
        for ndim in ndims:
            shapes.append(tuple(dims[at : at + ndim]))
            at += ndim
        layout = cls(tuple(names), tuple(shapes), tuple(kinds), tuple(metrics))
        if field(record, "length", int) != layout.length:
            raise ValueError("the layout's length does not match its arrays")
        return layout

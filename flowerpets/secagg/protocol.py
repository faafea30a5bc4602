"""What SecAgg+ messages carry: stage names, record names, and the round's configuration.

Every stage message is a message of the round's own type (``train`` or
``query``) whose metadata names its stage (:class:`Stage`); the simulation's
fault injection can therefore drop a node at exactly one stage. Its protocol
fields travel in a :class:`~flowerpets.core.ConfigRecord` named
:data:`RECORD`; the masked vector travels in an ``ArrayRecord`` named
:data:`MASKED_RECORD`. Wire formats are explicit: fixed-size byte strings for
keys and shares, lists of node ids, and nothing pickled. What a node signs
(malicious mode) is a :func:`transcript`: a domain string and length-prefixed
fields, so no two different contents encode alike and no signature made for
one purpose passes for another.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from flowerpets._validation import instance, integer, one_of, strings
from flowerpets.core import ArrayRecord, ConfigRecord, QuantizedDomain, RecordDict
from flowerpets.core.fields import Fields
from flowerpets.core.layout import ArrayLayout
from flowerpets.core.protocol import StageName
from flowerpets.exceptions import (
    ConfigurationError,
    InvalidUpdateError,
    ParameterTypeError,
    ParameterValueError,
    ProtocolViolationError,
)
from flowerpets.secagg._primitives import aead, keys, shamir, signatures
from flowerpets.secagg._primitives.quantize import Quantization
from flowerpets.secagg.graph import HararyGraph
from flowerpets.secagg.parameters import Threat  # one enum: the finder's rule and the stages

__all__ = [
    "FLOAT",
    "INTEGER",
    "MASKED_ARRAY",
    "MASKED_RECORD",
    "MODULAR",
    "PROTOCOL_VERSION",
    "RECORD",
    "SESSION_BYTES",
    "SHARE_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "SIGNATURE_BYTES",
    "Layout",
    "RoundConfig",
    "Stage",
    "Threat",
    "advertisement",
    "survivor_set",
    "survivor_sets",
    "transcript",
]

# 2: the round configuration names its threat model; the malicious mode's signed
# advertisements and its consistency-check stage (issue 13).
# 3: the round configuration names its quantized domain (modulus bits, residue arrays),
# and a layout may hold modular arrays (kind "m"; issue 14).
# 4: the round configuration carries the quantized domain's binding (the digest of what
# the noising mod sent the nodes), and its digest covers it.
PROTOCOL_VERSION = 4
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
SIGNATURE_BYTES = signatures.SIGNATURE_BYTES

# Signature domains: one per signed content, so a signature never serves two purposes.
DOMAIN_CONFIG = b"flowerpets/secagg+/v2/round-config"
DOMAIN_ADVERTISE = b"flowerpets/secagg+/v2/advertise-keys"
DOMAIN_CONSISTENCY = b"flowerpets/secagg+/v2/consistency-check"


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
    """The stages of a SecAgg+ round, as they appear in ``Metadata.stage``.

    A semi-honest round runs four; a malicious-mode round runs the consistency
    check between collect-masked-input and unmask
    (:data:`flowerpets.secagg.threat.MODELS` says which run). Fault injection
    names them, e.g. ``Dropout(node=3, round=2, stage=Stage.UNMASK)``.
    """

    ADVERTISE_KEYS = "secagg+/advertise-keys"
    SHARE_KEYS = "secagg+/share-keys"
    COLLECT_MASKED_INPUT = "secagg+/collect-masked-input"
    UNMASK = "secagg+/unmask"
    # Runs before unmask, listed last: it came in protocol version 2.
    CONSISTENCY_CHECK = "secagg+/consistency-check"

    # Every stage a node answers, in the order of their members.
    ALL = enum.nonmember(
        (ADVERTISE_KEYS, SHARE_KEYS, COLLECT_MASKED_INPUT, UNMASK, CONSISTENCY_CHECK)
    )
    PREFIX = enum.nonmember("secagg+/")


# -- what nodes sign ----------------------------------------------------------------
_LENGTH = struct.Struct("<I")
_INT_BYTES = 16  # node ids and counts: signed, so any id a record can carry encodes


def _field(value: bytes | int | str) -> bytes:
    if isinstance(value, bytes):
        return _LENGTH.pack(len(value)) + value
    if isinstance(value, str):
        return _field(value.encode("utf-8"))
    try:
        return _field(value.to_bytes(_INT_BYTES, "little", signed=True))
    except OverflowError:
        raise ProtocolViolationError("an integer too large to sign") from None


def transcript(domain: bytes, *fields: bytes | int | str | Iterable[int]) -> bytes:
    """``domain`` and the fields, each length-prefixed (a list of ints: its count, then each)."""
    out = [_field(domain)]
    for value in fields:
        if isinstance(value, bytes | int | str):
            out.append(_field(value))
        else:
            items = [_field(int(item)) for item in value]
            out.append(_LENGTH.pack(len(items)) + b"".join(items))
    return b"".join(out)


def advertisement(config: RoundConfig, round: int, node: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a node signs when it advertises its keys: the round's whole configuration
    (session, ring order, degree, threshold, ...), the round, its id and both keys."""
    # No cache: the configuration enters as its (cached) digest, so this is a few fields.
    return transcript(DOMAIN_ADVERTISE, config.digest, round, node, c_pk, s_pk)


def survivor_set(config: RoundConfig, round: int, node: int, survivors: Iterable[int]) -> bytes:
    """What a node signs at the consistency check: the set of nodes whose masked inputs the
    server says it holds (sorted: a set, whatever order it was sent in), then its id."""
    return survivor_sets(config, round, survivors)(node)


def survivor_sets(
    config: RoundConfig, round: int, survivors: Iterable[int]
) -> Callable[[int], bytes]:
    """:func:`survivor_set` of one set for any node: the set is sorted and encoded once (a
    node checks up to ``max(t, q)`` signatures of its set, the server one per survivor)."""
    prefix = _survivors_prefix(config.digest, round, tuple(sorted(survivors)))
    return lambda node: prefix + _field(node)


@functools.lru_cache(maxsize=8)
def _survivors_prefix(digest: bytes, round: int, survivors: tuple[int, ...]) -> bytes:
    # A node checks t (or q) signatures of one set: everything but their ids is shared. The
    # key is the configuration's digest (it covers every field; hashing the config itself
    # would hash its whole ring order on every call), the round and the whole set.
    return transcript(DOMAIN_CONSISTENCY, digest, round, survivors)


def fields_of(content: RecordDict | None) -> Fields:
    """The :data:`RECORD` of a stage message or reply, read through core
    :class:`~flowerpets.core.fields.Fields` (MessageFieldError if it is missing)."""
    return Fields.of(content, RECORD)


def _fields(record: ConfigRecord | Fields) -> Fields:
    return record if isinstance(record, Fields) else Fields(record, RECORD)


@dataclass(frozen=True)
class RoundConfig:
    """Everything a node needs to know about a round, sent with the first stage.

    ``order`` is the cohort in ring order (the Harary graph's random labelling);
    the node derives its own neighbourhood from it. ``weight_key`` is the reply
    metric that weighs the update (None: unweighted), ``secure_metrics`` the
    reply metrics summed under the masks too. ``quantized`` (None: none) is the
    round's :class:`~flowerpets.core.QuantizedDomain`: the reply arrays it names
    are residues, sent as they are (kind ``"m"``: no quantization, no weight) and
    summed modulo its modulus; its ``binding`` (the digest of what the noising mod
    sent the nodes) travels with it. The :attr:`digest` covers every field, so in
    malicious mode a server that tells two nodes different domains is caught
    like one that tells them different ring orders. ``quorum`` (malicious mode;
    0: none) is how many nodes of the whole cohort must have signed a node's
    survivor set before it unmasks, on top of its ``t`` neighbours: more than
    half the cohort, so that every node that unmasks was shown one set.
    """

    session: bytes
    order: tuple[int, ...]
    degree: int
    threshold: int
    clipping_range: float
    max_weight: int
    weight_key: str | None
    secure_metrics: tuple[str, ...]
    threat: Threat = Threat.SEMI_HONEST
    quantized: QuantizedDomain | None = None
    quorum: int = 0

    def __post_init__(self) -> None:
        if len(instance("session", self.session, bytes)) != SESSION_BYTES:
            raise ParameterValueError(f"the session id must be {SESSION_BYTES} bytes")
        self.graph  # noqa: B018  (validates order and degree)
        integer("threshold", self.threshold, at_least=2, at_most=self.degree)
        self.quantization  # noqa: B018  (validates the encoding, refuses overflow)
        if self.weight_key is not None:
            instance("weight_key", self.weight_key, str)
        strings("secure_metrics", self.secure_metrics, unique=True)
        instance("threat", self.threat, Threat)
        if self.quantized is not None:
            instance("quantized", self.quantized, QuantizedDomain)
        n = len(self.order)
        if integer("quorum", self.quorum, at_least=0, at_most=n) and (
            self.quorum <= n // 2 or self.threat is not Threat.MALICIOUS
        ):
            raise ParameterValueError(
                f"quorum must be 0 or, in malicious rounds, more than half the cohort of {n}; "
                f"got {self.quorum}"
            )

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the whole configuration: what a signed advertisement binds a node's
        keys to (so neighbours that were sent different ring orders refuse each other)."""
        data = transcript(
            DOMAIN_CONFIG,
            PROTOCOL_VERSION,
            self.session,
            self.order,
            self.degree,
            self.threshold,
            struct.pack("<d", self.clipping_range),
            self.max_weight,
            self.weight_key or "",
            len(self.secure_metrics),
            *self.secure_metrics,
            self.threat.value,
            self.modulus_bits,
            len(self.modular_names),
            *self.modular_names,
            self.binding,
            self.quorum,
        )
        return hashlib.sha256(data).digest()

    @property
    def modulus_bits(self) -> int:
        """The quantized domain's modulus bits; 0 when the round has none."""
        return 0 if self.quantized is None else self.quantized.modulus_bits

    @property
    def modular_names(self) -> tuple[str, ...]:
        """The reply arrays summed modulo (the quantized domain's names); () without one."""
        return () if self.quantized is None else self.quantized.names

    @property
    def binding(self) -> bytes:
        """The quantized domain's binding (see :class:`~flowerpets.core.QuantizedDomain`);
        ``b""`` without a domain or a binding."""
        return b"" if self.quantized is None else self.quantized.binding

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
                "threat": self.threat.value,
                "modulus-bits": self.modulus_bits,
                "modular-names": list(self.modular_names),
                "binding": self.binding,
                "quorum": self.quorum,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord | Fields) -> RoundConfig:
        """Parse and validate a peer's configuration.

        A field missing or mistyped raises MessageFieldError; well-typed values
        that no round can use raise ProtocolViolationError naming what is wrong.
        """
        fields = _fields(record)
        version = fields.get("version", int)
        if version != PROTOCOL_VERSION:
            raise ProtocolViolationError(f"unsupported SecAgg+ protocol version {version}")
        clipping = fields.get("clipping-range", float)
        if not (math.isfinite(clipping) and clipping > 0):
            raise ProtocolViolationError(f"clipping-range must be finite and > 0, got {clipping}")
        weight_key = fields.get("weight-key", str)
        threat = fields.get("threat", str)
        if threat not in set(Threat):
            raise ProtocolViolationError(f"unknown threat model {threat[:40]!r}")
        bits = fields.get("modulus-bits", int)
        modular = tuple(fields.items("modular-names", str))
        binding = fields.get("binding", bytes)
        if bits == 0 and (modular or binding):
            raise ProtocolViolationError(
                "modular-names or a binding are given without modulus-bits"
            )
        try:
            quantized = (
                None
                if bits == 0
                else QuantizedDomain(modulus_bits=bits, names=modular, binding=binding)
            )
            return cls(
                session=fields.get("session", bytes),
                order=tuple(fields.items("order", int)),
                degree=fields.get("degree", int),
                threshold=fields.get("threshold", int),
                clipping_range=clipping,
                max_weight=fields.get("max-weight", int),
                weight_key=weight_key or None,
                secure_metrics=tuple(fields.items("secure-metrics", str)),
                threat=Threat(threat),
                quantized=quantized,
                quorum=fields.get("quorum", int),
            )
        except (ParameterTypeError, ParameterValueError, ConfigurationError) as exc:
            raise ProtocolViolationError(f"the round configuration: {exc}") from None


# Array kinds as the vector encodes them: quantized floats, exact integers, or residues
# (a quantized domain's arrays: the words are the residues, summed modulo 2**bits).
FLOAT, INTEGER, MODULAR = "f", "i", "m"
_KINDS = {"f": FLOAT, "b": INTEGER, "i": INTEGER, "u": INTEGER}


def kind_of(dtype_kind: str, name: str) -> str:
    try:
        return _KINDS[dtype_kind]
    except KeyError:
        raise InvalidUpdateError(
            f"array {name!r} of dtype kind {dtype_kind!r} cannot be securely aggregated "
            "(only float, integer and bool arrays can)"
        ) from None


# The dtype each kind is released in by the server's sum: the kinds map one-to-one to them.
_DTYPE_OF_KIND = {
    FLOAT: np.dtype(np.float64).str,
    INTEGER: np.dtype(np.int64).str,
    MODULAR: np.dtype(np.uint64).str,
}
_KIND_OF_DTYPE = {dtype: kind for kind, dtype in _DTYPE_OF_KIND.items()}


@dataclass(frozen=True, slots=True)
class Layout:
    """How a masked vector is laid out: the arrays (flattened, in order), then a tail.

    The arrays are a core :class:`~flowerpets.core.ArrayLayout` (names and
    shapes), whose dtypes are those the server's sum releases them in: float64
    for quantized floats, int64 for exact integers, uint64 for the residues of
    a quantized domain (modular). The wire carries each array's kind (``"f"``,
    ``"i"`` or ``"m"``), which maps one-to-one to those, never the dtype a
    node's update had.

    The tail is the weight (an exact integer), the secure metrics (quantized
    like float arrays) and a clipping flag (1 if the node clipped anything).
    """

    arrays: ArrayLayout
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        instance("arrays", self.arrays, ArrayLayout)
        for name, _, dtype in self.arrays.items():
            if dtype not in _KIND_OF_DTYPE:
                raise ParameterValueError(
                    f"array {name!r}: a masked vector sums float64, int64 or uint64 arrays, "
                    f"got {dtype}"
                )
        strings("metrics", self.metrics)

    @classmethod
    def of_kinds(
        cls,
        names: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        kinds: Sequence[str],
        metrics: Sequence[str] = (),
    ) -> Layout:
        """The layout of arrays of these names, shapes and kinds (``FLOAT``, ``INTEGER``,
        ``MODULAR``)."""
        dtypes = tuple(_DTYPE_OF_KIND[one_of("kind", k, _DTYPE_OF_KIND)] for k in kinds)
        return cls(ArrayLayout(tuple(names), tuple(shapes), dtypes), tuple(metrics))

    @classmethod
    def of_arrays(
        cls, arrays: ArrayRecord, metrics: Sequence[str] = (), modular: Iterable[str] = ()
    ) -> Layout:
        """The layout of ``arrays``: those named in ``modular`` are ``MODULAR`` (their
        values are checked where they are encoded), the others by their dtype."""
        residues = set(modular)
        return cls.of_kinds(
            tuple(arrays),
            tuple(a.shape for a in arrays.values()),
            tuple(
                MODULAR if name in residues else kind_of(a.dtype.kind, name)
                for name, a in arrays.items()
            ),
            metrics,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return self.arrays.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.arrays.shapes

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(_KIND_OF_DTYPE[dtype] for dtype in self.arrays.dtypes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.arrays.sizes

    @property
    def modular_names(self) -> tuple[str, ...]:
        """The arrays of kind ``MODULAR``, in layout order."""
        return tuple(n for n, k in zip(self.names, self.kinds, strict=True) if k == MODULAR)

    @property
    def weight_index(self) -> int:
        return self.arrays.size

    @property
    def clip_index(self) -> int:
        return self.weight_index + 1 + len(self.metrics)

    @property
    def length(self) -> int:
        return self.clip_index + 1

    def signature(self) -> tuple[Any, ...]:
        return (self.arrays, self.metrics)

    def write(self, record: ConfigRecord) -> None:
        record["names"] = list(self.names)
        record["ndims"] = [len(shape) for shape in self.shapes]
        record["dims"] = [d for shape in self.shapes for d in shape]
        record["kinds"] = list(self.kinds)
        record["length"] = self.length

    @classmethod
    def read(cls, record: ConfigRecord | Fields, metrics: Sequence[str]) -> Layout:
        """A peer's layout; one whose parts do not fit together is an InvalidUpdateError."""
        fields = _fields(record)
        names = fields.items("names", str)
        ndims = fields.items("ndims", int)
        dims = fields.items("dims", int)
        kinds = fields.items("kinds", str)
        if not len(names) == len(ndims) == len(kinds) or sum(ndims) != len(dims):
            raise InvalidUpdateError("the layout's names, ndims, dims and kinds do not match")
        if any(d < 0 for d in ndims + dims) or any(k not in _DTYPE_OF_KIND for k in kinds):
            raise InvalidUpdateError("the layout has a negative dimension or an unknown kind")
        if len(set(names)) != len(names):
            raise InvalidUpdateError("the layout names an array twice")
        shapes, at = [], 0
        for ndim in ndims:
            shapes.append(tuple(dims[at : at + ndim]))
            at += ndim
        layout = cls.of_kinds(names, shapes, kinds, metrics)
        if fields.get("length", int) != layout.length:
            raise InvalidUpdateError("the layout's length does not match its arrays")
        return layout

"""Records both ways between flowerpets and Flower (flwr), without copying where flwr allows.

flwr's :class:`flwr.app.Array` holds ``bytes`` in NumPy's ``.npy`` format
(``stype="numpy.ndarray"``), the format flwr's own ``Array.numpy()`` and
strategies read. So:

* flwr -> ours never copies array data: the ``.npy`` header is parsed and our
  :class:`~flowerpets.core.Array` is a read-only NumPy view of flwr's ``bytes``;
* ours -> flwr copies each array once (``bytes`` must own its data), unless the
  array came from flwr in the same :class:`Session`: then flwr's original
  ``Array`` is handed back, with no copy at all.

Config and metric values are shared as they are (``bytes`` are immutable).
What flwr accepts and we refuse (an empty key, a non-numeric dtype, an ``Array``
of another ``stype``) raises :class:`~flowerpets.exceptions.RecordTypeError`;
a malformed ``.npy`` payload raises :class:`~flowerpets.exceptions.CodecError`.
Integers travel on flwr's wire as signed or unsigned 64-bit values.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr import app as fl
from flwr.common.constant import SType
from numpy.typing import NDArray

from flowerpets.core import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flowerpets.exceptions import CodecError, RecordTypeError

__all__ = [
    "Session",
    "array_from_flwr",
    "array_to_flwr",
    "recorddict_from_flwr",
    "recorddict_to_flwr",
]


class Session:
    """Remembers which of our arrays are views of which flwr arrays, for one message.

    A mod that forwards what it received (a clipping mod passes the global model
    on to the handler) then costs no copy on the way back to flwr. The session
    holds strong references, so an ``id`` cannot be reused while it lives.
    """

    __slots__ = ("_arrays",)

    def __init__(self) -> None:
        self._arrays: dict[int, tuple[Array, fl.Array]] = {}

    def remember(self, ours: Array, theirs: fl.Array) -> None:
        self._arrays[id(ours)] = (ours, theirs)

    def lookup(self, ours: Array) -> fl.Array | None:
        hit = self._arrays.get(id(ours))
        return hit[1] if hit is not None and hit[0] is ours else None


# -- arrays -----------------------------------------------------------------------------------
def _npy_header(array: NDArray[Any]) -> bytes:
    out = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(out, header)
    except ValueError:  # a header too long for format 1.0 (a very high-dimensional shape)
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, header)
    return out.getvalue()


def array_to_flwr(array: Array, session: Session | None = None) -> fl.Array:
    """Our Array as a flwr Array in ``.npy`` form (one copy, none if ``session`` knows it)."""
    if session is not None and (known := session.lookup(array)) is not None:
        return known
    data = array.numpy()
    # One allocation: the header, then the raw C-order bytes viewed as uint8.
    payload = b"".join((_npy_header(data), data.reshape(-1).view(np.uint8).data))
    return fl.Array(
        dtype=str(data.dtype),
        shape=tuple(int(n) for n in data.shape),
        stype=SType.NUMPY,
        data=payload,
    )


def array_from_flwr(array: fl.Array, session: Session | None = None) -> Array:
    """A flwr Array as ours: a read-only view of its bytes, never a copy of C-order data."""
    if array.stype != SType.NUMPY:
        raise RecordTypeError(
            f"only flwr Arrays of stype {SType.NUMPY!r} can be read, got {array.stype!r}"
        )
    data = array.data
    stream = io.BytesIO(data)  # shares the bytes' buffer until written to
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise CodecError(f"unsupported .npy format version {version}")
    except (ValueError, OSError) as exc:
        raise CodecError(f"malformed .npy payload in a flwr Array: {exc}") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise RecordTypeError(f"Array holds numeric or boolean data only, got dtype {dtype!r}")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise CodecError(
            f"a flwr Array's payload holds {len(data) - offset} bytes, its header claims "
            f"{count * dtype.itemsize}"
        )
    if tuple(array.shape) != tuple(shape):
        raise CodecError(f"a flwr Array's shape {array.shape} disagrees with its payload's")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    view = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    ours = Array(view, copy=False)  # Array copies only non-native byte order or Fortran order
    if session is not None:
        session.remember(ours, array)
    return ours


# -- records ----------------------------------------------------------------------------------
def _array_record_to_flwr(record: ArrayRecord, session: Session | None) -> fl.ArrayRecord:
    out = fl.ArrayRecord()
    for name, array in record.items():
        out[name] = array_to_flwr(array, session)
    return out


def _array_record_from_flwr(record: fl.ArrayRecord, session: Session | None) -> ArrayRecord:
    out = ArrayRecord()
    for name, array in record.items():
        out[name] = array_from_flwr(array, session)
    return out


def recorddict_to_flwr(records: RecordDict, session: Session | None = None) -> fl.RecordDict:
    """Our RecordDict as flwr's, same names, order and values."""
    out = fl.RecordDict()
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            out[name] = _array_record_to_flwr(record, session)
        elif isinstance(record, MetricRecord):
            out[name] = fl.MetricRecord(dict(record.items()))
        else:
            out[name] = fl.ConfigRecord(dict(record.items()))
    return out


def recorddict_from_flwr(records: fl.RecordDict, session: Session | None = None) -> RecordDict:
    """flwr's RecordDict as ours; values flwr allows and we do not raise RecordTypeError."""
    out = RecordDict()
    for name, record in records.items():
        if isinstance(record, fl.ArrayRecord):
            out[name] = _array_record_from_flwr(record, session)
        elif isinstance(record, fl.MetricRecord):
            out[name] = MetricRecord(dict(record.items()))
        elif isinstance(record, fl.ConfigRecord):
            out[name] = ConfigRecord(dict(record.items()))
        else:
            raise RecordTypeError(f"unknown flwr record type {type(record).__name__}")
    return out

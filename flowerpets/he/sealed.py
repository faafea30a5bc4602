"""The encrypted sum the server holds, and how a node opens a sealed model.

:class:`EncryptedSum` is the ``sealed`` part of a
:class:`~flowerpets.core.RoundResult`: CKKS ciphertexts of
``sum_i weight_i * update_i`` over the encrypted arrays, flat-packed. It
implements :class:`~flowerpets.core.SealedArrays`, so

* a mod that post-processes sums (central DP's noise) adds to it through
  :meth:`~flowerpets.core.RoundResult.add_to_sum` without knowing it is
  encrypted: the plaintext is encoded and added to the ciphertexts, which
  needs no key;
* :class:`~flowerpets.core.FedAvg` sends its wire form to the nodes with the
  total weight, and the nodes' client mod opens and divides it
  (:func:`open_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from flowerpets.core import SEALED_WEIGHT_KEY, Array, ArrayRecord, Context, is_sealed
from flowerpets.exceptions import (
    CiphertextError,
    MissingKeyError,
    ParameterValueError,
    RoundFailedError,
)
from flowerpets.he._primitives.ciphertexts import (
    Header,
    decrypt_vectors,
    load_vectors,
    split_wire,
    wire_arrays,
)
from flowerpets.he._primitives.packing import chunk_views, peak
from flowerpets.he._primitives.params import load_secret_context
from flowerpets.he._state import ClientKeys, ClientPhase

if TYPE_CHECKING:
    import tenseal as ts  # for annotations only

__all__ = ["EncryptedSum", "open_model"]


class EncryptedSum:
    """A weighted sum of CKKS-encrypted updates: the server can add to it, never read it.

    Immutable from the outside: :meth:`add_plaintext` returns a new sum. An
    empty sum (no update arrived) has no ciphertexts and cannot be sent.
    """

    __slots__ = ("_context", "_header", "_vectors")

    def __init__(
        self,
        *,
        context: ts.Context,
        header: Header,
        vectors: Sequence[ts.CKKSVector] = (),
    ) -> None:
        if header.order is None:
            raise ParameterValueError("an encrypted sum's header must carry the model order")
        if vectors and len(vectors) != header.chunks:
            raise ParameterValueError(
                f"{len(vectors)} ciphertexts, the layout needs {header.chunks}"
            )
        self._context = context
        self._header = header
        self._vectors = tuple(vectors)

    def __repr__(self) -> str:
        return (
            f"EncryptedSum({len(self._header.layout.arrays)} arrays, "
            f"{self._header.layout.size} values, {len(self._vectors)} ciphertexts)"
        )

    @property
    def header(self) -> Header:
        return self._header

    @property
    def empty(self) -> bool:
        return not self._vectors

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._header.layout.shapes()

    def add_plaintext(self, arrays: Mapping[str, NDArray[np.float64]]) -> EncryptedSum:
        """This sum plus ``arrays`` (a subset of the encrypted names; the rest count as zero).

        An unknown name raises :class:`~flowerpets.exceptions.UnknownArrayError` (a
        ``KeyError``), a wrong shape or NaN ``InvalidUpdateError`` (a ``ValueError``).
        The plaintext is encoded at the sum's scale and added to each
        ciphertext; nothing is encrypted, so no key is needed.
        """
        layout = self._header.layout
        flat = layout.pack(arrays)
        peak(flat)  # refuses NaN and infinity
        if self.empty:
            raise RoundFailedError("no encrypted update was summed: nothing to add to")
        slots = self._header.params.slots
        chunks = chunk_views(flat, slots)
        vectors = [v + chunk for v, chunk in zip(self._vectors, chunks, strict=True)]
        return EncryptedSum(context=self._context, header=self._header, vectors=vectors)

    def to_arrays(self) -> ArrayRecord:
        """The wire form: ``he.header`` (with the model order) and one array per ciphertext."""
        if self.empty:
            raise RoundFailedError("no encrypted update was summed: there is no sealed model")
        return wire_arrays(self._header, (v.serialize() for v in self._vectors))


class CiphertextSum:
    """The server's running sum: one aggregate, to which each checked update is added."""

    __slots__ = ("_context", "_count", "_header", "_vectors")

    def __init__(self, *, context: ts.Context, header: Header) -> None:
        self._context = context
        self._header = header
        self._vectors: list[ts.CKKSVector] = []
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def header(self) -> Header:
        """The round's header: what every update must match (see :func:`split_wire`)."""
        return self._header

    def load(self, chunks: Sequence[Array | bytes], header: Header) -> list[ts.CKKSVector]:
        """Check an update's header against the sum's and load its ciphertexts (all checked)."""
        header.require_like(self._header)
        if header.order is not None:
            raise CiphertextError("an update's header must not carry a model order")
        return load_vectors(self._context, chunks, header)

    def add(self, vectors: Sequence[ts.CKKSVector]) -> None:
        """Add a loaded update in place (the first one becomes the aggregate)."""
        if len(vectors) != self._header.chunks:
            raise CiphertextError(f"{len(vectors)} ciphertexts, expected {self._header.chunks}")
        if not self._vectors:
            self._vectors = list(vectors)
        else:
            for total, vector in zip(self._vectors, vectors, strict=True):
                total.add_(vector)
        self._count += 1

    def result(self) -> EncryptedSum:
        """The sum so far (handed over: the accumulator must not be used afterwards)."""
        return EncryptedSum(context=self._context, header=self._header, vectors=self._vectors)


# -- the node's side -----------------------------------------------------------------------------
def open_sealed(arrays: ArrayRecord, keys: ClientKeys) -> ArrayRecord:
    """Decrypt and divide a sealed global model with a node's key (see :func:`open_model`)."""
    if keys.phase is not ClientPhase.HOLDS_KEY or keys.params is None:
        raise MissingKeyError("this node holds no CKKS key: it cannot open the sealed model")
    weight_array = arrays[SEALED_WEIGHT_KEY].numpy()
    if weight_array.shape != () or weight_array.dtype.kind != "f":
        raise CiphertextError(f"{SEALED_WEIGHT_KEY} must be a float scalar")
    total_weight = float(weight_array)
    if not (np.isfinite(total_weight) and total_weight > 0):
        raise CiphertextError(f"total weight {total_weight} cannot divide the sum")
    rest = {name: a for name, a in arrays.items() if name != SEALED_WEIGHT_KEY}
    plain, header, chunks = split_wire(rest)
    if header is None or header.order is None:
        raise CiphertextError("a sealed model without its encrypted part or its model order")
    if header.key_id != keys.key_id or header.params != keys.params:
        raise MissingKeyError(
            f"the model is sealed under key {header.key_id}, this node holds {keys.key_id}"
        )
    names = [*plain, *header.layout.names]
    if sorted(names) != sorted(header.order):
        raise CiphertextError(f"the sealed model holds {names}, its header says {header.order}")
    context = load_secret_context(keys.secret_context, keys.params)
    flat = decrypt_vectors(load_vectors(context, chunks, header), header.layout.size)
    peak(flat)  # a sum that wrapped around or was tampered with may decode to inf/NaN
    opened = header.layout.unpack(flat, total_weight)
    model = ArrayRecord()
    for name in header.order:
        model[name] = plain[name] if name in plain else Array(opened[name], copy=False)
    return model


def open_model(arrays: ArrayRecord, context: Context) -> ArrayRecord:
    """The model as the nodes see it: ``arrays`` opened with the key in ``context.state``.

    ``arrays`` that are not sealed come back unchanged. In simulation, open the
    run's final model with any node that holds the key::

        result = run_simulation(server_app, client_app, 10)
        model = open_model(result.arrays, result.contexts[0])

    Raises :class:`~flowerpets.exceptions.MissingKeyError` if the context
    holds no key (the server's does not), and
    :class:`~flowerpets.exceptions.CiphertextError` if the model is malformed.
    """
    if not is_sealed(arrays):
        return arrays
    return open_sealed(arrays, ClientKeys.load(context.state))

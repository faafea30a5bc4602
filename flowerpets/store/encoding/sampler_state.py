"""A cohort sampler's generator, as JSON and back, so a resumed run draws what it would have.

The ServerApp draws cohorts from a :class:`numpy.random.Generator` (seeded from
the OS's secure source, or from the run's seed). Its bit generator's ``state``
is a dict of ints and strings (PCG64, the default), or of arrays for some
others; arrays are written as ``{"ndarray": [...], "dtype": ...}``. Only
numpy's own bit generators are rebuilt, by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from flowerpets.exceptions import CorruptStoreError

__all__ = ["generator_from_state", "generator_state"]

_BIT_GENERATORS: Final = {
    "MT19937": np.random.MT19937,
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
}


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"ndarray", "dtype"}:
            return np.asarray(value["ndarray"], dtype=np.dtype(str(value["dtype"])))
        return {k: _from_json(v) for k, v in value.items()}
    return value


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """The JSON-able state of ``rng``'s bit generator."""
    return dict(_to_json(rng.bit_generator.state))


def generator_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A generator in exactly the state :func:`generator_state` recorded."""
    name = state.get("bit_generator") if isinstance(state, Mapping) else None
    kind = _BIT_GENERATORS.get(str(name))
    if kind is None:
        raise CorruptStoreError(f"the stored sampler state names no known bit generator ({name!r})")
    bit_generator = kind()
    try:
        bit_generator.state = _from_json(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptStoreError(
            f"the stored {name} sampler state cannot be restored: {exc}"
        ) from None
    return np.random.Generator(bit_generator)

"""HomomorphicAggregation's state in a run store: the key's public side and the model's layout.

With a store (``ServerApp(..., store=writer)``) the mod commits, with every
round, what the server itself holds between rounds and nothing more: the key
state (:class:`~flowerpets.he._state.ServerKeys`: the phase, the key id, the
parameters, the public context, which is the parameters alone and holds no key
of any kind, the nodes that hold the key and the one that generated it), the
sealed model's layout (:class:`~flowerpets.he._aggregation.ModelLayout`) and the
settings they were made under (the parameters, the encryption patterns). Each is
the context's own state record, strict to read (:mod:`flowerpets.core.state`),
in one core codec frame (versioned, bounded, with its CRC; never pickle).

A resume restores exactly that state, or refuses with a typed
:class:`~flowerpets.exceptions.StoredKeyStateError`: no state although rounds
were committed, a frame or record that cannot be read, a context that is not
the public parameters alone, other settings. A restored key is ``RESUMED``:
no key set-up is run again, and the first round asks the nodes whether they
still hold it (:mod:`flowerpets.he._keysetup`).
"""

from __future__ import annotations

from collections.abc import Sequence

from flowerpets.core import ConfigRecord, RecordDict, ServerContext
from flowerpets.core.codec import CodecLimits, decode_record_dict, encode_record_dict
from flowerpets.core.fields import Fields
from flowerpets.exceptions import (
    CodecError,
    KeyMaterialError,
    MessageFieldError,
    StateError,
    StoredKeyStateError,
)
from flowerpets.he._aggregation import MODEL_RECORD, ModelLayout
from flowerpets.he._primitives.params import CKKSParameters, load_public_context
from flowerpets.he._state import SERVER_RECORD, ServerEvent, ServerKeys, ServerPhase

__all__ = ["STATE_NAME", "encode_state", "restore_state"]

STATE_NAME = "he"
"""The name HomomorphicAggregation's state is stored under in a run."""

_SETTINGS = "he.settings"
_VERSION = 1
# The state is a few hundred bytes plus the layout's names: far below this.
_LIMITS = CodecLimits(max_message_bytes=16 << 20)


def _settings(params: CKKSParameters, encrypt: Sequence[str]) -> ConfigRecord:
    return ConfigRecord({"version": _VERSION, "params": params.to_list(), "encrypt": list(encrypt)})


def encode_state(context: ServerContext, params: CKKSParameters, encrypt: Sequence[str]) -> bytes:
    """The run's key state and model layout in ``context``, with the settings, as one frame."""
    record = RecordDict({_SETTINGS: _settings(params, encrypt)})
    ServerKeys.load(context.state).store(record)
    model = ModelLayout.load(context.state)
    if model is not None:
        model.store(record)
    return encode_record_dict(record)


def restore_state(
    context: ServerContext,
    state: bytes | None,
    *,
    round: int,
    params: CKKSParameters,
    encrypt: Sequence[str],
) -> None:
    """Put the state committed with ``round`` in ``context``, its key ``RESUMED``; or refuse.

    Raises :class:`StoredKeyStateError` if it cannot be continued by a mod
    with ``params`` and ``encrypt``.
    """
    where = f"run {context.run_id}"
    if state is None:
        if round > 0:
            raise StoredKeyStateError(
                f"{where} committed {round} round(s) but stored no HomomorphicAggregation state: "
                "its key and its sealed model's layout cannot be continued"
            )
        return
    malformed = f"the stored HomomorphicAggregation state of {where} is malformed"
    try:
        record = decode_record_dict(state, limits=_LIMITS)
        settings = Fields.of(record, _SETTINGS)
        version = settings.get("version", int)
        stored_params = settings.items("params", int)
        stored_encrypt = settings.items("encrypt", str)
        keys = ServerKeys.require(record)
        model = ModelLayout.load(record)
    except (CodecError, MessageFieldError, StateError) as exc:
        raise StoredKeyStateError(f"{malformed} ({type(exc).__name__})") from None
    unknown = set(record) - {_SETTINGS, SERVER_RECORD, MODEL_RECORD}
    if unknown or set(settings.record) != {"version", "params", "encrypt"} or version != _VERSION:
        raise StoredKeyStateError(malformed)
    changed = [
        name
        for name, stored, given in (
            ("params", stored_params, params.to_list()),
            ("encrypt", stored_encrypt, list(encrypt)),
        )
        if stored != given
    ]
    if changed:
        raise StoredKeyStateError(
            f"{where} was run with other HomomorphicAggregation settings ({', '.join(changed)} "
            "differ): resume it with the settings its key and model were made under"
        )
    if keys.phase is not ServerPhase.NO_KEY:
        if keys.params != params:
            raise StoredKeyStateError(f"{where}'s stored key is of other parameters than its own")
        try:
            load_public_context(keys.public_context, params)  # refuses one holding a secret
        except KeyMaterialError as exc:
            raise StoredKeyStateError(f"{where}'s stored public context: {exc}") from None
        keys = keys.after(ServerEvent.RESUMED)
    keys.store(context.state)
    if model is not None:
        model.store(context.state)

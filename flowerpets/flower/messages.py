"""Messages, metadata, error codes and contexts both ways between flowerpets and flwr.

What travels where (flwr 1.42 keeps each of these end to end, through its
simulation and its SuperLink):

* **round and stage** travel in flwr's ``group_id``: ``"<round>"`` for a plain
  message (what flwr's own strategies send: ``str(server_round)``) and
  ``"<round>:<stage>"`` for a protocol stage (``"3:secagg+/share-keys"``).
  Round 0 with no stage is ``""``, flwr's default. Replies inherit the
  request's ``group_id`` in flwr, so a reply's round and stage come back too.
* **message types**: flwr accepts only ``train``, ``evaluate``, ``query`` (and
  ``<category>.<action>`` with an identifier action). Those pass unchanged. Our
  PET types that flwr refuses get a ``query.flowerpets_...`` name: HE's key
  set-up ``he-keys`` is ``query.flowerpets_he_keys``; any other type ``t`` is
  ``query.flowerpets_x<hex of t's UTF-8>``. The mapping is injective, and a flwr
  type under the reserved ``query.flowerpets_`` prefix that none of ours maps to
  is refused.
* **error codes**: the three codes both sides define alike map to each other
  (0 unknown, our ``CLIENT_APP_RAISED_EXCEPTION`` = flwr's 2, our
  ``NODE_UNAVAILABLE`` = flwr's 5); our other codes travel as ``1000 + code``.
  A flwr code we do not define becomes our nearest code, and its number is
  kept in the reason as ``"flwr error code N: ..."`` so that it maps back.
* **node ids, message ids, run id, reply-to id, creation time** map one to one;
  flwr's ``ttl`` has no counterpart in ours and is supplied on the way back.

Every ours -> flwr -> ours conversion is the identity (property-tested).
"""

from __future__ import annotations

import re
from typing import Any, Final, cast

from flwr import app as fl
from flwr.app.metadata import validate_message_type
from flwr.common.constant import ErrorCode as FlwrErrorCode

from flowerpets.core import Context, Error, ErrorCode, Message, Metadata, RecordDict
from flowerpets.exceptions import CodecError
from flowerpets.flower.records import Session, recorddict_from_flwr, recorddict_to_flwr

__all__ = [
    "RESERVED_TYPE_PREFIX",
    "context_from_flwr",
    "error_from_flwr",
    "error_to_flwr",
    "group_id",
    "message_from_flwr",
    "message_to_flwr",
    "message_type_from_flwr",
    "message_type_to_flwr",
    "metadata_from_flwr",
    "metadata_to_flwr",
    "parse_group_id",
    "state_from_flwr",
    "write_state",
]

# -- message types ----------------------------------------------------------------------------
RESERVED_TYPE_PREFIX: Final = "query.flowerpets_"
_NAMED_TYPES: Final = {"he-keys": RESERVED_TYPE_PREFIX + "he_keys"}
_NAMED_BACK: Final = {v: k for k, v in _NAMED_TYPES.items()}
_HEX: Final = re.compile(r"(?:[0-9a-f]{2})+")


def message_type_to_flwr(message_type: str) -> str:
    """The flwr message type our ``message_type`` travels as (see the module docstring)."""
    if message_type in _NAMED_TYPES:
        return _NAMED_TYPES[message_type]
    if validate_message_type(message_type) and not message_type.startswith(RESERVED_TYPE_PREFIX):
        return message_type
    return RESERVED_TYPE_PREFIX + "x" + message_type.encode("utf-8").hex()


def message_type_from_flwr(message_type: str) -> str:
    """Our message type for flwr's; a reserved name none of ours maps to raises CodecError."""
    if not message_type.startswith(RESERVED_TYPE_PREFIX):
        return message_type
    if message_type in _NAMED_BACK:
        return _NAMED_BACK[message_type]
    rest = message_type[len(RESERVED_TYPE_PREFIX) :]
    if rest.startswith("x") and _HEX.fullmatch(rest[1:]):
        try:
            ours = bytes.fromhex(rest[1:]).decode("utf-8")
        except UnicodeDecodeError:
            ours = ""
        if ours and message_type_to_flwr(ours) == message_type:
            return ours
    raise CodecError(f"flwr message type {message_type!r} uses the reserved flowerpets prefix")


# -- round and stage --------------------------------------------------------------------------
def group_id(round: int, stage: str) -> str:
    """flwr's ``group_id`` for our round and stage."""
    if not stage:
        return "" if round == 0 else str(round)
    return f"{round}:{stage}"


_ROUND: Final = re.compile(r"-?(?:0|[1-9][0-9]*)")


def parse_group_id(value: str) -> tuple[int, str]:
    """Our round and stage from flwr's ``group_id``; other forms raise CodecError."""
    if value == "":
        return 0, ""
    head, sep, stage = value.partition(":")
    if not _ROUND.fullmatch(head) or head == "-0" or (sep and not stage):
        raise CodecError(
            f"flwr group_id {value!r} is not '<round>' or '<round>:<stage>': flowerpets mods "
            "need the round there (flwr's strategies send str(server_round))"
        )
    return int(head), stage


# -- errors -----------------------------------------------------------------------------------
_OFFSET: Final = 1000
_SHARED: Final = {
    ErrorCode.UNKNOWN: FlwrErrorCode.UNKNOWN,
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: FlwrErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    ErrorCode.NODE_UNAVAILABLE: FlwrErrorCode.NODE_UNAVAILABLE,
}
_SHARED_BACK: Final = {v: k for k, v in _SHARED.items()}
# flwr's codes we do not define, by what they mean to a round.
_FOREIGN: Final = {
    FlwrErrorCode.LOAD_CLIENT_APP_EXCEPTION: ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    FlwrErrorCode.MESSAGE_UNAVAILABLE: ErrorCode.NODE_UNAVAILABLE,
    FlwrErrorCode.REPLY_MESSAGE_UNAVAILABLE: ErrorCode.TIMEOUT,
    FlwrErrorCode.MOD_FAILED_PRECONDITION: ErrorCode.REFUSED,
    FlwrErrorCode.INVALID_FAB: ErrorCode.UNKNOWN,
    FlwrErrorCode.CLIENT_APP_CRASHED: ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
}
_TAG: Final = re.compile(r"flwr error code (-?[0-9]+): ")
# Our codes that travel as 1000 + code: those flwr does not define alike.
_OURS: Final = frozenset(int(c) for c in ErrorCode if c not in _SHARED)


def _is_foreign(code: int) -> bool:
    return code not in _SHARED_BACK and not (code >= _OFFSET and code - _OFFSET in _OURS)


def _foreign_meaning(code: int) -> ErrorCode:
    return _FOREIGN.get(code, ErrorCode.UNKNOWN)


def error_to_flwr(error: Error) -> fl.Error:
    """Our error as flwr's."""
    match = _TAG.match(error.reason)
    if match is not None:
        code = int(match.group(1))
        if (
            str(code) == match.group(1)
            and _is_foreign(code)
            and _foreign_meaning(code) == error.code
        ):
            return fl.Error(code=code, reason=error.reason[match.end() :])
    if error.code in _SHARED:
        return fl.Error(code=_SHARED[error.code], reason=error.reason)
    return fl.Error(code=_OFFSET + int(error.code), reason=error.reason)


def error_from_flwr(error: fl.Error) -> Error:
    """flwr's error as ours (a missing reason is ``""``)."""
    reason = error.reason or ""
    code = int(error.code)
    if code in _SHARED_BACK:
        return Error(_SHARED_BACK[code], reason)
    if not _is_foreign(code):
        return Error(ErrorCode(code - _OFFSET), reason)
    return Error(_foreign_meaning(code), f"flwr error code {code}: {reason}")


# -- metadata and messages --------------------------------------------------------------------
def metadata_to_flwr(metadata: Metadata, *, ttl: float = fl.DEFAULT_TTL) -> fl.Metadata:
    """Our metadata as flwr's, with ``ttl`` (ours has none)."""
    return fl.Metadata(
        run_id=metadata.run_id,
        message_id=metadata.message_id,
        src_node_id=metadata.src_node_id,
        dst_node_id=metadata.dst_node_id,
        reply_to_message_id=metadata.reply_to_message_id,
        group_id=group_id(metadata.round, metadata.stage),
        created_at=metadata.created_at,
        ttl=ttl,
        message_type=message_type_to_flwr(metadata.message_type),
    )


def metadata_from_flwr(metadata: fl.Metadata) -> Metadata:
    """flwr's metadata as ours (flwr's ``ttl`` and task ids are not kept)."""
    round, stage = parse_group_id(metadata.group_id)
    return Metadata(
        run_id=metadata.run_id,
        message_id=metadata.message_id,
        src_node_id=metadata.src_node_id,
        dst_node_id=metadata.dst_node_id,
        round=round,
        message_type=message_type_from_flwr(metadata.message_type),
        reply_to_message_id=metadata.reply_to_message_id,
        stage=stage,
        created_at=metadata.created_at,
    )


def _flwr_message(**fields: Any) -> fl.Message:
    # flwr's Message takes ``metadata=`` (for its own runtimes; its overloads omit it): the
    # only way to keep a message's ids, which our replies are matched by.
    message: fl.Message = cast(Any, fl.Message)(**fields)
    return message


def message_to_flwr(
    message: Message, session: Session | None = None, *, ttl: float = fl.DEFAULT_TTL
) -> fl.Message:
    """Our message as flwr's, metadata and all (for a request or a reply)."""
    metadata = metadata_to_flwr(message.metadata, ttl=ttl)
    if message.error is not None:
        return _flwr_message(error=error_to_flwr(message.error), metadata=metadata)
    assert message.content is not None
    return _flwr_message(content=recorddict_to_flwr(message.content, session), metadata=metadata)


def message_from_flwr(message: fl.Message, session: Session | None = None) -> Message:
    """flwr's message as ours."""
    metadata = metadata_from_flwr(message.metadata)
    if message.has_error():
        return Message(metadata=metadata, error=error_from_flwr(message.error))
    return Message(metadata=metadata, content=recorddict_from_flwr(message.content, session))


# -- contexts ---------------------------------------------------------------------------------
def state_from_flwr(state: fl.RecordDict, session: Session | None = None) -> RecordDict:
    """A flwr context's state as our RecordDict."""
    return recorddict_from_flwr(state, session)


def write_state(state: RecordDict, into: fl.RecordDict, session: Session | None = None) -> None:
    """Make flwr's state ``into`` hold exactly ``state`` (same names, order and values)."""
    converted = recorddict_to_flwr(state, session)
    for name in list(into.keys()):
        del into[name]
    for name, record in converted.items():
        into[name] = record


def context_from_flwr(context: fl.Context, session: Session | None = None) -> Context:
    """flwr's context as ours: ids, both configs and the state (converted)."""
    return Context(
        node_id=context.node_id,
        run_id=context.run_id,
        node_config=dict(context.node_config),
        run_config=dict(context.run_config),
        state=state_from_flwr(context.state, session),
    )

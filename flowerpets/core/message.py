"""Messages between the server and the nodes, and the errors they can carry."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from enum import IntEnum

from flowerpets._validation import string
from flowerpets.core.records import RecordDict
from flowerpets.exceptions import MessageFieldError, ParameterValueError, RecordTypeError

__all__ = ["Error", "ErrorCode", "Message", "MessageType", "Metadata"]


class MessageType:
    """The message types every ClientApp understands. PETs may add their own."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    QUERY = "query"


class ErrorCode(IntEnum):
    """Why a reply carries an error instead of content."""

    UNKNOWN = 0
    CLIENT_APP_RAISED_EXCEPTION = 1
    MOD_RAISED_EXCEPTION = 2
    UNKNOWN_MESSAGE_TYPE = 3
    INVALID_REPLY = 4
    REFUSED = 5  # a mod refused the request on purpose (for example, a protocol check failed)
    TIMEOUT = 6
    NODE_UNAVAILABLE = 7
    INJECTED_FAULT = 8  # the simulation's fault injection, never a real failure


@dataclass(frozen=True, slots=True)
class Error:
    """What went wrong, carried by a reply instead of content."""

    code: ErrorCode
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.reason}" if self.reason else self.code.name


def new_message_id() -> str:
    """A fresh random message id (128 bits from the OS's secure source)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Metadata:
    """Who sent a message to whom, in which run and round, and what for.

    ``stage`` names the protocol step the message belongs to (empty for a plain
    train/evaluate/query): PET protocols name theirs so that logs and the
    simulation's fault injection can point at exactly one of them.
    """

    run_id: int
    message_id: str
    src_node_id: int
    dst_node_id: int
    round: int
    message_type: str
    reply_to_message_id: str = ""
    stage: str = ""
    created_at: float = field(default_factory=time.time)


SERVER_NODE_ID = 0


@dataclass(slots=True)
class Message:
    """A request or a reply: metadata plus either content or an error (never both).

    Build a request with :meth:`create` and a reply with :meth:`reply` or
    :meth:`error_reply`, which fill in the routing fields.
    """

    metadata: Metadata
    content: RecordDict | None = None
    error: Error | None = None

    def __post_init__(self) -> None:
        if (self.content is None) == (self.error is None):
            raise ParameterValueError("a Message holds exactly one of content or error")
        if self.content is not None and not isinstance(self.content, RecordDict):
            raise RecordTypeError(
                f"Message content must be a RecordDict, got {type(self.content).__name__}"
            )
        if self.error is not None and not isinstance(self.error, Error):
            raise RecordTypeError(f"Message error must be an Error, got {type(self.error)}")

    @classmethod
    def create(
        cls,
        content: RecordDict,
        *,
        message_type: str,
        dst_node_id: int,
        round: int,
        run_id: int = 0,
        stage: str = "",
        src_node_id: int = SERVER_NODE_ID,
    ) -> Message:
        """A new request from the server to ``dst_node_id``."""
        string("message_type", message_type, non_empty=True)
        metadata = Metadata(
            run_id=run_id,
            message_id=new_message_id(),
            src_node_id=src_node_id,
            dst_node_id=dst_node_id,
            round=round,
            message_type=message_type,
            stage=stage,
        )
        return cls(metadata=metadata, content=content)

    # -- convenient views --------------------------------------------------
    @property
    def has_error(self) -> bool:
        return self.error is not None

    @property
    def message_type(self) -> str:
        return self.metadata.message_type

    @property
    def round(self) -> int:
        return self.metadata.round

    def require_content(self) -> RecordDict:
        """The content; a clear error if the message is an error reply."""
        if self.content is None:
            raise MessageFieldError(
                f"message {self.metadata.message_id} from node {self.metadata.src_node_id} "
                f"carries an error, not content: {self.error}"
            )
        return self.content

    # -- replies -----------------------------------------------------------
    def _reply_metadata(self) -> Metadata:
        md = self.metadata
        return replace(
            md,
            message_id=new_message_id(),
            src_node_id=md.dst_node_id,
            dst_node_id=md.src_node_id,
            reply_to_message_id=md.message_id,
            created_at=time.time(),
        )

    def reply(self, content: RecordDict) -> Message:
        """A reply to this message carrying ``content``."""
        return Message(metadata=self._reply_metadata(), content=content)

    def error_reply(self, error: Error) -> Message:
        """A reply to this message carrying ``error``."""
        return Message(metadata=self._reply_metadata(), error=error)

    def is_reply_to(self, request: Message) -> bool:
        md, rq = self.metadata, request.metadata
        return (
            md.reply_to_message_id == rq.message_id
            and md.src_node_id == rq.dst_node_id
            and md.dst_node_id == rq.src_node_id
            and md.run_id == rq.run_id
            and md.round == rq.round
        )

    def with_private_content(self) -> Message:
        """This message with its own copy of the record mappings (arrays stay shared).

        A runtime hands each node such a copy so a mod that edits its request in
        place cannot change what another node receives.
        """
        content = self.content.deep_copy() if self.content is not None else None
        return Message(metadata=self.metadata, content=content, error=self.error)

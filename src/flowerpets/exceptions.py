"""Every exception flowerpets raises on purpose, in one flat module.

Each class subclasses the built-in that fits, so ``except ValueError`` keeps
working for callers who do not know flowerpets, and ``except FlowerpetsError``
catches everything of ours.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "CorruptMessageError",
    "FlowerpetsError",
    "InvalidUpdateError",
    "MessageTooLargeError",
    "RecordTypeError",
    "RequestRefusedError",
    "RoundFailedError",
    "StopRunError",
    "TruncatedMessageError",
    "UnsupportedVersionError",
]


class FlowerpetsError(Exception):
    """Base class of every error that flowerpets raises on purpose."""


class RecordTypeError(FlowerpetsError, TypeError):
    """A record was given a key or value of a type it does not hold."""


class RequestRefusedError(FlowerpetsError, RuntimeError):
    """A node refused a request on purpose, for example because a protocol check failed.

    A client mod raises it to say no; the node's reply then carries an error with
    code ``REFUSED`` and this exception's message as the reason.
    """


class InvalidUpdateError(FlowerpetsError, ValueError):
    """A client's update cannot be aggregated: wrong names, shapes or dtypes, or NaN/inf."""


class RoundFailedError(FlowerpetsError, RuntimeError):
    """A round could not complete, for example because too few nodes replied."""


class StopRunError(FlowerpetsError, RuntimeError):
    """A server mod ends the run on purpose (for example, the privacy budget is spent).

    The ServerApp stops before the round that raised it changes the model and
    returns what the run produced so far, with this error's message as the reason.
    """


class CodecError(FlowerpetsError, ValueError):
    """Bytes that do not decode to a message. The subclasses say why."""


class TruncatedMessageError(CodecError):
    """The input ended before the message did."""


class MessageTooLargeError(CodecError):
    """The message, or one of its parts, is larger than the configured bound."""


class CorruptMessageError(CodecError):
    """The bytes are of the right length but do not form a valid message."""


class UnsupportedVersionError(CodecError):
    """The message was written in a wire-format version this build cannot read."""

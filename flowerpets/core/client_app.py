"""ClientApp: a node's message handlers, wrapped in mods.

.. code-block:: python

    app = ClientApp(mods=[fixed_clipping_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        ...
        return msg.reply(RecordDict({"arrays": new_arrays, "metrics": metrics}))

A handler may also return a bare :class:`RecordDict`; it becomes the reply's
content. Whatever a handler or a mod raises becomes an error reply: a node
never crashes on a bad message. Mods see a handler's failure as an error reply
and pass it on. Error replies travel in the clear, so a reply names only the
type of an exception that is not flowerpets' own (see :func:`failure_reason`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flowerpets._validation import string
from flowerpets.core.context import Context
from flowerpets.core.message import Error, ErrorCode, Message, MessageType
from flowerpets.core.mods import chain
from flowerpets.core.records import RecordDict
from flowerpets.exceptions import (
    FlowerpetsError,
    ParameterTypeError,
    ParameterValueError,
    RequestRefusedError,
)

__all__ = ["ClientApp", "ClientMod", "Handler", "as_reply", "failure_reason", "failure_reply"]

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message | RecordDict]
ClientMod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def failure_reason(exc: BaseException) -> str:
    """The reason an error reply gives for ``exc``: what went wrong, never a private value.

    Error replies travel in the clear. flowerpets' own errors
    (:class:`~flowerpets.exceptions.FlowerpetsError`) are raised on purpose with
    reasons that say what was wrong without the private value, so their message
    is sent. Any other exception's message may quote anything (a handler's
    ``ValueError(f"loss {loss} diverged")``, a library quoting the data), so
    only its type is sent; the node's log keeps the rest.
    """
    if isinstance(exc, FlowerpetsError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (the details are in the node's log)"


def failure_reply(msg: Message, context: Context, exc: Exception, code: ErrorCode) -> Message:
    """The error reply for what a handler or mod raised: ``REFUSED`` if it said no on purpose."""
    if isinstance(exc, RequestRefusedError):
        log.info("node %s refused %r: %s", context.node_id, msg.message_type, exc)
        return msg.error_reply(Error(ErrorCode.REFUSED, str(exc)))
    log.warning("node %s: %r failed", context.node_id, msg.message_type, exc_info=True)
    return msg.error_reply(Error(code, failure_reason(exc)))


def as_reply(handler: Handler) -> Callable[[Message, Context], Message]:
    """Run ``handler`` and make sure what comes back is a valid reply to ``msg``."""

    def call(msg: Message, context: Context) -> Message:
        try:
            out = handler(msg, context)
        except Exception as exc:  # a handler's bug must not take the node down
            return failure_reply(msg, context, exc, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        if isinstance(out, RecordDict):
            return msg.reply(out)
        if isinstance(out, Message) and out.is_reply_to(msg):
            return out
        return msg.error_reply(
            Error(
                ErrorCode.INVALID_REPLY,
                f"handler for {msg.message_type!r} returned {type(out).__name__}, "
                "expected a RecordDict or msg.reply(...)",
            )
        )

    return call


class ClientApp:
    """A node's handlers by message type, each behind the app's mods and its own."""

    def __init__(self, *, mods: Sequence[ClientMod] = ()) -> None:
        for mod in mods:
            if not callable(mod):
                raise ParameterTypeError(f"ClientApp mods must be callable, got {mod!r}")
        self._mods = tuple(mods)
        self._handlers: dict[str, Callable[[Message, Context], Message]] = {}
        self._chain = chain(self._mods, self._dispatch)

    @property
    def mods(self) -> tuple[ClientMod, ...]:
        return self._mods

    @property
    def message_types(self) -> tuple[str, ...]:
        """The message types this app has handlers for."""
        return tuple(self._handlers)

    # -- registration ------------------------------------------------------
    def handler(
        self, message_type: str, *, mods: Sequence[ClientMod] = ()
    ) -> Callable[[Handler], Handler]:
        """Register a handler for ``message_type`` behind ``mods`` (inside the app's mods)."""
        string("message_type", message_type, non_empty=True)

        def register(fn: Handler) -> Handler:
            if message_type in self._handlers:
                raise ParameterValueError(f"a handler for {message_type!r} is already registered")
            self._handlers[message_type] = chain(tuple(mods), as_reply(fn))
            return fn

        return register

    def train(self, *, mods: Sequence[ClientMod] = ()) -> Callable[[Handler], Handler]:
        return self.handler(MessageType.TRAIN, mods=mods)

    def evaluate(self, *, mods: Sequence[ClientMod] = ()) -> Callable[[Handler], Handler]:
        return self.handler(MessageType.EVALUATE, mods=mods)

    def query(self, *, mods: Sequence[ClientMod] = ()) -> Callable[[Handler], Handler]:
        return self.handler(MessageType.QUERY, mods=mods)

    # -- running -----------------------------------------------------------
    def _dispatch(self, msg: Message, context: Context) -> Message:
        handler = self._handlers.get(msg.message_type)
        if handler is None:
            return msg.error_reply(
                Error(
                    ErrorCode.UNKNOWN_MESSAGE_TYPE,
                    f"no handler for message type {msg.message_type!r} "
                    f"(this app handles {sorted(self._handlers)!r})",
                )
            )
        return handler(msg, context)

    def __call__(self, msg: Message, context: Context) -> Message:
        """Handle one message; always returns a reply, never raises."""
        try:
            reply = self._chain(msg, context)
        except Exception as exc:  # a mod's refusal or bug becomes an error reply
            return failure_reply(msg, context, exc, ErrorCode.MOD_RAISED_EXCEPTION)
        if not isinstance(reply, Message) or not reply.is_reply_to(msg):
            return msg.error_reply(
                Error(
                    ErrorCode.INVALID_REPLY, "the mod chain did not return a reply to the request"
                )
            )
        return reply

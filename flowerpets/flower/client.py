"""Our client mods (and whole ClientApps) inside a Flower ``flwr.clientapp.ClientApp``.

.. code-block:: python

    from flowerpets.dp import fixed_clipping_mod
    from flowerpets.flower import ClientApp, mods
    from flowerpets.secagg import secaggplus_mod

    app = ClientApp(mods=[mods(secaggplus_mod, fixed_clipping_mod)])   # a flwr ClientApp

    @app.train()
    def train(msg: flwr.app.Message, context: flwr.app.Context) -> flwr.app.Message:
        ...   # plain Flower code

:func:`mods` makes **one** flwr Mod of our mods (first listed outermost, as in
our :class:`~flowerpets.core.ClientApp`): per message it converts the request,
the context's state and, on the way in and out of flwr's ``call_next``, the
inner request and reply; errors keep their codes. :func:`client_app` runs a
whole flowerpets ClientApp (its handlers and mods) as a flwr ClientApp.

flwr routes a message to a mod only through a registered handler, and our PET
protocols use message types no Flower app registers (HE's key set-up). Our
:class:`ClientApp` (a flwr ClientApp) registers those itself, so nobody writes a
dummy handler; a protocol message that no mod answers gets an
``UNKNOWN_MESSAGE_TYPE`` error reply saying where the mod belongs (app-level).

Refused, with an error reply that says what to use instead: a ``train``
request that did not come from our server bridge
(:func:`flowerpets.flower.server_app`) when a mod replies with something a
Flower strategy would average as weights but is not (a clipped *update*, a
CKKS ciphertext). Flower's own strategies cannot tell.

Mods survive pickling (flwr's simulation ships the app to Ray workers): the
bridge keeps only the mods, and builds the chain per message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Final

import flwr.clientapp
from flwr import app as fl
from flwr.clientapp.typing import Mod

from flowerpets.core import ClientApp as OurClientApp
from flowerpets.core import ClientMod, Context, Error, ErrorCode, Message, MessageType, chain
from flowerpets.core.client_app import as_reply, failure_reply
from flowerpets.exceptions import FlowerpetsError, ParameterTypeError, ParameterValueError
from flowerpets.flower.messages import (
    context_from_flwr,
    error_to_flwr,
    message_from_flwr,
    message_to_flwr,
    message_type_to_flwr,
    state_from_flwr,
    write_state,
)
from flowerpets.flower.records import Session, recorddict_to_flwr

__all__ = [
    "BRIDGE_RECORD",
    "PROTOCOL_MESSAGE_TYPES",
    "ClientApp",
    "FlowerMod",
    "client_app",
    "mods",
]

FlwrCall = Callable[[fl.Message, fl.Context], fl.Message]

BRIDGE_RECORD: Final = "flowerpets.bridge"
"""Reserved content record: our server bridge marks every request it sends with it."""

PROTOCOL_MESSAGE_TYPES: Final = ("he-keys",)
"""Our message types that only mods answer (HE's key set-up), registered by :class:`ClientApp`."""


# (module, class, why): client mods whose replies a Flower strategy cannot average.
_CLASS_REPLIERS = (
    (
        "flowerpets.dp.distributed._client",
        "DistributedDpMod",
        "DistributedDpMod replies with noised residues modulo 2**bits, which only a secure sum "
        "can add up. Run the server with flowerpets.flower.server_app(ServerApp(..., "
        "mods=[DistributedDp(...), SecAggPlus()]))",
    ),
    (
        "flowerpets.he.client",
        "CKKSClientMod",
        "ckks_mod replies with CKKS ciphertexts, which a Flower strategy would average as "
        "weights. Run the server with flowerpets.flower.server_app(ServerApp(..., "
        "mods=[HomomorphicAggregation()]))",
    ),
)


def _update_replier(mod: object) -> str | None:
    """Why a Flower strategy must not average what ``mod`` replies, or None if it may."""
    # A module nobody imported holds no mod of ours: looked up, never imported here.
    clipping = sys.modules.get("flowerpets.dp.clipping")
    if clipping is not None and (
        mod is clipping.fixed_clipping_mod or mod is clipping.adaptive_clipping_mod
    ):
        name = getattr(mod, "__name__", "the clipping mod")
        return (
            f"{name} replies with a clipped model *update*, which a Flower strategy would "
            "average as weights. Run the server with flowerpets.flower.server_app(ServerApp("
            "..., mods=[CentralDp(...)])), keep your Flower strategy with "
            "flowerpets.flower.secure_strategy(strategy, mods=[CentralDp(...), SecAggPlus()]), "
            "or use Flower's own DifferentialPrivacyClientSideFixedClipping with flwr's "
            "fixedclipping_mod"
        )
    for module, kind, reason in _CLASS_REPLIERS:
        found = sys.modules.get(module)
        if found is not None and isinstance(mod, getattr(found, kind)):
            return reason
    return None


def _refusal(msg: Message, our_mods: Sequence[object]) -> Message | None:
    if msg.message_type != MessageType.TRAIN:
        return None
    for mod in our_mods:
        reason = _update_replier(mod)
        if reason is not None:
            return msg.error_reply(
                Error(ErrorCode.REFUSED, f"this request comes from a Flower strategy: {reason}")
            )
    return None


RunOurs = Callable[[Message, Context, Session, bool], Message]


def _bridge(
    msg: fl.Message, context: fl.Context, our_mods: Sequence[object], run: RunOurs
) -> fl.Message:
    """Convert ``msg`` and ``context``, ``run`` ours, convert the reply and the state back."""
    session = Session()
    try:
        ours = message_from_flwr(msg, session)
        our_context = context_from_flwr(context, session)
    except (FlowerpetsError, ValueError) as exc:
        # A request our mods cannot read: refused in the clear, naming what, not the values.
        error = Error(ErrorCode.REFUSED, f"{type(exc).__name__}: {exc}")
        return fl.Message(error_to_flwr(error), reply_to=msg)
    bridged = ours.content is not None and BRIDGE_RECORD in ours.content
    if bridged:
        assert ours.content is not None
        del ours.content[BRIDGE_RECORD]
    reply = None if bridged else _refusal(ours, our_mods)
    if reply is None:
        reply = run(ours, our_context, session, bridged)
        write_state(our_context.state, context.state, session)
    if reply.error is not None:
        return fl.Message(error_to_flwr(reply.error), reply_to=msg)
    assert reply.content is not None
    return fl.Message(recorddict_to_flwr(reply.content, session), reply_to=msg)


def _run_chain(
    call: Callable[[Message, Context], Message], msg: Message, context: Context
) -> Message:
    """What our ClientApp does around its chain: a reply always, never an exception."""
    try:
        reply = call(msg, context)
    except Exception as exc:  # a mod's refusal or bug becomes an error reply
        return failure_reply(msg, context, exc, ErrorCode.MOD_RAISED_EXCEPTION)
    if not isinstance(reply, Message) or not reply.is_reply_to(msg):
        return msg.error_reply(
            Error(ErrorCode.INVALID_REPLY, "the mod chain did not return a reply to the request")
        )
    return reply


class FlowerMod:
    """A flwr Mod that runs our client ``mods`` around flwr's ``call_next``.

    Build it with :func:`mods`. It holds nothing but the mods, so it pickles
    whenever they do.
    """

    __slots__ = ("mods",)

    def __init__(self, *client_mods: ClientMod) -> None:
        if not client_mods:
            raise ParameterValueError("flowerpets.flower.mods() needs at least one client mod")
        for mod in client_mods:
            if not callable(mod) or isinstance(mod, FlowerMod):
                raise ParameterTypeError(f"expected a flowerpets client mod, got {mod!r}")
        self.mods: tuple[ClientMod, ...] = tuple(client_mods)

    def __repr__(self) -> str:
        return f"flowerpets.flower.mods({', '.join(map(repr, self.mods))})"

    def __getstate__(self) -> tuple[ClientMod, ...]:
        return self.mods

    def __setstate__(self, state: tuple[ClientMod, ...]) -> None:
        self.mods = state

    def __call__(self, msg: fl.Message, context: fl.Context, call_next: FlwrCall) -> fl.Message:
        ttl = msg.metadata.ttl

        def run(ours: Message, our_context: Context, session: Session, bridged: bool) -> Message:
            def handler(inner: Message, ctx: Context) -> Message:
                request = message_to_flwr(inner, session, ttl=ttl)
                if bridged and request.has_content():  # nested bridge mods see the mark too
                    request.content[BRIDGE_RECORD] = fl.ConfigRecord({"version": 1})
                write_state(ctx.state, context.state, session)
                reply = call_next(request, context)
                fresh = state_from_flwr(context.state, session)
                for name in list(ctx.state):
                    del ctx.state[name]
                for name, record in fresh.items():
                    ctx.state[name] = record
                if reply.metadata.reply_to_message_id != request.metadata.message_id:
                    return inner.error_reply(
                        Error(ErrorCode.INVALID_REPLY, "flwr's handler replied to another message")
                    )
                back = message_from_flwr(reply, session)
                if back.error is not None:
                    return inner.error_reply(back.error)
                assert back.content is not None
                return inner.reply(back.content)

            return _run_chain(chain(self.mods, as_reply(handler)), ours, our_context)

        return _bridge(msg, context, self.mods, run)


def mods(*client_mods: ClientMod) -> FlowerMod:
    """One flwr Mod running ``client_mods`` (first listed outermost) around the handler."""
    return FlowerMod(*client_mods)


class _OurApp:
    """A flwr handler that runs a whole flowerpets ClientApp (picklable if the app is)."""

    __slots__ = ("app",)

    def __init__(self, app: OurClientApp) -> None:
        self.app = app

    def __getstate__(self) -> OurClientApp:
        return self.app

    def __setstate__(self, state: OurClientApp) -> None:
        self.app = state

    def __call__(self, msg: fl.Message, context: fl.Context) -> fl.Message:
        def run(ours: Message, our_context: Context, session: Session, bridged: bool) -> Message:
            return self.app(ours, our_context)

        return _bridge(msg, context, self.app.mods, run)


def _unanswered(msg: fl.Message, context: fl.Context) -> fl.Message:
    error = Error(
        ErrorCode.UNKNOWN_MESSAGE_TYPE,
        f"no mod answered the flowerpets protocol message {msg.metadata.message_type!r}: put "
        "flowerpets.flower.mods(...) in ClientApp(mods=[...]), not in one handler's mods",
    )
    return fl.Message(error_to_flwr(error), reply_to=msg)


def _register(app: flwr.clientapp.ClientApp, flwr_type: str, fn: FlwrCall) -> None:
    category, _, action = flwr_type.partition(".")
    register = getattr(app, category)(action) if action else getattr(app, category)()
    register(fn)


class ClientApp(flwr.clientapp.ClientApp):
    """A flwr ClientApp that also routes our PET protocol messages to its mods.

    Use it exactly as ``flwr.clientapp.ClientApp`` (``mods=[...]``, ``@app.train()``);
    put :func:`mods` in the app-level ``mods`` so protocol messages reach it.
    """

    def __init__(self, mods: list[Mod] | None = None) -> None:
        super().__init__(mods=mods)
        for our_type in PROTOCOL_MESSAGE_TYPES:
            _register(self, message_type_to_flwr(our_type), _unanswered)


def client_app(app: OurClientApp) -> flwr.clientapp.ClientApp:
    """Our whole ClientApp (handlers and mods) as a flwr ClientApp."""
    if not isinstance(app, OurClientApp):
        raise ParameterTypeError(
            f"client_app() takes a flowerpets ClientApp, got {type(app).__name__}"
        )
    out = flwr.clientapp.ClientApp()
    handler = _OurApp(app)
    for our_type in dict.fromkeys((*app.message_types, *PROTOCOL_MESSAGE_TYPES)):
        _register(out, message_type_to_flwr(our_type), handler)
    return out

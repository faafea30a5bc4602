"""The client-mod contract: every client mod flowerpets ships passes the same suite.

For each mod (built as its users build it, and again after a pickle round trip):

* a message of a type it does not handle reaches the handler untouched, and the
  handler's reply comes back untouched;
* an error reply from the inner chain, to a request the mod does handle, goes on
  with the same error (never content, never a different reason);
* bad construction arguments raise the fitting built-in, ``TypeError`` for a wrong
  type and ``ValueError`` for a wrong value, and that error is ours
  (:class:`~flowerpets.exceptions.FlowerpetsError`); a request the mod cannot
  accept is refused with :class:`~flowerpets.exceptions.RequestRefusedError`;
* it pickles and still works afterwards (a mod holding a live secret source builds
  it lazily and never pickles it), and its repr names it and its settings.

``DpSgd`` is not in the suite: it is a training helper a handler calls, not a mod.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    ErrorCode,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.dp import LocalDpMod, adaptive_clipping_mod, fixed_clipping_mod
from flowerpets.dp._protocol import CLIP_KEY, INDICATOR
from flowerpets.exceptions import FlowerpetsError, RequestRefusedError
from flowerpets.he import HE_MESSAGE_TYPE, CKKSClientMod, ckks_mod
from flowerpets.secagg import SecAggPlusClientMod, Stage, secaggplus_mod
from flowerpets.secagg.protocol import RECORD
from tests.secagg.conftest import Federation

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
CallNext = Callable[[Message, Context], Message]

OTHER_TYPES = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY, "contract.other")


def request(
    message_type: str = MessageType.TRAIN,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    config: dict[str, Any] | None = None,
    stage: str = "",
    node: int = 7,
) -> Message:
    arrays = {"w": np.zeros(3, np.float32)} if arrays is None else arrays
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "config": ConfigRecord(config or {"lr": 0.1})}
    )
    return Message.create(
        content, message_type=message_type, dst_node_id=node, round=1, run_id=1, stage=stage
    )


def plain_reply(msg: Message, *, arrays: bool = True) -> Message:
    body = RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 0.25})})
    if arrays:
        body["arrays"] = ArrayRecord({"w": np.full(3, 0.5, np.float32)})
    return msg.reply(body)


class Recorder:
    """An inner chain that records what it received and answers with a prepared reply."""

    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer = answer
        self.seen: list[Message] = []
        self.replies: list[Message] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        self.seen.append(msg)
        reply = self.answer(msg)
        self.replies.append(reply)
        return reply


@dataclass(frozen=True)
class Handled:
    """A request the mod handles and passes on to the inner chain, in its context."""

    msg: Message
    context: Context


@dataclass
class ModCase:
    """How the contract drives one mod."""

    build: Callable[[], Mod]
    handles: tuple[str, ...]  # message types the mod acts on (the others must pass through)
    handled: Callable[[Mod], Handled]  # a request the mod passes on to the inner chain
    bad_requests: Callable[[], list[Message]]  # requests the mod must refuse
    # Construction arguments that are wrong (class mods only), by the built-in they must raise,
    # each applied over ``base`` (arguments that work).
    base: dict[str, Any] = field(default_factory=dict)
    bad_types: list[dict[str, Any]] = field(default_factory=list)
    bad_values: list[dict[str, Any]] = field(default_factory=list)
    # The mod never lets arrays leave in the clear, whatever the type (by design).
    guards_every_array_reply: bool = False
    # What the inner chain answers in test_a_handled_request_works.
    good_reply: Callable[[Message], Message] = field(default=lambda m: plain_reply(m))
    repr_shows: tuple[str, ...] = ()


def _clip_handled(adaptive: bool) -> Callable[[Mod], Handled]:
    def handled(mod: Mod) -> Handled:
        arrays = {"w": np.zeros(3, np.float32)}
        if adaptive:
            arrays[INDICATOR] = np.zeros(1)
        return Handled(request(arrays=arrays, config={CLIP_KEY: 1.0}), Context(node_id=7))

    return handled


def _clip_bad(adaptive: bool) -> Callable[[], list[Message]]:
    def bad() -> list[Message]:
        arrays = {"w": np.zeros(3, np.float32)}
        if adaptive:
            arrays[INDICATOR] = np.zeros(1)
        other = {"w": np.zeros(3, np.float32)}
        if not adaptive:
            other[INDICATOR] = np.zeros(1)  # the server runs the other kind of clipping
        return [
            request(arrays=arrays),  # no clip at all
            request(arrays=arrays, config={CLIP_KEY: -1.0}),
            request(arrays=arrays, config={CLIP_KEY: float("nan")}),
            request(arrays=arrays, config={CLIP_KEY: "1.0"}),
            request(arrays=other, config={CLIP_KEY: 1.0}),
        ]

    return bad


def _local_handled(mod: Mod) -> Handled:
    return Handled(request(), Context(node_id=7))


_SECAGG_NODES = 4


def _secagg_handled(mod: Mod) -> Handled:
    """A COLLECT_MASKED_INPUT request after an honest set-up: the stage that calls the handler."""
    assert isinstance(mod, SecAggPlusClientMod)
    fed = Federation(_SECAGG_NODES, degree=_SECAGG_NODES - 1, threshold=2, params=3)
    fed.mod = mod
    from flowerpets.core import ClientApp

    fed.app = ClientApp(mods=[mod])
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    record = ConfigRecord({"session": fed.config.session, **fields})
    content = RecordDict({RECORD: record, **fed.train_content()})
    msg = Message.create(
        content,
        message_type=MessageType.TRAIN,
        dst_node_id=node,
        round=fed.round,
        run_id=1,
        stage=Stage.COLLECT_MASKED_INPUT,
    )
    return Handled(msg, fed.contexts[node])


def _secagg_bad() -> list[Message]:
    return [
        request(stage=Stage.PREFIX + "no-such-stage"),
        request(),  # a protected type in the clear
        request(MessageType.QUERY),
        request(stage="another-pet/stage"),  # a foreign stage would reach the handler in clear
        request(stage=Stage.SHARE_KEYS),  # out of order: no keys advertised
    ]


def _ckks_handled(mod: Mod) -> Handled:
    return Handled(request(), Context(node_id=7))


def _ckks_bad() -> list[Message]:
    return [
        request(HE_MESSAGE_TYPE, stage="no-such-stage"),
        request(HE_MESSAGE_TYPE, stage=""),
    ]


LOCAL_DP: dict[str, Any] = {"clipping_norm": 1.0, "epsilon": 1.0, "delta": 1e-5}

CASES: dict[str, ModCase] = {
    "fixed_clipping_mod": ModCase(
        build=lambda: fixed_clipping_mod,
        handles=(MessageType.TRAIN,),
        handled=_clip_handled(adaptive=False),
        bad_requests=_clip_bad(adaptive=False),
        repr_shows=("fixed_clipping_mod",),
    ),
    "adaptive_clipping_mod": ModCase(
        build=lambda: adaptive_clipping_mod,
        handles=(MessageType.TRAIN,),
        handled=_clip_handled(adaptive=True),
        bad_requests=_clip_bad(adaptive=True),
        repr_shows=("adaptive_clipping_mod",),
    ),
    "LocalDpMod": ModCase(
        build=lambda: LocalDpMod(**LOCAL_DP),
        handles=(MessageType.TRAIN,),
        handled=_local_handled,
        base=LOCAL_DP,
        bad_requests=lambda: [],  # it reads no request config
        bad_types=[
            {"clipping_norm": "1.0"},
            {"epsilon": None},
            {"delta": "1e-5"},
            {"neighbouring": "replace-one"},
            {"max_epsilon": "2"},
            {"keep_metrics": 3},
        ],
        bad_values=[
            {"clipping_norm": -1.0},
            {"epsilon": float("inf")},
            {"delta": 1.5},
            {"max_epsilon": 0.5},
            {"keep_metrics": ["loss", "loss"]},
        ],
        repr_shows=("LocalDpMod(", "clipping_norm=1.0", "epsilon=1.0", "delta=1e-05"),
    ),
    "secaggplus_mod": ModCase(
        build=SecAggPlusClientMod,
        handles=(MessageType.TRAIN, MessageType.QUERY),
        handled=_secagg_handled,
        bad_requests=_secagg_bad,
        bad_types=[
            {"min_threshold": "2"},
            {"min_threshold": 2.0},
            {"refuse_plaintext": 1},
            {"randomness": b"seed"},
            {"protected_types": [3]},
        ],
        bad_values=[{"min_threshold": 1}, {"protected_types": [""]}],
        repr_shows=("SecAggPlusClientMod(", "min_threshold=2", "refuse_plaintext=True"),
    ),
    "ckks_mod": ModCase(
        build=lambda: CKKSClientMod(),
        handles=(MessageType.TRAIN, HE_MESSAGE_TYPE),
        handled=_ckks_handled,
        bad_requests=_ckks_bad,
        bad_types=[{"encrypt": "w"}, {"encrypt": [3]}, {"encrypt": None}],
        bad_values=[{"encrypt": []}, {"encrypt": [""]}],
        guards_every_array_reply=True,
        # Without the round's key set-up, arrays would leave in the clear: it refuses them (the
        # pass-through test checks that); a reply without arrays goes on.
        good_reply=lambda m: plain_reply(m, arrays=False),
        repr_shows=("CKKSClientMod(", "encrypt=('*',)"),
    ),
}

# Where a mod fails a clause today: the file to fix, and why (strict, so a fix is noticed).
NOT_OURS: dict[str, str] = {}
WRONG_BUILTIN: dict[str, str] = {}


def _xfail(table: dict[str, str]) -> list[Any]:
    return [
        pytest.param(
            name,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=table[name])] if name in table else [],
        )
        for name in CASES
    ]


def test_the_suite_covers_every_client_mod_of_the_package_faces() -> None:
    assert secaggplus_mod.__class__ is SecAggPlusClientMod and ckks_mod.__class__ is CKKSClientMod
    assert set(CASES) == {
        "fixed_clipping_mod",
        "adaptive_clipping_mod",
        "LocalDpMod",
        "secaggplus_mod",
        "ckks_mod",
    }


def built(name: str, how: str) -> Mod:
    mod = CASES[name].build()
    return pickle.loads(pickle.dumps(mod)) if how == "unpickled" else mod


HOW = ["as-built", "unpickled"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("with_arrays", [True, False], ids=["arrays", "metrics-only"])
def test_other_message_types_pass_through_untouched(name: str, how: str, with_arrays: bool) -> None:
    case, mod = CASES[name], built(name, how)
    for message_type in (t for t in OTHER_TYPES if t not in case.handles):
        msg, context = request(message_type), Context(node_id=7)
        before = msg.require_content().deep_copy()
        inner = Recorder(lambda m: plain_reply(m, arrays=with_arrays))
        if with_arrays and case.guards_every_array_reply:
            with pytest.raises(RequestRefusedError):  # arrays never leave in the clear
                mod(msg, context, inner)
            continue
        out = mod(msg, context, inner)
        assert len(inner.seen) == 1 and inner.seen[0].metadata == msg.metadata
        assert_same_records(inner.seen[0].require_content(), before)
        assert_same_records(msg.require_content(), before)  # the request itself is not edited
        assert out is inner.replies[0] or (
            out.metadata == inner.replies[0].metadata
            and out.error is None
            and same_records(out.require_content(), inner.replies[0].require_content())
        )
        assert dict(context.state) == {}, f"{name} kept state for a {message_type!r} message"


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", CASES)
def test_error_replies_go_on_unchanged(name: str, how: str) -> None:
    case, mod = CASES[name], built(name, how)
    handled = case.handled(mod)
    error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the handler failed")
    inner = Recorder(lambda m: m.error_reply(error))
    out = mod(handled.msg, handled.context, inner)
    assert len(inner.seen) == 1, f"{name} did not pass its request on"
    assert out.content is None and out.error == error
    assert out.is_reply_to(handled.msg)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", CASES)
def test_a_handled_request_works(name: str, how: str) -> None:
    """The same request with a good reply gives a reply with content (also after pickling)."""
    case, mod = CASES[name], built(name, how)
    handled = case.handled(mod)
    out = mod(handled.msg, handled.context, Recorder(case.good_reply))
    assert out.error is None, out.error
    assert out.is_reply_to(handled.msg)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", CASES)
def test_requests_it_cannot_accept_are_refused_by_our_error(name: str, how: str) -> None:
    mod = built(name, how)
    for msg in CASES[name].bad_requests():
        inner = Recorder(plain_reply)
        with pytest.raises(RequestRefusedError):
            mod(msg, Context(node_id=msg.metadata.dst_node_id), inner)
        assert not inner.seen, f"{name} passed on a request it refused"


@pytest.mark.parametrize("name", _xfail(WRONG_BUILTIN))
def test_bad_arguments_raise_the_fitting_builtin(name: str) -> None:
    case = CASES[name]
    cls = type(case.build())
    for kwargs in case.bad_types:
        with pytest.raises(TypeError):
            cls(**{**case.base, **kwargs})
    for kwargs in case.bad_values:
        with pytest.raises(ValueError):
            cls(**{**case.base, **kwargs})


@pytest.mark.parametrize("name", _xfail(NOT_OURS))
def test_bad_arguments_raise_our_error(name: str) -> None:
    case = CASES[name]
    cls = type(case.build())
    for kwargs in [*case.bad_types, *case.bad_values]:
        with pytest.raises(FlowerpetsError):
            cls(**{**case.base, **kwargs})


def test_function_mods_take_no_arguments_to_get_wrong() -> None:
    for name, case in CASES.items():
        if not case.bad_types and not case.bad_values:
            assert callable(case.build()) and not isinstance(case.build(), type), name


@pytest.mark.parametrize("name", CASES)
def test_pickles_and_has_a_useful_repr(name: str) -> None:
    mod = CASES[name].build()
    clone = pickle.loads(pickle.dumps(mod))
    assert repr(clone) == repr(mod)
    for part in CASES[name].repr_shows:
        assert part in repr(mod), (part, repr(mod))
    if isinstance(mod, FunctionType):  # a function's repr names it, and it pickles by name
        assert mod.__name__ in repr(mod) and pickle.loads(pickle.dumps(mod)) is mod
    else:  # a class mod writes its own repr, with its settings
        assert type(mod).__repr__ is not object.__repr__


def test_local_dp_builds_its_secure_noise_on_first_use_and_never_pickles_it() -> None:
    mod = LocalDpMod(clipping_norm=1.0, epsilon=1.0, delta=1e-5)
    # Used once, so its source exists; pickling still works and carries no live source.
    first = mod(request(), Context(node_id=7), Recorder(plain_reply))
    clone = pickle.loads(pickle.dumps(mod))
    second = clone(request(), Context(node_id=7), Recorder(plain_reply))
    a = first.require_content().get_typed("arrays", ArrayRecord)["w"].numpy()
    b = second.require_content().get_typed("arrays", ArrayRecord)["w"].numpy()
    # Both noised, with independent keys (equal draws: probability ~2^-96 in float32).
    assert not np.array_equal(a, np.full(3, 0.5, np.float32)) and not np.array_equal(a, b)


def same_records(a: RecordDict, b: RecordDict) -> bool:
    return list(a) == list(b) and all(_record_equal(a[k], b[k]) for k in a)


def _record_equal(a: object, b: object) -> bool:
    if isinstance(a, ArrayRecord) and isinstance(b, ArrayRecord):
        return list(a) == list(b) and all(a[k] == b[k] for k in a)
    return type(a) is type(b) and dict(a) == dict(b)  # type: ignore[call-overload]


def assert_same_records(a: RecordDict, b: RecordDict) -> None:
    assert same_records(a, b), (a, b)

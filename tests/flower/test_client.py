"""Our client mods inside a real flwr ClientApp: what they reply, what is refused, pickling."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import cloudpickle
import numpy as np
import pytest
from flwr import app as fl
from flwr.clientapp import ClientApp as FlwrClientApp
from flwr.serverapp.strategy import FedAvg as FlwrFedAvg

from flowerpets.core import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flowerpets.dp import LocalDpMod, fixed_clipping_mod
from flowerpets.flower import BRIDGE_RECORD, ClientApp, client_app, mods
from flowerpets.flower.messages import error_from_flwr, message_to_flwr
from flowerpets.he import ckks_mod
from flowerpets.secagg import secaggplus_mod

CLIP = 0.5


def _request(
    content: RecordDict, *, bridged: bool, message_type: str = MessageType.TRAIN
) -> fl.Message:
    ours = Message.create(content, message_type=message_type, dst_node_id=9, round=1, run_id=3)
    theirs = message_to_flwr(ours)
    if bridged:
        theirs.content[BRIDGE_RECORD] = fl.ConfigRecord({"version": 1})
    return theirs


def _context(pid: int = 0) -> fl.Context:
    return fl.Context(
        run_id=3, node_id=9, node_config={"partition-id": pid}, state=fl.RecordDict(), run_config={}
    )


def _train_content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord.from_numpy({"w": np.zeros(4, np.float32)}),
            "config": ConfigRecord({"dp.clip": CLIP}),
        }
    )


def _flwr_app(kit: SimpleNamespace, *client_mods: Any) -> FlwrClientApp:
    app = ClientApp(mods=[mods(*client_mods)])
    app.train()(kit.flwr_train)
    return app


def test_clipping_mod_in_a_flwr_app_replies_as_in_ours(kit: SimpleNamespace) -> None:
    reply = _flwr_app(kit, fixed_clipping_mod)(_request(_train_content(), bridged=True), _context())
    assert not reply.has_error(), reply
    got = reply.content["arrays"]["w"].numpy()
    # Our own ClientApp, same handler logic and mod, same request.
    ours = kit.numpy_client([fixed_clipping_mod])
    request = Message.create(_train_content(), message_type="train", dst_node_id=9, round=1)
    want = ours(request, Context(node_id=9, node_config={"partition-id": 0}))
    np.testing.assert_array_equal(got, want.require_content()["arrays"]["w"].numpy())
    assert np.linalg.norm(got) == pytest.approx(CLIP, rel=1e-6)  # a clipped update


def test_flwr_fedavg_with_our_clipping_mod_is_refused_with_what_to_use(
    kit: SimpleNamespace,
) -> None:
    """flwr's own FedAvg would average our clipped update as weights: silently wrong."""
    arrays = fl.ArrayRecord({"w": fl.Array(np.full(4, 5.0, np.float32))})
    grid = SimpleNamespace(get_node_ids=lambda: [9])
    messages = list(
        FlwrFedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1).configure_train(
            1,
            arrays,
            fl.ConfigRecord({"dp.clip": CLIP}),
            grid,  # type: ignore[arg-type]
        )
    )
    calls: list[fl.Message] = []

    def train(msg: fl.Message, context: fl.Context) -> fl.Message:
        calls.append(msg)
        return kit.flwr_train(msg, context)

    app = ClientApp(mods=[mods(fixed_clipping_mod)])
    app.train()(train)
    reply = app(messages[0], _context())
    assert reply.has_error() and not calls  # refused before any training
    error = error_from_flwr(reply.error)
    assert error.code.name == "REFUSED"
    assert "update" in error.reason and "server_app" in error.reason
    assert "DifferentialPrivacyClientSideFixedClipping" in error.reason


def test_flwr_fedavg_with_our_ckks_mod_is_refused(kit: SimpleNamespace) -> None:
    reply = _flwr_app(kit, ckks_mod)(_request(_train_content(), bridged=False), _context())
    error = error_from_flwr(reply.error)
    assert error.code.name == "REFUSED" and "HomomorphicAggregation" in error.reason


def test_flwr_fedavg_with_our_distributed_dp_mod_is_refused(kit: SimpleNamespace) -> None:
    from flowerpets.dp import DistributedDpMod

    reply = _flwr_app(kit, DistributedDpMod())(
        _request(_train_content(), bridged=False), _context()
    )
    error = error_from_flwr(reply.error)
    assert error.code.name == "REFUSED" and "DistributedDp" in error.reason


def test_local_dp_composes_with_flwr_strategies() -> None:
    """LocalDpMod replies with (noised) weights: what a Flower strategy averages. Not refused."""
    from flowerpets.flower.client import _update_replier

    mod = LocalDpMod(clipping_norm=1.0, epsilon=1.0, delta=1e-5)
    assert _update_replier(mod) is None
    assert _update_replier(fixed_clipping_mod) is not None


def test_secagg_refuses_a_plain_flwr_request_with_its_code(kit: SimpleNamespace) -> None:
    reply = _flwr_app(kit, secaggplus_mod)(_request(_train_content(), bridged=True), _context())
    assert error_from_flwr(reply.error).code.name == "REFUSED"


def test_protocol_messages_need_no_handler_from_the_user() -> None:
    """HE's key set-up (a type flwr refuses) reaches the app-level mod; no dummy handler."""
    app = ClientApp(mods=[mods(ckks_mod)])  # only a train handler would be the user's
    request = _request(RecordDict({"config": ConfigRecord()}), bridged=True, message_type="he-keys")
    request.metadata.group_id = "1:he/advertise"
    context = _context()
    reply = app(request, context)
    assert not reply.has_error(), reply
    assert "he.public-key" in reply.content["config"]
    assert any(name.startswith("he.") for name in context.state)  # state kept in flwr's
    assert reply.metadata.message_type == "query.flowerpets_he_keys"


def test_a_protocol_mod_placed_on_one_handler_says_where_it_belongs(kit: SimpleNamespace) -> None:
    app = ClientApp()
    app.train(mods=[mods(ckks_mod)])(kit.flwr_train)
    request = _request(RecordDict({"config": ConfigRecord()}), bridged=True, message_type="he-keys")
    error = error_from_flwr(app(request, _context()).error)
    assert error.code.name == "UNKNOWN_MESSAGE_TYPE" and "ClientApp(mods=" in error.reason


def test_our_whole_client_app_runs_as_a_flwr_client_app(kit: SimpleNamespace) -> None:
    app = client_app(kit.numpy_client([fixed_clipping_mod]))
    reply = app(_request(_train_content(), bridged=True), _context())
    assert np.linalg.norm(reply.content["arrays"]["w"].numpy()) == pytest.approx(CLIP, rel=1e-6)


def test_an_unreadable_request_is_refused_in_the_clear(kit: SimpleNamespace) -> None:
    request = _request(_train_content(), bridged=True)
    request.metadata.group_id = "round-one"
    error = error_from_flwr(_flwr_app(kit, fixed_clipping_mod)(request, _context()).error)
    assert error.code.name == "REFUSED" and "group_id" in error.reason


@pytest.mark.parametrize("mod", [fixed_clipping_mod, secaggplus_mod, ckks_mod], ids=repr)
def test_bridge_mods_survive_pickling(mod: Any) -> None:
    bridge = mods(mod)
    back = pickle.loads(cloudpickle.dumps(bridge))
    assert len(back.mods) == 1 and type(back.mods[0]) is type(mod)


def test_local_dp_mod_survives_pickling() -> None:
    bridge = mods(LocalDpMod(clipping_norm=1.0, epsilon=1.0, delta=1e-5))
    back = pickle.loads(cloudpickle.dumps(bridge))
    assert type(back.mods[0]) is LocalDpMod


def test_mods_validate_what_they_wrap() -> None:
    with pytest.raises(ValueError, match="at least one"):
        mods()
    with pytest.raises(TypeError):
        mods(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mods(mods(fixed_clipping_mod))  # type: ignore[arg-type]

"""Hostile or broken connections: each is refused with a typed error in the log.

A server with node keys serves one honest node. Each test plays an attacker
(or a broken node) on a raw gRPC stream, then checks three things: the
connection was closed with the right status, the server's log names the typed
error, and the honest node is still served.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.core.codec import CodecLimits
from flowerpets.transport import NodeClient, NodeKey
from flowerpets.transport._frames import Chunk, Head, Welcome, encode_content, envelope_parts

from .conftest import Federation, RawNode, wait_until

MAX_CHUNK = 64 * 1024
MAX_MESSAGE = 1 << 20


def echo_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"echo": ConfigRecord({"node": context.node_id})})

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": np.ones(3, np.float32)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )

    return app


@dataclass
class Scene:
    federation: Federation
    honest: NodeClient
    attacker_key: NodeKey  # a key the server knows, held by the attacker
    caplog: pytest.LogCaptureFixture

    @property
    def port(self) -> int:
        return self.federation.server.port

    def raw(self, key: NodeKey | None = None) -> RawNode:
        node = RawNode(self.port, key=key or self.attacker_key)
        self.opened.append(node)
        return node

    def query(self, node: int) -> Message:
        grid = self.federation.server.grid
        request = Message.create(
            RecordDict(),
            message_type=MessageType.QUERY,
            dst_node_id=node,
            round=1,
            run_id=grid.run_id,
        )
        replies = list(grid.send_and_receive([request], timeout=20))
        assert len(replies) == 1, "no reply"
        return replies[0]

    def assert_refused(self, node: RawNode, status: grpc.StatusCode, error: str, text: str) -> None:
        code, details = node.wait_closed()
        assert code == status, (code, details)
        assert details.startswith(f"[{error}]"), details
        assert text in details
        wait_until(lambda: f"[{error}] " in self.caplog.text and text in self.caplog.text, 10)
        self.assert_honest_node_served()

    def assert_honest_node_served(self) -> None:
        reply = self.query(self.honest.node_id)
        assert not reply.has_error
        assert (
            reply.require_content().get_typed("echo", ConfigRecord)["node"] == self.honest.node_id
        )

    opened: list[RawNode]


@pytest.fixture
def scene(federation_factory: Callable[..., Federation], caplog: pytest.LogCaptureFixture) -> Scene:
    from .conftest import FAST_SERVER

    honest_key, attacker_key = NodeKey.generate(), NodeKey.generate()
    keys = {honest_key.public_bytes: "honest", attacker_key.public_bytes: "attacker"}
    settings = replace(FAST_SERVER, max_chunk_bytes=MAX_CHUNK, max_message_bytes=MAX_MESSAGE)
    federation = federation_factory(node_keys=keys, settings=settings)
    caplog.set_level(logging.INFO, logger="flowerpets")
    honest = federation.add(echo_app(), 0, key=honest_key)
    scene = Scene(federation, honest, attacker_key, caplog, [])
    yield scene  # type: ignore[misc]
    for node in scene.opened:
        node.close()


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- before authentication ------------------------------------------------------------------------
def test_an_unknown_key_is_refused(scene: Scene) -> None:
    node = scene.raw(NodeKey.generate())
    node.send(node.hello().encode())
    scene.assert_refused(node, UNAUTHENTICATED, "AuthenticationError", "unknown node key")
    assert node.key.node_id not in scene.federation.server.node_ids()


def test_a_forged_hello_is_refused(scene: Scene) -> None:
    node = scene.raw()
    forged = replace(node.hello(), max_message=1 << 20)  # changed after signing
    node.send(forged.encode())
    scene.assert_refused(node, UNAUTHENTICATED, "AuthenticationError", "signature")


def test_a_stale_hello_is_refused(scene: Scene) -> None:
    node = scene.raw()
    node.send(node.hello(now=time.time() - 3600).encode())
    scene.assert_refused(node, UNAUTHENTICATED, "AuthenticationError", "-3600")


def test_a_replayed_hello_is_refused(scene: Scene) -> None:
    first = scene.raw()
    hello = first.hello()
    first.join(hello)  # the genuine request is accepted
    first.close()
    wait_until(lambda: first.key.node_id not in scene.federation.server.node_ids(), 10)
    replay = scene.raw()
    replay.send(hello.encode())  # the very same bytes, again
    scene.assert_refused(replay, UNAUTHENTICATED, "ReplayError", "a replayed request")
    assert first.key.node_id not in scene.federation.server.node_ids()


def test_frames_before_the_hello_are_refused(scene: Scene) -> None:
    node = scene.raw()
    node.send(Head(1, 10, bytes(32)).encode())
    scene.assert_refused(node, UNAUTHENTICATED, "AuthenticationError", "before an accepted HELLO")


def test_a_garbage_first_frame_is_refused(scene: Scene) -> None:
    node = scene.raw()
    node.send(os.urandom(200))
    scene.assert_refused(node, INVALID, "FrameError", "bad magic")


def test_an_oversized_frame_is_refused(scene: Scene) -> None:
    node = scene.raw()
    node.send(b"FPTX\x02\x04" + bytes(MAX_CHUNK + 5000))  # a chunk over max-chunk + room
    scene.assert_refused(node, TOO_LARGE, "MessageTooLargeError", "is more than the limit")


def test_a_frame_past_grpc_s_own_limit_costs_only_that_connection(scene: Scene) -> None:
    node = scene.raw()
    node.send(bytes(4 * MAX_CHUNK + 100_000))  # over gRPC's backstop: gRPC itself refuses it
    code, _ = node.wait_closed()
    assert code == TOO_LARGE
    scene.assert_honest_node_served()


def test_a_silent_connection_is_closed_after_the_hello_timeout(scene: Scene) -> None:
    node = scene.raw()
    code, details = node.wait_closed()
    assert code == grpc.StatusCode.UNAVAILABLE and "no HELLO within 2 s" in details
    assert "dropping the unauthenticated connection from" in scene.caplog.text
    scene.assert_honest_node_served()


# -- after authentication -------------------------------------------------------------------------
def joined(scene: Scene) -> RawNode:
    node = scene.raw()
    node.join()
    return node


def test_a_garbage_frame_after_joining_closes_that_connection(scene: Scene) -> None:
    node = joined(scene)
    assert node.key.node_id in scene.federation.server.node_ids()
    node.send(b"FPTX\x02\x63garbage")
    scene.assert_refused(node, INVALID, "FrameError", "unknown frame kind 99")
    assert node.key.node_id not in scene.federation.server.node_ids()


@pytest.mark.parametrize("reordered", [False, True])
def test_a_replayed_heartbeat_is_refused(scene: Scene, reordered: bool) -> None:
    node = joined(scene)
    beat = node.heartbeat()
    if reordered:
        node.send(beat, node.heartbeat(), beat)
        expected = "HEARTBEAT frame 1 after frame 2"
    else:
        node.send(beat, beat)  # the very same signed frame, twice
        expected = "HEARTBEAT frame 1 after frame 1"
    scene.assert_refused(node, UNAUTHENTICATED, "ReplayError", expected)


def test_a_frame_signed_for_another_connection_is_refused(scene: Scene) -> None:
    first = joined(scene)
    stolen = first.heartbeat()
    first.close()
    second = scene.raw()
    second.join(second.hello())
    second.send(stolen)  # valid signature, but over the first connection's session id
    scene.assert_refused(second, UNAUTHENTICATED, "AuthenticationError", "for this connection")


def test_an_oversized_message_is_refused_before_it_is_received(scene: Scene) -> None:
    node = joined(scene)
    node.send(node.signed(Head(node.next_seq(), 2**40, bytes(32))))
    scene.assert_refused(
        node, TOO_LARGE, "MessageTooLargeError", "1099511627776 bytes was announced"
    )


def test_chunks_that_do_not_match_their_digest_are_refused(scene: Scene) -> None:
    node = joined(scene)
    head, *chunks = node.message(os.urandom(3000), max_chunk=1000)
    node.send(head, *chunks[:-1], Chunk(node.seq, 2000, os.urandom(1000)).encode())
    scene.assert_refused(node, INVALID, "FrameError", "do not match the announced digest")


def test_a_message_that_is_not_a_message_is_refused(scene: Scene) -> None:
    node = joined(scene)
    assert node.welcome is not None
    request = Message.create(
        RecordDict(),
        message_type="query",
        dst_node_id=node.key.node_id,
        round=1,
        run_id=node.welcome.run_id,
    )
    reply = request.reply(RecordDict({"c": ConfigRecord({"x": 1})}))
    limits = CodecLimits()
    data = bytearray(b"".join(envelope_parts(reply, encode_content(reply, limits), limits)))
    data[40] ^= 0x55  # damaged in a way the framing cannot see (its digest is of these bytes)
    node.send(*node.message(bytes(data)))
    scene.assert_refused(node, INVALID, "CorruptMessageError", "CRC mismatch")


def test_a_reply_in_another_node_s_name_is_refused(scene: Scene) -> None:
    node = joined(scene)
    assert isinstance(node.welcome, Welcome)
    request = Message.create(
        RecordDict(),
        message_type="query",
        dst_node_id=scene.honest.node_id,
        round=1,
        run_id=node.welcome.run_id,
    )
    spoofed = request.reply(RecordDict())  # from the honest node, to the server
    node.send(*node.message(spoofed))
    scene.assert_refused(node, UNAUTHENTICATED, "AuthenticationError", "claims to be from node")


def test_a_node_cannot_answer_a_request_sent_to_another(scene: Scene) -> None:
    node = joined(scene)
    assert node.welcome is not None
    grid = scene.federation.server.grid
    request = Message.create(
        RecordDict(),
        message_type="query",
        dst_node_id=scene.honest.node_id,
        round=1,
        run_id=grid.run_id,
    )
    replies = grid.send_and_receive([request], timeout=20)
    stolen = Message(
        metadata=replace(request.reply(RecordDict()).metadata, src_node_id=node.key.node_id),
        content=RecordDict({"echo": ConfigRecord({"node": 666})}),
    )
    node.send(*node.message(stolen))
    got = list(replies)
    assert len(got) == 1
    assert got[0].require_content().get_typed("echo", ConfigRecord)["node"] == scene.honest.node_id
    scene.assert_honest_node_served()


def test_a_node_may_not_send_server_frames(scene: Scene) -> None:
    node = joined(scene)
    assert node.welcome is not None
    node.send(node.welcome.encode())
    scene.assert_refused(node, INVALID, "FrameError", "a node may not send a WELCOME frame")

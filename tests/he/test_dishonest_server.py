"""The server plays curious: everything it holds or relays must fail to decrypt.

The claim in docs/he.md is that an honest-but-curious server learns neither an
update nor the sum. This test runs a federation through every key set-up stage
(advertise, keygen, install, a late joiner's share and install), keeps what
the server saw (every request and reply, its context's state, its mod, the
sealed sums), then tries everything it has as a key.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tenseal as ts

from flowerpets import (
    ArrayRecord,
    ConfigRecord,
    ErrorCode,
    Message,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.exceptions import DecryptionError
from flowerpets.he import KEY_GENERATOR_CONFIG, HomomorphicAggregation, Stage, ckks_mod, open_model
from flowerpets.he._primitives.ciphertexts import HEADER_NAME, chunk_name, split_wire
from flowerpets.he._primitives.keywrap import KeyBinding, unwrap
from flowerpets.he._state import ClientKeys
from flowerpets.simulation import ErrorReply


def _payloads(records: RecordDict) -> Iterator[bytes]:
    """Every bytes value in a RecordDict: config bytes (and lists of them), array buffers."""
    for record in records.values():
        if isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                yield from (item for item in items if isinstance(item, bytes))
        elif isinstance(record, ArrayRecord):
            yield from (array.numpy().tobytes() for array in record.values())


def _contexts_in(payloads: list[bytes]) -> list[ts.Context]:
    found = []
    for blob in payloads:
        try:
            found.append(ts.context_from(blob))
        except (ValueError, RuntimeError, TypeError):
            continue
    return found


def _can_decrypt(context: ts.Context, ciphertext: bytes) -> bool:
    try:
        ts.ckks_vector_from(context, ciphertext).decrypt()
    except (ValueError, RuntimeError, TypeError):
        return False
    return True


def server_can_decrypt(payloads: list[bytes], ciphertext: bytes) -> list[str]:
    """How the server could decrypt ``ciphertext`` with what it holds (empty: it cannot)."""
    ways = []
    for index, context in enumerate(_contexts_in(payloads)):
        if context.is_private():
            ways.append(f"payload context {index} holds a secret key")
        if _can_decrypt(context, ciphertext):
            ways.append(f"payload context {index} decrypts")
    return ways


@pytest.fixture(scope="module")
def observed(kit: SimpleNamespace) -> SimpleNamespace:
    contexts: list[ServerContext] = []
    results: list[RoundResult] = []

    def curious(
        request: RoundRequest,
        context: ServerContext,
        call_next: Callable[[RoundRequest, ServerContext], RoundResult],
    ) -> RoundResult:
        contexts.append(context)
        results.append(call_next(request, context))
        return results[-1]

    mod = HomomorphicAggregation()
    run = kit.run(
        kit.server_app([curious, mod], rounds=2),
        kit.client_app([ckks_mod]),
        4,
        faults=[ErrorReply(node=3, round=1, stage=Stage.INSTALL)],  # a late joiner in round 2
        # Node 3 must not be the key generator, which is otherwise drawn at random.
        node_config=lambda index: {KEY_GENERATOR_CONFIG: index == 0},
    )
    stages = {m.metadata.stage for m in run.grid.sent}
    assert set(Stage) <= stages  # every stage ran, so every kind of message is examined
    payloads: list[bytes] = []
    for msg in [*run.grid.sent, *run.grid.received]:
        if msg.content is not None:
            payloads.extend(_payloads(msg.content))
    payloads.extend(_payloads(contexts[0].state))
    payloads.extend(v for v in vars(mod).values() if isinstance(v, bytes))
    for result in results:
        if result.sealed is not None:
            payloads.extend(_payloads(RecordDict({"sum": result.sealed.to_arrays()})))
    _, _, chunks = split_wire(run.result.arrays.copy())
    return SimpleNamespace(
        run=run,
        mod=mod,
        state=contexts[0].state,
        results=results,
        payloads=payloads,
        ciphertext=chunks[0].numpy().tobytes(),
    )


def test_the_nodes_can_open_the_model(observed: SimpleNamespace) -> None:
    # The positive control: the same ciphertext opens with a node's key.
    keys = ClientKeys.load(observed.run.contexts[0].state)
    node_context = ts.context_from(keys.secret_context)
    assert _can_decrypt(node_context, observed.ciphertext)
    assert open_model(observed.run.result.arrays, observed.run.contexts[1])


def test_nothing_the_server_holds_or_relays_can_decrypt(observed: SimpleNamespace) -> None:
    assert len(observed.payloads) > 20
    contexts = _contexts_in(observed.payloads)
    assert contexts, "the server's public context should be among the payloads"
    assert server_can_decrypt(observed.payloads, observed.ciphertext) == []
    for result in observed.results:
        with pytest.raises(ValueError, match="secret_key"):
            result.sealed._vectors[0].decrypt()  # the server's own objects


def test_the_check_would_catch_a_leaked_key(observed: SimpleNamespace) -> None:
    # The negative control: had a node's secret context passed through the server, the
    # check above would have failed.
    leaked = ClientKeys.load(observed.run.contexts[2].state).secret_context
    assert server_can_decrypt([*observed.payloads, leaked], observed.ciphertext)


def test_no_secret_context_crosses_the_server_in_the_clear(observed: SimpleNamespace) -> None:
    secrets_ = {ClientKeys.load(c.state).secret_context for c in observed.run.contexts}
    assert len(secrets_) == 1 and b"" not in secrets_  # every node holds the one key
    secret = secrets_.pop()
    assert not any(secret in blob for blob in observed.payloads)


def test_the_server_state_holds_parameters_only(observed: SimpleNamespace) -> None:
    assert set(observed.state) == {"he.server", "he.model"}
    server = observed.state["he.server"]
    public = ts.context_from(server["public-context"])
    assert not public.is_private() and not public.has_relin_keys()
    assert not public.has_galois_keys()
    assert len(server["public-context"]) < 1024


def test_wrapped_keys_do_not_open_with_anything_the_server_saw(observed: SimpleNamespace) -> None:
    run = observed.run
    installs = [m for m in run.grid.sent if m.metadata.stage == Stage.INSTALL]
    candidates = {blob for blob in observed.payloads if len(blob) == 32}  # public keys, mostly
    assert installs and candidates
    for msg, candidate in itertools.product(installs, candidates):
        config = msg.require_content().get_typed("config", ConfigRecord)
        binding = KeyBinding(
            run_id=run.grid.run_id,
            sender=int(config["he.sender"]),  # type: ignore[arg-type]
            recipient=msg.metadata.dst_node_id,
            key_id=bytes.fromhex(str(config["he.key-id"])),
            context_digest=_digest(config["he.public-context"]),
        )
        with pytest.raises((DecryptionError, ValueError)):
            unwrap(config["he.wrapped"], candidate, binding)  # type: ignore[arg-type]


def test_a_rerouted_install_is_refused_by_its_wrong_recipient(
    observed: SimpleNamespace, kit: SimpleNamespace
) -> None:
    # The server replays node A's install message to node B: B cannot unwrap it.
    run = observed.run
    install = next(m for m in run.grid.sent if m.metadata.stage == Stage.INSTALL)
    target = next(c for c in run.contexts if c.node_id != install.metadata.dst_node_id)
    rerouted = Message.create(
        install.require_content(),
        message_type=install.message_type,
        dst_node_id=target.node_id,
        round=1,
        run_id=run.grid.run_id,
        stage=Stage.INSTALL,
    )
    before = ClientKeys.load(target.state)
    reply = kit.client_app([ckks_mod])(rerouted, target)
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert "authentication" in reply.error.reason
    assert ClientKeys.load(target.state) == before


def _digest(public: Any) -> bytes:
    import hashlib

    return hashlib.sha256(public).digest()


def test_the_model_the_server_sends_is_ciphertext(observed: SimpleNamespace) -> None:
    trains = [m for m in observed.run.grid.sent if m.message_type == "train" and m.round == 2]
    arrays = trains[0].require_content().get_typed("arrays", ArrayRecord)
    assert HEADER_NAME in arrays and chunk_name(0) in arrays
    assert not any(name in arrays for name in ("w", "b"))
    assert np.all(arrays[chunk_name(0)].numpy().dtype == np.uint8)

"""SecAgg+'s modular path through the Flower bridge, both sides, in this process.

The nodes run real flwr ClientApps (conftest's ``LocalFlwrGrid``: cloudpickle, flwr's
protobuf serde); inside SecAgg+'s client mod, a mod that stands for distributed DP's
reads the modulus SecAgg+ tells it and adds residues to the reply. On the server, a
mod asks for the quantized round (``RoundRequest.quantized``) above SecAgg+, behind
our ServerApp as a flwr ServerApp and behind a flwr strategy (``secure_strategy``):
the domain survives the bridge, and the residues' sum is exact modulo ``2**bits``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.serverapp import strategy as fs

from flowerpets.core import (
    ArrayRecord,
    Context,
    Message,
    QuantizedDomain,
    RoundRequest,
    RoundResult,
    ServerContext,
    modulus_bits_of,
)
from flowerpets.exceptions import QuantizedRoundError, RequestRefusedError
from flowerpets.flower import ClientApp, client_app, mods, secure_strategy
from flowerpets.secagg import SecAggPlus, secaggplus_mod
from tests.flower import test_secure_strategy as strategies

N = 4
BITS = 18
DOMAIN = QuantizedDomain(modulus_bits=BITS, names=("dp.residues",))


def node_residues(pid: int, rnd: int, bits: int = BITS) -> np.ndarray:
    """Node ``pid``'s residues in round ``rnd``: at the top of the range, so the sum wraps."""
    rng = np.random.default_rng([13, pid, rnd])
    top = (1 << bits) - 1
    return (top - rng.integers(0, 5, size=(2, 3))).astype(np.uint64)


def modular_sum(pids: list[int], rnd: int) -> np.ndarray:
    total = sum(node_residues(p, rnd).astype(object) for p in pids)
    return (total % (1 << BITS)).astype(np.uint64)  # type: ignore[union-attr, no-any-return]


class AddResidues:
    """A client mod inside SecAgg+'s (where distributed DP's goes): it needs the modulus."""

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        config = msg.require_content()["config"]
        bits = modulus_bits_of(config)  # type: ignore[arg-type]
        if bits is None:
            raise RequestRefusedError("no secure aggregation sums this reply modulo")
        reply: Message = call_next(msg, context)
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        content = reply.require_content()
        arrays = ArrayRecord(content["arrays"])  # type: ignore[arg-type]
        arrays["dp.residues"] = node_residues(pid, msg.round, bits)
        content["arrays"] = arrays
        return reply


class AskResidues:
    """The server mod above SecAgg+: asks for the quantized round, keeps what it got, and
    hands the strategy the model arrays only."""

    def __init__(self) -> None:
        self.requests: list[RoundRequest] = []
        self.results: list[RoundResult] = []

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        asked = request.replace(quantized=DOMAIN)
        self.requests.append(asked)
        result: RoundResult = call_next(asked, context)
        self.results.append(result)
        model = ArrayRecord({n: a for n, a in result.aggregate.items() if n not in DOMAIN})
        return result.replace(aggregate=model)


def _check(ask: AskResidues, rounds: int) -> None:
    assert [r.quantized for r in ask.requests] == [DOMAIN] * rounds
    for rnd, result in enumerate(ask.results, start=1):
        assert len(result.participants) == N
        got = result.aggregate["dp.residues"].numpy()
        assert got.dtype == np.uint64 and got.shape == (2, 3)
        np.testing.assert_array_equal(got, modular_sum(list(range(N)), rnd))


@pytest.mark.parametrize("native", [False, True], ids=["our-client-app", "flwr-handler"])
def test_residues_through_our_server_app_as_a_flwr_server_app(
    kit: SimpleNamespace, native: bool
) -> None:
    client_mods = [secaggplus_mod, AddResidues()]
    if native:  # plain Flower training code behind our mods
        app = ClientApp(mods=[mods(*client_mods)])
        app.train()(kit.flwr_train)
    else:
        app = client_app(kit.numpy_client(client_mods))
    ask = AskResidues()
    server = kit.numpy_server([ask, SecAggPlus()], rounds=2)
    flwr_app = kit.run_bridge(server, kit.LocalFlwrGrid(app, N))
    history = flwr_app.last_result.history
    assert [r.ok for r in history.rounds] == [True, True], [r.error for r in history.rounds]
    _check(ask, rounds=2)
    # The float arrays kept their weighted path beside the residues.
    assert list(flwr_app.last_result.arrays) == ["w", "b"]
    assert history[0].train_metrics["num-examples"] == sum(range(1, N + 1))


def test_residues_through_a_flwr_strategy(kit: SimpleNamespace) -> None:
    ask = AskResidues()
    strategy = secure_strategy(fs.FedAvg(), mods=[ask, SecAggPlus()])
    grid = strategies.loop_grid(kit, strategies.client(secaggplus_mod, AddResidues()))
    result = strategies.start(strategy, grid, rounds=2)
    assert [r.ok for r in strategy.history.rounds] == [True, True]
    assert list(result.arrays) == ["w", "b"]
    _check(ask, rounds=2)


def test_a_quantized_round_without_secagg_is_refused_through_the_bridge(
    kit: SimpleNamespace,
) -> None:
    ask = AskResidues()
    app = client_app(kit.numpy_client([AddResidues()]))
    grid = kit.LocalFlwrGrid(app, N)
    with pytest.raises(QuantizedRoundError):
        kit.run_bridge(kit.numpy_server([ask], rounds=1), grid)
    assert not any(m.metadata.message_type == "train" for m in grid.pushed)

"""A server process that SIGKILLs itself at one phase of a round, for the fault tests.

Run as ``python -m tests.store.faulty_runs STORE KIND PHASE [ROUND [EVERY]]``: it
starts run ``"r"`` in the store at ``STORE`` and runs the seeded simulation of
:mod:`tests.store.test_resume` (``KIND``, one of :data:`KINDS`: ``plain``;
``he`` behind :class:`~flowerpets.he.HomomorphicAggregation`; ``secagg``
behind :class:`~flowerpets.secagg.SecAggPlus`; ``dp`` behind
:class:`~flowerpets.dp.CentralDp`; ``dp-secagg`` behind both), and in round
``ROUND`` (default :data:`KILL_ROUND`) kills itself at ``PHASE``, one of
:data:`PHASES` (or, with SecAgg+, of :data:`SECAGG_PHASES`):

``before-send``
    the round's request is made, nothing was sent (the outermost server mod);
``mid-collection``
    one node replied, the second is computing its update (a node's mod: the
    simulated nodes run in the server's process); with SecAgg+, one node sent
    its masked input, the second is masking its own;
``after-share-keys``
    SecAgg+ only: every node shared its keys, the first is about to mask;
``mid-unmask``
    SecAgg+ only: one survivor sent its shares, the second is reading its own;
``after-aggregation``
    the strategy aggregated the round, nothing of it is committed;
``mid-commit``
    inside SQLite's transaction, every row of the round written and the round
    counter moved, before ``COMMIT``;
``disk-full``
    never: once round ``ROUND`` - 1 is committed neither the store's file nor
    its arrays directory may grow (as if the disk were full): the next round's
    arrays file does not fit, and that commit fails.

``hold``
    never: before sending round ``ROUND`` it prints ``holding`` and waits for
    a line on stdin, holding the run's lease;
``resume``
    never: it resumes run ``"r"`` (instead of starting it) and runs it to the end.

A run that ends with an error instead prints the error's type and reason and
exits with 3; one that ends prints ``finished``.

``EVERY`` (default 1) is the server's ``commit_every``: with 2, round
``ROUND`` = 4 is killed with round 3 run but not committed.

The phase is reached by code, not by timing: each hook kills at a fixed point.

With SecAgg+, every node's round secrets and what it sent (its private keys,
self-mask seed, shares, share ciphertexts, masked input) and each round's
session id are recorded as the nodes make them (:class:`SecAggRecorder`), and
just before the kill those of round ``ROUND`` are written to
``STORE.secrets.json``: what the test then looks for in the store. Its nodes'
SecAgg+ randomness is seeded (:class:`SeededSecAgg`), so that a round run
again quantizes exactly as the uninterrupted run did.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    CohortSampling,
    ConfigRecord,
    Context,
    FedAvg,
    FixedSizeSampling,
    FullParticipation,
    Message,
    RoundRecord,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
    ServerMod,
)
from flowerpets.exceptions import InsecureRandomnessWarning
from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore, RunWriter, run_writer
from tests.store.test_resume import NODES, ROUNDS, local_training, simulate

KILL_ROUND = 3
KINDS = ("plain", "he", "secagg", "dp", "dp-secagg")
PHASES = ("before-send", "mid-collection", "after-aggregation", "mid-commit")
SECAGG_PHASES = (
    "before-send",
    "after-share-keys",
    "mid-collection",
    "mid-unmask",
    "after-aggregation",
    "mid-commit",
)
SHAPE = (4, 5)
BIG_SHAPE = (100, 200)  # 80 kB a round: more than a page of the store
NOISE_MULTIPLIER, CLIP, DELTA, NOISE_SEED = 1.0, 1.0, 1e-5, 7
SECAGG_COHORT = 5  # SecAgg+ on 3 nodes has no dropout to spare: 5 of the 6

_last_words: list[Callable[[], None]] = []  # run just before the kill


def die() -> None:
    try:
        for say in _last_words:
            say()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def secrets_path(store: Path) -> Path:
    return store.with_name(f"{store.name}.secrets.json")


# -- SecAgg+ ---------------------------------------------------------------------------------------
class SeededSecAgg:
    """A client mod seeding its node's SecAgg+ draws, as ``tests/examples``' ``SeededPerStage``.

    The masking stage (its stochastic rounding decides the sum's last bits) is
    seeded by (node, round) only: a round run again quantizes as the
    uninterrupted run did. The key and share stages are seeded by the session
    too, so that a new session makes new keys, shares and self-mask seeds.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        from flowerpets.secagg.protocol import RECORD, Stage

        stage = msg.metadata.stage
        seed = [5, context.node_id, msg.round, list(Stage.ALL).index(stage) if stage else 9]
        if stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
            seed += list(_session_of(msg.require_content()[RECORD]))
        self._local.rng = np.random.default_rng(seed)
        return call_next(msg, context)

    def randomness(self, n: int) -> bytes:
        return bytes(self._local.rng.bytes(n))


def _session_of(record: object) -> bytes:
    assert isinstance(record, ConfigRecord)
    session = record["session"]
    assert isinstance(session, bytes)
    return session


class SecAggRecorder:
    """The outermost client mod: each round's session, and every secret a node made or sent."""

    def __init__(self) -> None:
        self.sessions: dict[int, bytes] = {}
        self.secrets: dict[int, list[bytes]] = {}

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        from flowerpets.secagg import _node_state
        from flowerpets.secagg.protocol import RECORD, Stage

        if msg.metadata.stage not in Stage.ALL:
            return call_next(msg, context)
        rnd = msg.round
        self.sessions.setdefault(rnd, _session_of(msg.require_content()[RECORD]))
        secrets = self.secrets.setdefault(rnd, [])
        try:
            return self._record_reply(call_next(msg, context), secrets)
        finally:
            loaded = _node_state.load(context)
            if loaded is not None:  # the node's round state (wiped once the round is over)
                state = loaded[0]
                secrets += [state.c_sk, state.s_sk, state.self_seed]
                secrets += [*state.share_keys, *state.b_shares, *state.s_shares]
            secrets[:] = [s for s in secrets if s]

    @staticmethod
    def _record_reply(reply: Message, secrets: list[bytes]) -> Message:
        from flowerpets.secagg.protocol import MASKED_ARRAY, MASKED_RECORD, RECORD

        if reply.has_error:
            return reply
        content = reply.require_content()
        record = content.get(RECORD)
        if isinstance(record, ConfigRecord):
            for name in ("ciphertexts", "b-shares", "s-shares"):
                value = record.get(name)
                if isinstance(value, list):
                    secrets += [v for v in value if isinstance(v, bytes)]
        masked = content.get(MASKED_RECORD)
        if isinstance(masked, ArrayRecord):
            secrets.append(masked[MASKED_ARRAY].numpy().tobytes())
        return reply

    def dump(self, path: Path, rnd: int) -> None:
        """Round ``rnd``'s session (None before it began) and secrets, as hex, to ``path``."""
        session = self.sessions.get(rnd)
        data = {
            "session": None if session is None else session.hex(),
            "secrets": [s.hex() for s in self.secrets.get(rnd, [])],
        }
        path.write_text(json.dumps(data))


def _kill_at_a_stage(stage: str, nth: int) -> ClientMod:
    """Die when the ``nth`` message of ``stage`` (``train`` without SecAgg+) of the round comes."""
    seen = 0

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        nonlocal seen
        here = msg.metadata.stage or msg.message_type
        if here == stage and msg.message_type == "train" and msg.metadata.round == KILL_ROUND:
            seen += 1
            if seen == nth:
                die()
        return call_next(msg, context)

    return mod


class _KillingFedAvg(FedAvg):
    """FedAvg that dies once it aggregated round :data:`KILL_ROUND`."""

    def aggregate_train(self, result: RoundResult, current: ArrayRecord) -> ArrayRecord:
        aggregated = super().aggregate_train(result, current)
        if result.round == KILL_ROUND:
            die()
        return aggregated


def _kill_before_send(request: RoundRequest, context: ServerContext, call_next: Any) -> Any:
    if request.round == KILL_ROUND:
        die()
    return call_next(request, context)


def _hold_before_send(request: RoundRequest, context: ServerContext, call_next: Any) -> Any:
    if request.round == KILL_ROUND:
        print("holding", flush=True)
        sys.stdin.readline()
    return call_next(request, context)


def _kill_inside_the_commit() -> None:
    set_last_round = run_writer._set_last_round

    def write_all_then_die(db: Any, info: Any, rnd: int) -> None:
        set_last_round(db, info, rnd)
        if rnd == KILL_ROUND:
            die()

    run_writer._set_last_round = write_all_then_die


def central_dp() -> ServerMod:
    from flowerpets.dp import CentralDp

    with warnings.catch_warnings():  # noise_seed: the noise of a round is the same resumed
        warnings.simplefilter("ignore", InsecureRandomnessWarning)
        return CentralDp(
            noise_multiplier=NOISE_MULTIPLIER,
            clipping_norm=CLIP,
            delta=DELTA,
            noise_seed=NOISE_SEED,
        )


def server(
    kind: str,
    store: RunWriter | None = None,
    *,
    phase: str = "none",
    shape: tuple[int, int] = SHAPE,
    commit_every: int = 1,
) -> ServerApp:
    """The run's server; with ``phase``, one that dies there in round :data:`KILL_ROUND`."""
    mods: list[ServerMod] = []
    if phase == "before-send":
        mods.append(_kill_before_send)
    if phase == "hold":
        mods.append(_hold_before_send)
    if kind == "he":
        from flowerpets.he import HomomorphicAggregation

        mods.append(HomomorphicAggregation())
    if kind.startswith("dp"):
        mods.append(central_dp())
    if kind.endswith("secagg"):
        from flowerpets.secagg import SecAggPlus

        mods.append(SecAggPlus())
    strategy_type = _KillingFedAvg if phase == "after-aggregation" else FedAvg
    sampling: CohortSampling = FixedSizeSampling(SECAGG_COHORT if kind == "secagg" else 3)
    if kind.startswith("dp"):
        # Every node, every round: the accountant's event is a Gaussian without sampling,
        # which PLD accounts in milliseconds (fixed-size sampling needs RDP: a second a round).
        sampling = FullParticipation()
    return ServerApp(
        strategy=strategy_type(sampling=sampling),
        num_rounds=ROUNDS,
        initial_arrays=ArrayRecord({"w": np.zeros(shape, np.float32)}),
        mods=mods,
        store=store,
        commit_every=commit_every,
    )


_KILL_AT = {  # a node's phase: (the stage whose message kills, which one of the round's)
    "mid-collection": ("train", 2),
    "after-share-keys": ("secagg+/collect-masked-input", 1),
    "secagg-mid-collection": ("secagg+/collect-masked-input", 2),
    "mid-unmask": ("secagg+/unmask", 2),
}


def client(kind: str, *, phase: str = "none", recorder: SecAggRecorder | None = None) -> ClientApp:
    secagg = kind.endswith("secagg")
    mods: list[ClientMod] = []
    if recorder is not None:
        mods.append(recorder)
    kill_at = _KILL_AT.get(f"secagg-{phase}" if secagg else phase, _KILL_AT.get(phase))
    if kill_at is not None:
        mods.append(_kill_at_a_stage(*kill_at))
    if secagg:
        from flowerpets.secagg import SecAggPlusClientMod

        seeded = SeededSecAgg()
        mods += [seeded, SecAggPlusClientMod(randomness=seeded.randomness)]
    if kind == "he":
        from flowerpets.he import ckks_mod

        mods.append(ckks_mod)
    if kind.startswith("dp"):
        from flowerpets.dp import fixed_clipping_mod

        mods.append(fixed_clipping_mod)
    return local_training(mods)


def run(
    kind: str,
    store: RunWriter | None = None,
    *,
    phase: str = "none",
    shape: tuple[int, int] = SHAPE,
    on_round: Callable[[RoundRecord], None] | None = None,
    recorder: SecAggRecorder | None = None,
    commit_every: int = 1,
) -> SimulationResult:
    return simulate(
        server(kind, store, phase=phase, shape=shape, commit_every=commit_every),
        client=client(kind, phase=phase, recorder=recorder),
        on_round=on_round,
    )


def uninterrupted(kind: str) -> SimulationResult:
    """The run that nothing kills: each round once, every one ok with its whole cohort."""
    whole = run(kind)
    cohort = server(kind).strategy.sampling.expected_size(NODES)
    assert [r.round for r in whole.history.rounds] == list(range(1, ROUNDS + 1))
    assert all(r.ok and len(r.participants) == cohort for r in whole.history.rounds)
    return whole


def _fill_the_disk_after(rnd: int, store: RunStore) -> Callable[[RoundRecord], None]:
    def fill(record: RoundRecord) -> None:
        if record.round == rnd:  # committed: the store may not grow from now on
            store._connection.execute("PRAGMA max_page_count = 1")
            store._files.max_bytes = 1  # nor its arrays directory

    return fill


def main(argv: list[str]) -> None:
    global KILL_ROUND  # the hooks read it when they fire
    path, kind, phase = Path(argv[0]), argv[1], argv[2]
    KILL_ROUND = int(argv[3]) if len(argv) > 3 else KILL_ROUND
    every = int(argv[4]) if len(argv) > 4 else 1
    if phase == "mid-commit":
        _kill_inside_the_commit()
    recorder = SecAggRecorder() if kind.endswith("secagg") else None
    if recorder is not None:
        _last_words.append(lambda: recorder.dump(secrets_path(path), KILL_ROUND))
    try:
        with RunStore(path) as store:
            writer = store.resume_run("r") if phase == "resume" else store.start_run("r", config={})
            with writer:
                if phase == "disk-full":
                    fill = _fill_the_disk_after(KILL_ROUND - 1, store)
                    run(kind, writer, shape=BIG_SHAPE, on_round=fill)
                else:
                    run(kind, writer, phase=phase, recorder=recorder, commit_every=every)
    except Exception as exc:  # the parent reads which error ended the run
        print(f"{type(exc).__name__}: {exc}", flush=True)
        raise SystemExit(3) from exc
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

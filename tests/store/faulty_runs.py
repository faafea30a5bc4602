"""A server process that SIGKILLs itself at one phase of a round, for the fault tests.

Run as ``python -m tests.store.faulty_runs STORE KIND PHASE [ROUND]``: it
starts run ``"r"`` in the store at ``STORE`` and runs the seeded simulation of
:mod:`tests.store.test_resume` (``KIND`` ``plain``, or ``he`` behind
:class:`~flowerpets.he.HomomorphicAggregation`), and in round ``ROUND``
(default :data:`KILL_ROUND`) kills itself at ``PHASE``, one of :data:`PHASES`:

``before-send``
    the round's request is made, nothing was sent (the outermost server mod);
``mid-collection``
    one node replied, the second is computing its update (a node's mod: the
    simulated nodes run in the server's process);
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

The phase is reached by code, not by timing: each hook kills at a fixed point.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    Context,
    FedAvg,
    FixedSizeSampling,
    Message,
    RoundRecord,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
    ServerMod,
)
from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore, RunWriter, run_writer
from tests.store.test_resume import ROUNDS, local_training, simulate

KILL_ROUND = 3
PHASES = ("before-send", "mid-collection", "after-aggregation", "mid-commit")
SHAPE = (4, 5)
BIG_SHAPE = (100, 200)  # 80 kB a round: more than a page of the store


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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


def _kill_at_the_second_update() -> ClientMod:
    updates = 0

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        nonlocal updates
        if msg.message_type == "train" and msg.metadata.round == KILL_ROUND:
            updates += 1
            if updates == 2:
                die()
        return call_next(msg, context)

    return mod


def _kill_inside_the_commit() -> None:
    set_last_round = run_writer._set_last_round

    def write_all_then_die(db: Any, info: Any, rnd: int) -> None:
        set_last_round(db, info, rnd)
        if rnd == KILL_ROUND:
            die()

    run_writer._set_last_round = write_all_then_die


def server(
    kind: str,
    store: RunWriter | None = None,
    *,
    phase: str = "none",
    shape: tuple[int, int] = SHAPE,
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
    strategy_type = _KillingFedAvg if phase == "after-aggregation" else FedAvg
    return ServerApp(
        strategy=strategy_type(sampling=FixedSizeSampling(3)),
        num_rounds=ROUNDS,
        initial_arrays=ArrayRecord({"w": np.zeros(shape, np.float32)}),
        mods=mods,
        store=store,
    )


def client(kind: str, *, phase: str = "none") -> ClientApp:
    mods: list[ClientMod] = [_kill_at_the_second_update()] if phase == "mid-collection" else []
    if kind == "he":
        from flowerpets.he import ckks_mod

        mods.append(ckks_mod)
    return local_training(mods)


def run(
    kind: str,
    store: RunWriter | None = None,
    *,
    phase: str = "none",
    shape: tuple[int, int] = SHAPE,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    return simulate(
        server(kind, store, phase=phase, shape=shape),
        client=client(kind, phase=phase),
        on_round=on_round,
    )


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
    if phase == "mid-commit":
        _kill_inside_the_commit()
    try:
        with RunStore(path) as store:
            writer = store.resume_run("r") if phase == "resume" else store.start_run("r", config={})
            with writer:
                if phase == "disk-full":
                    fill = _fill_the_disk_after(KILL_ROUND - 1, store)
                    run(kind, writer, shape=BIG_SHAPE, on_round=fill)
                else:
                    run(kind, writer, phase=phase)
    except Exception as exc:  # the parent reads which error ended the run
        print(f"{type(exc).__name__}: {exc}", flush=True)
        raise SystemExit(3) from exc
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

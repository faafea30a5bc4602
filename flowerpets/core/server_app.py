"""ServerApp: runs a strategy for a number of rounds over a Grid.

Each round's training goes through the server mods, outermost first, down to
:func:`~flowerpets.core.exchange.aggregate_round`:

.. code-block:: text

    RoundRequest -> mod_1 -> ... -> mod_n -> aggregate_round -> RoundResult

A mod may change the request, replace the inner exchange, or post-process the
result. Evaluation (federated and centralized) runs after the model update and
is not wrapped by the mods.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flowerpets._validation import instance, integer
from flowerpets.core.exchange import aggregate_round
from flowerpets.core.grid import Grid, round_nodes
from flowerpets.core.history import History, RoundRecord
from flowerpets.core.journal import DurableState, RunJournal
from flowerpets.core.mods import chain
from flowerpets.core.records import ArrayRecord, ConfigValue, MetricRecord
from flowerpets.core.round import (
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerContext,
    ServerMod,
    fewest_inputs_of,
)
from flowerpets.core.strategy import Strategy
from flowerpets.exceptions import (
    ConfigurationError,
    ParameterTypeError,
    ParameterValueError,
    RoundFailedError,
    StopRunError,
    StoreError,
)

__all__ = ["RunResult", "ServerApp"]

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord], None]


@dataclass(slots=True)
class RunResult:
    """What a run produced: the final global arrays and the per-round history.

    ``stopped`` holds the reason when a mod ended the run early
    (:class:`~flowerpets.exceptions.StopRunError`).
    """

    arrays: ArrayRecord
    history: History = field(default_factory=History)
    stopped: str | None = None


def _scalars(metrics: MetricRecord | Mapping[str, float] | None) -> dict[str, float]:
    if not metrics:
        return {}
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}


class ServerApp:
    """Runs ``strategy`` for ``num_rounds`` rounds, each behind ``mods``.

    ``seed`` seeds the generator the strategy samples cohorts with; without it
    the generator is seeded from the OS's secure source. A round that fails
    (too few replies, or any exception from the mods or the strategy other than
    :class:`~flowerpets.exceptions.StopRunError` and
    :class:`~flowerpets.exceptions.ConfigurationError`, which end the run because
    every round would fail alike) leaves the model unchanged and
    is recorded in the history, with every node's reason
    (``RoundRecord.failures``, also when the round failed inside a mod); with
    ``stop_on_failure`` it ends the run with ``RoundFailedError`` instead (the
    original exception as its cause). ``History.every_round_failed`` tells a
    run in which no round changed the model.

    With a ``store`` (a :class:`~flowerpets.core.journal.RunJournal`, such as
    :class:`flowerpets.store.RunWriter`) every round is committed to it before
    the next one starts, and a run the store already holds rounds of continues
    after its last committed round, with its model, history and cohort generator.
    With ``commit_every=N`` a commit happens after every round whose number is
    a multiple of N, after the last round and after a round that stopped the
    run, and carries the records of the rounds since the one before: the model
    is written once per N rounds, and a crash loses the rounds run since the
    last commit, which a resumed run runs again from the last stored model
    (spending their privacy budget again: an over-count, never an under-count).
    A mod that declares :class:`~flowerpets.core.journal.DurableState` has its
    state restored before the first round and committed with every commit, and
    reaches the store through ``context.journal``. A commit that fails, or a
    store error inside a round, ends the run with the store's error.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        num_rounds: int,
        initial_arrays: ArrayRecord,
        mods: Sequence[ServerMod] = (),
        seed: int | None = None,
        stop_on_failure: bool = False,
        store: RunJournal | None = None,
        commit_every: int = 1,
    ) -> None:
        integer("num_rounds", num_rounds, at_least=1)
        integer("commit_every", commit_every, at_least=1)
        if commit_every != 1 and store is None:
            raise ParameterValueError(
                f"commit_every={commit_every} says how often to commit to a store: give store=..."
            )
        instance("initial_arrays", initial_arrays, ArrayRecord)
        if not isinstance(strategy, Strategy):
            raise ParameterTypeError(
                f"strategy must implement the Strategy protocol, got {strategy!r}"
            )
        for mod in mods:
            if getattr(mod, "secure_aggregation", False) and not isinstance(mod, SecureAggregator):
                # The old ad-hoc declaration: refused loudly, never silently ignored.
                raise ParameterTypeError(
                    f"{mod!r} says secure_aggregation = True but is no SecureAggregator: "
                    "declare it by subclassing flowerpets.core.SecureAggregator"
                )
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.initial_arrays = initial_arrays
        self.mods = tuple(mods)
        self.seed = seed
        self.stop_on_failure = stop_on_failure
        self.store = None if store is None else instance("store", store, RunJournal)
        self.commit_every = commit_every
        declared: tuple[object, ...] = self.mods  # a DurableState is declared by its class
        self._durable = [mod for mod in declared if isinstance(mod, DurableState)]
        names = [mod.state_name for mod in self._durable]
        if len(set(names)) != len(names):
            raise ParameterValueError(f"two mods keep their state under one name: {names}")
        self._train = chain(self.mods, aggregate_round)

    def run(
        self,
        grid: Grid,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        on_round: RoundCallback | None = None,
        seed: int | None = None,
    ) -> RunResult:
        """Run every round over ``grid``; ``on_round`` is called after each one.

        The app's own ``seed`` wins over ``seed``; with neither, cohorts are
        sampled with a generator seeded from the OS's secure source.
        """
        chosen = self.seed if self.seed is not None else seed
        rng = np.random.default_rng(chosen if chosen is not None else secrets.randbits(128))
        context = ServerContext(
            run_id=grid.run_id,
            run_config=run_config,
            grid=grid,
            secure_aggregation=any(isinstance(m, SecureAggregator) for m in self.mods),
            journal=self.store,
            fewest_inputs=fewest_inputs_of(self.mods),
        )
        result = RunResult(arrays=self.initial_arrays)
        resumed = None if self.store is None else self.store.resumption()
        if self.store is not None:
            for mod in self._durable:  # a state that cannot be continued refuses the run
                state = self.store.pet_state(mod.state_name)
                mod.restore(context, state, round=resumed.round if resumed else 0)
        if resumed is not None:
            rng = resumed.rng
            result = RunResult(arrays=resumed.arrays, history=resumed.history)
            last = resumed.history.rounds[-1] if resumed.history.rounds else None
            if last is not None and last.stopped:  # a mod ended this run: it stays ended
                result.stopped = last.error
                return result
        pending: list[RoundRecord] = []  # run since the last commit, committed with the next
        for rnd in range((resumed.round + 1) if resumed else 1, self.num_rounds + 1):
            started = time.perf_counter()
            record = RoundRecord(round=rnd)
            try:
                result.arrays = self._train_round(rnd, result.arrays, rng, context, record)
            except StopRunError as exc:
                log.warning("run stopped before round %d changed the model: %s", rnd, exc)
                result.stopped = str(exc)
                record.error = str(exc)
                record.stopped = True
                record.seconds = time.perf_counter() - started
                result.history.append(record)
                self._commit(pending, record, result.arrays, rng, context)
                break
            self._evaluate(rnd, result.arrays, rng, context, record)
            record.seconds = time.perf_counter() - started
            result.history.append(record)
            if rnd % self.commit_every == 0 or rnd == self.num_rounds:
                self._commit(pending, record, result.arrays, rng, context)
            else:
                pending.append(record)
            if on_round is not None:
                on_round(record)
        return result

    def _commit(
        self,
        pending: list[RoundRecord],
        record: RoundRecord,
        arrays: ArrayRecord,
        rng: np.random.Generator,
        context: ServerContext,
    ) -> None:
        """Commit ``record``'s round, and the ``pending`` rounds before it, in one commit."""
        if self.store is not None:
            states = {mod.state_name: mod.durable_state(context) for mod in self._durable}
            self.store.commit_round(
                record, arrays=arrays, sampler=rng, pet_states=states, since=tuple(pending)
            )
        pending.clear()

    def _train_round(
        self,
        rnd: int,
        arrays: ArrayRecord,
        rng: np.random.Generator,
        context: ServerContext,
        record: RoundRecord,
    ) -> ArrayRecord:
        try:
            # Inside the try: in deployment the live nodes change between rounds, so a
            # cohort the strategy cannot draw (a fixed size above the nodes left) fails
            # this round rather than the run. A deployment's grid waits here, bounded,
            # for enough nodes to be back (its round-start hook, WaitsForNodes).
            node_ids = round_nodes(context.require_grid())
            request: RoundRequest = self.strategy.configure_train(rnd, arrays, node_ids, rng)
            record.cohort_size = len(request.cohort)
            outcome: RoundResult = self._train(request, context)
            record.participants = outcome.participants
            record.failures = dict(outcome.failures)
            record.train_metrics = _scalars(outcome.metrics)
            return self.strategy.aggregate_train(outcome, arrays)
        except (StopRunError, ConfigurationError, StoreError):
            # A stop on purpose, a configuration that would fail every round alike, or a
            # store that cannot keep what the round must commit first (a privacy spend): the
            # run ends with it rather than repeating it round after round.
            raise
        except RoundFailedError as exc:
            failed = exc
            log.warning("round %d failed, the model is unchanged: %s", rnd, exc)
        except Exception as exc:
            # Whatever else a mod or the strategy raised (a bug, a malicious node's input
            # that slipped past a check) fails this round, not the run.
            failed = RoundFailedError(f"round {rnd}: {type(exc).__name__}: {exc}")
            failed.__cause__ = exc
            log.error("round %d failed, the model is unchanged", rnd, exc_info=exc)
        # The reasons of a round that failed inside a mod travel on the error.
        if failed.failures:
            record.failures = dict(failed.failures)
        if failed.participants:
            record.participants = failed.participants
        record.error = str(failed)
        if self.stop_on_failure:
            raise failed
        return arrays

    def _evaluate(
        self,
        rnd: int,
        arrays: ArrayRecord,
        rng: np.random.Generator,
        context: ServerContext,
        record: RoundRecord,
    ) -> None:
        node_ids = round_nodes(context.require_grid())
        request = self.strategy.configure_evaluate(rnd, arrays, node_ids, rng)
        if request is not None:
            outcome = aggregate_round(request, context)
            record.evaluate_metrics = _scalars(outcome.metrics)
            record.evaluate_failures = dict(outcome.failures)
        record.server_metrics = _scalars(self.strategy.evaluate(rnd, arrays))

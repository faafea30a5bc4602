"""Flower's own strategies over our server mods: flwr's FedAvg on a SecAgg+ sum.

.. code-block:: python

    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flowerpets.flower import secure_strategy
    from flowerpets.secagg import SecAggPlus

    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = secure_strategy(FedAvg(), mods=[SecAggPlus()])
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

How a round goes: flwr's ``Strategy.start`` loop runs unchanged over a grid
that :class:`SecureStrategy` wraps around yours. The strategy's
``configure_train`` makes the requests (its sampling, its config); the train
messages never reach the nodes as they are: our server mods run the round over
:class:`~flowerpets.flower.FlowerGrid` instead (SecAgg+'s four stages, central
DP's clipping and noise), and the strategy's ``aggregate_train`` receives **one**
reply: the round's weighted mean under ``arrays``, and under ``metrics`` the
total weight (the strategy's ``weighted_by_key``) beside the round's metrics.
A weighted mean of that one reply is the mean itself (its weight factor is
exactly 1.0), so what the strategy does after the mean (momentum, an adaptive
server optimizer) runs on the secure mean. Flower's own ``SecAggPlusWorkflow``
does the same for its legacy strategies, but hands each node's ``num_examples``
and metrics over in the clear; here only the totals are released.

Which strategies: those whose aggregate is a weighted mean of the replies,
followed by anything that needs only that mean (:data:`WEIGHTED_MEAN_STRATEGIES`,
exact classes; a subclass of one may override ``aggregate_train``, so it is not
taken on trust). Your own class declares the capability in its body with
``flowerpets_weighted_mean = True``. Every other strategy is refused with
:class:`~flowerpets.exceptions.IncompatibleStrategyError` naming what to use
instead: robust aggregators (median, trimmed mean, Krum, Bulyan), q-FFL and
Flower's DP wrappers need each update on its own, which secure aggregation hides.

Privacy accounting (with :class:`~flowerpets.dp.CentralDp` in ``mods``): flwr's
strategies draw their cohort with Python's ``random`` module, not a secret draw,
so no amplification by subsampling is claimed; each round is accounted as the
full participation of its cohort (``population = len(cohort)``), an upper bound
on the epsilon.

Run stores: flwr's ``Strategy.start`` loop always starts at round 1 from the
initial arrays, so a :class:`SecureStrategy` run cannot be resumed, and its
server context has no run store: ``CentralDp`` keeps its ledger in memory for
that one ``start``. A run whose config overrides name a ``store`` (``flwr run
--run-config 'store="run.db"'``, which the grid's ``run.override_config`` holds)
is refused with :class:`~flowerpets.exceptions.IncompatibleStrategyError` rather
than run unstored (for ``CentralDp``, a budget that a restart would count from 0
again). The strategy sees only the grid, not the app's own defaults
(``[tool.flwr.app.config]``): a ``store`` set there alone is not seen. A durable
run is our ServerApp through :func:`flowerpets.flower.server_app`, whose ``store``
run-config key commits every round and ``CentralDp``'s spends.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from flwr import app as fl
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid as FlwrGrid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Result,
    Strategy,
)
from flwr.supercore.run import Run

from flowerpets._validation import instance
from flowerpets.core import (
    Array,
    ArrayRecord,
    ConfigRecord,
    DurableState,
    Error,
    ErrorCode,
    FullParticipation,
    History,
    MessageType,
    RoundRecord,
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerContext,
    ServerMod,
    aggregate_round,
    chain,
    fewest_inputs_of,
)
from flowerpets.exceptions import (
    ConfigurationError,
    IncompatibleStrategyError,
    ParameterTypeError,
    ParameterValueError,
    RecordTypeError,
    RoundFailedError,
    StopRunError,
)
from flowerpets.flower.grid import FlowerGrid
from flowerpets.flower.messages import _flwr_message, error_to_flwr
from flowerpets.flower.records import Session, array_to_flwr, recorddict_from_flwr
from flowerpets.flower.server import _log_round

__all__ = [
    "WEIGHTED_MEAN_DECLARATION",
    "WEIGHTED_MEAN_STRATEGIES",
    "SecureStrategy",
    "secure_strategy",
]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, fl.ArrayRecord], fl.MetricRecord | None]

WEIGHTED_MEAN_STRATEGIES: Final[frozenset[type[Strategy]]] = frozenset(
    {FedAvg, FedAvgM, FedProx, FedAdam, FedAdagrad, FedYogi}
)
"""flwr strategies whose ``aggregate_train`` is FedAvg's weighted mean of the replies,
then only steps on that mean (FedAvgM's momentum, FedOpt's server optimizers); FedProx
changes only the config it sends."""

WEIGHTED_MEAN_DECLARATION: Final = "flowerpets_weighted_mean"
"""The class attribute (``= True``, in the class's own body) by which a strategy declares
that its ``aggregate_train`` needs only the weighted mean of the replies."""

# Our records: what our server mods send and read, and what a Flower handler replies with.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

_MEAN_STRATEGIES = "FedAvg, FedAvgM, FedProx, FedAdam, FedAdagrad or FedYogi"
_ROBUST = (
    "is a robust aggregator: it needs each update on its own (to rank, trim or compare "
    "them), which secure aggregation hides by design. Run it without secure aggregation, "
    f"or use {_MEAN_STRATEGIES} over SecAgg+, with flowerpets.dp.CentralDp in mods to bound "
    "any one node's influence"
)
_FLOWER_DP = (
    "adds Flower's DP noise after checking each reply on its own (its weight, its clipping), "
    "which secure aggregation hides. Use the inner strategy with "
    "mods=[flowerpets.dp.CentralDp(...), SecAggPlus()] (clients run "
    "mods(secaggplus_mod, fixed_clipping_mod)): CentralDp noises the secure sum and "
    "accounts epsilon per round"
)
_REFUSED: Final[Mapping[type[Strategy], str]] = {
    FedMedian: _ROBUST,
    FedTrimmedAvg: _ROBUST,
    Krum: _ROBUST,
    MultiKrum: _ROBUST,
    Bulyan: _ROBUST,
    QFedAvg: (
        "reweights each update by its own node's loss (q-FFL), so it needs every update and "
        f"loss on its own, which secure aggregation hides; use {_MEAN_STRATEGIES}"
    ),
    DifferentialPrivacyServerSideFixedClipping: _FLOWER_DP,
    DifferentialPrivacyServerSideAdaptiveClipping: _FLOWER_DP,
    DifferentialPrivacyClientSideFixedClipping: _FLOWER_DP,
    DifferentialPrivacyClientSideAdaptiveClipping: _FLOWER_DP,
    FedXgbBagging: (
        "merges serialized XGBoost trees (bytes), not a weighted mean of arrays; secure "
        "aggregation sums numbers only"
    ),
    FedXgbCyclic: (
        "trains one node after another and keeps its model, not a weighted mean; there is "
        "nothing to aggregate securely"
    ),
}


def _refusal(strategy: object) -> str | None:
    """Why ``strategy`` cannot run over our mods, or None if its aggregate is a weighted mean."""
    kind = type(strategy)
    if isinstance(strategy, SecureStrategy):
        return "is already a SecureStrategy: wrap the plain strategy once"
    if not isinstance(strategy, Strategy):
        return "is not a flwr.serverapp.strategy.Strategy"
    if kind in WEIGHTED_MEAN_STRATEGIES or vars(kind).get(WEIGHTED_MEAN_DECLARATION) is True:
        return None
    for base in kind.__mro__:
        reason = _REFUSED.get(base)
        if reason is not None:
            return reason
    return (
        "is not known to aggregate by a weighted mean of the replies (a subclass may "
        f"override aggregate_train). Use {_MEAN_STRATEGIES}; if its aggregate_train is "
        "FedAvg's weighted mean followed by steps that need only that mean, declare it in "
        f"the class body: {WEIGHTED_MEAN_DECLARATION} = True"
    )


def _record_key(strategy: Strategy, attribute: str, ours: str) -> None:
    value = getattr(strategy, attribute, ours)
    if value != ours:
        raise IncompatibleStrategyError(
            f"{type(strategy).__name__}.{attribute} is {value!r}: over our mods the records are "
            f"named {ours!r} (our client mods hand the handler {ARRAYS!r} and {CONFIG!r} and "
            f"read its {ARRAYS!r} and {METRICS!r}); use the default"
        )


def _refuse_sealing(mods: Sequence[ServerMod]) -> None:
    he = sys.modules.get("flowerpets.he.server")  # if it is not imported, no mod is one
    if he is not None and any(isinstance(m, he.HomomorphicAggregation) for m in mods):
        raise IncompatibleStrategyError(
            "HomomorphicAggregation keeps the sum encrypted, so no Flower strategy can read "
            "its mean: run it through flowerpets.flower.server_app(ServerApp(strategy="
            "flowerpets.FedAvg(), mods=[HomomorphicAggregation()])), whose FedAvg sends the "
            "sealed model on"
        )


def _refuse_store(grid: FlwrGrid, mods: Sequence[ServerMod]) -> None:
    """Refuse a run whose config asks for a run store: this loop could keep nothing there."""
    override = getattr(getattr(grid, "run", None), "override_config", None) or {}
    if "store" not in override:
        return
    budget = [type(m).__name__ for m in mods if isinstance(m, DurableState)]
    lost = (
        f"{budget[0]}'s privacy budget (a restart would count it from 0 again)"
        if budget
        else "its model and history"
    )
    raise IncompatibleStrategyError(
        "the run config names a run store, but secure_strategy runs flwr's Strategy.start "
        f"loop, which cannot resume and would store nothing, losing {lost}: for a durable "
        "run use flowerpets.flower.server_app(ServerApp(strategy=flowerpets.FedAvg(), "
        "mods=[CentralDp(...), SecAggPlus()])), whose store run-config key commits every "
        "round and the budget"
    )


@dataclass(slots=True)
class _Pending:
    """What the strategy's ``configure_train`` made, for the grid to run securely."""

    round: int
    messages: list[fl.Message]


@dataclass(slots=True)
class _Run:
    """One ``start`` call: our server context (central DP keeps its ledger in its state)."""

    context: ServerContext
    history: History = field(default_factory=History)
    stopped: str | None = None


def _mean_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype flwr's FedAvg gives a mean of replies of ``dtype``: floats keep theirs."""
    return dtype if dtype.kind in "fc" else np.dtype(np.float64)


class _SecureGrid(FlwrGrid):
    """The grid the strategy's loop runs over: train messages go through our mods.

    Everything else (node ids, evaluate messages) is the wrapped grid's. A train
    message pushed on its own would bypass the secure round, so it is refused.
    """

    def __init__(self, owner: SecureStrategy, grid: FlwrGrid) -> None:
        self.owner = owner
        self.grid = grid

    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    def create_message(
        self,
        content: fl.RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> fl.Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[fl.Message]) -> Iterable[str]:
        batch = list(messages)
        if any(_is_train(m) for m in batch):
            raise IncompatibleStrategyError(
                "a train message pushed on its own would bypass the secure round: a strategy "
                "over our mods sends its train messages with send_and_receive (as "
                "Strategy.start does)"
            )
        return self.grid.push_messages(batch)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[fl.Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[fl.Message], *, timeout: float | None = None
    ) -> Iterable[fl.Message]:
        batch = list(messages)
        if not batch:
            return []
        if not any(_is_train(m) for m in batch):
            return self.grid.send_and_receive(batch, timeout=timeout)
        return [self.owner._secure_round(self.grid, batch, timeout)]


def _is_train(message: fl.Message) -> bool:
    return message.metadata.message_type.partition(".")[0] == MessageType.TRAIN


class SecureStrategy(Strategy):
    """A flwr strategy whose training rounds run through our server mods.

    Build it with :func:`secure_strategy`; call :meth:`start` exactly as flwr's.
    ``history`` holds our record of each round of the last :meth:`start`
    (participants, each lost node's failure and stage, every metric of the
    round: SecAgg+'s ``secagg-mean-error-bound``, central DP's ``epsilon``).
    """

    def __init__(self, strategy: Strategy, *, mods: Sequence[ServerMod]) -> None:
        super().__init__()
        reason = _refusal(strategy)
        if reason is not None:
            raise IncompatibleStrategyError(
                f"{type(strategy).__name__} cannot run over secure aggregation: it {reason}"
            )
        for attribute, ours in (("arrayrecord_key", ARRAYS), ("configrecord_key", CONFIG)):
            _record_key(strategy, attribute, ours)
        weight_key = getattr(strategy, "weighted_by_key", None)
        if not isinstance(weight_key, str) or not weight_key:
            raise IncompatibleStrategyError(
                f"{type(strategy).__name__} names no weighted_by_key: the secure round weighs "
                "each update by that reply metric"
            )
        instance("mods", mods, (list, tuple))
        if not mods:
            raise ParameterValueError(
                "mods must hold at least one server mod (SecAggPlus(), CentralDp(...))"
            )
        for mod in mods:
            if not callable(mod):
                raise ParameterTypeError(f"every item of mods must be a server mod, got {mod!r}")
        _refuse_sealing(mods)
        self.strategy = strategy
        self.mods: tuple[ServerMod, ...] = tuple(mods)
        self.weight_key: str = weight_key
        self.history = History()
        self._train = chain(self.mods, aggregate_round)
        self._pending: _Pending | None = None
        self._run: _Run | None = None

    def __repr__(self) -> str:
        return f"SecureStrategy({self.strategy!r}, mods={list(self.mods)!r})"

    # -- the strategy's own steps, unchanged --------------------------------------------
    def configure_train(
        self, server_round: int, arrays: fl.ArrayRecord, config: fl.ConfigRecord, grid: FlwrGrid
    ) -> Iterable[fl.Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._pending = _Pending(server_round, messages) if messages else None
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[fl.Message]
    ) -> tuple[fl.ArrayRecord | None, fl.MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: fl.ArrayRecord, config: fl.ConfigRecord, grid: FlwrGrid
    ) -> Iterable[fl.Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[fl.Message]
    ) -> fl.MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("training rounds run through flowerpets mods: %s", list(self.mods))
        self.strategy.summary()

    def start(
        self,
        grid: FlwrGrid,
        initial_arrays: fl.ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: fl.ConfigRecord | None = None,
        evaluate_config: fl.ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """flwr's ``Strategy.start``, with every training round run through our mods.

        A run config that names a ``store`` is refused (see the module docstring).
        """
        _refuse_store(grid, self.mods)
        context = ServerContext(
            grid=FlowerGrid(grid, min_nodes=0, node_timeout=0),
            secure_aggregation=any(isinstance(m, SecureAggregator) for m in self.mods),
            run_id=int(grid.run.run_id),
            fewest_inputs=fewest_inputs_of(self.mods),
        )
        self._run = _Run(context)
        self.history = self._run.history
        self._pending = None
        try:
            return super().start(
                _SecureGrid(self, grid),
                initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=evaluate_fn,
            )
        finally:
            self._run = None

    # -- the secure round ---------------------------------------------------------------
    def _secure_round(
        self, grid: FlwrGrid, messages: list[fl.Message], timeout: float | None
    ) -> fl.Message:
        pending, self._pending = self._pending, None
        run = self._run
        if (
            run is None
            or pending is None
            or len(pending.messages) != len(messages)
            or any(a is not b for a, b in zip(pending.messages, messages, strict=True))
        ):
            raise IncompatibleStrategyError(
                "train messages reached the secure grid that this strategy's configure_train "
                "did not just make: run the round with SecureStrategy.start"
            )
        record = RoundRecord(round=pending.round, cohort_size=len(messages))
        started = time.perf_counter()
        try:
            return self._attempt(grid, run, pending, messages, timeout, record)
        finally:
            record.seconds = time.perf_counter() - started
            run.history.append(record)
            _log_round(record)

    def _attempt(
        self,
        grid: FlwrGrid,
        run: _Run,
        pending: _Pending,
        messages: list[fl.Message],
        timeout: float | None,
        record: RoundRecord,
    ) -> fl.Message:
        """Run the round; fill ``record``; the mean reply, or an error reply if it failed."""
        rnd = pending.round
        if run.stopped is not None:  # no node hears of a round after the stop
            record.error, record.stopped = run.stopped, True
            return self._error_reply(grid, rnd, f"the run was stopped: {run.stopped}")
        try:
            request = self._request(rnd, messages, timeout)
            result = self._train(request, run.context)
            record.participants = result.participants
            record.failures = dict(result.failures)
            record.train_metrics = {
                k: float(v) for k, v in result.metrics.items() if not isinstance(v, list)
            }
            return self._mean_reply(grid, request, result)
        except StopRunError as exc:
            log.warning("round %d: the run is stopped: %s", rnd, exc)
            run.stopped = record.error = str(exc)
            record.stopped = True
            return self._error_reply(grid, rnd, str(exc))
        except ConfigurationError as exc:
            record.error = str(exc)
            raise  # every round would fail alike: the run ends with it
        except RoundFailedError as exc:
            log.warning("round %d failed, the model is unchanged: %s", rnd, exc)
            failed = exc
        except Exception as exc:
            # As our ServerApp does: a bug or a malicious node's input fails this round only.
            log.error("round %d failed, the model is unchanged", rnd, exc_info=exc)
            failed = RoundFailedError(f"round {rnd}: {type(exc).__name__}: {exc}")
        record.error = str(failed)
        if failed.failures:
            record.failures = dict(failed.failures)
        if failed.participants:
            record.participants = failed.participants
        return self._error_reply(grid, rnd, str(failed))

    def _request(
        self, round: int, messages: list[fl.Message], timeout: float | None
    ) -> RoundRequest:
        first = messages[0]
        if not first.has_content():
            raise IncompatibleStrategyError("the strategy's train message carries no content")
        content = first.content
        kinds = {m.metadata.message_type for m in messages}
        if kinds != {MessageType.TRAIN} or any(m.content is not content for m in messages):
            raise IncompatibleStrategyError(
                f"{type(self.strategy).__name__} sends its nodes different train requests "
                f"(types {sorted(kinds)}): a secure round sums the replies to one request"
            )
        cohort = tuple(int(m.metadata.dst_node_id) for m in messages)
        if len(set(cohort)) != len(cohort):
            raise IncompatibleStrategyError("the strategy addressed a node twice in one round")
        if set(content.keys()) != {ARRAYS, CONFIG}:
            raise IncompatibleStrategyError(
                f"the strategy's train request holds the records {sorted(content.keys())}; a "
                f"secure round sends {ARRAYS!r} and {CONFIG!r} only"
            )
        try:
            ours = recorddict_from_flwr(content, Session())
            arrays = ours.get_typed(ARRAYS, ArrayRecord)
            config = ours.get_typed(CONFIG, ConfigRecord)
        except RecordTypeError as exc:
            raise IncompatibleStrategyError(f"the strategy's train request: {exc}") from exc
        return RoundRequest(
            round=round,
            cohort=cohort,
            arrays=arrays,
            config=config,
            # flwr samples with Python's `random`: accounted as the cohort's full participation.
            sampling=FullParticipation(),
            population=len(cohort),
            message_type=MessageType.TRAIN,
            weight_key=self.weight_key,
            timeout=timeout,
        )

    def _mean_reply(self, grid: FlwrGrid, request: RoundRequest, result: RoundResult) -> fl.Message:
        if result.sealed is not None:
            raise IncompatibleStrategyError(
                f"the round's sum came back sealed ({type(result.sealed).__name__}): no Flower "
                "strategy can read it; run sealing mods through flowerpets.flower.server_app"
            )
        model = request.arrays.layout().shape_map()
        if result.aggregate.layout().shape_map() != model:
            raise RoundFailedError(
                f"round {request.round}: the aggregate holds {list(result.aggregate)}, the "
                f"model holds {list(request.arrays)}",
                failures=result.failures,
                participants=result.participants,
            )
        if not (np.isfinite(result.total_weight) and result.total_weight > 0):
            raise RoundFailedError(
                f"round {request.round}: total weight is {result.total_weight}, no mean",
                failures=result.failures,
                participants=result.participants,
            )
        mean = result.mean()
        arrays = fl.ArrayRecord()
        for name, array in request.arrays.items():
            values = mean[name].astype(_mean_dtype(array.dtype), copy=False)
            arrays[name] = array_to_flwr(Array(values, copy=False))
        metrics = fl.MetricRecord(dict(result.metrics.items()))
        # A weighted mean of this one reply is the reply: its weight is the round's total.
        metrics[self.weight_key] = float(result.total_weight)
        content = fl.RecordDict({ARRAYS: arrays, METRICS: metrics})
        return _server_reply(grid, request.round, content=content)

    def _error_reply(self, grid: FlwrGrid, round: int, reason: str) -> fl.Message:
        error = error_to_flwr(Error(ErrorCode.REFUSED, f"the secure round failed: {reason}"))
        return _server_reply(grid, round, error=error)


def _server_reply(grid: FlwrGrid, round: int, **body: Any) -> fl.Message:
    """The round's one reply: it comes from the server's secure round, from no node."""
    metadata = fl.Metadata(
        run_id=int(grid.run.run_id),
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id="",
        group_id=str(round),
        created_at=time.time(),
        ttl=fl.DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return _flwr_message(metadata=metadata, **body)


def secure_strategy(
    strategy: Strategy, *, mods: Sequence[ServerMod] | None = None
) -> SecureStrategy:
    """``strategy`` (a flwr strategy) with its training rounds run through our server ``mods``.

    ``mods`` defaults to ``[SecAggPlus()]``; ``[CentralDp(...), SecAggPlus()]`` adds
    central DP (clients: ``mods(secaggplus_mod, fixed_clipping_mod)``). A strategy
    whose aggregate is not a weighted mean of the replies raises
    :class:`~flowerpets.exceptions.IncompatibleStrategyError` (see the module docstring).
    """
    if mods is None:
        from flowerpets.secagg import SecAggPlus

        mods = [SecAggPlus()]
    return SecureStrategy(strategy, mods=mods)

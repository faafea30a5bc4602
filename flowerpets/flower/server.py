"""Our ServerApp (strategy and server mods) as a Flower ``flwr.serverapp.ServerApp``.

.. code-block:: python

    from flowerpets.flower import server_app

    app = server_app(ServerApp(strategy=FedAvg(), num_rounds=3, initial_arrays=arrays,
                               mods=[CentralDp(...), SecAggPlus(...)]))
    # or a factory that reads the run's settings:
    app = server_app(lambda s: ServerApp(..., num_rounds=s.num_rounds or 3, seed=s.seed))

Its ``main(grid, context)`` runs our app over a :class:`~flowerpets.flower.FlowerGrid`
(replies streamed as they arrive). ``context.run_config`` (the ``[tool.flwr.app.config]``
of a Flower app, or ``flwr run --run-config``) maps to :class:`Settings`:

=======================  ===============================================================
``num-server-rounds``    rounds (Flower's template key); overrides the app's
``seed``                 cohort sampling seed (and passed on in the run config)
``min-nodes``            wait for this many connected nodes before each round
``node-timeout``         how long to wait for them, seconds (default 60)
``poll-interval``        pause between two empty pulls, seconds (default 0.01)
``history-file``         write our History as JSON there when the run ends
``store``                commit every round to the run store (an SQLite file) at this
                         path, and resume the run from it if it holds it already
``store-run``            the run's id in that store (default ``"flower"``)
``store-commit-every``   commit after every N-th round and the last (default 1)
``store-population``     the privacy ledger the run spends from (default: the run's own)
=======================  ===============================================================

With ``store``, a ServerApp process that died (or a run started again with
``flwr run``) continues after the last committed round, with the stored model,
history and cohort generator. The stored configuration is the run config without
the keys that change no result (``store``, ``store-run``, ``store-commit-every``,
``history-file``, ``min-nodes``, ``node-timeout``, ``poll-interval``) and the app's
rounds and seed;
resuming with another is refused, and so is a ``store-population`` that is not the
stored run's (without the key a resumed run spends on from its stored population).
``CentralDp`` keeps its budget in the store (spent before each release, continued on
resume: the same epsilon per round as an uninterrupted run); ``HomomorphicAggregation``
is refused with ``store``: its CKKS key lives only in the nodes' contexts, and a resumed
run is a new flwr run whose nodes start new ones. The interrupted round is run again
from scratch with a new SecAgg+ session, which a node that kept its state refuses (it
never runs one round twice): that round
fails with the model unchanged and the run goes on with the next.

The whole run config is also passed to our ``ServerApp.run`` as its run config.
What comes back: :attr:`FlowerServerApp.last_result` (our ``RunResult`` with the
History, epsilon per round included, in the process that ran ``main``),
:attr:`FlowerServerApp.last_flwr_result` (Flower's ``Result``), one log line per
round on the ``flwr`` logger (what ``flwr log`` shows), and the optional JSON file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr.serverapp
from flwr import app as fl
from flwr.serverapp import Grid as FlwrGrid
from flwr.serverapp.strategy import Result

from flowerpets._validation import is_integer, is_real
from flowerpets.core import ConfigValue, RoundRecord, RunResult, ServerApp
from flowerpets.exceptions import ParameterTypeError, ParameterValueError
from flowerpets.flower.grid import FlowerGrid
from flowerpets.flower.records import array_to_flwr
from flowerpets.store.serving import stored_app

__all__ = ["FlowerServerApp", "Settings", "flwr_result", "server_app"]

log = logging.getLogger(__name__)
flwr_log = logging.getLogger("flwr")

# Why a HE run cannot be resumed here (the store's refusal says it).
_NEW_FLWR_RUN = (
    "a resumed Flower run is a new flwr run, in which every node starts a new context "
    "(a SuperNode keeps one per run)"
)


def _int(config: Mapping[str, Any], key: str, default: int | None, low: int) -> int | None:
    value = config.get(key, default)
    if value is None:
        return None
    if not is_integer(value) or value < low:
        raise ParameterValueError(f"run config {key!r} must be an integer >= {low}, got {value!r}")
    return int(value)


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if not is_real(value) or not value >= 0:
        raise ParameterValueError(f"run config {key!r} must be a number >= 0, got {value!r}")
    if not math.isfinite(value):
        raise ParameterValueError(f"run config {key!r} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Settings:
    """Our settings, read from a Flower run config (see the module docstring)."""

    num_rounds: int | None = None
    seed: int | None = None
    min_nodes: int = 1
    node_timeout: float = 60.0
    poll_interval: float = 0.01
    history_file: str | None = None
    store: str | None = None
    store_run: str = "flower"
    store_commit_every: int = 1
    store_population: str | None = None
    run_config: Mapping[str, ConfigValue] = field(default_factory=dict)

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> Settings:
        """Validated settings; a bad value raises ``ValueError`` naming its key."""
        config = {**(defaults or {}), **run_config}
        history = _text(config, "history-file", "a path")
        store = _text(config, "store", "a path")
        store_run = _text(config, "store-run", "a run id") or "flower"
        return cls(
            num_rounds=_int(config, "num-server-rounds", None, 1),
            seed=_int(config, "seed", None, 0),
            min_nodes=_int(config, "min-nodes", 1, 0) or 0,
            node_timeout=_seconds(config, "node-timeout", 60.0),
            poll_interval=_seconds(config, "poll-interval", 0.01),
            history_file=history or None,
            store=store or None,
            store_run=store_run,
            store_commit_every=_int(config, "store-commit-every", 1, 1) or 1,
            store_population=_text(config, "store-population", "a population id") or None,
            run_config=config,
        )

    def stored_config(self, app: ServerApp) -> dict[str, Any]:
        """What identifies the run in a store: the run config's keys that change results."""
        relevant = {k: v for k, v in self.run_config.items() if k not in _OPERATIONAL}
        return {
            "program": "flowerpets.flower",
            "run_config": relevant,
            "num_rounds": app.num_rounds,
            "seed": app.seed if app.seed is not None else self.seed,
        }


# Run-config keys that say how to run, not what is computed: not part of a stored run's identity.
_OPERATIONAL = frozenset(
    {
        "store",
        "store-run",
        "store-commit-every",
        "store-population",
        "history-file",
        "min-nodes",
        "node-timeout",
        "poll-interval",
    }
)


def _text(config: Mapping[str, Any], key: str, what: str) -> str | None:
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise ParameterValueError(f"run config {key!r} must be {what}, got {value!r}")
    return value


AppOrFactory = ServerApp | Callable[[Settings], ServerApp]


def _with_rounds(app: ServerApp, num_rounds: int | None) -> ServerApp:
    if num_rounds is None or num_rounds == app.num_rounds:
        return app
    return ServerApp(
        strategy=app.strategy,
        num_rounds=num_rounds,
        initial_arrays=app.initial_arrays,
        mods=app.mods,
        seed=app.seed,
        stop_on_failure=app.stop_on_failure,
    )


def flwr_result(result: RunResult) -> Result:
    """Flower's ``Result`` for our run: final arrays and per-round metrics."""
    arrays = fl.ArrayRecord()
    for name, array in result.arrays.items():
        arrays[name] = array_to_flwr(array)
    out = Result(arrays=arrays)
    for record in result.history.rounds:
        if record.train_metrics:
            out.train_metrics_clientapp[record.round] = fl.MetricRecord(dict(record.train_metrics))
        if record.evaluate_metrics:
            out.evaluate_metrics_clientapp[record.round] = fl.MetricRecord(
                dict(record.evaluate_metrics)
            )
        if record.server_metrics:
            out.evaluate_metrics_serverapp[record.round] = fl.MetricRecord(
                dict(record.server_metrics)
            )
    return out


def _log_round(record: RoundRecord) -> None:
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(record.train_metrics.items()))
    flwr_log.info(
        "flowerpets round %d: %d participants, %d failures%s%s (%.2f s)",
        record.round,
        len(record.participants),
        len(record.failures),
        f", {metrics}" if metrics else "",
        f", error: {record.error}" if record.error else "",
        record.seconds,
    )


class FlowerServerApp(flwr.serverapp.ServerApp):
    """A flwr ServerApp whose ``main`` runs our ServerApp; build it with :func:`server_app`."""

    def __init__(self, app: AppOrFactory, *, defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not (isinstance(app, ServerApp) or callable(app)):
            raise ParameterTypeError(
                f"server_app() takes a flowerpets ServerApp or a factory, got {app!r}"
            )
        self._app = app
        self._defaults = dict(defaults or {})
        Settings.from_run_config({}, self._defaults)  # fail now on a bad default
        self.last_result: RunResult | None = None
        self.last_flwr_result: Result | None = None
        self.last_grid: FlowerGrid | None = None
        self.main()(self._run)

    def _run(self, grid: FlwrGrid, context: fl.Context) -> None:
        settings = Settings.from_run_config(dict(context.run_config), self._defaults)
        if isinstance(self._app, ServerApp):
            ours = _with_rounds(self._app, settings.num_rounds)
        else:
            ours = self._app(settings)
            if not isinstance(ours, ServerApp):
                raise ParameterTypeError(
                    f"the factory returned {type(ours).__name__}, not a ServerApp"
                )
        bridge = FlowerGrid(
            grid,
            min_nodes=settings.min_nodes,
            node_timeout=settings.node_timeout,
            poll_interval=settings.poll_interval,
        )
        self.last_grid = bridge
        with ExitStack() as stored:
            if settings.store is not None:
                config = settings.stored_config(ours)
                ours = stored.enter_context(
                    stored_app(
                        ours,
                        settings.store,
                        settings.store_run,
                        config,
                        nodes_lose_state=_NEW_FLWR_RUN,
                        commit_every=settings.store_commit_every,
                        population_id=settings.store_population,
                    )
                )
            result = ours.run(
                bridge, run_config=settings.run_config, on_round=_log_round, seed=settings.seed
            )
        self.last_result = result
        self.last_flwr_result = flwr_result(result)
        if result.stopped:
            flwr_log.warning("flowerpets run stopped early: %s", result.stopped)
        if settings.history_file:
            Path(settings.history_file).write_text(
                json.dumps(result.history.to_dicts(), indent=1), encoding="utf-8"
            )


def server_app(app: AppOrFactory, **defaults: Any) -> FlowerServerApp:
    """Our ServerApp (or a factory of one) as a flwr ServerApp.

    ``defaults`` are run-config values used when the run config lacks them, by
    their Python names (``min_nodes=3``) or their run-config keys.
    """
    keys = {k.replace("_", "-"): v for k, v in defaults.items()}
    return FlowerServerApp(app, defaults=keys)

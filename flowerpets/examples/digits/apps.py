"""The digits federation as a ClientApp and a ServerApp.

Every node holds one partition of the training set and one slice of the test
set (for federated evaluation). The server evaluates the global model on the
whole test set after every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import integer
from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    CohortSampling,
    ConfigRecord,
    Context,
    FedAvg,
    FullParticipation,
    Message,
    MetricRecord,
    RecordDict,
    RunJournal,
    ServerApp,
    ServerMod,
)
from flowerpets.examples.digits.data import DigitsData, partition_iid
from flowerpets.examples.digits.model import Model, Params, evaluate, train

__all__ = ["DigitsTask", "TrainSettings", "make_client_app", "make_server_app"]


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Local training on each node, per round."""

    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.5


@dataclass(frozen=True)
class DigitsTask:
    """The data, its split across nodes, and the model they train."""

    data: DigitsData
    partitions: Sequence[NDArray[np.int64]]
    model: Model
    test_slices: Sequence[NDArray[np.int64]]

    @classmethod
    def create(
        cls,
        data: DigitsData,
        partitions: Sequence[NDArray[np.int64]],
        model: Model,
        *,
        seed: int = 0,
    ) -> DigitsTask:
        rng = np.random.default_rng(seed)
        test_slices = partition_iid(len(data.y_test), len(partitions), rng)
        return cls(data=data, partitions=partitions, model=model, test_slices=test_slices)

    @property
    def num_nodes(self) -> int:
        return len(self.partitions)


def _params(arrays: ArrayRecord) -> Params:
    return {name: np.asarray(a.numpy(), dtype=np.float32) for name, a in arrays.items()}


def _partition_id(context: Context, num_nodes: int) -> int:
    pid = context.node_config["partition-id"]
    return integer("node config partition-id", pid, at_least=0, below=num_nodes)


def _seed(context: Context, round: int, pid: int) -> list[int]:
    base = context.run_config.get("seed", 0)
    return [int(base) if isinstance(base, int) else 0, pid, round]


def make_client_app(
    task: DigitsTask,
    settings: TrainSettings = TrainSettings(),
    *,
    mods: Sequence[ClientMod] = (),
) -> ClientApp:
    """A ClientApp that trains locally on its partition and evaluates on its test slice."""
    app = ClientApp(mods=mods)
    data = task.data

    @app.train()
    def _train(msg: Message, context: Context) -> RecordDict:
        body = msg.require_content()
        pid = _partition_id(context, task.num_nodes)
        idx = task.partitions[pid]
        config = body.get_typed("config", ConfigRecord) if "config" in body else ConfigRecord()
        lr = config.get("learning-rate", settings.learning_rate)
        params, loss = train(
            task.model,
            _params(body.get_typed("arrays", ArrayRecord)),
            data.x_train[idx],
            data.y_train[idx],
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            learning_rate=float(lr) if isinstance(lr, int | float) else settings.learning_rate,
            rng=np.random.default_rng(_seed(context, msg.round, pid)),
        )
        metrics = MetricRecord({"num-examples": len(idx), "train-loss": loss})
        return RecordDict(
            {"arrays": ArrayRecord.from_numpy(params, copy=False), "metrics": metrics}
        )

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> RecordDict:
        pid = _partition_id(context, task.num_nodes)
        idx = task.test_slices[pid]
        params = _params(msg.require_content().get_typed("arrays", ArrayRecord))
        loss, acc = evaluate(task.model, params, data.x_test[idx], data.y_test[idx])
        metrics = MetricRecord({"num-examples": len(idx), "loss": loss, "accuracy": acc})
        return RecordDict({"metrics": metrics})

    return app


def make_server_app(
    task: DigitsTask,
    *,
    num_rounds: int,
    sampling: CohortSampling | None = None,
    federated_evaluation: bool = False,
    central_evaluation: bool = True,
    mods: Sequence[ServerMod] = (),
    seed: int | None = None,
    store: RunJournal | None = None,
) -> ServerApp:
    """FedAvg over the task's nodes, evaluated on the whole test set after each round.

    ``central_evaluation=False`` leaves the server's evaluation out, for a
    server that cannot read the model (it stays encrypted): only the nodes'
    federated evaluation measures it then. ``store`` is where the app commits
    every round and resumes from (see :class:`~flowerpets.core.ServerApp`).
    """
    data = task.data

    def evaluate_global(round: int, arrays: ArrayRecord) -> Mapping[str, float]:
        loss, acc = evaluate(task.model, _params(arrays), data.x_test, data.y_test)
        return {"loss": loss, "accuracy": acc}

    strategy = FedAvg(
        sampling=sampling,
        evaluate_sampling=(sampling or FullParticipation()) if federated_evaluation else None,
        evaluate_fn=evaluate_global if central_evaluation else None,
    )
    initial = task.model.init_params(np.random.default_rng(seed if seed is not None else 0))
    return ServerApp(
        strategy=strategy,
        num_rounds=num_rounds,
        initial_arrays=ArrayRecord.from_numpy(initial, copy=False),
        mods=mods,
        seed=seed,
        store=store,
    )

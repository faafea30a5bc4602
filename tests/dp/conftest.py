"""Helpers for the DP tests: apps whose updates are known exactly (the grid: ``scripted_grid``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)


@dataclass
class UpdateApp:
    """A ClientApp whose train handler returns received + ``delta(pid, round)``."""

    delta: Callable[[int, int], dict[str, np.ndarray]]
    mods: Sequence[ClientMod] = ()
    weight: Callable[[int], int] = lambda pid: 10 + pid
    calls: list[tuple[int, int]] = field(default_factory=list)

    def build(self) -> ClientApp:
        app = ClientApp(mods=self.mods)

        @app.train()
        def train(msg: Message, context: Context) -> RecordDict:
            pid = context.node_config["partition-id"]
            assert isinstance(pid, int)
            self.calls.append((pid, msg.round))
            arrays = msg.require_content().get_typed("arrays", ArrayRecord)
            step = self.delta(pid, msg.round)
            new = {n: np.asarray(a.numpy()) + step[n] for n, a in arrays.items()}
            metrics = MetricRecord({"num-examples": self.weight(pid), "train-loss": float(pid)})
            return RecordDict({"arrays": ArrayRecord(new), "metrics": metrics})

        return app


@pytest.fixture
def update_app() -> type[UpdateApp]:
    return UpdateApp


def refusal(
    main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """What a command line prints when it refuses ``argv``: one line on stderr, status 2."""
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    """``flowerpets accountant ARGV --json``, run in-process: its one JSON object."""
    from flowerpets.dp.cli import main

    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object
    result: dict[str, object] = json.loads(out)
    return result

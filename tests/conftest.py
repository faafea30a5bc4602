"""Helpers every test folder may use, as fixtures (tests run with ``--import-mode=importlib``)."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from flowerpets.core import ClientApp, Context, Message

# Tests never assert wall-clock times, and hypothesis's per-example deadline is one: on a
# loaded 2-core machine an example can take 300 ms for reasons that are not the code's.
settings.register_profile("flowerpets", deadline=None)
settings.load_profile("flowerpets")

if TYPE_CHECKING:
    from flowerpets.examples.digits.features import DemoFeature


class ScriptedGrid:
    """Nodes answer synchronously, in order; the ``silent`` ones (and unknown ids) never answer.

    Node ``i + 1`` has ``partition-id`` ``i``; ``silent`` lists partition ids (node indices).

    ``sent`` keeps every message sent and ``replies`` every reply as it left its node
    (what the wire carries).
    """

    def __init__(self, app: ClientApp, n: int, silent: Sequence[int] = ()) -> None:
        self.app = app
        self.contexts = {
            i + 1: Context(node_id=i + 1, node_config={"partition-id": i}) for i in range(n)
        }
        self.silent = {i + 1 for i in silent}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    @property
    def run_id(self) -> int:
        return 0

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self.sent.extend(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent or node not in self.contexts:  # no such node: no reply
                continue
            reply = self.app(msg.with_private_content(), self.contexts[node])
            self.replies.append(reply)
            yield reply

    def sent_in_round(self, rnd: int) -> int:
        return sum(1 for m in self.sent if m.metadata.round == rnd)


@pytest.fixture
def scripted_grid() -> type[ScriptedGrid]:
    """The class :class:`ScriptedGrid`: ``scripted_grid(app, n, silent=[...])``."""
    return ScriptedGrid


@pytest.fixture
def run_demo(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """``run_demo(*argv, features=None)``: what ``flowerpets demo *argv --json`` prints, parsed.

    With ``features``, the demo has only those PET switches (for this test). Skips the test
    without scikit-learn.
    """
    pytest.importorskip("sklearn")
    from flowerpets.examples.digits import demo

    def run(*argv: str, features: Sequence[DemoFeature] | None = None) -> dict[str, Any]:
        if features is not None:
            monkeypatch.setattr(demo, "FEATURES", list(features))
        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        out = io.StringIO()
        assert demo.run(parser.parse_args([*argv, "--json"]), out=out) == 0
        result: dict[str, Any] = json.loads(out.getvalue())
        return result

    return run

"""``flowerpets new NAME --pets secagg,dp,he``: write a Flower app that uses our PETs.

The app (see ``docs/flower.md``) is a directory ``NAME/`` with

* ``pyproject.toml``: ``[tool.flwr.app]`` components (``serverapp``,
  ``clientapp``) and run config;
* ``flwr-home/config.toml``: the local simulation federation (flwr 1.42 keeps
  federations, "SuperLink connections", in ``$FLWR_HOME/config.toml``; a
  ``[tool.flwr.federations]`` table in pyproject is legacy and flwr rewrites it);
* ``NAME/client_app.py``: a ``flowerpets.flower.ClientApp(mods=[mods(...)])``
  with the chosen client mods in the documented order (SecAgg+ or CKKS
  outermost, clipping inside), training on scikit-learn's digits;
* ``NAME/server_app.py``: ``server_app(ServerApp(...))`` with the server mods
  (``CentralDp`` outermost, then ``SecAggPlus`` or ``HomomorphicAggregation``);
* ``NAME/task.py``: the digits data and model, from ``flowerpets.examples.digits``;
* ``tests/test_app.py``: pytest, runs both apps in-process over flwr's Message API.

The templates are Python strings in this module, filled with
:class:`string.Template` (``$name``); the values substituted are only NAME,
validated as a lowercase Python identifier that is no keyword, and code chosen
here from the PET table. This module imports nothing from flwr, so ``new`` works
without the ``flower`` extra.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from pathlib import Path
from string import Template

from flowerpets.exceptions import PathExistsError

__all__ = ["PETS", "add_parser", "package_name", "parse_pets", "render", "write_app"]

#: The PETs ``--pets`` accepts, in update-flow order (privacy before protection).
PETS = ("dp", "secagg", "he")
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

_PYPROJECT = Template("""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "$name"
version = "1.0.0"
description = "A Flower app on the digits data with flowerpets ($pets_text)"
license = "Apache-2.0"
# flwr and flowerpets (extras flower, examples) come from the environment that
# runs the SuperLink and SuperNodes: flowerpets[flower,examples].
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flowerpets"

[tool.flwr.app.components]
serverapp = "$name.server_app:app"
clientapp = "$name.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 3
seed = 1
local-epochs = 1
history-file = ""  # set it with --run-config to keep our History as JSON

[tool.ruff]
line-length = 100

[tool.ruff.lint]
select = ["E", "F", "W", "I", "B", "UP"]
""")

_FLWR_CONFIG = """\
# The local simulation federation: FLWR_HOME=$PWD/flwr-home flwr run . --stream
# (or copy [superlink.local-simulation] into your own $FLWR_HOME/config.toml).
[superlink]
default = "local-simulation"

[superlink.local-simulation]
address = ":local:"
options.num-supernodes = 3
"""

_INIT = Template('''\
"""$name: a Flower app on the digits data with flowerpets ($pets_text)."""
''')

_TASK = Template('''\
"""The digits data (bundled with scikit-learn, nothing downloaded) and the model."""

from __future__ import annotations

from functools import cache

import numpy as np
from flowerpets.examples.digits import (
    DigitsData,
    SoftmaxRegression,
    load_digits_split,
    partition_iid,
)

MODEL = SoftmaxRegression()


@cache
def data() -> DigitsData:
    return load_digits_split(seed=0)


def partition(pid: int, num_partitions: int) -> np.ndarray:
    """Training-set indices of partition ``pid`` (the same split on every node)."""
    rng = np.random.default_rng(0)
    return partition_iid(len(data().y_train), num_partitions, rng)[pid]


def test_slice(pid: int, num_partitions: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return partition_iid(len(data().y_test), num_partitions, rng)[pid]
''')

_CLIENT = Template('''\
"""The ClientApp: plain Flower handlers, our PETs as one flwr Mod ($pets_text)."""

from __future__ import annotations

import numpy as np
${client_imports}
from $name.task import MODEL, data, partition, test_slice

$client_app


def _node(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _params(msg: Message) -> dict[str, np.ndarray]:
    return {n: a.numpy().astype(np.float32) for n, a in msg.content["arrays"].items()}


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    pid, n = _node(context)
    idx = partition(pid, n)
    rnd = int(msg.metadata.group_id.partition(":")[0] or 0)
    seed = int(context.run_config.get("seed", 0))
    params, loss = train(
        MODEL,
        _params(msg),
        data().x_train[idx],
        data().y_train[idx],
        epochs=int(context.run_config.get("local-epochs", 1)),
        batch_size=16,
        learning_rate=0.5,
        rng=np.random.default_rng([seed, pid, rnd]),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()}),
            "metrics": MetricRecord({"num-examples": len(idx), "train-loss": loss}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    pid, n = _node(context)
    idx = test_slice(pid, n)
    loss, acc = evaluate(MODEL, _params(msg), data().x_test[idx], data().y_test[idx])
    metrics = MetricRecord({"num-examples": len(idx), "loss": loss, "accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
''')

_SERVER = Template('''\
"""The ServerApp: our FedAvg with the server mods ($pets_text), as a flwr ServerApp."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
${server_imports}
from $name.task import MODEL, data


def _global(round: int, arrays: ArrayRecord) -> Mapping[str, float]:
    params = {n: np.asarray(a.numpy(), np.float32) for n, a in arrays.items()}
    loss, acc = evaluate(MODEL, params, data().x_test, data().y_test)
    return {"loss": loss, "accuracy": acc}


def build(settings: Settings) -> ServerApp:
    seed = settings.seed if settings.seed is not None else 0
    strategy = FedAvg(
        evaluate_sampling=FullParticipation(),  # the nodes evaluate the global model
        evaluate_fn=$evaluate_fn,
    )
    return ServerApp(
        strategy=strategy,
        num_rounds=settings.num_rounds or 2,
        initial_arrays=ArrayRecord.from_numpy(MODEL.init_params(np.random.default_rng(seed))),
        # First listed is outermost: it post-processes what the inner ones produce.
        mods=[$server_mods],
        seed=settings.seed,
    )


app = server_app(build, min_nodes=3)
''')

_TEST = Template('''\
"""Run $name's ClientApp and ServerApp in-process: 3 nodes, 2 rounds, flwr's Message API.

A minimal flwr Grid runs the ClientApp once per message and keeps each node's
Context, as flwr's runtime does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from $name.client_app import app as client
from $name.server_app import app as server

N = 3


class InProcessGrid(Grid):
    def __init__(self) -> None:
        self.nodes = list(range(101, 101 + N))
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": N},
                state=RecordDict(),
                run_config={"seed": 1, "local-epochs": 1},
            )
            for i, node in enumerate(self.nodes)
        }
        self._run: Any = type("Run", (), {"run_id": 7})()
        self.inbox: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for mid in message_ids:
            msg = self.inbox.pop(mid, None)
            if msg is None:
                continue
            try:
                reply = client(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # as flwr's runtime reports a ClientApp's exception
                reply = Message(Error(code=2, reason=repr(exc)), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            return [reply]
        return []

    def send_and_receive(self, messages: Iterable[Message], **_: Any) -> Iterable[Message]:
        raise NotImplementedError


def test_two_rounds_on_three_nodes(monkeypatch: Any) -> None:
    # What flwr's runtime sets in a ServerApp process; flwr's Message() reads it.
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    grid = InProcessGrid()
    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"num-server-rounds": 2, "min-nodes": N, "seed": 1, "node-timeout": 5},
    )
    server(grid, context)
    result = server.last_result
    assert result is not None
    rounds = result.history.rounds
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.ok and len(r.participants) == N for r in rounds), [r.to_dict() for r in rounds]
    assert all(0.0 <= r.evaluate_metrics["accuracy"] <= 1.0 for r in rounds)
''')

# Per PET: client mod (import, expression), server mod (import, expression).
_CLIENT_MOD = {
    "secagg": ("from flowerpets.secagg import secaggplus_mod", "secaggplus_mod"),
    "he": ("from flowerpets.he import ckks_mod", "ckks_mod"),
    "dp": ("from flowerpets.dp import fixed_clipping_mod", "fixed_clipping_mod"),
}
_SERVER_MOD = {
    "dp": (
        "from flowerpets.dp import CentralDp",
        "CentralDp(noise_multiplier=0.5, clipping_norm=1.0)",
    ),
    "secagg": ("from flowerpets.secagg import SecAggPlus", "SecAggPlus()"),
    "he": ("from flowerpets.he import HomomorphicAggregation", "HomomorphicAggregation()"),
}
_CLIENT_ORDER = ("secagg", "he", "dp")  # protection outermost, clipping inside
_SERVER_ORDER = ("dp", "secagg", "he")  # noise outermost, over the secure sum


def parse_pets(text: str) -> tuple[str, ...]:
    """``"secagg,dp"`` as PET names; an unknown one or a bad combination is refused."""
    names = [p.strip() for p in text.split(",")] if text.strip() else []
    unknown = [p for p in names if p not in PETS]
    if unknown or "" in names:
        raise argparse.ArgumentTypeError(
            f"unknown PET {unknown[0] if unknown else ''!r}: choose from {', '.join(PETS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a PET is listed twice in {text!r}")
    if "secagg" in names and "he" in names:
        raise argparse.ArgumentTypeError(
            "secagg and he both replace the round's exchange (masked sums vs. encrypted sums): "
            "choose one"
        )
    return tuple(p for p in PETS if p in names)


def package_name(text: str) -> str:
    """NAME as a package: a lowercase Python identifier (``[a-z][a-z0-9_]*``), not a keyword."""
    if not _NAME.match(text) or keyword.iskeyword(text) or text in sys.stdlib_module_names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid app name: use a lowercase Python identifier "
            "([a-z][a-z0-9_]*, not a keyword or a standard-library module)"
        )
    return text


def _imports(*lines: str) -> str:
    """Third-party ``from`` imports in isort's order (one block after ``import numpy``)."""
    return "".join(f"{line}\n" for line in sorted(lines))


def render(name: str, pets: tuple[str, ...]) -> dict[str, str]:
    """The app's files, relative path -> text, for ``name`` with ``pets``."""
    name = package_name(name)
    pets = parse_pets(",".join(pets))

    def chosen(table: dict[str, tuple[str, str]], order: tuple[str, ...]) -> list[tuple[str, str]]:
        return [table[p] for p in order if p in pets]

    client, server = chosen(_CLIENT_MOD, _CLIENT_ORDER), chosen(_SERVER_MOD, _SERVER_ORDER)
    values = {
        "name": name,
        "pets_text": ", ".join(pets) or "no PET",
        "client_imports": _imports(
            *(i for i, _ in client),
            "from flowerpets.examples.digits import evaluate, train",
            "from flowerpets.flower import ClientApp" + (", mods" if client else ""),
            "from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict",
        ),
        "client_app": (
            "# First listed is outermost: it post-processes the reply last.\n"
            f"app = ClientApp(mods=[mods({', '.join(e for _, e in client)})])"
            if client
            else "app = ClientApp()"
        ),
        "flower_import": "from flowerpets.flower import ClientApp" + (", mods" if client else ""),
        "server_imports": _imports(
            *(i for i, _ in server),
            "from flowerpets.core import ArrayRecord, FedAvg, FullParticipation, ServerApp",
            "from flowerpets.examples.digits import evaluate",
            "from flowerpets.flower import Settings, server_app",
        ),
        "server_mods": ", ".join(e for _, e in server),
        # Under HE the server cannot read the model: only the nodes evaluate it.
        "evaluate_fn": "None" if "he" in pets else "_global",
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        f"{name}/__init__.py": _INIT,
        f"{name}/task.py": _TASK,
        f"{name}/client_app.py": _CLIENT,
        f"{name}/server_app.py": _SERVER,
        "tests/test_app.py": _TEST,
    }
    out = {path: t.substitute(values) for path, t in files.items()}
    out["flwr-home/config.toml"] = _FLWR_CONFIG
    return out


def write_app(target: Path, name: str, pets: tuple[str, ...], *, force: bool = False) -> None:
    """Write the app into ``target``: refused if it is not empty, unless ``force``.

    ``force`` overwrites the app's files and leaves any other file there alone.
    """
    files = render(name, pets)
    if target.exists() and not target.is_dir():
        raise PathExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise PathExistsError(f"{target} is not empty (use --force to write into it)")
    for path, text in files.items():
        file = target / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    target = Path(args.directory) if args.directory else Path(args.name)
    try:
        write_app(target, args.name, args.pets, force=args.force)
    except (FileExistsError, OSError) as exc:
        parser.error(str(exc))
    print(f"wrote a Flower app in {target} (PETs: {', '.join(args.pets) or 'none'})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``flowerpets new``."""
    parser = subparsers.add_parser(
        "new",
        help="write a Flower app that uses flowerpets' PETs",
        description="Write a Flower app (pyproject, ClientApp, ServerApp, a test) on the "
        "digits data, with the PETs chosen, that runs with `flwr run .`.",
    )
    parser.add_argument("name", type=package_name, metavar="NAME", help="the app's package name")
    parser.add_argument(
        "--pets",
        type=parse_pets,
        default=(),
        help=f"comma-separated PETs among {', '.join(PETS)} (secagg and he exclude each other)",
    )
    parser.add_argument("--directory", help="where to write the app (default: ./NAME)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty target directory (overwrites the app's files)",
    )
    parser.set_defaults(command=lambda args: _run(parser, args))

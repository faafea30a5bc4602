"""A server's run in a store, for the entry points that take a store path (the Flower bridge).

:func:`stored_app` opens the store, starts the run or, if the store holds it
already, resumes it (its configuration must be the stored one), and gives back
the ServerApp rebuilt to commit each round there. ``CentralDp`` keeps its budget
there and ``HomomorphicAggregation`` its key's public side (both declare
:class:`~flowerpets.core.DurableState`). What a store cannot keep is refused
before anything is written: HE where the entry point's nodes would not keep
their contexts across a restart, for its CKKS key lives there only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flowerpets._validation import integer
from flowerpets.core import ServerApp, ServerMod
from flowerpets.exceptions import MissingRunError, ParameterValueError, RunConfigMismatchError
from flowerpets.store.run_store import RunStore
from flowerpets.store.run_writer import RunWriter

__all__ = ["refuse_unstored_state", "stored_app", "with_store"]

# (defining module, class, why a resume would be wrong where the nodes lose their contexts):
# only looked up once the module is loaded, since no mod of a class never imported can exist
# (and HE stays unloaded).
_NODE_STATE = (
    (
        "flowerpets.he.server",
        "HomomorphicAggregation",
        "the run's CKKS key lives only in the nodes' contexts (the store keeps its public side, "
        "never a key), so a resumed run could not open its sealed model",
    ),
)


def refuse_unstored_state(mods: Sequence[ServerMod], *, nodes_lose_state: str | None) -> None:
    """Refuse (``ParameterValueError``) a server mod whose state a resumed run would lose.

    ``nodes_lose_state`` says why the entry point's nodes would not keep their
    contexts across a server's restart (None: they keep them, as long-lived
    deployment nodes do).
    """
    if nodes_lose_state is None:
        return
    for module_name, class_name, why in _NODE_STATE:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        cls = getattr(module, class_name)
        if any(isinstance(mod, cls) for mod in mods):
            raise ParameterValueError(
                f"a run store cannot resume a run with {class_name} here: {why}, and "
                f"{nodes_lose_state}"
            )


def with_store(app: ServerApp, store: RunWriter, *, commit_every: int = 1) -> ServerApp:
    """``app`` again, committing to ``store`` every ``commit_every`` rounds and after the
    last (and resuming from it)."""
    return ServerApp(
        strategy=app.strategy,
        num_rounds=app.num_rounds,
        initial_arrays=app.initial_arrays,
        mods=app.mods,
        seed=app.seed,
        stop_on_failure=app.stop_on_failure,
        store=store,
        commit_every=commit_every,
    )


@contextmanager
def stored_app(
    app: ServerApp,
    path: str | os.PathLike[str],
    run_id: str,
    config: Mapping[str, Any],
    *,
    nodes_lose_state: str | None,
    commit_every: int = 1,
    population_id: str | None = None,
) -> Iterator[ServerApp]:
    """``app`` committing to run ``run_id`` of the store at ``path`` every
    ``commit_every`` rounds and after the last (``ServerApp(commit_every=...)``).

    The run is started with ``config`` if the store lacks it, spending from the
    privacy ledger of ``population_id`` (default: the run's own,
    ``"run:<run_id>"``), and resumed otherwise (refused with
    ``RunConfigMismatchError`` if its stored configuration is another, or a
    ``population_id`` given is not the stored run's, ``StoreLockedError`` while
    another live server holds it). The run's lease is given back on exit.
    ``nodes_lose_state`` (see :func:`refuse_unstored_state`) refuses the mods
    that need the nodes' contexts to outlive the server.
    """
    refuse_unstored_state(app.mods, nodes_lose_state=nodes_lose_state)
    integer("commit_every", commit_every, at_least=1)  # before the store is touched
    with RunStore(path) as store:
        try:
            stored = store.run(run_id)
        except MissingRunError:
            writer = store.start_run(run_id, config=config, population_id=population_id)
        else:
            # Without one the stored run's population goes on: its ledger is never left behind.
            if population_id is not None and population_id != stored.population_id:
                raise RunConfigMismatchError(
                    f"run {run_id!r} spends from population {stored.population_id!r}, "
                    f"not {population_id!r}"
                )
            writer = store.resume_run(run_id, config=config)
        with writer:
            yield with_store(app, writer, commit_every=commit_every)

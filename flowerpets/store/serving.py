"""A server's run in a store, for the entry points that take a store path (the Flower bridge).

:func:`stored_app` opens the store, starts the run or, if the store holds it
already, resumes it (its configuration must be the stored one), and gives back
the ServerApp rebuilt to commit each round there. ``CentralDp`` keeps its budget
there (it declares :class:`~flowerpets.core.DurableState`). Server mods whose state
the store does not keep are refused before anything is written: HE, whose run a new
server process could not continue once its model is sealed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flowerpets._validation import integer
from flowerpets.core import ServerApp, ServerMod
from flowerpets.exceptions import MissingRunError, ParameterValueError
from flowerpets.store.run_store import RunStore
from flowerpets.store.run_writer import RunWriter

__all__ = ["refuse_unstored_state", "stored_app", "with_store"]

# (defining module, class, why a resume would be wrong): only looked up once the module
# is loaded, since no mod of a class never imported can exist (and HE stays unloaded).
_UNSTORED = (
    (
        "flowerpets.he.server",
        "HomomorphicAggregation",
        "the nodes' CKKS keys are never stored, so a resumed run could not decrypt its model "
        "(and the mod refuses to resume a sealed model)",
    ),
)


def refuse_unstored_state(mods: Sequence[ServerMod]) -> None:
    """Refuse (``ParameterValueError``) a server mod whose state a resumed run would lose."""
    for module_name, class_name, why in _UNSTORED:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        cls = getattr(module, class_name)
        if any(isinstance(mod, cls) for mod in mods):
            raise ParameterValueError(f"a run store cannot resume a run with {class_name}: {why}")


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
    commit_every: int = 1,
) -> Iterator[ServerApp]:
    """``app`` committing to run ``run_id`` of the store at ``path`` every
    ``commit_every`` rounds and after the last (``ServerApp(commit_every=...)``).

    The run is started with ``config`` if the store lacks it, and resumed
    otherwise (refused with ``RunConfigMismatchError`` if its stored
    configuration is another, ``StoreLockedError`` while another live server
    holds it). The run's lease is given back on exit.
    """
    refuse_unstored_state(app.mods)
    integer("commit_every", commit_every, at_least=1)  # before the store is touched
    with RunStore(path) as store:
        try:
            store.run(run_id)
        except MissingRunError:
            writer = store.start_run(run_id, config=config)
        else:
            writer = store.resume_run(run_id, config=config)
        with writer:
            yield with_store(app, writer, commit_every=commit_every)

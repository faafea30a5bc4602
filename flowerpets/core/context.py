"""What a node (or the server) knows about itself across messages and rounds."""

from __future__ import annotations

from collections.abc import Mapping

from flowerpets.core.records import ConfigRecord, ConfigValue, RecordDict

__all__ = ["Context"]


class Context:
    """A node's identity, its configuration, and state that persists across rounds.

    ``node_config`` is what the runtime says about this node (for example its
    ``partition-id``); ``run_config`` is shared by the whole run; ``state`` is
    the node's own memory, which its mods and handlers read and write (a PET
    keeps its protocol state here, a DP mod its privacy spent). Plain mappings
    are accepted for the configs and checked value by value.
    """

    __slots__ = ("node_config", "node_id", "run_config", "run_id", "state")

    def __init__(
        self,
        node_id: int,
        *,
        run_id: int = 0,
        node_config: Mapping[str, ConfigValue] | None = None,
        run_config: Mapping[str, ConfigValue] | None = None,
        state: RecordDict | None = None,
    ) -> None:
        self.node_id = node_id
        self.run_id = run_id
        self.node_config = _config(node_config)
        self.run_config = _config(run_config)
        self.state = state if state is not None else RecordDict()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(node_id={self.node_id}, run_id={self.run_id}, "
            f"node_config={dict(self.node_config)!r})"
        )


def _config(values: Mapping[str, ConfigValue] | None) -> ConfigRecord:
    if isinstance(values, ConfigRecord):
        return values
    return ConfigRecord(values or {})

"""What a node (or the server) knows about itself across messages and rounds."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowerpets.core.records import ConfigRecord, RecordDict

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    """A node's identity, its configuration, and state that persists across rounds.

    ``node_config`` is what the runtime says about this node (for example its
    ``partition-id``); ``run_config`` is shared by the whole run; ``state`` is
    the node's own memory, which its mods and handlers read and write (a PET
    keeps its protocol state here, a DP mod its privacy spent).
    """

    node_id: int
    run_id: int = 0
    node_config: ConfigRecord = field(default_factory=ConfigRecord)
    run_config: ConfigRecord = field(default_factory=ConfigRecord)
    state: RecordDict = field(default_factory=RecordDict)

    def __post_init__(self) -> None:
        # Accept plain dicts for convenience; the records check every value.
        if not isinstance(self.node_config, ConfigRecord):
            self.node_config = ConfigRecord(self.node_config)
        if not isinstance(self.run_config, ConfigRecord):
            self.run_config = ConfigRecord(self.run_config)
        if not isinstance(self.state, RecordDict):
            self.state = RecordDict(self.state)

"""What the store gives back: a run's identity, and its state after the last committed round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowerpets.core.history import History
from flowerpets.core.records import ArrayRecord

__all__ = ["PetState", "RunInfo", "RunSnapshot"]

PetState = bytes | Any
"""A PET's server state: opaque bytes, or a JSON value (a ledger, a clip, public parameters)."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A stored run: its configuration and digest, its population and its round counter.

    ``population_id`` keys the privacy ledger the run spends from (by default
    ``"run:<run_id>"``, a population of its own). ``last_round`` is the last
    committed round (0 before the first). The arrays of every
    ``keep_arrays_every``-th round are kept (0: none before the last), and always
    the last round's, and the initial arrays if the run stored them.
    """

    run_id: str
    config: Mapping[str, Any]
    config_digest: str
    population_id: str
    keep_arrays_every: int
    last_round: int
    created_at: float


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """A run as of its last committed round: everything a resume starts from.

    ``arrays`` are the global arrays after ``round`` (the initial arrays when
    ``round`` is 0, or None if the run stored none); ``sampler_state`` the
    cohort generator's state after it (None before the first round);
    ``pet_states`` each PET's last committed server state by name.
    """

    info: RunInfo
    round: int
    arrays: ArrayRecord | None
    history: History = field(default_factory=History)
    sampler_state: Mapping[str, Any] | None = None
    pet_states: Mapping[str, PetState] = field(default_factory=dict)

"""PET switches for the demo: how a PET adds its flags and its mods.

A feature turns its command-line flags into a client mod list and a server
mod list. ``flowerpets.examples.digits.pets.FEATURES`` lists the features in
the order an update is processed on its way from a client to the global model:
privacy first (clip, then noise), protection last (mask or encrypt). The demo
composes the chains from that order, so each PET only says what its mods are,
never where they go:

* on a client, the first mod listed is the outermost and post-processes a
  reply last, so client mods are chained in *reverse* feature order
  (``[encrypt, clip]``: the reply is clipped, then encrypted);
* on the server, the innermost mod produces the sum and the outer ones
  post-process it, so server mods are chained in feature order
  (``[noise, secure sum]``: the sum is computed securely, then noised).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flowerpets.core import ClientMod, ServerMod
from flowerpets.examples.digits.apps import DigitsTask

__all__ = ["Composition", "DemoFeature", "FeatureMods", "compose"]


@dataclass(frozen=True)
class FeatureMods:
    """What one feature contributes to a run (both empty when it is off)."""

    client: Sequence[ClientMod] = field(default_factory=tuple)
    server: Sequence[ServerMod] = field(default_factory=tuple)
    summary: str = ""  # one line for the demo's header, e.g. "SecAgg+ (k=8, t=5)"
    # The server cannot read the model (it stays encrypted): evaluate on the nodes instead.
    needs_federated_evaluation: bool = False


class DemoFeature(Protocol):
    """A PET's switch in the demo."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods: ...


@dataclass(frozen=True)
class Composition:
    """Every enabled feature's mods, chained in the right order."""

    client: list[ClientMod]
    server: list[ServerMod]
    summaries: list[str]
    needs_federated_evaluation: bool


def compose(
    features: Sequence[DemoFeature], args: argparse.Namespace, task: DigitsTask
) -> Composition:
    """The client mods, server mods and summaries of every enabled feature."""
    contributions = [feature.mods(args, task) for feature in features]
    return Composition(
        client=[mod for c in reversed(contributions) for mod in c.client],
        server=[mod for c in contributions for mod in c.server],
        summaries=[c.summary for c in contributions if c.summary],
        needs_federated_evaluation=any(c.needs_federated_evaluation for c in contributions),
    )

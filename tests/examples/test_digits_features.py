"""The demo composes PET mods in update-flow order, whatever order PETs register in."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("sklearn")

from flowerpets.examples.digits.features import FeatureMods, compose


class Feature:
    def __init__(self, name: str, on: bool = True) -> None:
        self.name, self.on = name, on

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        return None

    def mods(self, args: argparse.Namespace, task: object) -> FeatureMods:
        if not self.on:
            return FeatureMods()
        return FeatureMods(
            client=[f"{self.name}-client"],  # type: ignore[list-item]
            server=[f"{self.name}-server"],  # type: ignore[list-item]
            summary=self.name,
        )


def test_client_chain_reversed_server_chain_in_flow_order() -> None:
    features = [Feature("dp"), Feature("off", on=False), Feature("secagg")]
    chains = compose(features, argparse.Namespace(), task=None)  # type: ignore[arg-type]
    # The client's reply is clipped (inner) before it is masked (outer).
    assert chains.client == ["secagg-client", "dp-client"]
    # The server's sum is computed securely (inner) before it is noised (outer).
    assert chains.server == ["dp-server", "secagg-server"]
    assert chains.summaries == ["dp", "secagg"]
    assert not chains.needs_federated_evaluation

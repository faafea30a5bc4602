"""A hand-driven SecAgg+ federation: the tests play the server, honest or not.

``Federation`` (``flowerpets.secagg.attacks``, which the SecAgg+ notebook uses
too) holds a few nodes running the real client mod (seeded randomness) and a
train handler with known updates, and sends them stage messages built by hand,
keeping what an honest server would keep. Attack tests use it to send what a
dishonest server would.
"""

from __future__ import annotations

import pytest

from flowerpets.secagg.attacks import Federation, seeded_randomness

__all__ = ["Federation", "seeded_randomness"]


@pytest.fixture(scope="session")
def federation() -> type[Federation]:
    return Federation

"""Attacks on SecAgg+ played by a dishonest server against real nodes, to show and test them.

:class:`Federation` is a hand-driven federation (the real client mod, a server
played by the caller); :func:`split_view` runs the split view on a victim's
partners and :func:`rebuild` tries to unmask the victim from what the server
obtained: it succeeds against the semi-honest mode and fails against the
malicious one (``docs/secagg.md``). A demonstration bench with seeded keys,
never a runtime.
"""

from flowerpets.secagg.attacks.federation import Federation, seeded_randomness
from flowerpets.secagg.attacks.split_view import (
    Loot,
    closest_partners,
    partner_holders,
    read_update,
    rebuild,
    split_view,
    two_views,
)

__all__ = [
    "Federation",
    "Loot",
    "closest_partners",
    "partner_holders",
    "read_update",
    "rebuild",
    "seeded_randomness",
    "split_view",
    "two_views",
]

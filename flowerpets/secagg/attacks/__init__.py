"""Attacks on SecAgg+ played by a dishonest server against real nodes, to show and test them.

:class:`Federation` is a hand-driven federation (the real client mod, a server
played by the caller); :func:`split_view` runs the split view on a victim's
partners and :func:`rebuild` tries to unmask the victim from what the server
obtained: it succeeds against the semi-honest mode and fails against the
malicious one (``docs/secagg.md``). :func:`regional_plan` and
:func:`learn_block_sum` show what the malicious mode's local consistency check
does not stop: far-apart parts of the ring shown different survivor sets, and
the sum of a small block of honest nodes learned. A demonstration bench with
seeded keys, never a runtime.
"""

from flowerpets.secagg.attacks.federation import Federation, seeded_randomness
from flowerpets.secagg.attacks.regional import (
    BlockSum,
    RegionalPlan,
    learn_block_sum,
    regional_plan,
)
from flowerpets.secagg.attacks.split_view import (
    Loot,
    closest_partners,
    combine,
    partner_holders,
    read_update,
    rebuild,
    split_view,
    two_views,
)

__all__ = [
    "BlockSum",
    "Federation",
    "Loot",
    "RegionalPlan",
    "closest_partners",
    "combine",
    "learn_block_sum",
    "partner_holders",
    "read_update",
    "rebuild",
    "regional_plan",
    "seeded_randomness",
    "split_view",
    "two_views",
]

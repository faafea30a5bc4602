"""The split view on a victim's partners, played by a dishonest server against real nodes.

The server forwards the victim the shares of only ``t`` neighbours (its
*partners*: it masks with those alone), lets every node send a masked input,
and tells the partners' other neighbours that the partners dropped, to collect
``t`` shares of each partner's mask key, while the victim's neighbours, told
that the victim survived, release ``t`` shares of its self-mask seed. No honest
node releases both kinds of share of one owner, yet with both sets the server
unmasks the victim's vector alone (docs/secagg.md).

In malicious mode the server must also get each node to release for the set it
shows it: it shows every node its own survivor set at the consistency check,
collects the signatures, and forwards to each node every neighbour's signature
over that node's very set (the best a server can do: it cannot sign for honest
nodes). :func:`rebuild` then tries to unmask the victim's vector from
everything the server obtained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from flowerpets.exceptions import ConfigurationError
from flowerpets.secagg._primitives import keys, prg, shamir
from flowerpets.secagg.attacks.federation import Federation, fields_of, masked_vector
from flowerpets.secagg.protocol import Stage, pair_mask_seed


@dataclass
class Loot:
    """What the server obtained: the victim's masked vector and the shares released."""

    victim: int
    partners: list[int]
    masked: np.ndarray
    b_shares: dict[int, bytes] = field(default_factory=dict)  # holder -> victim's seed share
    s_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # partner -> holder -> key
    refusals: dict[int, str] = field(default_factory=dict)  # holder -> the reason it refused


def partner_holders(fed: Federation, victim: int, partners: list[int]) -> dict[int, list[int]]:
    """For each node, the partners of ``victim`` it is to be told dropped: ``t`` holders per
    partner, at most ``k - t`` per node (so each node still sees ``t`` live neighbours).
    A maximum flow over the ring finds the assignment."""
    k, t = fed.config.degree, fed.config.threshold
    holders = [m for m in fed.ids if m != victim]
    node = {m: 2 + len(partners) + i for i, m in enumerate(holders)}
    edges = []  # (from, to, capacity): source 0 -> partner -> holder -> sink 1
    for a, j in enumerate(partners):
        edges.append((0, 2 + a, t))
        edges += [(2 + a, node[m], 1) for m in fed.graph.neighbours(j) if m != victim]
    edges += [(node[m], 1, k - t) for m in holders]
    rows, cols, caps = zip(*edges, strict=True)
    size = 2 + len(partners) + len(holders)
    graph = csr_matrix((caps, (rows, cols)), shape=(size, size), dtype=np.int32)
    flow = maximum_flow(graph, 0, 1)
    if flow.flow_value != t * len(partners):
        raise ConfigurationError("no assignment of views: the attack does not apply here")
    dense = flow.flow.toarray()
    return {m: [j for a, j in enumerate(partners) if dense[2 + a, node[m]] > 0] for m in holders}


def closest_partners(fed: Federation, victim: int) -> list[int]:
    """The victim's ``t`` closest neighbours on the ring, on either side."""
    k, t = fed.config.degree, fed.config.threshold
    nbrs = list(fed.graph.neighbours(victim))
    return nbrs[: t // 2] + nbrs[k - (t - t // 2) :]


def two_views(fed: Federation, victim: int, partners: list[int]) -> dict[int, list[int]]:
    """As few views as possible: every partner told all survived, everyone else told all
    the partners dropped (so most nodes share one set, and can sign it for each other)."""
    return {m: ([] if m in partners else list(partners)) for m in fed.ids if m != victim}


Views = Callable[[Federation, int, list[int]], Mapping[int, list[int]]]


def split_view(fed: Federation, views: Views = partner_holders) -> Loot:
    """Run the attack on ``fed.ids[0]`` (``views(fed, victim, partners)``: each holder and
    the partners it is told dropped) and return what the server obtained."""
    fed.advertise()
    fed.share()
    victim = fed.ids[0]
    partners = closest_partners(fed, victim)
    fields = fed.collect_fields(victim, senders=partners)
    reply = fed.ask(victim, Stage.COLLECT_MASKED_INPUT, fields, extra=fed.train_content())
    masked = masked_vector(reply)
    fed.collect([m for m in fed.ids if m != victim])
    told_dropped = dict(views(fed, victim, partners))
    loot = Loot(victim, partners, masked, s_shares={j: {} for j in partners})
    sets = {m: [x for x in fed.ids if x not in dropped] for m, dropped in told_dropped.items()}
    sets[victim] = list(fed.ids)
    signatures: dict[int, bytes] = {}
    if fed.malicious:
        for m, survivors in sets.items():
            answer = fed.ask(m, Stage.CONSISTENCY_CHECK, {"survivors": survivors})
            if answer.error is None:
                signatures[m] = fields_of(answer).get("signature", bytes)
    for m, dropped in told_dropped.items():
        # Every neighbour's signature made over m's very set: nothing else could verify.
        signers = [
            j for j in fed.signer_pool(m) if j in signatures and sorted(sets[j]) == sorted(sets[m])
        ]
        signed = {"signers": signers, "signatures": [signatures[j] for j in signers]}
        answer = fed.unmask(m, sets[m], dropped, signed=signed if fed.malicious else {})
        if answer.error is not None:
            loot.refusals[m] = answer.error.reason
            continue
        body = fields_of(answer)
        b_nodes, b_shares = body.items("b-nodes", int), body.items("b-shares", bytes)
        for j, share in zip(b_nodes, b_shares, strict=True):
            if j == victim:
                loot.b_shares[m] = share
        s_nodes, s_shares = body.items("s-nodes", int), body.items("s-shares", bytes)
        for j, share in zip(s_nodes, s_shares, strict=True):
            if j in loot.s_shares:
                loot.s_shares[j][m] = share
    return loot


def combine(fed: Federation, owner: int, shares: Mapping[int, bytes]) -> bytes | None:
    """``owner``'s secret from the shares its neighbours released (holder -> share), or
    None with fewer than ``t``: Shamir's reconstruction, as the server does it."""
    t = fed.config.threshold
    if len(shares) < t:
        return None
    holders = sorted(shares)[:t]
    ys = np.stack([np.frombuffer(shares[m], "<u4").astype(np.uint64) for m in holders])
    points = [fed.graph.share_point(owner, m) for m in holders]
    return shamir.elements_to_bytes(shamir.Shamir().combine(points, ys))


def rebuild(fed: Federation, loot: Loot) -> np.ndarray | None:
    """The victim's vector unmasked from the loot, or None where it holds fewer than ``t``
    shares of a secret the unmasking needs (the self-mask seed, or a partner's mask key)."""
    self_seed = combine(fed, loot.victim, loot.b_shares)
    if self_seed is None:
        return None
    add: list[bytes] = []
    subtract = [self_seed]
    for j in loot.partners:
        secret = combine(fed, j, loot.s_shares[j])
        if secret is None:
            return None
        key = keys.load_private_key(secret)
        seed = pair_mask_seed(key, fed.pks[loot.victim][1], session=fed.config.session, round=1)
        (subtract if loot.victim < j else add).append(seed)  # undo what the victim applied
    masked = loot.masked.copy()
    prg.apply_masks(masked, add=add, subtract=subtract)
    return masked


def read_update(fed: Federation, victim: int, vector: np.ndarray) -> tuple[int, np.ndarray]:
    """The weight and the float update an unmasked vector holds."""
    words = vector.view(np.int32).astype(np.float64)
    weight = int(vector[-2])
    factor = fed.config.quantization.float_factor(weight)
    return weight, words[:-2] / factor

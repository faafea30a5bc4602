"""Regional views: a malicious server shows far-apart parts of the ring different survivor sets.

The consistency check is local: a node releases shares once ``t`` of its
*neighbours* signed its survivor set. Two nodes whose neighbourhoods barely
overlap can therefore be shown different sets, each signed by its own
neighbourhood (at ``c = 0`` and ``t = k/2 + 1``, releasers of two sets need only
be 3 ring places apart). With two such views a server cuts a small block ``K``
of consecutive honest nodes off the ring: ``K``'s view lists a moat of nodes
around it as dropped, the rest of the ring's view lists two nodes just beyond
the moat as dropped, and the block's edge members mask with those two, whose
mask keys the rest of the ring releases. The server then learns ``sum(K)``
exactly, for a block of ``k/2 + 2`` nodes at ``k >= 8`` and ``t = k/2 + 1``
(docs/secagg.md, *Malicious mode*; at ``t = k/2 + 2`` no plan is found).

:func:`regional_plan` finds such a plan by mixed-integer programming over the
nodes' own checks (every check a real node makes is a constraint: a signer's
set lists itself and at least ``t`` neighbours, all of them senders; a releaser
holds ``t`` neighbours' signatures over its set; a key is rebuilt from ``t``
holders told its owner dropped; every mask in ``sum(K)`` cancels or has a
rebuilt key); :func:`learn_block_sum` plays it against real nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from flowerpets.secagg._primitives import keys, prg
from flowerpets.secagg.attacks.federation import Federation, fields_of, masked_vector
from flowerpets.secagg.attacks.split_view import combine
from flowerpets.secagg.protocol import Stage, pair_mask_seed


@dataclass(frozen=True)
class RegionalPlan:
    """What the server tells whom, by ring place (0 is the block's first node)."""

    block: tuple[int, ...]
    partners: Mapping[int, tuple[int, ...]]  # place -> the places whose shares it is given
    views: tuple[tuple[int, ...], ...]  # each view: the places it lists as survivors
    signs: Mapping[int, int]  # place -> the view it is asked to sign
    releases: Mapping[int, int]  # place -> the view it is asked to unmask for
    dropped: Mapping[int, tuple[int, ...]]  # place -> the neighbours it is told dropped


class _Program:
    """Binary variables by name and linear constraints, for scipy's ``milp`` (HiGHS)."""

    def __init__(self) -> None:
        self.index: dict[tuple[object, ...], int] = {}
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, *key: object) -> int:
        return self.index.setdefault(key, len(self.index))

    def add(self, coef: Mapping[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        self.rows.append((dict(coef), lo, hi))

    def solve(self, time_limit: float) -> np.ndarray | None:
        matrix = lil_matrix((len(self.rows), len(self.index)))
        lo, hi = np.empty(len(self.rows)), np.empty(len(self.rows))
        for r, (coef, a, b) in enumerate(self.rows):
            for col, value in coef.items():
                matrix[r, col] = value
            lo[r], hi[r] = a, b
        result = milp(
            np.zeros(len(self.index)),
            constraints=LinearConstraint(matrix.tocsr(), lo, hi),
            integrality=np.ones(len(self.index)),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit},
        )
        return None if result.x is None else np.round(result.x).astype(int)


def regional_plan(
    n: int,
    k: int,
    t: int,
    block: int,
    *,
    views: int = 2,
    corrupted: frozenset[int] = frozenset(),
    time_limit: float = 60.0,
) -> RegionalPlan | None:
    """A plan that makes the honest nodes hand over ``sum`` of the ``block`` consecutive
    honest nodes at ring places ``0 .. block - 1``, or None if there is none with this many
    views (``views=1``: one survivor set for everyone). The nodes at the ``corrupted``
    places collude: they sign every view and hand over every share and key they hold."""
    h = k // 2
    nbrs = {i: [(i + d) % n for d in range(-h, h + 1) if d != 0] for i in range(n)}
    p = _Program()
    v_range = range(views)
    for m in sorted(corrupted):
        for v in v_range:
            p.add({p.var("signs", m, v): 1}, lo=1)
        for j in nbrs[m]:  # it holds what it was forwarded, and gives it all away
            p.add({p.var("b", m, j): 1, p.var("partner", j, m): -1}, 0, 0)
            p.add({p.var("dropped", m, j): 1, p.var("partner", j, m): -1}, 0, 0)
        p.add({p.var("rebuilt-s", m): 1}, lo=1)  # its own key: the server has it
    for m in (m for m in range(n) if m not in corrupted):
        p.add({p.var("signs", m, v): 1 for v in v_range}, hi=1)
        p.add({**{p.var("releases", m, v): 1 for v in v_range}, p.var("released", m): -1}, 0, 0)
        p.add({p.var("partner", j, m): 1 for j in nbrs[m]}, lo=t)  # t senders to mask
        for v in v_range:
            p.add({p.var("releases", m, v): 1, p.var("signs", m, v): -1}, hi=0)
            p.add({p.var("signs", m, v): 1, p.var("in", v, m): -1}, hi=0)  # lists itself
            for j in nbrs[m]:  # the set's neighbours are its senders
                p.add(
                    {p.var("in", v, j): 1, p.var("signs", m, v): 1, p.var("partner", j, m): -1},
                    hi=1,
                )
            p.add({**{p.var("in", v, j): 1 for j in nbrs[m]}, p.var("signs", m, v): -t}, lo=0)
            p.add({**{p.var("signs", j, v): 1 for j in nbrs[m]}, p.var("releases", m, v): -t}, lo=0)
        for j in nbrs[m]:
            p.add({p.var("dropped", m, j): 1, p.var("partner", j, m): -1}, hi=0)
            p.add({p.var("dropped", m, j): 1, p.var("released", m): -1}, hi=0)
            for v in v_range:  # told dropped: not in its view; a seed share: in its view
                p.add(
                    {p.var("dropped", m, j): 1, p.var("in", v, j): 1, p.var("releases", m, v): 1},
                    hi=2,
                )
                p.add(
                    {p.var("b", m, j): 1, p.var("in", v, j): -1, p.var("releases", m, v): 1}, hi=1
                )
            p.add({p.var("b", m, j): 1, p.var("released", m): -1}, hi=0)
            p.add({p.var("b", m, j): 1, p.var("partner", j, m): -1}, hi=0)
    for i in range(n):
        inside = int(i < block)
        held = {p.var("b", m, i): 1 for m in nbrs[i]}
        p.add({**held, p.var("rebuilt-b", i): -t}, lo=0)
        p.add({p.var("rebuilt-b", i): 1}, lo=inside)
        if i not in corrupted:
            given = {p.var("dropped", m, i): 1 for m in nbrs[i]}
            p.add({**given, p.var("rebuilt-s", i): -t}, lo=0)
        for j in nbrs[i]:  # every mask of a block member cancels inside it or is rebuilt
            if not inside:
                continue
            mutual = 1 if j < block else 0
            p.add(
                {
                    p.var("partner", j, i): 1,
                    p.var("partner", i, j): -mutual,
                    p.var("rebuilt-s", j): -1,
                },
                hi=0,
            )
    x = p.solve(time_limit)
    if x is None:
        return None

    def on(*key: object) -> bool:
        return bool(x[p.index[key]])

    return RegionalPlan(
        block=tuple(range(block)),
        partners={i: tuple(j for j in nbrs[i] if on("partner", j, i)) for i in range(n)},
        views=tuple(tuple(j for j in range(n) if on("in", v, j)) for v in v_range),
        signs={m: v for m in range(n) for v in v_range if on("signs", m, v)},
        releases={m: v for m in range(n) for v in v_range if on("releases", m, v)},
        dropped={m: tuple(j for j in nbrs[m] if on("dropped", m, j)) for m in range(n)},
    )


@dataclass
class BlockSum:
    """What the server read: the block's summed vector (None if it lacked a secret)."""

    nodes: list[int]
    vector: np.ndarray | None
    refusals: dict[int, str] = field(default_factory=dict)


def learn_block_sum(fed: Federation, plan: RegionalPlan) -> BlockSum:
    """Play ``plan`` against ``fed``'s real nodes (ring place 0 is ``fed.config.order[0]``)
    and unmask the block's sum from what they released."""
    order = list(fed.config.order)
    n = len(order)

    def at(place: int) -> int:
        return order[place % n]

    fed.advertise()
    fed.share()
    masked = {}
    for place in range(n):
        node = at(place)
        senders = [at(j) for j in plan.partners[place]]
        fields = fed.collect_fields(node, senders=senders)
        reply = fed.ask(node, Stage.COLLECT_MASKED_INPUT, fields, extra=fed.train_content())
        masked[node] = masked_vector(reply)
    views = [[at(j) for j in view] for view in plan.views]
    signatures: dict[int, tuple[int, bytes]] = {}
    if fed.malicious:
        for place, v in plan.signs.items():
            answer = fed.ask(at(place), Stage.CONSISTENCY_CHECK, {"survivors": views[v]})
            signatures[at(place)] = (v, fields_of(answer).get("signature", bytes))
    seeds: dict[int, dict[int, bytes]] = {}
    mask_keys: dict[int, dict[int, bytes]] = {}
    nodes = [at(i) for i in plan.block]
    got = BlockSum(nodes, None)
    for place, v in plan.releases.items():
        m = at(place)
        signers = [j for j in fed.signer_pool(m) if signatures.get(j, (-1,))[0] == v]
        signed = {"signers": signers, "signatures": [signatures[j][1] for j in signers]}
        dropped = [at(j) for j in plan.dropped[place]]
        answer = fed.unmask(m, views[v], dropped, signed=signed if fed.malicious else {})
        if answer.error is not None:
            got.refusals[m] = answer.error.reason
            continue
        body = fields_of(answer)
        for j, share in zip(body.items("b-nodes", int), body.items("b-shares", bytes), strict=True):
            seeds.setdefault(j, {})[m] = share
        for j, share in zip(body.items("s-nodes", int), body.items("s-shares", bytes), strict=True):
            mask_keys.setdefault(j, {})[m] = share
    total = np.zeros_like(masked[nodes[0]])
    add: list[bytes] = []
    subtract: list[bytes] = []
    for i in nodes:
        total += masked[i]
        seed = combine(fed, i, seeds.get(i, {}))
        if seed is None:
            return got
        subtract.append(seed)
        for j in (at(place) for place in plan.partners[order.index(i)]):
            if j in nodes:
                continue  # cancels inside the block
            key = combine(fed, j, mask_keys.get(j, {}))
            if key is None:
                return got
            pair = pair_mask_seed(
                keys.load_private_key(key), fed.pks[i][1], session=fed.config.session, round=1
            )
            (subtract if i < j else add).append(pair)  # undo what the block member applied
    prg.apply_masks(total, add=add, subtract=subtract)
    got.vector = total
    return got

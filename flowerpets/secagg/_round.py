"""One SecAgg+ round on the server: the state machine the server mod runs over the Grid.

:class:`ServerRound` sends the round's messages itself, stage by stage
(:class:`~flowerpets.secagg.protocol.Stage`), through one core
:class:`~flowerpets.core.StageExchange`. Each stage is a transition of an explicit state
machine (``NEW -> ADVERTISED -> SHARED -> COLLECTED -> UNMASKED``, with
``COLLECTED -> CHECKED -> UNMASKED`` in malicious mode: the consistency check)
that refuses to run out of order; the stages run are those of the mod's threat
model (:data:`flowerpets.secagg.threat.MODELS`). What the server holds is a
running ``uint32`` sum of the masked vectors (4 bytes per parameter, whatever
the cohort size), never a node's vector on its own after it has been added.

Dropouts are survivable at every stage while the threshold conditions hold:

* after *advertise-keys* and *share-keys* the server keeps the largest set of
  live nodes in which each has at least ``t`` live neighbours (their ``t``-core);
  a node outside it is excluded (recorded as a failure) as if it had dropped;
* after *collect-masked-input*, every survivor needs ``t`` surviving neighbours
  (to rebuild its self-mask seed) and every dropped node that a survivor masked
  with needs ``t`` too (to rebuild its mask key), or the round stops with
  :class:`~flowerpets.exceptions.RoundFailedError` naming the stage and the
  counts;
* in malicious mode, after the *consistency check*, a survivor is asked to unmask
  only if at least ``t`` of its neighbours signed the survivor set (it would
  refuse otherwise); a survivor that did not sign is still in the sum;
* at *unmask*, the server needs ``t`` shares for each of those secrets from the
  survivors that answer; it uses exactly ``t`` (those at the lowest points),
  checks each rebuilt mask key against the public key its owner advertised, and
  removes exactly the masks that were added: every survivor's self mask, and the
  pairwise masks between each dropped node and its surviving neighbours.

A malicious node cannot make the server accept garbage silently where the
range is known: with ``m`` survivors the unmasked total weight must be in
``[0, m * max_weight]`` (exactly ``m`` when unweighted) and the count of nodes
that clipped in ``[0, m]``. Wrong self-mask shares (a random mask stays in the
sum) or forged words fail the round with
:class:`~flowerpets.exceptions.RoundFailedError`. Every such error carries the
per-node failures so far and the survivors, which the ServerApp records on the
round's record.

The result is a :class:`~flowerpets.core.RoundResult` whose ``aggregate`` is the
dequantized weighted sum (float64 for float arrays, int64 for integer arrays,
exact) and, in a quantized round (``RoundRequest.quantized``), the unweighted sum
modulo ``2**bits`` of each residue array the domain names (uint64 residues),
``total_weight`` the securely summed weights, ``participants`` the nodes
whose masked input is in the sum, and ``failures`` the others with the stage at
which each was lost. Reply metrics are *not* seen in the clear: only those
named in ``secure_metrics`` are summed under the masks (weighted, reported as
weighted means like the plain exchange does); the others are dropped. The
metrics also report the total weight (under the weight key), how many nodes
clipped a value, the bound on the rounding error of the weighted mean, the
degree and threshold, and seconds per stage.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    FailureKind,
    Grid,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    StageExchange,
)
from flowerpets.core.fields import Fields
from flowerpets.core.records import Array
from flowerpets.exceptions import (
    ConfigurationError,
    InvalidUpdateError,
    MessageFieldError,
    ParameterTypeError,
    ParameterValueError,
    ProtocolViolationError,
    RecordTypeError,
    RoundFailedError,
    UsageError,
)
from flowerpets.secagg._primitives import keys, prg, quantize, shamir
from flowerpets.secagg.identity import NodeIdentities
from flowerpets.secagg.protocol import (
    FLOAT,
    MASKED_ARRAY,
    MASKED_RECORD,
    MODULAR,
    RECORD,
    SESSION_BYTES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    Layout,
    RoundConfig,
    Stage,
    advertisement,
    fields_of,
    pair_mask_seed,
    survivor_sets,
)

if TYPE_CHECKING:  # the mod builds rounds; a round only reads the mod's settings
    from flowerpets.secagg.server import SecAggPlus

__all__ = ["ServerPhase", "ServerRound"]

log = logging.getLogger(__name__)

SHAMIR = shamir.Shamir()


class ServerPhase(enum.StrEnum):
    """Where the server's round stands."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    COLLECTED = "collected"
    CHECKED = "checked"  # malicious mode: the survivors signed their set
    UNMASKED = "unmasked"


# What a stage's accept raises for a reply it cannot use (INVALID_REPLY); a
# ProtocolViolationError is recorded as PROTOCOL_VIOLATION; anything else is a bug of the
# server's own code and fails the round without blaming the node.
_INVALID = (MessageFieldError, InvalidUpdateError, RecordTypeError)


class ServerRound:
    """One SecAgg+ round on the server: an explicit state machine over its stages."""

    def __init__(
        self,
        mod: SecAggPlus,
        request: RoundRequest,
        grid: Grid,
        *,
        config: RoundConfig | None = None,
    ) -> None:
        """``config`` fixes the round's configuration (tests and benchmarks); by default the
        mod draws a session id and a ring order and picks the parameters for the cohort."""
        self.mod, self.request, self.grid = mod, request, grid
        self.model = mod.model
        self.phase = ServerPhase.NEW
        self.exchange = StageExchange.of(grid, request)
        self.failures = self.exchange.failures  # the round's record: every node's reason
        cohort = tuple(request.cohort)
        if len(set(cohort)) == len(cohort) and self.model.signed:
            cohort = self._enrolled(cohort)
        n = len(cohort)
        if n < 2 or len(set(cohort)) != n:
            raise self.exchange.round_failed(
                f"{Stage.ADVERTISE_KEYS}: round {request.round}: secure aggregation needs a "
                f"cohort of at least 2 distinct{' enrolled' if self.model.signed else ''} "
                f"nodes, got {n}"
            )
        try:
            params = mod.parameters(n)
            self.config = config or RoundConfig(
                session=mod.randomness(SESSION_BYTES),
                order=self._ring_order(cohort),
                degree=params.degree,
                threshold=params.threshold,
                clipping_range=mod.clipping_range,
                max_weight=mod.max_weight if request.weight_key is not None else 1,
                weight_key=request.weight_key,
                secure_metrics=mod.secure_metrics,
                threat=self.model.threat,
                quantized=request.quantized,
                quorum=mod.quorum_for(params),
            )
            # A quantized round's replies hold residues the model does not (their names and
            # shapes are the noising mod's): the first masked input fixes the layout.
            self.expected = (
                Layout.of_arrays(request.arrays, mod.secure_metrics)
                if len(request.arrays) and request.quantized is None
                else None
            )
        except (
            ConfigurationError,
            ParameterTypeError,
            ParameterValueError,
            InvalidUpdateError,
        ) as exc:
            log.error("round %d: SecAgg+ cannot run: %s", request.round, exc)
            raise RoundFailedError(f"{Stage.ADVERTISE_KEYS}: round {request.round}: {exc}") from exc
        self.params = params
        self.graph = self.config.graph
        self.t = self.config.threshold
        self.seconds: dict[str, float] = {}
        self.c_pks: dict[int, bytes] = {}
        self.s_pks: dict[int, bytes] = {}
        self.key_signatures: dict[int, bytes] = {}  # malicious mode: each advertisement's
        self.set_signatures: dict[int, bytes] = {}  # ... and each survivor's, of the set
        self.unmaskers: list[int] = []  # malicious mode: signed, with t neighbours that did
        self.advertised: list[int] = []  # A0 after pruning
        self.shared: list[int] = []  # A1 after pruning: their shares were forwarded
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self.layout: Layout | None = self.expected
        self.total: NDArray[np.uint32] | None = None
        self.survivors: list[int] = []  # A2: their masked inputs are in the sum
        self.dropped: list[int] = []  # D: shared keys, then no masked input
        self.unmask_missing: list[int] = []
        self.clipped_nodes = 0

    # -- the state machine -----------------------------------------------------------
    def run(self) -> RoundResult:
        for stage in self.model.stages:  # the threat model's stages, in order
            _STAGES[stage](self)
        return self.result()

    @property
    def identities(self) -> NodeIdentities:
        if self.mod.identities is None:  # resolve() refuses a signed model without them
            raise UsageError("a signed SecAgg+ round needs identities")
        return self.mod.identities

    def _enrolled(self, cohort: Sequence[int]) -> tuple[int, ...]:
        """The cohort's enrolled nodes; the others are excluded (every node would refuse a
        ring order with a node it cannot verify)."""
        for node in cohort:
            if node not in self.identities:
                self.exchange.fail(
                    node,
                    Stage.ADVERTISE_KEYS,
                    FailureKind.EXCLUDED,
                    "excluded by the server: not enrolled (no identity key)",
                )
        return tuple(node for node in cohort if node in self.identities)

    @property
    def _unmasks_after(self) -> ServerPhase:
        return ServerPhase.CHECKED if self.model.consistency_check else ServerPhase.COLLECTED

    def _enter(self, expected: ServerPhase, stage: str) -> float:
        if self.phase != expected:
            raise UsageError(
                f"SecAgg+ server: {stage} cannot run in phase {self.phase.value!r} "
                f"(needs {expected.value!r})"
            )
        return time.perf_counter()

    def _leave(self, phase: ServerPhase, stage: str, started: float) -> None:
        self.phase = phase
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def _ring_order(self, cohort: Sequence[int]) -> tuple[int, ...]:
        nodes = list(cohort)
        if self.mod.rng is not None:
            return tuple(nodes[i] for i in self.mod.rng.permutation(len(nodes)).tolist())
        secrets.SystemRandom().shuffle(nodes)
        return tuple(nodes)

    # -- helpers ------------------------------------------------------------------------
    def _send(
        self,
        stage: str,
        contents: Iterable[tuple[int, RecordDict]],
        accept: Callable[[int, RecordDict], object],
    ) -> tuple[int, ...]:
        """One stage through the exchange; every reply must first be of this session."""

        def checked(node: int, content: RecordDict) -> object:
            if fields_of(content).get("session", bytes) != self.config.session:
                raise ProtocolViolationError("the reply belongs to another session")
            return accept(node, content)

        return self.exchange.send(stage, contents, checked, invalid=_INVALID)

    def _live_core(self, nodes: set[int], stage: str, what: str) -> list[int]:
        """The largest subset in which every node has >= t neighbours (the others are excluded)."""
        live = set(nodes)
        changed = True
        while changed:
            changed = False
            for node in [i for i in self.config.order if i in live]:
                count = sum(1 for j in self.graph.neighbours(node) if j in live)
                if count < self.t:
                    live.discard(node)
                    changed = True
                    self.exchange.fail(
                        node,
                        stage,
                        FailureKind.EXCLUDED,
                        f"excluded by the server: only {count} of its neighbours {what}, "
                        f"fewer than the threshold t={self.t}",
                    )
        return [i for i in self.config.order if i in live]

    def _round_failed(self, stage: str, detail: str) -> RoundFailedError:
        """The round's error, carrying every node's reason so far (the record keeps them)."""
        message = f"{stage}: round {self.request.round}: {detail}"
        log.warning("SecAgg+ %s", message)
        cohort = set(self.survivors)
        return self.exchange.round_failed(
            message, participants=[i for i in self.request.cohort if i in cohort]
        )

    # -- stage 0 ------------------------------------------------------------------------
    def advertise_keys(self) -> None:
        stage = Stage.ADVERTISE_KEYS
        started = self._enter(ServerPhase.NEW, stage)
        content = RecordDict({RECORD: self.config.to_record()})
        seen: set[bytes] = set()

        def accept(node: int, body: RecordDict) -> None:
            record = fields_of(body)
            pks = [record.get(key, bytes) for key in ("c-pk", "s-pk")]
            if any(len(pk) != keys.KEY_BYTES for pk in pks):
                raise InvalidUpdateError(f"public keys must be {keys.KEY_BYTES} bytes")
            if seen & set(pks) or pks[0] == pks[1]:
                raise ProtocolViolationError("the node reuses a public key")
            if self.model.signed:
                signature = record.get("signature", bytes)
                self.identities.verify(
                    node,
                    signature,
                    advertisement(self.config, self.request.round, node, *pks),
                    what="its key advertisement",
                )
                self.key_signatures[node] = signature
            seen.update(pks)
            self.c_pks[node], self.s_pks[node] = pks

        self._send(stage, ((i, content) for i in self.config.order), accept)
        advertised = set(self.c_pks)
        live = self._live_core(advertised, Stage.SHARE_KEYS, "advertised keys")
        self._leave(ServerPhase.ADVERTISED, stage, started)
        if not live:
            raise self._round_failed(
                stage,
                f"{len(advertised)} of {len(self.config.order)} nodes advertised keys, and none "
                f"has t={self.t} live neighbours (degree {self.config.degree})",
            )
        self.advertised = live

    # -- stage 1 ------------------------------------------------------------------------
    def share_keys(self) -> None:
        stage = Stage.SHARE_KEYS
        started = self._enter(ServerPhase.ADVERTISED, stage)
        live = set(self.advertised)
        told: dict[int, list[int]] = {}
        contents = []
        for i in self.advertised:
            told[i] = [j for j in self.graph.neighbours(i) if j in live]
            record = ConfigRecord(
                {
                    "session": self.config.session,
                    "nodes": told[i],
                    "c-pks": [self.c_pks[j] for j in told[i]],
                    "s-pks": [self.s_pks[j] for j in told[i]],
                }
            )
            if self.model.signed:
                record["signatures"] = [self.key_signatures[j] for j in told[i]]
            contents.append((i, RecordDict({RECORD: record})))
        delivered: dict[int, dict[int, bytes]] = {}

        def accept(node: int, body: RecordDict) -> None:
            record = fields_of(body)
            receivers = record.items("receivers", int)
            ciphertexts = record.items("ciphertexts", bytes, size=SHARE_CIPHERTEXT_BYTES)
            if receivers != told[node] or len(ciphertexts) != len(receivers):
                raise ProtocolViolationError(
                    "the shares are not addressed to the neighbours it was told"
                )
            delivered[node] = dict(zip(receivers, ciphertexts, strict=True))

        self._send(stage, contents, accept)
        self.shared = self._live_core(set(delivered), Stage.COLLECT_MASKED_INPUT, "shared keys")
        for sender in self.shared:
            for receiver, ciphertext in delivered[sender].items():
                self.ciphertexts.setdefault(receiver, {})[sender] = ciphertext
        self._leave(ServerPhase.SHARED, stage, started)
        if not self.shared:
            raise self._round_failed(
                stage,
                f"{len(delivered)} of {len(self.advertised)} nodes shared keys, and none has "
                f"t={self.t} neighbours that did",
            )

    # -- stage 2 ------------------------------------------------------------------------
    def collect_masked_inputs(self) -> None:
        stage = Stage.COLLECT_MASKED_INPUT
        started = self._enter(ServerPhase.SHARED, stage)
        shared = set(self.shared)
        contents = []
        for i in self.shared:
            senders = [j for j in self.graph.neighbours(i) if j in shared]
            record = ConfigRecord(
                {
                    "session": self.config.session,
                    "senders": senders,
                    "ciphertexts": [self.ciphertexts[i][j] for j in senders],
                }
            )
            content = RecordDict(
                {"arrays": self.request.arrays, "config": self.request.config, RECORD: record}
            )
            contents.append((i, content))
        arrived = set(self._send(stage, contents, lambda node, body: self._add_masked_input(body)))
        self.ciphertexts.clear()
        self.survivors = [i for i in self.shared if i in arrived]
        self.dropped = [j for j in self.shared if j not in arrived]
        self._leave(ServerPhase.COLLECTED, stage, started)
        if not self.survivors:
            raise self._round_failed(
                stage, f"none of the {len(self.shared)} nodes that shared keys sent a masked input"
            )
        self._check_recoverable(
            stage,
            set(self.survivors),
            f"{len(self.survivors)} of {len(self.shared)} nodes sent masked inputs",
            "surviving neighbours",
        )

    def _count(self, node: int, among: set[int]) -> int:
        return sum(1 for j in self.graph.neighbours(node) if j in among)

    def _check_recoverable(self, stage: str, holders: set[int], summary: str, what: str) -> None:
        """Fail the round if a survivor, or a dropped node some survivor masked with, has
        fewer than ``t`` neighbours among ``holders`` (its secret could not be rebuilt)."""
        alive = set(self.survivors)
        short = [i for i in self.survivors if self._count(i, holders) < self.t]
        stranded = [
            j
            for j in self.dropped
            if self._count(j, alive) > 0 and self._count(j, holders) < self.t
        ]
        if short or stranded:
            raise self._round_failed(
                stage,
                f"{summary}; {len(short)} survivor(s) and {len(stranded)} dropped node(s) have "
                f"fewer than t={self.t} {what}, so their masks cannot be removed",
            )

    def _add_masked_input(self, body: RecordDict) -> None:
        layout = Layout.read(fields_of(body), self.config.secure_metrics)
        if sorted(layout.modular_names) != sorted(self.config.modular_names):
            # Residues summed modulo are released as they are: only the domain's names may be.
            raise InvalidUpdateError(
                f"the masked input's modular arrays {sorted(layout.modular_names)[:4]} are not "
                f"the round's quantized domain {sorted(self.config.modular_names)[:4]}"
            )
        if self.layout is None:
            self.layout = layout
        elif layout.signature() != self.layout.signature():
            raise InvalidUpdateError(
                "the masked input's arrays differ from the round's "
                f"(names {list(layout.names)[:4]}, expected {list(self.layout.names)[:4]})"
            )
        masked = body.get(MASKED_RECORD)
        if not isinstance(masked, ArrayRecord) or MASKED_ARRAY not in masked:
            raise MessageFieldError(
                f"the reply carries no ArrayRecord {MASKED_RECORD!r} with {MASKED_ARRAY!r}"
            )
        vector = masked[MASKED_ARRAY].numpy()
        if vector.dtype != np.uint32 or vector.shape != (self.layout.length,):
            raise InvalidUpdateError(
                f"the masked vector must be uint32 of shape ({self.layout.length},), "
                f"got {vector.dtype} {vector.shape}"
            )
        if self.total is None:
            self.total = np.zeros(self.layout.length, dtype=np.uint32)
        np.add(self.total, vector, out=self.total)

    # -- stage 3 (malicious mode) --------------------------------------------------------
    def consistency_check(self) -> None:
        """Every survivor signs the survivor set; a node unmasks only with ``t`` neighbours'."""
        stage = Stage.CONSISTENCY_CHECK
        started = self._enter(ServerPhase.COLLECTED, stage)
        record = ConfigRecord({"session": self.config.session, "survivors": self.survivors})
        content = RecordDict({RECORD: record})
        signed_by = survivor_sets(self.config, self.request.round, self.survivors)

        def accept(node: int, body: RecordDict) -> None:
            signature = fields_of(body).get("signature", bytes)
            self.identities.verify(
                node, signature, signed_by(node), what="its signature of the survivor set"
            )
            self.set_signatures[node] = signature

        self._send(stage, ((i, content) for i in self.survivors), accept)
        signed = set(self.set_signatures)
        # A node unmasks only with t of its neighbours' signatures (and, with a quorum, that
        # many of the cohort's besides its own): ask no other.
        quorum = self.config.quorum
        self.unmaskers = [
            i
            for i in self.survivors
            if i in signed and self._count(i, signed) >= self.t and len(signed) - 1 >= quorum
        ]
        self._leave(ServerPhase.CHECKED, stage, started)
        self._check_recoverable(
            stage,
            set(self.unmaskers),
            f"{len(signed)} of {len(self.survivors)} survivors signed the survivor set, "
            f"{len(self.unmaskers)} with t={self.t} neighbours that did"
            + (f" and the cohort's quorum of {quorum}" if quorum else ""),
            "neighbours among those",
        )

    def _unmask_requests(self, record: ConfigRecord) -> list[tuple[int, RecordDict]]:
        """Each survivor's unmask request (malicious mode: only those with ``t`` neighbours'
        signatures of the survivor set, each with those signatures)."""
        if not self.model.consistency_check:
            content = RecordDict({RECORD: record})
            return [(i, content) for i in self.survivors]
        requests = []
        for i in self.unmaskers:
            # t suffice (a node checks every one it is sent): no more to send or to verify.
            signers = [j for j in self.graph.neighbours(i) if j in self.set_signatures][: self.t]
            if self.config.quorum:  # then the cohort's, up to the quorum
                chosen = {*signers, i}
                others = (j for j in self.set_signatures if j not in chosen)
                signers += list(itertools.islice(others, max(self.config.quorum - len(signers), 0)))
            signed = ConfigRecord(dict(record.items()))
            signed["signers"] = signers
            signed["signatures"] = [self.set_signatures[j] for j in signers]
            requests.append((i, RecordDict({RECORD: signed})))
        return requests

    # -- stage 4 ------------------------------------------------------------------------
    def unmask(self) -> None:
        stage = Stage.UNMASK
        started = self._enter(self._unmasks_after, stage)
        alive, gone = set(self.survivors), set(self.dropped)
        record = ConfigRecord(
            {
                "session": self.config.session,
                "survivors": self.survivors,
                "dropped": self.dropped,
            }
        )
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}

        def accept(holder: int, body: RecordDict) -> None:
            got = self._read_shares(holder, fields_of(body), alive, gone)
            for kind, dealer, point, share in got:
                (b_shares if kind == "b" else s_shares).setdefault(dealer, {})[point] = share

        answered = self._send(stage, self._unmask_requests(record), accept)
        # A survivor that does not help unmask is still in the sum: not a failure of the round.
        self.unmask_missing = [i for i in self.survivors if i not in set(answered)]
        for node in self.unmask_missing:
            self.failures.pop(node, None)
        self.seconds[stage] = time.perf_counter() - started

        self.recover(
            b_shares,
            s_shares,
            summary=f"{len(answered)} of {len(self.survivors)} survivors answered",
        )

    def recover(
        self,
        b_shares: dict[int, dict[int, bytes]],
        s_shares: dict[int, dict[int, bytes]],
        *,
        summary: str = "",
    ) -> None:
        """Rebuild the secrets from ``{dealer: {point: share}}`` and take the masks out of the sum.

        Every survivor's self-mask seed, and the mask key of every dropped node
        that a survivor masked with, each from exactly ``t`` shares; then the
        self masks and the pairwise masks between dropped nodes and their
        surviving neighbours are removed from the running sum, block by block.
        """
        if self.phase != self._unmasks_after or self.total is None:
            raise UsageError(f"SecAgg+ server: cannot unmask in phase {self.phase.value!r}")
        stage = Stage.UNMASK
        alive = set(self.survivors)
        started = time.perf_counter()
        needs_key = [j for j in self.dropped if self._count(j, alive) > 0]
        self_seeds = self._reconstruct(b_shares, self.survivors, "self-mask seed", summary)
        mask_keys = self._reconstruct(s_shares, needs_key, "mask key", summary)
        for j, private in mask_keys.items():
            if keys.public_key_of(private) != self.s_pks[j]:
                raise self._round_failed(
                    stage, f"the rebuilt mask key of node {j} does not match its public key"
                )
        self.seconds["secagg+/reconstruct"] = time.perf_counter() - started

        started = time.perf_counter()
        add, subtract = list[bytes](), [self_seeds[i] for i in self.survivors]
        for j in needs_key:
            mask_key = keys.load_private_key(mask_keys[j])
            for i in self.graph.neighbours(j):
                if i in alive:
                    seed = pair_mask_seed(
                        mask_key,
                        self.s_pks[i],
                        session=self.config.session,
                        round=self.request.round,
                    )
                    # Survivor i added +PRG if i < j, -PRG otherwise: take out what it put in.
                    (subtract if i < j else add).append(seed)
        prg.apply_masks(self.total, add=add, subtract=subtract)
        self.seconds["secagg+/remove-masks"] = time.perf_counter() - started
        self.phase = ServerPhase.UNMASKED

    def _read_shares(
        self, holder: int, record: Fields, alive: set[int], gone: set[int]
    ) -> list[tuple[str, int, int, bytes]]:
        out = []
        for kind, allowed in (("b", alive), ("s", gone)):
            dealers = record.items(f"{kind}-nodes", int)
            shares = record.items(f"{kind}-shares", bytes, size=SHARE_BYTES)
            if len(dealers) != len(shares) or len(set(dealers)) != len(dealers):
                raise InvalidUpdateError(f"{kind}-nodes and {kind}-shares do not match")
            for dealer, share in zip(dealers, shares, strict=True):
                if dealer not in allowed or not self.graph.are_neighbours(dealer, holder):
                    raise ProtocolViolationError(
                        f"a {kind}-share of node {dealer} was not asked for"
                    )
                out.append((kind, dealer, self.graph.share_point(dealer, holder), share))
        return out

    def _reconstruct(
        self, shares: dict[int, dict[int, bytes]], dealers: Sequence[int], what: str, summary: str
    ) -> dict[int, bytes]:
        """Each dealer's secret from exactly ``t`` shares (those at the lowest points)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        short = []
        for dealer in dealers:
            points = sorted(shares.get(dealer, {}))[: self.t]
            if len(points) < self.t:
                short.append((dealer, len(points)))
            else:
                groups.setdefault(tuple(points), []).append(dealer)
        if short:
            dealer, have = short[0]
            raise self._round_failed(
                Stage.UNMASK,
                f"{summary}; the {what} of {len(short)} node(s) cannot be rebuilt (node {dealer} "
                f"has {have} of the t={self.t} shares needed)",
            )
        out: dict[int, bytes] = {}
        for group, members in groups.items():
            ys = np.stack(
                [np.stack([np.frombuffer(shares[d][x], "<u4") for x in group]) for d in members]
            ).astype(np.uint64)
            try:
                secrets_ = SHAMIR.combine_many(group, ys)
                for dealer, elements in zip(members, secrets_, strict=True):
                    out[dealer] = shamir.elements_to_bytes(elements)
            except (ProtocolViolationError, ParameterValueError) as exc:
                # A share out of the field, or a rebuilt secret that is no 32-byte key: the
                # survivors' shares disagree (a node sent wrong ones).
                raise self._round_failed(Stage.UNMASK, f"inconsistent shares: {exc}") from None
        return out

    # -- the result ---------------------------------------------------------------------
    def _check_unmasked(self, total_weight: int, clipped: int) -> None:
        """The words whose range is known must be in it, or the sum is not the nodes' sum.

        A node that sends wrong self-mask shares leaves a random mask in the sum; one that
        forges its weight or clip word shifts them. Each of the ``m`` survivors adds a
        weight in ``[0, max_weight]`` (exactly 1 when unweighted) and a clip flag in
        ``{0, 1}``; a random mask lands both words in range with probability below
        ``(m * max_weight + 1) * (m + 1) / 2**64``.
        """
        m, max_weight = len(self.survivors), self.config.max_weight
        if self.config.weight_key is None:
            weight_ok, expected = total_weight == m, f"exactly {m} (one per survivor)"
        else:
            weight_ok = 0 <= total_weight <= m * max_weight
            expected = f"within [0, {m} x max_weight={max_weight}]"
        if not weight_ok:
            raise self._round_failed(
                Stage.UNMASK,
                f"the unmasked total weight of the {m} survivors is not {expected}: a node sent "
                "wrong shares or a forged masked input, so the sum is discarded",
            )
        if not 0 <= clipped <= m:
            raise self._round_failed(
                Stage.UNMASK,
                f"the unmasked count of nodes that clipped is not within [0, {m}]: a node sent "
                "wrong shares or a forged masked input, so the sum is discarded",
            )

    def result(self) -> RoundResult:
        if self.phase != ServerPhase.UNMASKED or self.total is None or self.layout is None:
            raise UsageError(f"SecAgg+ server: no result in phase {self.phase.value!r}")
        layout, quant = self.layout, self.config.quantization
        signed = quantize.to_signed(self.total)
        aggregate = ArrayRecord()
        at = 0
        for name, shape, kind, size in zip(
            layout.names, layout.shapes, layout.kinds, layout.sizes, strict=True
        ):
            values: NDArray[Any]
            if kind == MODULAR:
                # The mod-2**32 sum, reduced mod 2**bits (which divides 2**32): the residues.
                mask = np.uint64((1 << self.config.modulus_bits) - 1)
                values = (self.total[at : at + size].astype(np.uint64) & mask).reshape(shape)
            else:
                segment = signed[at : at + size].reshape(shape)
                values = segment / quant.scale if kind == FLOAT else segment
            aggregate[name] = Array(values, copy=False)
            at += size
        self._check_unmasked(int(signed[layout.weight_index]), int(signed[layout.clip_index]))
        total_weight = float(signed[layout.weight_index])
        metrics = MetricRecord()
        if self.config.weight_key is not None:
            metrics[self.config.weight_key] = total_weight
        tail = signed[layout.weight_index + 1 : layout.clip_index] / quant.scale
        for name, value in zip(layout.metrics, tail.tolist(), strict=True):
            if total_weight > 0:
                metrics[name] = value / total_weight
        clipped = int(signed[layout.clip_index])
        if clipped:
            log.warning(
                "round %d: %d node(s) clipped values to +-%g before masking",
                self.request.round,
                clipped,
                self.config.clipping_range,
            )
        metrics["secagg-clipped-nodes"] = clipped
        bound = quant.mean_error_bound(len(self.survivors), total_weight)
        if math.isfinite(bound):
            metrics["secagg-mean-error-bound"] = bound
        metrics["secagg-degree"] = self.config.degree
        metrics["secagg-threshold"] = self.t
        metrics["secagg-unmask-missing"] = len(self.unmask_missing)
        for stage, seconds in self.seconds.items():
            metrics[f"secagg-seconds-{stage.removeprefix(Stage.PREFIX)}"] = seconds
        cohort = set(self.survivors)
        return RoundResult(
            round=self.request.round,
            aggregate=aggregate,
            total_weight=total_weight,
            participants=tuple(i for i in self.request.cohort if i in cohort),
            failures=dict(self.failures),
            metrics=metrics,
        )


_STAGES: dict[str, Callable[[ServerRound], None]] = {
    Stage.ADVERTISE_KEYS: ServerRound.advertise_keys,
    Stage.SHARE_KEYS: ServerRound.share_keys,
    Stage.COLLECT_MASKED_INPUT: ServerRound.collect_masked_inputs,
    Stage.CONSISTENCY_CHECK: ServerRound.consistency_check,
    Stage.UNMASK: ServerRound.unmask,
}
"""The method that runs each stage on the server."""

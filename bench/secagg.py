"""Benchmark: SecAgg+ against the limits it cannot beat, all measured in one run.

Three parts (``--parts``), each a table of medians and ratios:

``client``
    One node's whole protocol for ``--params`` float32 parameters (default
    1,000,000) in a cohort of ``--client-n`` (default 100), with the degree ``k``
    the parameter finder picks for it: key generation, ``k`` key agreements,
    Shamir sharing and AES-GCM encryption of the shares (share-keys), then ``k``
    decryptions and ``k`` key agreements, quantization with stochastic
    rounding and ``k + 1`` masks (masked input). The neighbours are synthetic
    (their keys and share ciphertexts are made beforehand), the node is the real
    ``ClientApp`` with ``secaggplus_mod``, with injected seeded randomness so its
    keys are the same every run. The *limit* is ``k + 1`` raw AES-256-CTR
    expansions of the same length (``cryptography``, ``update_into`` a reused
    buffer): the masks alone. Stochastic rounding needs one more expansion of
    its own, which the limit does not count.
``server``
    The server's unmasking for ``--server-n`` nodes (default 1,000) of which
    ``--dropout-fraction`` (default 5%) dropped after share-keys, on
    ``--server-params`` parameters (default 1,000,000): rebuilding every
    survivor's self-mask seed and every dropped node's mask key from ``t``
    Shamir shares (vectorised, cached Lagrange coefficients), the key
    agreements, and removing all masks from the running sum. Synthetic state
    (keys, shares and a masked sum built beforehand), not a full 1,000-node
    round, which would take minutes here. The *limit* is the raw AES-CTR
    expansions it must do: one per survivor and one per (dropped, surviving
    neighbour) pair. The result is checked to be the exact sum.
``round``
    A whole round through ``run_simulation`` for each ``--round-n`` (default 50
    and 100) on ``--params`` parameters: FedAvg with ``SecAggPlus`` against a
    plain FedAvg round on the same pre-made updates, and SecAgg+'s seconds per
    stage. The model is checked against the plain round within the documented
    quantization bound.

``malicious``
    The malicious mode (signed keys, the consistency check) against the
    semi-honest mode, both measured in this run: one node's whole protocol
    (every stage, unmask included; synthetic neighbours that sign with their
    own identity keys) in a cohort of ``--client-n``, and whole rounds of
    ``--malicious-n`` (default 100) nodes through ``run_simulation``, on
    ``--params`` parameters. The ratios are malicious over semi-honest, per
    client and per round, with each mode at the degree and threshold the finder
    picks for its threat (what a user pays: the malicious bound needs a larger
    ``k``, so more masks), and with the malicious mode at the semi-honest
    ``(k, t)`` too ("same k": the cost of the signatures and the consistency
    check alone). The malicious mode includes its default cohort quorum ``q`` on a
    sparse graph (``SecAggPlus``'s and the nodes' default): a node then verifies
    ``max(t, q)`` survivor-set signatures. The *limit* of that second ratio is the
    ``k + max(t, q)`` raw Ed25519 verifications a node must do on top
    (``cryptography``), also measured. The
    node cases run ``--client-repeats`` times (default 21: they are quick), the
    rounds ``--repeats``; beside the wall clock, each case's CPU seconds (all
    threads of the process), steadier on a shared machine.

Peak memory is the tracemalloc peak above the start of one untimed run (numpy
buffers included; the inputs prepared before are not). For ``round`` it counts
the clients too, since they run in the same process; the server itself holds
one running ``uint32`` sum (``4 * params`` bytes), never ``n`` masked vectors,
and the simulation bounds how many replies are in flight.

Run from the repository root::

    PYTHONPATH=src python bench/secagg.py [--parts client server round] [--repeats 5]
    PYTHONPATH=src python bench/secagg.py --json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from _common import (
    MEMORY_METRIC,
    Case,
    add_common_arguments,
    finish,
    format_table,
    max_rss_mb,
    measurement_table,
    positive_int,
    ratio,
    run_cases,
    update_app,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from flowerpets.core import (
    WEIGHT_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    FedAvg,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
)
from flowerpets.secagg import (
    Enrolment,
    GraphParameters,
    RoundConfig,
    SecAggPlus,
    SecAggPlusClientMod,
    Stage,
    Threat,
    check_parameters,
    cohort_quorum,
    enroll,
    find_parameters,
    secaggplus_mod,
)
from flowerpets.secagg._primitives import aead, keys, prg, shamir
from flowerpets.secagg.protocol import (
    INTEGER,
    MASKED_ARRAY,
    MASKED_RECORD,
    RECORD,
    SHARE_PLAINTEXT_BYTES,
    Layout,
    advertisement,
    pair_mask_seed,
    share_key,
    survivor_set,
)
from flowerpets.secagg.server import ServerPhase, ServerRound
from flowerpets.secagg.threat import MODELS
from flowerpets.simulation import run_simulation

PARTS = ("client", "server", "round", "malicious")
Randomness = Callable[[int], bytes]


def seeded(seed: int) -> Randomness:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def raw_expansions(seeds: Sequence[bytes], words: int) -> int:
    """The limit: AES-256-CTR keystreams of ``words`` words, into one reused buffer."""
    zeros = bytes(4 * words)
    buffer = bytearray(4 * words + 16)
    for seed in seeds:
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(zeros, buffer)
    return len(seeds)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- part 1: one client --------------------------------------------------------------------
@dataclass
class ClientWorkload:
    n: int
    k: int
    t: int
    params: int
    config: RoundConfig
    target: int
    share_fields: dict[str, Any]
    collect_fields: dict[str, Any]
    update: NDArray[np.float32]
    stages: dict[str, list[float]] = field(default_factory=dict)
    pki: Enrolment | None = None  # malicious mode: every node's identity key
    later: dict[str, dict[str, Any]] = field(default_factory=dict)  # consistency, unmask

    SEED = 7

    def app(self) -> ClientApp:
        mod = SecAggPlusClientMod(
            randomness=seeded(self.SEED),
            threat=self.config.threat,
            identities=None if self.pki is None else self.pki.identities,
            identity=None if self.pki is None else self.pki.keyring,
        )
        app = ClientApp(mods=[mod])
        update = self.update

        @app.train()
        def train(msg: Message, context: Context) -> RecordDict:
            return RecordDict(
                {
                    "arrays": ArrayRecord.from_numpy({"w": update}, copy=False),
                    "metrics": MetricRecord({WEIGHT_KEY: 50}),
                }
            )

        return app

    def message(self, stage: str, fields: dict[str, Any], extra: dict[str, Any]) -> Message:
        record = ConfigRecord({"session": self.config.session, **fields})
        return Message.create(
            RecordDict({RECORD: record, **extra}),
            message_type=MessageType.TRAIN,
            dst_node_id=self.target,
            round=1,
            run_id=1,
            stage=stage,
        )

    def run(self, *, record: bool = True, whole: bool = False) -> NDArray[np.uint32]:
        """The target node's three stages (``whole``: every stage of its threat model, unmask
        included); their times are recorded."""
        app, context = self.app(), Context(node_id=self.target, run_id=1)
        advertise = self.message(Stage.ADVERTISE_KEYS, self._config_fields(), {})
        share = self.message(Stage.SHARE_KEYS, self.share_fields, {})
        arrays = ArrayRecord.from_numpy({"w": np.zeros(self.params, np.float32)}, copy=False)
        collect = self.message(
            Stage.COLLECT_MASKED_INPUT,
            self.collect_fields,
            {"arrays": arrays, "config": ConfigRecord({"server-round": 1})},
        )
        messages = [("advertise-keys", advertise), ("share-keys", share), ("masked-input", collect)]
        if whole:
            for stage in MODELS[self.config.threat].stages[3:]:
                name = stage.removeprefix(Stage.PREFIX)
                messages.append((name, self.message(stage, self.later[stage], {})))
        times, replies = [], []
        for _, msg in messages:
            started = time.perf_counter()
            replies.append(app(msg, context))
            times.append(time.perf_counter() - started)
        for reply in replies:
            if reply.error is not None:
                raise RuntimeError(f"the client failed: {reply.error}")
        if record:
            for (name, _), seconds in zip(messages, times, strict=True):
                self.stages.setdefault(name, []).append(seconds)
        body = replies[2].require_content()
        vector: NDArray[np.uint32] = body.get_typed(MASKED_RECORD, ArrayRecord)[
            MASKED_ARRAY
        ].numpy()
        return vector

    def _config_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.to_record().items() if k != "session"}


def make_client_workload(
    n: int,
    params: int,
    seed: int,
    threat: Threat = Threat.SEMI_HONEST,
    degree_threshold: tuple[int, int] | None = None,
) -> ClientWorkload:
    """One node's workload; ``degree_threshold`` overrides the finder's ``(k, t)`` for
    ``threat`` (to measure two threat models at the same ``k``)."""
    if degree_threshold is None:
        graph_params = find_parameters(n, threat=threat)
        degree_threshold = graph_params.degree, graph_params.threshold
    k, t = degree_threshold
    # The malicious mode's default cohort quorum on a sparse graph (SecAggPlus's).
    quorum = cohort_quorum(n) if MODELS[threat].consistency_check and k < n - 1 else 0
    rng = np.random.default_rng(seed)
    ids = [1000 + i for i in range(n)]
    order = tuple(ids[i] for i in rng.permutation(n))
    config = RoundConfig(
        session=rng.bytes(16),
        order=order,
        degree=k,
        threshold=t,
        clipping_range=8.0,
        max_weight=10_000,
        weight_key=WEIGHT_KEY,
        secure_metrics=(),
        threat=threat,
        quorum=quorum,
    )
    target = order[0]
    neighbours = list(config.graph.neighbours(target))
    randomness = seeded(seed + 1)
    c_keys = [keys.generate_private_key(randomness) for _ in neighbours]
    s_keys = [keys.generate_private_key(randomness) for _ in neighbours]
    pki = enroll(ids, randomness=seeded(seed + 2)) if MODELS[threat].signed else None
    workload = ClientWorkload(
        n=n,
        k=k,
        t=t,
        params=params,
        config=config,
        target=target,
        share_fields={
            "nodes": neighbours,
            "c-pks": [keys.public_bytes(c) for c in c_keys],
            "s-pks": [keys.public_bytes(s) for s in s_keys],
        },
        collect_fields={},
        update=rng.uniform(-1, 1, params).astype(np.float32),
        pki=pki,
    )
    unmask: dict[str, Any] = {"survivors": list(order), "dropped": []}
    if pki is not None:
        # The neighbours sign what an honest neighbour signs: its keys, then the survivors.
        workload.share_fields["signatures"] = [
            pki.keyring[j].sign(
                advertisement(config, 1, j, keys.public_bytes(c), keys.public_bytes(s))
            )
            for j, c, s in zip(neighbours, c_keys, s_keys, strict=True)
        ]
        workload.later[Stage.CONSISTENCY_CHECK] = {"survivors": list(order)}
        signers = neighbours[:t]  # what an honest server forwards: t of them, ...
        others = (j for j in order if j != target and j not in signers)
        signers += list(itertools.islice(others, max(quorum - len(signers), 0)))  # ... up to q
        unmask["signers"] = signers
        unmask["signatures"] = [
            pki.keyring[j].sign(survivor_set(config, 1, j, order)) for j in signers
        ]
    workload.later[Stage.UNMASK] = unmask
    # The target's keys come from its seeded randomness: learn them once to encrypt to it.
    probe = workload.app()
    context = Context(node_id=target, run_id=1)
    reply = probe(workload.message(Stage.ADVERTISE_KEYS, workload._config_fields(), {}), context)
    target_c_pk = reply.require_content()[RECORD]["c-pk"]
    assert isinstance(target_c_pk, bytes)
    ciphertexts = []
    for j, c in zip(neighbours, c_keys, strict=True):
        key = share_key(c, target_c_pk, session=config.session)
        associated = aead.associated_data(
            session=config.session, round=1, sender=j, receiver=target
        )
        ciphertexts.append(
            aead.encrypt(key, randomness(SHARE_PLAINTEXT_BYTES), associated, randomness)
        )
    workload.collect_fields = {"senders": neighbours, "ciphertexts": ciphertexts}
    workload.run(record=False)  # fails loudly now if anything is inconsistent
    return workload


def client_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    workload = make_client_workload(args.client_n, args.params, args.seed)
    seeds = [np.random.default_rng(i).bytes(32) for i in range(workload.k + 1)]
    cases = [
        Case(
            f"limit_{workload.k + 1}_prg",
            lambda: raw_expansions(seeds, args.params),
            f"(k + 1) = {workload.k + 1} raw AES-CTR expansions of {args.params:,} words",
        ),
        Case("client", workload.run, "advertise + share-keys + masked input, one node"),
    ]
    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
    limit, client = results[cases[0].name], results["client"]
    stages = {name: median(times) for name, times in workload.stages.items()}
    per_expansion = limit.median / (workload.k + 1)
    return {
        "n": workload.n,
        "k": workload.k,
        "t": workload.t,
        "params": args.params,
        "limit": limit.name,
        "results": {name: m.to_json(limit) for name, m in results.items()},
        "ratio": ratio(client, limit),
        "stages_s": stages,
        "stages_in_expansions": {name: s / per_expansion for name, s in stages.items()},
        "_measurements": results,
    }


# -- part 2: the server's unmasking ------------------------------------------------------------
class _NoGrid:
    """Unmasking on synthetic state sends nothing; the round only needs a placeholder."""

    run_id = 0


@dataclass
class ServerWorkload:
    round: ServerRound
    masked_sum: NDArray[np.uint32]
    expected: NDArray[np.uint32]
    b_shares: dict[int, dict[int, bytes]]
    s_shares: dict[int, dict[int, bytes]]
    expansions: int

    def run(self) -> bool:
        self.round.total = self.masked_sum.copy()
        self.round.phase = ServerPhase.COLLECTED
        self.round.recover(self.b_shares, self.s_shares)
        return bool(np.array_equal(self.round.total, self.expected))


def make_server_workload(n: int, params: int, dropout_fraction: float, seed: int) -> ServerWorkload:
    graph_params = find_parameters(n)
    k, t = graph_params.degree, graph_params.threshold
    rng = np.random.default_rng(seed)
    randomness = seeded(seed + 2)
    ids = [1000 + i for i in range(n)]
    config = RoundConfig(
        session=rng.bytes(16),
        order=tuple(ids[i] for i in rng.permutation(n)),
        degree=k,
        threshold=t,
        clipping_range=8.0,
        max_weight=1,
        weight_key=None,
        secure_metrics=(),
    )
    graph = config.graph
    gone = set(rng.choice(ids, size=round(dropout_fraction * n), replace=False).tolist())
    survivors = [i for i in config.order if i not in gone]
    dropped = [j for j in config.order if j in gone]
    s_private = {i: keys.generate_private_key(randomness) for i in ids}
    s_raw = {i: keys.private_bytes(s_private[i]) for i in ids}
    self_seeds = {i: randomness(32) for i in ids}
    field = shamir.Shamir()
    alive = set(survivors)
    b_shares: dict[int, dict[int, bytes]] = {}
    s_shares: dict[int, dict[int, bytes]] = {}
    for dealer in ids:
        secret = np.concatenate(
            [shamir.bytes_to_elements(self_seeds[dealer]), shamir.bytes_to_elements(s_raw[dealer])]
        )
        holders = graph.neighbours(dealer)
        shares = field.split(secret, t, list(range(1, len(holders) + 1)), randomness)
        kind, half = (b_shares, slice(0, 16)) if dealer in alive else (s_shares, slice(16, 32))
        kind[dealer] = {
            point: np.asarray(row[half], "<u4").tobytes()
            for point, (holder, row) in enumerate(zip(holders, shares, strict=True), start=1)
            if holder in alive  # only survivors answer the unmasking
        }
    length = params + 2  # the parameters, then the weight and the clipping flag
    expected = rng.integers(0, 2**32, size=length, dtype=np.uint32)  # the plain sum
    masked = expected.copy()
    add = [self_seeds[i] for i in survivors]
    subtract: list[bytes] = []
    for j in dropped:
        for i in graph.neighbours(j):
            if i in alive:
                seed_ij = pair_mask_seed(
                    s_private[i], keys.public_bytes(s_private[j]), session=config.session, round=1
                )
                (add if i < j else subtract).append(seed_ij)  # what survivor i put in
    prg.apply_masks(masked, add=add, subtract=subtract)
    request = RoundRequest(
        round=1, cohort=tuple(ids), arrays=ArrayRecord(), config=ConfigRecord(), weight_key=None
    )
    mod = SecAggPlus()  # finds the same (k, t); degree=k would refuse the complete graph's odd k
    server_round = ServerRound(mod, request, _NoGrid(), config=config)  # type: ignore[arg-type]
    server_round.s_pks = {i: keys.public_bytes(s_private[i]) for i in ids}
    server_round.survivors, server_round.dropped = survivors, dropped
    server_round.layout = Layout.of_kinds(("x",), ((params,),), (INTEGER,))
    return ServerWorkload(
        round=server_round,
        masked_sum=masked,
        expected=expected,
        b_shares=b_shares,
        s_shares=s_shares,
        expansions=len(add) + len(subtract),
    )


def server_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    workload = make_server_workload(
        args.server_n, args.server_params, args.dropout_fraction, args.seed
    )
    length = args.server_params + 2
    seeds = [np.random.default_rng(i).bytes(32) for i in range(workload.expansions)]
    cases = [
        Case(
            f"limit_{workload.expansions}_prg",
            lambda: raw_expansions(seeds, length),
            f"{workload.expansions} raw AES-CTR expansions of {length:,} words",
        ),
        Case("unmask", workload.run, "rebuild secrets + key agreements + remove masks"),
    ]
    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
    limit, unmask = results[cases[0].name], results["unmask"]
    seconds = workload.round.seconds
    return {
        "n": args.server_n,
        "k": workload.round.config.degree,
        "t": workload.round.t,
        "params": args.server_params,
        "survivors": len(workload.round.survivors),
        "dropped": len(workload.round.dropped),
        "expansions": workload.expansions,
        "limit": limit.name,
        "results": {name: m.to_json(limit) for name, m in results.items()},
        "ratio": ratio(unmask, limit),
        "exact": unmask.result is True,
        "last_run_s": {
            "reconstruct": seconds.get("secagg+/reconstruct"),
            "remove_masks": seconds.get("secagg+/remove-masks"),
        },
        "running_sum_mb": 4 * length / 2**20,
        "all_masked_vectors_mb": 4 * length * len(workload.round.survivors) / 2**20,
        "_measurements": results,
    }


# -- part 3: whole rounds -----------------------------------------------------------------------
class Capture:
    def __init__(self) -> None:
        self.results: list[RoundResult] = []

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        result: RoundResult = call_next(request, context)
        self.results.append(result)
        return result


def one_round(
    args: argparse.Namespace,
    n: int,
    app: ClientApp,
    mods: Sequence[Any],
    node_ids: Sequence[int] | None = None,
) -> NDArray[np.float32]:
    """One FedAvg round of ``n`` nodes through run_simulation; the new model."""
    initial = ArrayRecord.from_numpy({"w": np.zeros(args.params, np.float32)}, copy=False)
    server = ServerApp(strategy=FedAvg(), num_rounds=1, initial_arrays=initial, mods=mods)
    result = run_simulation(server, app, n, seed=args.seed, node_ids=node_ids)
    if not result.history[0].ok:
        raise RuntimeError(f"the round failed: {result.history[0].error}")
    model: NDArray[np.float32] = result.arrays["w"].numpy()
    return model


def round_updates(args: argparse.Namespace, n: int) -> tuple[NDArray[np.float32], list[int]]:
    rng = np.random.default_rng(args.seed + n)
    updates = rng.random((n, args.params), dtype=np.float32)  # no float64 temporary
    updates *= 2
    updates -= 1
    return updates, [int(w) for w in rng.integers(10, 1000, size=n)]


def round_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in args.round_n:
        updates, weights = round_updates(args, n)
        secure_app = update_app(updates, weights, name="w", mods=[secaggplus_mod])
        plain_app = update_app(updates, weights, name="w")
        capture = Capture()
        secagg = SecAggPlus()
        cases = [
            Case(f"plain_n{n}", partial(one_round, args, n, plain_app, ())),
            Case(f"secagg_n{n}", partial(one_round, args, n, secure_app, (capture, secagg))),
        ]
        results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
        plain, secure = results[cases[0].name], results[cases[1].name]
        last = capture.results[-1]
        bound = float(last.metrics["secagg-mean-error-bound"])  # type: ignore[arg-type]
        error = float(np.max(np.abs(secure.result.astype(np.float64) - plain.result)))
        stages: dict[str, list[float]] = {}
        for outcome in capture.results[1:]:  # not the tracemalloc run
            for key, value in outcome.metrics.items():
                if key.startswith("secagg-seconds-"):
                    stages.setdefault(key.removeprefix("secagg-seconds-"), []).append(float(value))  # type: ignore[arg-type]
        params_ = secagg.parameters(n)
        out[str(n)] = {
            "k": params_.degree,
            "t": params_.threshold,
            "results": {name: m.to_json(plain) for name, m in results.items()},
            "ratio": ratio(secure, plain),
            "stages_s": {name: median(v) for name, v in stages.items()},
            "max_abs_error": error,
            "error_bound": bound,
            "within_bound": error <= bound + 2 * float(np.finfo(np.float32).eps),
            "all_masked_vectors_mb": 4 * (args.params + 2) * n / 2**20,
            "_measurements": results,
        }
    return out


# -- part 4: the malicious mode against the semi-honest one --------------------------------------
SAME_K = "malicious_same_k"  # the malicious mode at the semi-honest finder's (k, t)


def raw_verifications(count: int, size: int) -> int:
    """The limit of the signatures: ``count`` Ed25519 verifications of ``size``-byte
    messages (``cryptography``), what a node of the malicious mode must do on top."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    public, data = key.public_key(), bytes(size)
    signature = key.sign(data)
    for _ in range(count):
        public.verify(signature, data)
    return count


@dataclass
class CpuTimed:
    """A case's callable that also records the CPU seconds of each call (every thread of
    this process): on a shared machine steadier than the wall clock, which counts the
    time other processes hold the cores."""

    run: Callable[[], Any]
    seconds: list[float] = field(default_factory=list)

    def __call__(self) -> Any:
        started = time.process_time()
        try:
            return self.run()
        finally:
            self.seconds.append(time.process_time() - started)

    def median(self) -> float:
        return median(self.seconds[1:])  # not the untimed first run (peak memory, warm-up)


class AtParameters(SecAggPlus):
    """SecAgg+ at the given ``(k, t)`` whatever its threat model, as nodes check them: also
    the complete graph's odd ``k``, which ``SecAggPlus(degree=...)`` refuses."""

    def __init__(self, fixed: GraphParameters, **settings: Any) -> None:
        super().__init__(**settings)
        self.fixed = fixed

    def parameters(self, cohort_size: int) -> GraphParameters:
        k, t = self.fixed.degree, self.fixed.threshold
        return check_parameters(cohort_size, k, t, threat=self.model.threat)


def malicious_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Semi-honest, malicious at the finder's malicious (k, t), and malicious at the
    semi-honest (k, t): the first ratio is what a user pays, the second isolates the
    signatures and the consistency check from the larger k the malicious bound needs."""
    semi = find_parameters(args.client_n)
    modes: dict[str, tuple[Threat, tuple[int, int] | None]] = {
        Threat.SEMI_HONEST.value: (Threat.SEMI_HONEST, None),
        Threat.MALICIOUS.value: (Threat.MALICIOUS, None),
        SAME_K: (Threat.MALICIOUS, (semi.degree, semi.threshold)),
    }
    workloads = {
        name: make_client_workload(args.client_n, args.params, args.seed, threat, kt)
        for name, (threat, kt) in modes.items()
    }
    for workload in workloads.values():
        workload.run(record=False, whole=True)  # fails loudly now if anything is inconsistent
    n = args.malicious_n
    round_semi = find_parameters(n)
    updates, weights = round_updates(args, n)
    pki = enroll(range(1, n + 1))
    signed = SecAggPlusClientMod(identities=pki.identities, identity=pki.keyring)
    client_mods = {Threat.SEMI_HONEST.value: secaggplus_mod, Threat.MALICIOUS.value: signed}
    client_mods[SAME_K] = signed
    servers = {
        Threat.SEMI_HONEST.value: SecAggPlus(),
        Threat.MALICIOUS.value: SecAggPlus(identities=pki.identities),
        SAME_K: AtParameters(round_semi, identities=pki.identities),
    }
    same = workloads[SAME_K]
    # k advertisements, max(t, q) survivor-set signatures (q: the cohort quorum)
    verifications = same.k + len(same.later[Stage.UNMASK]["signers"])
    size = len(survivor_set(same.config, 1, same.target, same.config.order))
    cpu: dict[str, CpuTimed] = {}
    client_cases = [
        Case(
            f"client_{name}",
            cpu.setdefault(f"client_{name}", CpuTimed(partial(workload.run, whole=True))),
            f"one node, every stage, n = {args.client_n} (k = {workload.k}, t = {workload.t})",
        )
        for name, workload in workloads.items()
    ]
    client_cases.append(
        Case(
            f"verify_{verifications}",
            cpu.setdefault("verify", CpuTimed(partial(raw_verifications, verifications, size))),
            f"k + max(t, q) = {verifications} raw Ed25519 verifications of {size} bytes",
        )
    )
    round_cases = []
    for name in modes:
        app = update_app(updates, weights, name="w", mods=[client_mods[name]])
        round_ = partial(one_round, args, n, app, (servers[name],), pki.node_ids)
        timed = cpu.setdefault(f"round_{name}_n{n}", CpuTimed(round_))
        round_cases.append(Case(f"round_{name}_n{n}", timed, f"a whole round of {n} nodes"))
    # The nodes are quick: more repeats of them, interleaved among themselves.
    results = run_cases(client_cases, args.client_repeats, settle=args.settle, progress=progress)
    results |= run_cases(round_cases, args.repeats, settle=args.settle, progress=progress)
    cpu_s = {name: timed.median() for name, timed in cpu.items()}
    client = {name: results[f"client_{name}"] for name in modes}
    rounds = {name: results[f"round_{name}_n{n}"] for name in modes}
    semi_client, semi_round = client[Threat.SEMI_HONEST.value], rounds[Threat.SEMI_HONEST.value]
    verify = results[f"verify_{verifications}"]
    stages = {
        name: {stage: median(times) for stage, times in workload.stages.items()}
        for name, workload in workloads.items()
    }
    return {
        "client_n": args.client_n,
        "round_n": n,
        "params": args.params,
        "k_t": {name: [w.k, w.t] for name, w in workloads.items()},
        "quorum": {name: w.config.quorum for name, w in workloads.items()},
        "round_k_t": {
            name: [server.parameters(n).degree, server.parameters(n).threshold]
            for name, server in servers.items()
        },
        "results": {
            name: m.to_json(semi_client if name.startswith("client") else semi_round)
            for name, m in results.items()
            if not name.startswith("verify")
        },
        "client_ratio": ratio(client[Threat.MALICIOUS.value], semi_client),
        "client_ratio_same_k": ratio(client[SAME_K], semi_client),
        "round_ratio": ratio(rounds[Threat.MALICIOUS.value], semi_round),
        "round_ratio_same_k": ratio(rounds[SAME_K], semi_round),
        "verifications": verifications,
        "verify_s": verify.median,
        "same_k_extra_s": client[SAME_K].median - semi_client.median,
        "cpu_s": cpu_s,
        "cpu_ratios": {
            name: cpu_s[name] / cpu_s[base]
            for base in (
                f"client_{Threat.SEMI_HONEST.value}",
                f"round_{Threat.SEMI_HONEST.value}_n{n}",
            )
            for name in cpu_s
            if name != base and name.split("_")[0] == base.split("_")[0]
        },
        "client_stages_s": stages,
        "_measurements": results,
    }


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SecAgg+ against its limits.")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--params", type=positive_int, default=1_000_000, help="client/round params"
    )
    parser.add_argument("--client-n", type=positive_int, default=100, help="cohort for the client")
    parser.add_argument("--server-n", type=positive_int, default=1000, help="cohort for unmasking")
    parser.add_argument("--server-params", type=positive_int, default=1_000_000)
    parser.add_argument("--dropout-fraction", type=float, default=0.05)
    parser.add_argument("--round-n", type=positive_int, nargs="+", default=[50, 100])
    parser.add_argument(
        "--malicious-n", type=positive_int, default=100, help="cohort for malicious vs semi-honest"
    )
    parser.add_argument(
        "--client-repeats",
        type=positive_int,
        default=21,
        help="timed runs of each node case of --parts malicious (default 21)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser, repeats=5)
    return parser.parse_args(argv)


def _public(part: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_public(v) if isinstance(v, dict) else v)
        for k, v in part.items()
        if not k.startswith("_")
    }


def report(args: argparse.Namespace, parts: dict[str, Any]) -> str:
    lines = [f"secagg: medians of {args.repeats} run(s); peak MB = {MEMORY_METRIC}", ""]
    if "client" in parts:
        c = parts["client"]
        lines += [
            f"client: n = {c['n']} (k = {c['k']}, t = {c['t']}), {c['params']:,} params",
            measurement_table(c["_measurements"].values(), baseline=c["limit"], label="limit"),
            format_table(
                ("stage", "median s", "x one expansion"),
                [(name, s, c["stages_in_expansions"][name]) for name, s in c["stages_s"].items()],
            ),
            "",
        ]
    if "server" in parts:
        s = parts["server"]
        lines += [
            f"server unmasking (synthetic state): n = {s['n']} (k = {s['k']}, t = {s['t']}), "
            f"{s['dropped']} dropped after share-keys, {s['params']:,} params, "
            f"{s['expansions']} expansions; exact: {s['exact']}",
            measurement_table(s["_measurements"].values(), baseline=s["limit"], label="limit"),
            f"running sum {s['running_sum_mb']:.1f} MB (vs {s['all_masked_vectors_mb']:.0f} MB "
            "for every masked vector)",
            "",
        ]
    if "round" in parts:
        for n, r in parts["round"].items():
            lines += [
                f"round: n = {n} (k = {r['k']}, t = {r['t']}), {args.params:,} params; "
                f"max |secure - plain| = {r['max_abs_error']:.2e} <= bound "
                f"{r['error_bound']:.2e}: {r['within_bound']}; all masked vectors would be "
                f"{r['all_masked_vectors_mb']:.0f} MB",
                measurement_table(
                    r["_measurements"].values(), baseline=f"plain_n{n}", label="plain"
                ),
                format_table(("secagg stage", "median s"), list(r["stages_s"].items())),
                "",
            ]
    if "malicious" in parts:
        m = parts["malicious"]
        kt = ", ".join(f"{name}: k = {k}, t = {t}" for name, (k, t) in m["k_t"].items())
        measured = m["_measurements"]
        client = [v for name, v in measured.items() if name.startswith("client")]
        rounds = [v for name, v in measured.items() if name.startswith("round")]
        lines += [
            f"malicious vs semi-honest ({kt}), {m['params']:,} params: one node of "
            f"{m['client_n']}, x{m['client_ratio']:.2f} (x{m['client_ratio_same_k']:.2f} at "
            f"the same k); a round of {m['round_n']}, x{m['round_ratio']:.2f} "
            f"(x{m['round_ratio_same_k']:.2f} at the same k)",
            measurement_table(client, baseline=client[0].name, label="semi"),
            f"same k: {m['same_k_extra_s'] * 1e3:.1f} ms more than semi-honest; its "
            f"{m['verifications']} signature verifications alone take "
            f"{m['verify_s'] * 1e3:.1f} ms",
            measurement_table(rounds, baseline=rounds[0].name, label="semi"),
            format_table(
                ("CPU seconds (median)", "s", "x semi"),
                [
                    (name, s, m["cpu_ratios"].get(name, 1.0 if "semi" in name else float("nan")))
                    for name, s in m["cpu_s"].items()
                ],
            ),
            format_table(
                ("node stage", *m["client_stages_s"]),
                [
                    (stage, *(s.get(stage, float("nan")) for s in m["client_stages_s"].values()))
                    for stage in m["client_stages_s"][Threat.MALICIOUS.value]
                ],
            ),
            "",
        ]
    lines.append(f"process RSS high-water mark: {max_rss_mb() or float('nan'):.0f} MB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = None if args.quiet else sys.stderr
    parts: dict[str, Any] = {}
    runners = {
        "client": client_part,
        "server": server_part,
        "round": round_part,
        "malicious": malicious_part,
    }
    for name in args.parts:
        parts[name] = runners[name](args, progress)
    failed = []
    if "server" in parts and not parts["server"]["exact"]:
        failed.append("server unmasking is not exact")
    for n, r in parts.get("round", {}).items():
        if not r["within_bound"]:
            failed.append(f"round n={n} is outside the quantization bound")
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
        "memory_metric": MEMORY_METRIC,
        **{name: _public(part) for name, part in parts.items()},
        "ok": not failed,
        "failed": failed,
    }
    return finish(args, "secagg", payload, lambda: report(args, parts), failed)


if __name__ == "__main__":
    sys.exit(main())

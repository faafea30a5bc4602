"""Benchmark: CKKS aggregation (flowerpets.he) against raw TenSEAL, in one run.

The workload: ``--nodes`` clients (default 10), each with an update of
``--params`` float32 parameters (default 1,000,000) in four arrays (two
weights, two biases) and a weight (``num-examples``). Parameters: the default
set, :data:`flowerpets.he.COMPACT` (ring 4096, primes [60, 49], scale 2^40).

Client side (per client):

``client_mod``
    :class:`~flowerpets.he.CKKSClientMod` turning one train reply into its
    encrypted form: weighting, flat packing, the capacity check, loading the
    secret context, encrypting chunk by chunk, wrapping the bytes as arrays.
``tenseal_chunks``
    raw TenSEAL on the *same weighted flat vector* with the same parameters:
    ``ts.ckks_vector(ctx, chunk).serialize()`` per slot-sized chunk;
``tenseal_whole``
    raw TenSEAL's own splitting: ``ts.ckks_vector(ctx, vector).serialize()``.
    The faster of the two raw ways is the baseline the client mod is held to.
``common_8192``
    raw TenSEAL with the common default ring 8192, primes [60, 40, 40],
    scale 2^40 (depth for one multiplication the aggregation never uses).
``client_open``
    a node opening the sealed sum: loading its secret context, loading and
    checking the ciphertexts, decrypting, dividing, unpacking;
    ``tenseal_decrypt`` is raw loading and decryption of the same ciphertexts.

Server side (the whole cohort):

``server_sum``
    :class:`flowerpets.he` 's running sum over the ``--nodes`` encrypted updates,
    with every check (parameters, size, scale, level, key id, layout);
``tenseal_sum``
    raw ``ckks_vector_from`` + in-place add, no checks (both serialize the sum at the end,
    as the server must to send it);
``plain_sum``
    the core's ``WeightedSum`` over the same updates in the clear (what a plain
    FedAvg round costs the server, for scale).

Also reported: ciphertext bytes per parameter against float32 (ours, and the
common 8192 set), the error of the opened mean against the float64 mean, and
the server's peak memory: resident-set growth of a child process that sums
the updates streamed from disk one at a time (as ``HomomorphicAggregation``
does) against one that first holds all of them (TenSEAL's C++ allocations are
invisible to tracemalloc, hence RSS). The bench exits with status 1 if the
opened mean is off by more than ``--tolerance`` (plus float32 rounding).

Run from the repository root::

    PYTHONPATH=src python bench/he.py [--nodes 10] [--params 1000000] [--repeats 3]
    PYTHONPATH=src python bench/he.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from _common import (
    Case,
    Measurement,
    add_common_arguments,
    emit_result,
    format_seconds,
    format_table,
    positive_int,
    ratio,
    run_cases,
)
from numpy.typing import NDArray

from flowerpets.core import (
    SEALED_WEIGHT_KEY,
    WEIGHT_KEY,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    WeightedSum,
)
from flowerpets.he import COMPACT, CKKSClientMod, CKKSParameters
from flowerpets.he._primitives.ciphertexts import (
    Header,
    split_wire,
)
from flowerpets.he._primitives.packing import Layout
from flowerpets.he._primitives.params import (
    load_public_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from flowerpets.he._state import ClientKeys, ClientPhase
from flowerpets.he.protocol import (
    CONFIG_COHORT_SIZE,
    CONFIG_ENCRYPT,
    CONFIG_KEY_ID,
    CONFIG_WEIGHT_KEY,
)
from flowerpets.he.sealed import CiphertextSum, open_sealed

COMMON = CKKSParameters(8192, (60, 40, 40), 40, name="common-8192")
KEY_ID = "5eed" * 8
FLOAT32_BYTES = 4
CLIENT_CASES = ("client_mod", "tenseal_chunks", "tenseal_whole", "common_8192")
SERVER_CASES = ("server_sum", "tenseal_sum", "plain_sum")
OPEN_CASES = ("client_open", "tenseal_decrypt")
MB = 1024 * 1024


# -- the workload --------------------------------------------------------------------------------
def layer_sizes(params: int) -> dict[str, int]:
    bias = max(1, min(100, params // 10))
    first = (params - 2 * bias) // 2
    return {
        "fc1.weight": first,
        "fc1.bias": bias,
        "fc2.weight": params - 2 * bias - first,
        "fc2.bias": bias,
    }


@dataclass
class Workload:
    updates: list[dict[str, NDArray[np.float32]]]
    weights: list[int]
    params: int

    @property
    def nodes(self) -> int:
        return len(self.updates)

    def exact_mean(self) -> NDArray[np.float64]:
        total = np.zeros(self.params)
        for update, weight in zip(self.updates, self.weights, strict=True):
            total += weight * np.concatenate(
                [a.ravel().astype(np.float64) for a in update.values()]
            )
        out: NDArray[np.float64] = total / sum(self.weights)
        return out


def make_workload(nodes: int, params: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    updates = [
        {
            name: (0.1 * rng.standard_normal(size)).astype(np.float32)
            for name, size in layer_sizes(params).items()
        }
        for _ in range(nodes)
    ]
    return Workload(updates, [100 + 10 * i for i in range(nodes)], params)


class Client:
    """One node holding the run's key, and the train request it answers."""

    def __init__(self, workload: Workload, secret: ts.Context, params: CKKSParameters) -> None:
        self.workload = workload
        self.mod = CKKSClientMod()
        self.context = Context(node_id=1, run_id=1)
        ClientKeys(
            phase=ClientPhase.HOLDS_KEY,
            key_id=KEY_ID,
            params=params,
            secret_context=secret_context_bytes(secret),
        ).store(self.context.state)
        names = list(layer_sizes(workload.params))
        config = ConfigRecord(
            {
                CONFIG_KEY_ID: KEY_ID,
                CONFIG_ENCRYPT: names,
                CONFIG_WEIGHT_KEY: WEIGHT_KEY,
                CONFIG_COHORT_SIZE: workload.nodes,
            }
        )
        model = ArrayRecord.from_numpy({n: np.zeros(1, np.float32) for n in names})
        self.request = Message.create(
            RecordDict({"arrays": model, "config": config}),
            message_type="train",
            dst_node_id=1,
            round=1,
        )

    def encrypt(self, index: int) -> ArrayRecord:
        update, weight = self.workload.updates[index], self.workload.weights[index]

        def handler(msg: Message, context: Context) -> Message:
            return msg.reply(
                RecordDict(
                    {
                        "arrays": ArrayRecord.from_numpy(update, copy=False),
                        "metrics": MetricRecord({WEIGHT_KEY: weight}),
                    }
                )
            )

        reply = self.mod(self.request, self.context, handler)
        return reply.require_content().get_typed("arrays", ArrayRecord)


def raw_chunks(context: ts.Context, flat: NDArray[np.float64], slots: int) -> list[bytes]:
    return [
        ts.ckks_vector(context, flat[i : i + slots]).serialize() for i in range(0, flat.size, slots)
    ]


def raw_whole(context: ts.Context, flat: NDArray[np.float64]) -> bytes:
    # TenSEAL prints a warning (through Python's stdout) when it splits a vector itself.
    with contextlib.redirect_stdout(io.StringIO()):
        data: bytes = ts.ckks_vector(context, flat).serialize()
    return data


def server_sum(public: ts.Context, header: Header, updates: Sequence[ArrayRecord]) -> ArrayRecord:
    total = CiphertextSum(context=public, header=header)
    for arrays in updates:
        _, update_header, chunks = split_wire(arrays, expected=total.header)  # as the server does
        assert update_header is not None
        total.add(total.load(chunks, update_header))
    return total.result().to_arrays()


def raw_sum(public: ts.Context, updates: Sequence[list[bytes]]) -> list[bytes]:
    """Load and add without checks, then serialize the sum (as the server must, to send it)."""
    total: list[ts.CKKSVector] = []
    for chunks in updates:
        vectors = [ts.ckks_vector_from(public, blob) for blob in chunks]
        if not total:
            total = vectors
        else:
            for acc, vector in zip(total, vectors, strict=True):
                acc.add_(vector)
    return [vector.serialize() for vector in total]


def plain_sum(workload: Workload) -> ArrayRecord:
    total = WeightedSum()
    for update, weight in zip(workload.updates, workload.weights, strict=True):
        total.add(ArrayRecord.from_numpy(update, copy=False), weight)
    return total.result()


def raw_decrypt(context: ts.Context, blobs: Sequence[bytes]) -> NDArray[np.float64]:
    return np.concatenate([np.asarray(ts.ckks_vector_from(context, b).decrypt()) for b in blobs])


def wire_bytes(arrays: ArrayRecord) -> int:
    return sum(a.nbytes for name, a in arrays.items() if name.startswith("he."))


def chunk_blobs(arrays: ArrayRecord) -> list[bytes]:
    _, _, chunks = split_wire(arrays)
    return [c.numpy().tobytes() for c in chunks]


# -- server memory, in child processes -----------------------------------------------------------
def _write_updates(folder: Path, public: bytes, header: Header, updates: list[ArrayRecord]) -> None:
    (folder / "public").write_bytes(public)
    (folder / "header").write_bytes(header.encode().numpy().tobytes())
    for index, arrays in enumerate(updates):
        with open(folder / f"update-{index}", "wb") as out:
            for blob in chunk_blobs(arrays):
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)


def _read_update(path: Path) -> list[bytes]:
    data = path.read_bytes()
    chunks, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<Q", data, offset)
        chunks.append(data[offset + 8 : offset + 8 + size])
        offset += 8 + size
    return chunks


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (VmRSS now, VmHWM the peak of this image).

    Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(mode: str, folder: Path) -> dict[str, float]:
    """Run in a child: sum the updates in ``folder`` streaming or holding all; RSS growth."""
    header = Header.decode(Array(np.frombuffer((folder / "header").read_bytes(), np.uint8)))
    public = load_public_context((folder / "public").read_bytes(), header.params)
    update_header = Header(key_id=header.key_id, params=header.params, layout=header.layout)
    total = CiphertextSum(context=public, header=header)
    paths = sorted(folder.glob("update-*"))
    baseline = _status_mb("VmRSS")
    if mode == "stream":
        for path in paths:
            vectors = total.load(_read_update(path), update_header)
            total.add(vectors)
            del vectors
    else:
        held = [total.load(_read_update(path), update_header) for path in paths]
        for vectors in held:
            total.add(vectors)
    peak = _status_mb("VmHWM")
    return {"baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline}


def measure_memory(public: bytes, header: Header, updates: list[ArrayRecord]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flowerpets-bench-he-") as tmp:
        folder = Path(tmp)
        _write_updates(folder, public, header, updates)
        out: dict[str, Any] = {}
        for mode in ("stream", "hold"):
            done = subprocess.run(
                [sys.executable, __file__, "--child-memory", mode, str(folder)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            out[mode] = json.loads(done.stdout)
    return out


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=positive_int, default=10)
    parser.add_argument("--params", type=positive_int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-9,
        help="largest |opened mean - float64 mean| accepted, besides float32 rounding",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes")
    parser.add_argument("--child-memory", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_memory:
        mode, folder = args.child_memory
        print(json.dumps(child_memory(mode, Path(folder))))
        return 0
    progress = None if args.quiet else sys.stderr
    workload = make_workload(args.nodes, args.params, args.seed)
    params = COMPACT
    secret = new_secret_context(params)
    public_bytes = public_context_bytes(secret)
    public = load_public_context(public_bytes, params)
    common = ts.context(
        ts.SCHEME_TYPE.CKKS,
        COMMON.poly_modulus_degree,
        coeff_mod_bit_sizes=list(COMMON.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    common.global_scale = COMMON.scale
    client = Client(workload, secret, params)

    # What every client sends, made once (also what the server cases sum).
    updates = [client.encrypt(i) for i in range(workload.nodes)]
    names = list(layer_sizes(workload.params))
    layout = Layout.of(workload.updates[0], names)
    sum_header = Header(key_id=KEY_ID, params=params, layout=layout, order=tuple(names))
    raw_updates = [chunk_blobs(u) for u in updates]
    flat = layout.pack(workload.updates[0], float(workload.weights[0]))
    sealed = server_sum(public, sum_header, updates)
    sealed[SEALED_WEIGHT_KEY] = Array(np.float64(sum(workload.weights)))
    secret_again = ts.context_from(secret_context_bytes(secret))
    sealed_blobs = chunk_blobs(sealed)
    keys = ClientKeys.load(client.context.state)

    cases = [
        Case("client_mod", lambda: client.encrypt(0), "ours: weight, pack, check, encrypt"),
        Case("tenseal_chunks", lambda: raw_chunks(secret, flat, params.slots), "raw, per chunk"),
        Case("tenseal_whole", lambda: raw_whole(secret, flat), "raw, TenSEAL splits"),
        Case("common_8192", lambda: raw_chunks(common, flat, COMMON.slots), "raw, 8192 [60,40,40]"),
        Case("server_sum", lambda: server_sum(public, sum_header, updates), "ours, checked"),
        Case("tenseal_sum", lambda: raw_sum(public, raw_updates), "raw, unchecked"),
        Case("plain_sum", lambda: plain_sum(workload), "core WeightedSum, in the clear"),
        Case("client_open", lambda: open_sealed(sealed, keys), "ours: decrypt, divide, unpack"),
        Case("tenseal_decrypt", lambda: raw_decrypt(secret_again, sealed_blobs), "raw"),
    ]
    results = run_cases(cases, args.repeats, memory=False, settle=args.settle, progress=progress)
    raw_best = min((results["tenseal_chunks"], results["tenseal_whole"]), key=lambda m: m.median)

    # Precision: the opened mean against the float64 mean.
    opened = results["client_open"].result
    got = np.concatenate([opened[n].numpy().ravel().astype(np.float64) for n in names])
    exact = workload.exact_mean()
    error = float(np.max(np.abs(got - exact)))
    # The float32 cast of the opened model is part of the error; report CKKS's own too.
    flat_sum = results["tenseal_decrypt"].result[: layout.size] / sum(workload.weights)
    ckks_error = float(np.max(np.abs(flat_sum - exact)))
    # Ours (the opened float32 model) may differ from the float64 mean by CKKS's error plus
    # float32 rounding; the raw decryption by CKKS's error alone.
    rounding = float(np.finfo(np.float32).eps) * float(np.max(np.abs(exact)))
    ok = ckks_error <= args.tolerance and error <= args.tolerance + rounding

    sizes = {
        "ours_bytes_per_param": wire_bytes(updates[0]) / workload.params,
        "tenseal_bytes_per_param": sum(map(len, results["tenseal_chunks"].result))
        / workload.params,
        "common_8192_bytes_per_param": sum(map(len, results["common_8192"].result))
        / workload.params,
        "float32_bytes_per_param": FLOAT32_BYTES,
    }
    sizes["ours_x_float32"] = sizes["ours_bytes_per_param"] / FLOAT32_BYTES
    sizes["common_8192_x_float32"] = sizes["common_8192_bytes_per_param"] / FLOAT32_BYTES
    memory = None if args.no_memory else measure_memory(public_bytes, sum_header, updates)
    update_mb = wire_bytes(updates[0]) / MB

    ratios = {
        "client_mod_vs_raw_tenseal": ratio(results["client_mod"], raw_best),
        "common_8192_vs_raw_tenseal": ratio(results["common_8192"], raw_best),
        "server_sum_vs_raw_tenseal": ratio(results["server_sum"], results["tenseal_sum"]),
        "server_sum_vs_plain_sum": ratio(results["server_sum"], results["plain_sum"]),
        "client_open_vs_raw_decrypt": ratio(results["client_open"], results["tenseal_decrypt"]),
    }
    payload = {
        "config": {
            "nodes": workload.nodes,
            "params": workload.params,
            "repeats": args.repeats,
            "settle_s": args.settle,
            "seed": args.seed,
            "parameters": params.describe(),
            "common": COMMON.describe(),
            "weights": workload.weights,
        },
        "raw_baseline": raw_best.name,
        "results": {name: _json(m, results, raw_best) for name, m in results.items()},
        "ratios": ratios,
        "sizes": sizes,
        "memory": {
            "metric": "resident-set growth of a child process while it sums the updates",
            "update_mb": update_mb,
            "children": memory,
        },
        "precision": {"max_abs_error": error, "ckks_max_abs_error": ckks_error},
        "verification": {"ok": ok, "tolerance": args.tolerance},
    }
    emit_result(args, "he", payload, lambda: report(args, results, raw_best, payload))
    return 0 if ok else 1


def report(
    args: argparse.Namespace,
    results: dict[str, Measurement],
    raw_best: Measurement,
    payload: dict[str, Any],
) -> str:
    config, sizes, memory = payload["config"], payload["sizes"], payload["memory"]
    precision, ok = payload["precision"], payload["verification"]["ok"]
    rows = []
    for name, m in results.items():
        base = _baseline(name, results, raw_best)
        rows.append((name, format_seconds(m.median), f"{ratio(m, base):.2f}x {base.name}", m.note))
    lines = [
        f"CKKS aggregation: {config['nodes']} clients x {config['params']:,} parameters, "
        f"{config['parameters']}, {args.repeats} repeats (medians)",
        "",
        format_table(("case", "median s", "ratio", "what"), rows),
        "",
        format_table(
            ("size", "bytes/param", "x float32"),
            [
                (
                    "ours (compact)",
                    f"{sizes['ours_bytes_per_param']:.2f}",
                    f"{sizes['ours_x_float32']:.2f}",
                ),
                (
                    "raw TenSEAL, same params",
                    f"{sizes['tenseal_bytes_per_param']:.2f}",
                    f"{sizes['tenseal_bytes_per_param'] / FLOAT32_BYTES:.2f}",
                ),
                (
                    "common 8192 [60,40,40]",
                    f"{sizes['common_8192_bytes_per_param']:.2f}",
                    f"{sizes['common_8192_x_float32']:.2f}",
                ),
            ],
        ),
    ]
    children = memory["children"]
    if children is not None:
        lines += [
            "",
            f"server memory (RSS growth while summing; one update is {memory['update_mb']:.1f} "
            f"MB): streaming {children['stream']['growth_mb']:.1f} MB, "
            f"holding all {children['hold']['growth_mb']:.1f} MB",
        ]
    lines += [
        "",
        f"opened mean: max |error| {precision['max_abs_error']:.2e} "
        f"(CKKS alone {precision['ckks_max_abs_error']:.2e}, "
        f"tolerance {args.tolerance:.0e}): {'ok' if ok else 'FAILED'}",
    ]
    return "\n".join(lines)


def _baseline(name: str, results: dict[str, Measurement], raw_best: Measurement) -> Measurement:
    if name in CLIENT_CASES:
        return raw_best
    if name in SERVER_CASES:
        return results["tenseal_sum"]
    return results["tenseal_decrypt"]


def _json(m: Measurement, results: dict[str, Measurement], raw_best: Measurement) -> dict[str, Any]:
    out = m.to_json(_baseline(m.name, results, raw_best))
    out["baseline"] = _baseline(m.name, results, raw_best).name
    return out


if __name__ == "__main__":
    raise SystemExit(main())

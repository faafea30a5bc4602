"""Benchmark: what differential privacy costs, against the plain round it protects.

Five parts (``--parts``), each a table of medians and ratios measured in the same run:

``round``
    A whole FedAvg round through ``run_simulation`` on ``--nodes`` nodes (default 10)
    holding pre-made float32 updates of ``--params`` parameters (default 1,000,000):

    * ``plain``: FedAvg alone (the baseline);
    * ``central_dp``: the same round with ``CentralDp`` (noise multiplier 1, clip 1,
      secure noise, PLD accounting) on the server and ``fixed_clipping_mod`` on every
      client: each client computes and clips its update, the server adds
      ``params`` secure Gaussians and the model back, then accounts the round.

    The DP round's model is checked, once, against the fixed-denominator formula
    ``w + (sum of clipped updates + noise) / m`` with seeded noise.
``noise``
    The pieces of that overhead on ``--params`` values, against numpy:

    * ``numpy_normal``: ``Generator(PCG64).standard_normal`` (numpy's ziggurat in C; fast,
      *not* a secure source: the baseline of the noise rows);
    * ``secure_noise``: the default source, AES-256-CTR keystream, a vectorized ziggurat,
      each value the sum of 4 independent normals (the floating-point-attack
      mitigation); the target is within 3x of ``numpy_normal``;
    * ``secure_noise_1``: the same with 1 normal per value (no mitigation);
    * ``aes_ctr_keystream``: the raw keystream ``secure_noise`` needs (one 8-byte word
      per normal, 32 bytes per value): the limit of any AES-CTR-based sampler;
    * ``clip_update``: what a client's clipping mod does: the float64 difference of two
      float32 models, its norm, and the scaled float32 result.
``discrete``
    The exact integer samplers distributed DP adds on the clients, on ``--params`` values,
    for each ``--sigmas`` (default 100 and 10,000), against numpy's floating-point
    samplers of the same variance (fast, *not* secure, not exact on the integers):

    * ``numpy_normal``: ``Generator.normal(0, sigma)`` (the baseline of the Gaussian rows);
    * ``discrete_gaussian``: ``sample_discrete_gaussian(sigma^2)``, its table cached;
    * ``numpy_skellam``: ``Generator.poisson(mu) - Generator.poisson(mu)``, ``mu = sigma^2 / 2``
      (the baseline of the Skellam rows);
    * ``skellam``: ``sample_skellam(mu)``, its table cached;
    * ``*_table``: building the table (once per parameter and process; 1 value drawn).
``distributed``
    Distributed DP's integer pipeline on ``--params`` values (padded to a power of two ``D``),
    Skellam noise for a noise multiplier of 1 over ``--client-n`` clients, 32-bit residues:

    * ``secagg_masking``: the baseline, SecAgg+'s masked-input stage of one node in a cohort
      of ``--client-n`` (quantization with stochastic rounding, ``k + 1`` masks), timed by
      ``bench/secagg.py``'s client workload, run here (its whole protocol runs each time;
      only that stage's times are kept);
    * ``distributed_dp``: a client's :func:`~flowerpets.dp._primitives.distributed.encode`:
      clip, rotate, scale, conditional rounding and Skellam noise from the secure source,
      wrap; the target is within 2x of ``secagg_masking``;
    * ``distributed_dp_gaussian``: the same with discrete Gaussian shares (one keystream
      word per value where Skellam's two Poissons read two);
    * ``rotate``, ``conditional_round``, ``skellam_noise``: its three costly steps alone;
    * ``plain_aggregation``: the baseline of the server rows, a plain round's aggregation
      of ``--nodes`` float32 updates (``WeightedSum``, what FedAvg does);
    * ``decode``: the server's centred lift, rescale and unrotation of the residues' sum.

    One client's decoded update is checked against the clipped update: the squared error
    over its expectation ``d v / scale^2`` must be 1 within 6 standard errors.
``accountant``
    Seconds per epsilon query for ``--steps`` Poisson-sampled Gaussian steps
    (q = 0.01, z = 1.1), for each accountant: ``cold`` builds everything from
    nothing for an event never seen before (as the CLI does), ``per_round``
    composes one more step into an accountant that has seen the event before
    and asks again (what ``CentralDp`` pays each round).

Run from the repository root::

    PYTHONPATH=src python bench/dp.py [--parts round noise discrete distributed accountant]
    PYTHONPATH=src python bench/dp.py --json
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from _common import (
    MEMORY_METRIC,
    Case,
    Measurement,
    add_common_arguments,
    finish,
    format_seconds,
    format_table,
    measurement_table,
    positive_int,
    ratio,
    run_cases,
    update_app,
)
from numpy.typing import NDArray
from secagg import make_client_workload

from flowerpets.core import (
    ArrayRecord,
    FedAvg,
    ServerApp,
)
from flowerpets.core.aggregation import WeightedSum
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.dp._primitives import discrete
from flowerpets.dp._primitives.clip import clip_update, update_between
from flowerpets.dp._primitives.distributed import Encoding, conditional_round, decode, encode
from flowerpets.dp._primitives.noise import AesCtrGaussian
from flowerpets.dp._primitives.rotation import RandomizedHadamard
from flowerpets.dp.accountant import PldAccountant, PoissonSampledGaussian, RdpAccountant
from flowerpets.simulation import run_simulation

NAME = "params"
NOISE_MULTIPLIER, CLIP = 1.0, 1.0
ACCOUNTANT_EVENT = PoissonSampledGaussian(1.1, 0.01)
DELTA = 1e-5
PARTS = ("round", "noise", "discrete", "distributed", "accountant")
SKELLAM_ROWS = ("numpy_skellam", "skellam", "poisson_table")  # measured against numpy_skellam
SECURE_NOISE_TARGET = 3.0  # secure noise within this factor of numpy's standard_normal
DISTRIBUTED_TARGET = 2.0  # a distributed-DP client within this factor of SecAgg+'s masking
DISTRIBUTED_SCALE = 2.0**14  # integer steps per model unit: clip * scale = 16,384
DISTRIBUTED_ROWS = (
    "secagg_masking",
    "distributed_dp",
    "distributed_dp_gaussian",
    "rotate",
    "conditional_round",
    "skellam_noise",
)  # measured against secagg_masking
SERVER_ROWS = ("plain_aggregation", "decode")


# -- round ----------------------------------------------------------------------------------------
def make_updates(nodes: int, params: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    # Norms around 0.5 to 2: some updates are clipped, some are not.
    stack = rng.standard_normal((nodes, params), dtype=np.float32)
    stack *= (rng.uniform(0.5, 2.0, size=(nodes, 1)) / np.sqrt(params)).astype(np.float32)
    return stack


def one_round(stack: NDArray[np.float32], dp: CentralDp | None, seed: int) -> NDArray[Any]:
    params = stack.shape[1]
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord.from_numpy({NAME: np.zeros(params, np.float32)}, copy=False),
        mods=[] if dp is None else [dp],
    )
    mods = [] if dp is None else [fixed_clipping_mod]
    # The global model is zero, so the new weights are the update itself.
    app = update_app(stack, [1] * len(stack), name=NAME, mods=mods)
    result = run_simulation(server, app, len(stack), seed=seed)
    record = result.history[0]
    if not record.ok or len(record.participants) != len(stack):
        raise RuntimeError(f"the round did not complete: {record.error}")
    out: NDArray[Any] = result.arrays[NAME].numpy()
    return out


def check_round(stack: NDArray[np.float32], seed: int) -> float:
    """Max |DP model - fixed-denominator formula| with seeded noise (must be float32 rounding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = CentralDp(
            noise_multiplier=NOISE_MULTIPLIER, clipping_norm=CLIP, rng=np.random.default_rng(seed)
        )
    got = one_round(stack, dp, seed).astype(np.float64)
    total = np.zeros(stack.shape[1])
    for row in stack:
        clipped = clip_update({NAME: row.astype(np.float64)}, CLIP, dtypes={NAME: row.dtype})
        total += clipped.arrays[NAME]
    total += np.random.default_rng(seed).normal(0.0, NOISE_MULTIPLIER * CLIP, size=total.shape)
    expected = (total / len(stack)).astype(np.float32).astype(np.float64)
    return float(np.max(np.abs(got - expected)))


def round_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    stack = make_updates(args.nodes, args.params, args.seed)
    cases = [
        Case("plain", lambda: one_round(stack, None, args.seed), "FedAvg, no DP"),
        Case(
            "central_dp",
            lambda: one_round(
                stack, CentralDp(noise_multiplier=NOISE_MULTIPLIER, clipping_norm=CLIP), args.seed
            ),
            "CentralDp + fixed_clipping_mod, secure noise, PLD",
        ),
    ]
    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
    error = check_round(stack, args.seed)
    return {
        "results": results,
        "baseline": "plain",
        "overhead": ratio(results["central_dp"], results["plain"]),
        "max_abs_error": error,
        "exact": error <= 4 * float(np.finfo(np.float32).eps),
    }


# -- noise ----------------------------------------------------------------------------------------
def noise_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    params = args.params
    pcg = np.random.default_rng(args.seed)
    secure4, secure1 = AesCtrGaussian(summands=4), AesCtrGaussian(summands=1)
    stack = make_updates(2, params, args.seed)
    received = ArrayRecord.from_numpy({NAME: stack[0]}, copy=False)
    new = ArrayRecord.from_numpy({NAME: stack[0] + stack[1]}, copy=False)
    dtypes = {NAME: np.dtype(np.float32)}
    cases = [
        Case("numpy_normal", lambda: pcg.standard_normal(params), "PCG64 ziggurat, not secure"),
        Case(
            "secure_noise", lambda: secure4.normal(1.0, (params,)), "AES-CTR ziggurat, 4 summands"
        ),
        Case("secure_noise_1", lambda: secure1.normal(1.0, (params,)), "AES-CTR, 1 summand"),
        Case(
            "aes_ctr_keystream",
            lambda: secure4.keystream(32 * params),
            "the keystream secure_noise needs",
        ),
        Case(
            "clip_update",
            lambda: clip_update(update_between(new, received), 0.5, dtypes=dtypes),
            "a client's clipping of a float32 update",
        ),
    ]
    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
    return {
        "results": results,
        "baseline": "numpy_normal",
        "secure_vs_numpy": ratio(results["secure_noise"], results["numpy_normal"]),
        "secure_vs_numpy_target": SECURE_NOISE_TARGET,
    }


# -- discrete -------------------------------------------------------------------------------------
def _build_table(family: str, parameter: Fraction) -> Any:
    return discrete._table.__wrapped__(family, parameter)  # past the cache, which stays warm


def discrete_cases(
    sigma: int, n: int, pcg: np.random.Generator, source: AesCtrGaussian
) -> list[Case]:
    variance = Fraction(sigma * sigma)
    mu = variance / 2
    return [
        Case("numpy_normal", lambda: pcg.normal(0.0, sigma, n), "float normal, not secure"),
        Case(
            "discrete_gaussian",
            lambda: discrete.sample_discrete_gaussian(variance, n, source=source),
            "exact N_Z(0, sigma^2), AES-CTR",
        ),
        Case(
            "numpy_skellam",
            lambda: pcg.poisson(float(mu), n) - pcg.poisson(float(mu), n),
            "float Poisson difference, not secure",
        ),
        Case(
            "skellam",
            lambda: discrete.sample_skellam(mu, n, source=source),
            "exact Skellam(mu, mu), AES-CTR",
        ),
        Case(
            "gaussian_table",
            lambda: _build_table("gaussian", variance),
            "table build, once per sigma",
        ),
        Case("poisson_table", lambda: _build_table("poisson", mu), "table build, once per mu"),
    ]


def discrete_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    n = args.params
    pcg = np.random.default_rng(args.seed)
    source = AesCtrGaussian()
    rows: dict[int, dict[str, Any]] = {}
    for sigma in args.sigmas:
        variance = Fraction(sigma * sigma)
        mu = variance / 2
        cases = discrete_cases(sigma, n, pcg, source)
        results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
        gaussian = discrete.sample_discrete_gaussian(variance, n, source=source)
        skellam = discrete.sample_skellam(mu, n, source=source)
        rows[sigma] = {
            "results": results,
            "mu": float(mu),
            "gaussian_vs_numpy": ratio(results["discrete_gaussian"], results["numpy_normal"]),
            "skellam_vs_numpy": ratio(results["skellam"], results["numpy_skellam"]),
            # The sampled variance over sigma^2: a sanity check, 1 within a few sqrt(2 / n).
            "gaussian_variance_ratio": float(np.var(gaussian)) / sigma**2,
            "skellam_variance_ratio": float(np.var(skellam)) / sigma**2,
        }
    return {"sigmas": rows}


# -- distributed ----------------------------------------------------------------------------------
def distributed_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    params, clients = args.params, args.client_n
    encoding = Encoding(scale=DISTRIBUTED_SCALE, clip=CLIP, dimension=params)
    rotation = RandomizedHadamard(np.random.default_rng(args.seed).bytes(16), params)
    # Noise multiplier 1 over the rounded sensitivity, shared by the clients (Skellam's mu is
    # half a share's variance).
    variance = encoding.norm_bound**2 / clients
    mu = Fraction(round(variance / 2))
    sigma_squared = Fraction(round(variance))  # the discrete Gaussian option's share
    source = AesCtrGaussian()

    def noise(size: int) -> NDArray[np.int64]:
        return discrete.sample_skellam(mu, size, source=source)

    update = make_updates(1, params, args.seed)[0].astype(np.float64)
    scaled = rotation.rotate(clip_update({NAME: update}, CLIP).arrays[NAME]) * encoding.scale
    stack = make_updates(args.nodes, params, args.seed + 1)
    plain = [ArrayRecord.from_numpy({NAME: row}, copy=False) for row in stack]

    def aggregate() -> ArrayRecord:
        total = WeightedSum()
        for arrays in plain:
            total.add(arrays, 1)
        return total.result()

    def gaussian_noise(size: int) -> NDArray[np.int64]:
        return discrete.sample_discrete_gaussian(sigma_squared, size, source=source)

    def client(shares: Callable[[int], NDArray[np.int64]] = noise) -> NDArray[np.uint32]:
        return encode(update, encoding=encoding, rotation=rotation, noise=shares, source=source)[0]

    residues = client().astype(np.uint64)
    workload = make_client_workload(clients, params, args.seed)
    cases = [
        Case("secagg_node", workload.run, "one SecAgg+ node, every stage (masking kept)"),
        Case("distributed_dp", client, "clip + rotate + round + Skellam + wrap"),
        Case(
            "distributed_dp_gaussian",
            lambda: client(gaussian_noise),
            "the same with discrete Gaussian shares",
        ),
        Case("rotate", lambda: rotation.rotate(update), "randomized Hadamard, padded"),
        Case(
            "conditional_round",
            lambda: conditional_round(
                scaled, norm_bound=encoding.norm_bound, source=source, tries=1
            ),
            "randomized rounding + exact norm check",
        ),
        Case("skellam_noise", lambda: noise(encoding.padded), "exact Skellam, AES-CTR"),
        Case("plain_aggregation", aggregate, f"WeightedSum of {args.nodes} float32 updates"),
        Case(
            "decode",
            lambda: decode(residues, encoding=encoding, rotation=rotation),
            "centred lift + rescale + unrotate",
        ),
    ]
    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
    masking = Measurement(
        "secagg_masking",
        f"SecAgg+ masked-input stage, n = {clients}, k = {workload.k}",
        times=workload.stages["masked-input"][-args.repeats :],
    )
    results = {"secagg_masking": masking, **results}
    decoded = decode(residues, encoding=encoding, rotation=rotation)
    error = float(np.sum((decoded - clip_update({NAME: update}, CLIP).arrays[NAME]) ** 2))
    # The unrotation keeps d of the D coordinates, each of variance v (and the rounding's, at
    # most 1/4); the sum of d squares is within 6 standard errors, sqrt(2 / d) each.
    expected = params * variance / encoding.scale**2
    tolerance = 6 * math.sqrt(2 / params) + 0.25 / variance
    return {
        "results": results,
        "baseline": "secagg_masking",
        "baselines": {name: "plain_aggregation" for name in SERVER_ROWS},
        "clients": clients,
        "k": workload.k,
        "padded": encoding.padded,
        "local_variance": variance,
        "vs_secagg_masking": ratio(results["distributed_dp"], masking),
        "gaussian_vs_secagg_masking": ratio(results["distributed_dp_gaussian"], masking),
        "vs_secagg_masking_target": DISTRIBUTED_TARGET,
        "decode_vs_plain_aggregation": ratio(results["decode"], results["plain_aggregation"]),
        "noise_error_ratio": error / expected,
        "noise_tolerance": tolerance,
        "noise_ok": abs(error / expected - 1) <= tolerance,
    }


# -- accountant -----------------------------------------------------------------------------------
_fresh_events = itertools.count(1)


def cold_query(make: Any, steps: int) -> float:
    # A noise multiplier no accountant has seen (1.1 within 1e-9): nothing is cached, and
    # the per-round cases keep their cached event.
    event = PoissonSampledGaussian(1.1 * (1 + next(_fresh_events) * 1e-12), 0.01)
    value: float = make().compose(event, steps).get_epsilon(DELTA)
    return value


def accountant_part(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    warm = {"pld": PldAccountant(), "rdp": RdpAccountant()}
    for accountant in warm.values():
        accountant.compose(ACCOUNTANT_EVENT, args.steps).get_epsilon(DELTA)

    def per_round(name: str) -> float:
        value: float = warm[name].compose(ACCOUNTANT_EVENT).get_epsilon(DELTA)
        return value

    cases = [
        Case("pld_cold", lambda: cold_query(PldAccountant, args.steps), "fresh PLD"),
        Case("rdp_cold", lambda: cold_query(RdpAccountant, args.steps), "fresh RDP"),
        Case("pld_per_round", lambda: per_round("pld"), "one more step, PLD"),
        Case("rdp_per_round", lambda: per_round("rdp"), "one more step, RDP"),
    ]
    results = run_cases(cases, args.repeats, memory=False, settle=args.settle, progress=progress)
    epsilons = {
        "pld": PldAccountant().compose(ACCOUNTANT_EVENT, args.steps).get_epsilon(DELTA),
        "rdp": RdpAccountant().compose(ACCOUNTANT_EVENT, args.steps).get_epsilon(DELTA),
    }
    return {"results": results, "baseline": "rdp_cold", "epsilon": epsilons}


RUNNERS = {
    "round": round_part,
    "noise": noise_part,
    "discrete": discrete_part,
    "distributed": distributed_part,
    "accountant": accountant_part,
}


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--nodes", type=positive_int, default=10, help="nodes in a round")
    parser.add_argument(
        "--params", type=positive_int, default=1_000_000, help="float32 parameters per update"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=1000, help="steps the accountants compose"
    )
    parser.add_argument(
        "--sigmas",
        type=positive_int,
        nargs="+",
        default=[100, 10_000],
        help="noise standard deviations of the discrete part",
    )
    parser.add_argument(
        "--client-n", type=positive_int, default=100, help="SecAgg+ cohort of the distributed part"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser, repeats=5)
    return parser.parse_args(argv)


def _public_discrete(part: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for sigma, row in part["sigmas"].items():
        results: dict[str, Measurement] = row["results"]
        entry = {k: v for k, v in row.items() if k != "results"}
        entry["results"] = {
            name: m.to_json(results["numpy_skellam" if name in SKELLAM_ROWS else "numpy_normal"])
            for name, m in results.items()
        }
        out[str(sigma)] = entry
    return {"sigmas": out}


def _public(part: dict[str, Any]) -> dict[str, Any]:
    if "sigmas" in part:
        return _public_discrete(part)
    results: dict[str, Measurement] = part["results"]
    baselines: dict[str, str] = part.get("baselines", {})  # rows with a baseline of their own
    out = {k: v for k, v in part.items() if k != "results"}
    out["results"] = {
        name: m.to_json(results[baselines.get(name, part["baseline"])])
        for name, m in results.items()
    }
    return out


def report(args: argparse.Namespace, parts: dict[str, Any]) -> str:
    lines = [
        f"dp: {args.params:,} float32 params, {args.nodes} nodes, medians of {args.repeats} run(s)"
    ]
    if "round" in parts:
        part = parts["round"]
        lines += [
            "",
            "one round (run_simulation), central DP against plain FedAvg:",
            measurement_table(part["results"].values(), baseline="plain"),
            f"model vs the fixed-denominator formula: max |error| {part['max_abs_error']:.1e} "
            f"({'exact to float32' if part['exact'] else 'MISMATCH'})",
        ]
    if "noise" in parts:
        part = parts["noise"]
        lines += [
            "",
            f"noise and clipping of {args.params:,} values, against numpy's (insecure) normal:",
            measurement_table(part["results"].values(), baseline="numpy_normal"),
            f"secure noise (4 summands) / numpy standard_normal: {part['secure_vs_numpy']:.2f}x "
            f"(target: within {SECURE_NOISE_TARGET:g}x)",
        ]
    if "discrete" in parts:
        for sigma, row in parts["discrete"]["sigmas"].items():
            results = row["results"]
            gaussian = [results[k] for k in ("numpy_normal", "discrete_gaussian", "gaussian_table")]
            skellam = [results[k] for k in SKELLAM_ROWS]
            lines += [
                "",
                f"exact discrete noise, {args.params:,} values, sigma {sigma:,} "
                f"(Skellam mu {row['mu']:,.0f}), against numpy's floating-point samplers:",
                measurement_table(gaussian, baseline="numpy_normal"),
                measurement_table(skellam, baseline="numpy_skellam"),
                f"discrete Gaussian / numpy normal: {row['gaussian_vs_numpy']:.2f}x; "
                f"Skellam / numpy Poisson difference: {row['skellam_vs_numpy']:.2f}x; "
                f"sampled variance / sigma^2: {row['gaussian_variance_ratio']:.4f} and "
                f"{row['skellam_variance_ratio']:.4f}",
            ]
    if "distributed" in parts:
        part = parts["distributed"]
        results = part["results"]
        lines += [
            "",
            f"distributed DP, {args.params:,} values (D = {part['padded']:,}), Skellam shares for "
            f"{part['clients']} clients, against one SecAgg+ node's masking (k = {part['k']}):",
            measurement_table([results[k] for k in DISTRIBUTED_ROWS], baseline="secagg_masking"),
            measurement_table([results[k] for k in SERVER_ROWS], baseline="plain_aggregation"),
            f"distributed-DP client / SecAgg+ masking: {part['vs_secagg_masking']:.2f}x Skellam, "
            f"{part['gaussian_vs_secagg_masking']:.2f}x discrete Gaussian "
            f"(target: within {DISTRIBUTED_TARGET:g}x); decode / plain aggregation: "
            f"{part['decode_vs_plain_aggregation']:.2f}x; decoded noise / expected: "
            f"{part['noise_error_ratio']:.4f}",
        ]
    if "accountant" in parts:
        part = parts["accountant"]
        rows = [(m.name, format_seconds(m.median), m.note) for m in part["results"].values()]
        lines += [
            "",
            f"accountant, seconds per epsilon query ({args.steps} steps, q=0.01, z=1.1; "
            f"epsilon pld {part['epsilon']['pld']:.4f}, rdp {part['epsilon']['rdp']:.4f}):",
            format_table(("query", "median s", "what"), rows),
        ]
    lines += ["", f"peak MB = {MEMORY_METRIC}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = None if args.quiet else sys.stderr
    parts = {name: RUNNERS[name](args, progress) for name in args.parts}
    failed = []
    if "round" in parts and not parts["round"]["exact"]:
        failed.append("the DP round does not match the fixed-denominator formula")
    if "distributed" in parts and not parts["distributed"]["noise_ok"]:
        failed.append("the decoded distributed-DP update's noise is not the calibrated one")
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
        "memory_metric": MEMORY_METRIC,
        **{name: _public(part) for name, part in parts.items()},
        "ok": not failed,
        "failed": failed,
    }
    return finish(args, "dp", payload, lambda: report(args, parts), failed)


if __name__ == "__main__":
    sys.exit(main())

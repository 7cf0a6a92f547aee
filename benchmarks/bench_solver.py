"""CPU timing of the plan search (loss table + MILPs) on Llama-3-8B- and 70B-sized problems.

Influence is random but structured like real profiles: mass decaying with the query-key distance
(a per-head decay length), a sink column, and a few "retrieval" heads with mass far from the diagonal.

    .venv/bin/python benchmarks/bench_solver.py --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import time

import numpy as np
import scipy

from moa_hub.influence import InfluenceProfile
from moa_hub.optimize import (
    OptimizeConfig,
    build_loss_table,
    check_feasible,
    plan_from_choice,
    solve_weighted,
    weight_vectors,
)
from moa_hub.pareto import pareto_filter

SIZES = {"llama-3-8b": (32, 8), "llama-3-70b": (80, 8)}


def structured_influence(layers: int, groups: int, length: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """[L, G, nb, nb] float32: decaying with distance, a sink column, some far-mass retrieval heads."""
    nb = math.ceil(length / block)
    bi, bj = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    dist = (bi - bj).astype(np.float64) * block  # tokens
    causal = bj <= bi
    decay = rng.lognormal(mean=np.log(256), sigma=1.2, size=(layers, groups, 1, 1))  # per-head reach
    out = np.exp(-np.maximum(dist, 0) / decay) * rng.lognormal(0, 0.5, size=(layers, groups, nb, nb))
    out[..., 0] += rng.uniform(0.5, 3.0, size=(layers, groups, nb))  # sink keys
    retrieval = rng.random((layers, groups)) < 0.1
    far = rng.uniform(0.01, 0.05) * rng.random((layers, groups, nb, nb)) * (dist > 1024)
    out += retrieval[..., None, None] * far * 20
    out += rng.normal(0, 0.01, size=out.shape)  # first-order estimates can be negative
    return (out * causal).astype(np.float32)


def run(name: str, lengths: list[int], extend: int, block: int, density: float, repeats: int, gap: float) -> dict:
    layers, groups = SIZES[name]
    rng = np.random.default_rng(0)
    profiles = {n: InfluenceProfile(n, block, structured_influence(layers, groups, n, block, rng)) for n in lengths}
    config = OptimizeConfig(density=density, extend_length=extend, mip_rel_gap=gap)
    table_times, solve_times, front_times, fronts = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        table = build_loss_table(profiles, config)
        check_feasible(table, config.density)
        table_times.append(time.perf_counter() - start)
        plans = []
        for weights in weight_vectors(lengths, config.weight_steps):
            t0 = time.perf_counter()
            choice = solve_weighted(table, weights, config)
            solve_times.append(time.perf_counter() - t0)
            plans.append(plan_from_choice(table, choice, weights))
        front = pareto_filter(plans)
        front_times.append(time.perf_counter() - start)
        fronts.append(len(front))
        assert all(d <= density + 1e-12 for p in front for d in p.density.values())
    return {
        "problem": f"{name} ({layers}x{groups})",
        "rules": len(table.rules),
        "weights": len(weight_vectors(lengths, config.weight_steps)),
        "front": fronts[-1],
        "table_s": statistics.median(table_times),
        "solve_s": statistics.median(solve_times),
        "solve_max_s": max(solve_times),
        "total_s": statistics.median(front_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--extend", type=int, default=12288)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gap", type=float, default=OptimizeConfig.mip_rel_gap)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"python {platform.python_version()}, scipy {scipy.__version__}, numpy {np.__version__}")
    print("| problem | rules | weight vectors | front | loss table s | one MILP s (median / max) | full front s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.sizes:
        r = run(name, args.lengths, args.extend, args.block, args.density, args.repeats, args.gap)
        print(
            f"| {r['problem']} | {r['rules']} | {r['weights']} | {r['front']} | {r['table_s']:.2f} | "
            f"{r['solve_s']:.2f} / {r['solve_max_s']:.2f} | {r['total_s']:.2f} |"
        )


if __name__ == "__main__":
    main()

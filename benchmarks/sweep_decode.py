"""Targeted decode-config sweep at the weak points of the kernel table (CUDA-graph replays, bench_attention's timer).

    PYTHONPATH=. python benchmarks/sweep_decode.py 280     # seconds of budget; writes $OUT/sweep_decode.json
    PYTHONPATH=. python benchmarks/sweep_decode.py 120 8192x16@0.25,32768x1@0.5    # only these points
    PYTHONPATH=. python benchmarks/sweep_decode.py 200 9216x183@0.5,4608x371@0.5 e2e  # split caps too
    PYTHONPATH=. python benchmarks/sweep_decode.py 200 32768x1@0.5,8192x16@0.25 small  # long splits, wide merges
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 32768x1@0.5 granule step  # split lengths in whole tiles;
                                                       # the best 3 and the current config re-timed in step too
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 8192x16@0.25 balanced step  # the balanced kernel's knobs
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 8192x16@0.25 segcost step  # tiles charged per segment
    PYTHONPATH=. python benchmarks/sweep_decode.py 400 8192x16@0.5,8192x16@0.25 retune step  # the 2-warp entry
    PYTHONPATH=. python benchmarks/sweep_decode.py 500 4608x371@0.5,8192x64@0.25 retune4 step  # the 4-warp entry
    PYTHONPATH=. python benchmarks/sweep_decode.py 500 8192x16@0.25,8192x16@0.5 fine step  # 16/32-slot tiles
    PYTHONPATH=. python benchmarks/sweep_decode.py 500 8192x16@0.25,8192x16@0.5 whole step  # long fixed splits
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 8192x16@0.25,8192x16@0.5 onesm step  # 1-2 programs per SM
    PYTHONPATH=. python benchmarks/sweep_decode.py --head-dim 64 500 9216x816@0.5,8192x64@0.5 d64 step  # d=64
        (Llama-3.2-1B's heads: 32 q heads, 8 kv heads, d=64; d64small: the split kernel at one or two rows)
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 4608x371@0.5,9216x183@0.5 wide2w step  # d=128, e2e batches
    PYTHONPATH=. python benchmarks/sweep_decode.py --heads 28,4 300 9216x424@0.5 d64 step  # Qwen2.5-7B's heads
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 4608x384@0.25 splitbig step  # short splits, many pairs
    PYTHONPATH=. python benchmarks/sweep_decode.py 300 8192x16@0.5,32768x1@0.5 swap step  # each point's config with
                                                       # the slots as the dots' M (swap_ab)
    PYTHONPATH=. python benchmarks/sweep_decode.py --head-dim 64 200 9216x816@0.5 rows step  # each point's config
                                                       # with the other merge (row_merge toggled)

Each point is timed with the config the head size's table (DECODE_CONFIGS, or DECODE_CONFIGS_D64 at d <= 64) gives
it now ("current") and with every candidate installed in the entry that serves it; the table itself is left
unchanged (paste winners by hand).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention as ba  # noqa: E402

POINTS = [(8192, 1, 0.5), (32768, 1, 0.5), (131072, 1, 0.5), (8192, 16, 0.5), (8192, 16, 0.25), (32768, 16, 0.25),
          (8192, 64, 0.25), (32768, 16, 0.5), (131072, 64, 0.5)]  # fmt: skip
# (BLOCK_N, num_warps, num_stages, programs_per_sm, fused_merge, merge_splits)
CANDIDATES = [(*c, True, 16) for c in itertools.product((32, 64), (2, 4), (2, 3, 4), (2, 4, 8, 16, 32))]
CANDIDATES += [(128, 8, 3, 8, True, 16), (64, 8, 4, 8, True, 16)]
# few rows (batch 1, 8k x 16): fewer, longer splits than the main set (a shorter serial merge), wider merge steps
SMALL_CANDIDATES = [
    (*c, True, s) for c in itertools.product((32, 64), (2, 4, 8), (3,), (0.5, 1, 2, 4)) for s in (16, 32)
]
# one or two rows: split lengths a multiple of the tile (not a power of two), so programs_per_sm is met closely
GRANULE_CANDIDATES = [
    {"BLOCK_N": 64, "num_warps": w, "num_stages": st, "programs_per_sm": p, "fused_merge": True, "merge_splits": m,
     "split_granule": 64}
    for w, st, p, m in itertools.product((2, 4), (3, 4), (0.5, 0.75, 1, 1.5, 2, 3), (16, 32))
    if m == 16 or p >= 1.5
]  # fmt: skip
# the balanced kernel (16+ rows): narrower tiles, fewer warps, more programs per SM (more loads in flight per SM)
BALANCED_CANDIDATES = [
    ("balanced", bn, w, st, p) for bn, w, st, p in itertools.product((32, 64), (1, 2, 4), (2, 3), (3, 4, 5, 6))
]
# the balanced kernel's two table configs, charging each (row, head) a program starts 0-8 tiles
SEGCOST_CANDIDATES = [
    {"balanced": True, "BLOCK_N": 64, "num_warps": w, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c}
    for (w, st, p), costs in (((2, 2, 4), (0, 1, 2, 3)), ((4, 3, 2), (0, 2, 3, 4, 6, 8)))
    for c in costs
]  # fmt: skip
# the 2-warp balanced entry again, tiles, stages, programs per SM and segment cost together (8k x 16)
RETUNE_CANDIDATES = [
    {"balanced": True, "BLOCK_N": bn, "num_warps": 2, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c * 64 // bn}
    for bn, st, p, c in itertools.product((32, 64), (2, 3), (3, 4), (1, 2, 3, 4))
]  # fmt: skip
# the 4-warp balanced entry (8k x 64 and up, the e2e batches) the same way
RETUNE4_CANDIDATES = [
    {"balanced": True, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c // bn}
    for bn, w, st, p, c in itertools.product((32, 64), (2, 4), (3, 4), (2, 3), (128, 192))
]  # fmt: skip
# finer still for the 2-warp entry: tiles of 16 / 32 slots, deeper pipelines, more programs per SM
FINE_CANDIDATES = [
    {"balanced": True, "BLOCK_N": bn, "num_warps": 2, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c // bn}
    for bn, st, p, c in itertools.product((16, 32), (3, 4, 5), (4, 5, 6), (64, 128, 192))
]  # fmt: skip
# the balanced kernel with one or two programs per SM, more warps and deeper pipelines (never swept at 8k x 16)
ONESM_CANDIDATES = [
    {"balanced": True, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": 128 // bn}
    for bn, w, st, p in itertools.product((32, 64), (4, 8), (4, 6), (1, 2))
    if bn * st * 512 * p <= 200 * 1024  # K and V tiles of d=128 bf16 in flight per SM
]  # fmt: skip
# the split kernel with long fixed splits (a whole short head per program, no merge for it) and deep pipelines
WHOLE_CANDIDATES = [
    {"BLOCK_N": bn, "num_warps": w, "num_stages": st, "split_len": sl, "fused_merge": True, "merge_splits": 16}
    for sl, w, st, bn in itertools.product((1024, 1536, 2048, 3072, 4096), (4, 8), (3, 4, 5), (64, 128))
]  # fmt: skip
# the 2-warp entry's config before 2026-11-25 05:1x UTC (64-slot tiles), against the table's at any shape of the
# entry (the check that adopted the 32-slot tiles ran the winner against it the other way round)
PREV2W_CANDIDATES = [{"balanced": True, "BLOCK_N": 64, "num_warps": 2, "num_stages": 2, "programs_per_sm": 4,
                      "merge_splits": 16, "segment_cost": 2}]  # fmt: skip
# head_dim 64 (Llama-3.2-1B): half the bytes per slot, so tiles of up to 128 slots; the split config of run 14
# (before the balanced kernel) for reference
D64_CANDIDATES = [
    {"balanced": True, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c // bn}
    for bn, w, st, p, c in itertools.product((64, 128), (2, 4), (3, 4), (2, 4), (128, 256))
]  # fmt: skip
D64_CANDIDATES += [
    {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 16, "fused_merge": True, "merge_splits": 16}
]
# d=128 at the e2e batches: the d=64 winner's shape (2 warps, 4+ programs per SM) with 64-slot tiles
WIDE2W_CANDIDATES = [
    {"balanced": True, "BLOCK_N": 64, "num_warps": 2, "num_stages": st, "programs_per_sm": p, "merge_splits": 16,
     "segment_cost": c}
    for st, p, c in itertools.product((2, 3, 4), (3, 4, 5), (2, 4))
]  # fmt: skip
# many (row, kv head) pairs at low density: the split kernel with short splits against the balanced table entry
SPLITBIG_CANDIDATES = [
    {"BLOCK_N": 64, "num_warps": w, "num_stages": 3, "programs_per_sm": p, "fused_merge": True, "merge_splits": 16}
    for w, p in ((2, 8), (2, 16), (2, 32), (4, 8), (4, 16))
]
# head_dim 64 at one or two rows: the split kernel with 64- or 128-slot tiles and few, long splits
D64_SMALL_CANDIDATES = [
    {"BLOCK_N": bn, "num_warps": w, "num_stages": 3, "programs_per_sm": p, "fused_merge": True, "merge_splits": 16}
    for bn, w, p in itertools.product((64, 128), (2, 4), (0.5, 1, 2))
]


def swap_candidates(current: dict) -> list[dict]:
    """The point's table config with the slots as the dots' M (``swap_ab``), and with 4 warps and 64-slot tiles
    where it has fewer (a warpgroup: Hopper's wgmma)."""
    out = [dict(current, swap_ab=True)]
    if current["num_warps"] < 4 or current["BLOCK_N"] < 64:
        wide = dict(current, swap_ab=True, num_warps=4, BLOCK_N=max(64, current["BLOCK_N"]))
        if "segment_cost" in current:
            wide["segment_cost"] = max(1, current["segment_cost"] * current["BLOCK_N"] // wide["BLOCK_N"])
        out.append(wide)
    return out


# memory-filling batches (bench_e2e: rows x slots ~ 4M-16M): the split cap matters there too
E2E_CANDIDATES = [(*c, True, 16, cap) for c in itertools.product((32, 64), (2, 4), (3, 4), (4, 8, 16))
                  for cap in (4096, 8192, 16384)]  # fmt: skip


def step_times(cfg, n: int, bsz: int, alpha, beta, slots: int, timings: dict) -> dict:
    """ms per layer in step (bench_attention's in-step timer) of the current config and the 3 fastest per call."""
    entry = ba.decode_entry(cfg, bsz, slots)
    table = ba.decode.decode_table(cfg.head_dim)
    original = table[entry]
    read = ba.decode_bytes(bsz, slots, cfg.head_dim)
    result = {"current": ba.time_moa_decode_in_step(bsz, n, alpha, beta, cfg, read)[0]}
    try:
        for name in sorted((k for k in timings if k != "current"), key=timings.get)[:3]:
            table[entry] = ba.decode.with_config(original, json.loads(name))
            result[name] = ba.time_moa_decode_in_step(bsz, n, alpha, beta, cfg, read)[0]
    finally:
        table[entry] = original
    ba.log(f"{n}x{bsz} in step: " + json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


def main() -> None:
    cfg = ba.BenchConfig()
    if "--head-dim" in sys.argv:  # another head size (the table is keyed by it); the rest of argv as below
        at = sys.argv.index("--head-dim")
        cfg.head_dim = int(sys.argv[at + 1])
        del sys.argv[at : at + 2]
    if "--heads" in sys.argv:  # "q,kv" heads: another GQA group (Qwen2.5-7B: 28,4, groups of 7)
        at = sys.argv.index("--heads")
        cfg.hq, cfg.hkv = (int(x) for x in sys.argv[at + 1].split(","))
        del sys.argv[at : at + 2]
    points, candidates = POINTS, CANDIDATES
    if not ba.CUDA:  # CPU smoke test under TRITON_INTERPRET=1
        ba.patch_interpreter()
        cfg.hq, cfg.hkv, cfg.head_dim, cfg.sink, cfg.min_span = 8, 4, 16, 4, 8
        points, candidates = [(96, 2, 0.5)], [(16, 1, 1, 8, True, 8), (16, 1, 1, 4, True, 16)]
    deadline = time.time() + (float(sys.argv[1]) if len(sys.argv) > 1 else 240)
    if len(sys.argv) > 3:
        candidates = {"e2e": E2E_CANDIDATES, "small": SMALL_CANDIDATES, "granule": GRANULE_CANDIDATES,
                      "balanced": BALANCED_CANDIDATES, "segcost": SEGCOST_CANDIDATES,
                      "retune": RETUNE_CANDIDATES, "prev2w": PREV2W_CANDIDATES,
                      "retune4": RETUNE4_CANDIDATES, "fine": FINE_CANDIDATES,
                      "whole": WHOLE_CANDIDATES, "d64": D64_CANDIDATES, "d64small": D64_SMALL_CANDIDATES,
                      "wide2w": WIDE2W_CANDIDATES, "onesm": ONESM_CANDIDATES, "splitbig": SPLITBIG_CANDIDATES, "swap": "swap",
                      "rows": "rows"}[sys.argv[3]]  # fmt: skip
    in_step = len(sys.argv) > 4 and sys.argv[4] == "step"
    if len(sys.argv) > 2 and ba.CUDA:  # "NxB@density,...": only these points
        points = [(int(p.split("x")[0]), int(p.split("x")[1].split("@")[0]), float(p.split("@")[1]))
                  for p in sys.argv[2].split(",")]  # fmt: skip
    results = {}
    for n, bsz, density in points:
        alpha, beta = ba.make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
        current, slots = ba.time_moa_decode(bsz, n, alpha, beta, cfg)
        point_candidates = candidates
        if candidates == "swap":  # per point: its own config with swap_ab
            point_candidates = swap_candidates(ba.decode.decode_config(bsz, slots, cfg.head_dim, cfg.hkv))
        elif candidates == "rows":  # per point: its own config with the other merge
            own = ba.decode.decode_config(bsz, slots, cfg.head_dim, cfg.hkv)
            point_candidates = [dict(own, row_merge=not own.get("row_merge", False))]
        timings = ba.time_decode_candidates(
            cfg, n, bsz, density, point_candidates, ba.decode_entry(cfg, bsz, slots), deadline
        )  # fmt: skip
        timings["current"] = current
        best = min(timings, key=timings.get)
        results[f"{n}x{bsz}@{density}"] = dict(
            current=current, best=best, best_ms=timings[best], n_tried=len(timings),
            bytes=ba.decode_bytes(bsz, slots, cfg.head_dim), top5=sorted(timings.items(), key=lambda kv: kv[1])[:5], all=timings,
        )  # fmt: skip
        ba.log(f"{n}x{bsz}@{density}: current {current:.4f} ms, best {timings[best]:.4f} ms {best}")
        if in_step:  # the best 3 and the current config, per layer inside one captured step
            results[f"{n}x{bsz}@{density}"]["in_step"] = step_times(cfg, n, bsz, alpha, beta, slots, timings)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / "sweep_decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

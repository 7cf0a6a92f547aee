"""Decode launch configs on caches as the decode loop meets them: sized for context + new, read at the midpoint
(roomy rings), at bench_e2e's batch shapes, plus full caches of the kernel table.

    PYTHONPATH=. python benchmarks/sweep_decode_roomy.py    # writes $OUT/e2e_like.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention as ba  # noqa: E402

dec, spans = ba.decode, ba.spans
cfg = ba.BenchConfig()
OUT = os.environ.get("OUT", "/tmp")


def roomy_cache(bsz, n_fill, n_max, alpha, beta, sink, min_span, d):
    caps = [max(sink + 1, int(s)) for s in spans.span_at(n_max, alpha, beta, sink, min_span).tolist()]
    offsets = [sum(caps[:g]) for g in range(len(caps))]
    total = sum(caps)
    keys = torch.randn(bsz, total + 1, d, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    slot_pos = torch.full((bsz, total + 1), -1, dtype=torch.int32, device="cuda")
    for off, cap in zip(offsets, caps, strict=False):
        ring = cap - sink
        recent = torch.arange(max(sink, n_fill - ring), n_fill, device="cuda")
        slot_pos[:, off : off + sink] = torch.arange(sink, device="cuda", dtype=torch.int32)
        slot_pos[:, off + sink + (recent - sink) % ring] = recent.to(torch.int32)

    def dev(xs):
        return torch.tensor(xs, dtype=torch.int32, device="cuda")

    return keys, values, slot_pos, dev(offsets), dev(caps)


def split_config(bn, w, s, p, cap=4096):
    return dict(
        BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=p, fused_merge=True, merge_splits=16, split_cap=cap
    )


def balanced_config(bn, w, s, p):
    return dict(balanced=True, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=p, merge_splits=16)


CANDS = {
    "split e3 (run14)": split_config(64, 2, 3, 16),
    "split e4": split_config(64, 4, 4, 8),
    "split 64/2/3/4": split_config(64, 2, 3, 4),
    "bal 4/3/2": balanced_config(64, 4, 3, 2),
    "bal 2/2/4": balanced_config(64, 2, 2, 4),
    "bal 2/2/8": balanced_config(64, 2, 2, 8),
    "bal 2/2/16": balanced_config(64, 2, 2, 16),
    "bal 4/3/8": balanced_config(64, 4, 3, 8),
    "bal 4/3/4": balanced_config(64, 4, 3, 4),
    "bal 2/3/8": balanced_config(64, 2, 3, 8),
    "bal 2/2/32": balanced_config(64, 2, 2, 32),
}
# (fill, max, rows, density of the plan made at max)
POINTS = [
    (4608, 5120, 372, 0.5),
    (9216, 10240, 183, 0.5),
    (4608, 5120, 384, 0.25),
    (9216, 10240, 367, 0.25),
    (18432, 20480, 88, 0.5),
    (8192, 8192, 64, 0.25),
    (8192, 8192, 16, 0.5),
    (8192, 8192, 16, 0.25),
    (32768, 32768, 64, 0.25),
    (131072, 131072, 16, 0.25),
    (36864, 36864, 47, 0.5),
]


def main() -> None:
    res = {}
    for fill, nmax, bsz, density in POINTS:
        alpha, beta = ba.make_plan(nmax, density, cfg.sink, cfg.min_span, cfg.hkv)
        cache = roomy_cache(bsz, fill, nmax, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim)
        query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        q_pos = torch.full((bsz,), fill - 1, device="cuda", dtype=torch.int64)
        a, b = alpha.cuda(), beta.cuda()
        ref = None
        row = {}
        for name, c in CANDS.items():

            def fn(query=query, cache=cache, q_pos=q_pos, a=a, b=b, c=c):
                return dec._launch_decode(
                    query, cache, q_pos, a, b, cfg.head_dim**-0.5, cfg.sink, cfg.min_span, config=c
                )

            out = fn()
            if ref is None:  # float64 reference of the first 4 rows
                k4, v4, pos4 = (t[:4] for t in cache[:3])
                ref = dec.moa_decode_ref(query[:4].double(), k4.double(), v4.double(), pos4, *cache[3:], q_pos[:4], a, b,
                                         cfg.sink, cfg.min_span)  # fmt: skip
            assert ba.rel(out[:4], ref) < 1e-2, name
            row[name] = ba.bench(ba.graphed(fn), rep_ms=80)
        key = f"{fill}/{nmax}x{bsz}@{density}"
        res[key] = row
        best = min(row, key=row.get)
        print(key, " ".join(f"{k}={v:.4f}" for k, v in row.items()), "| best", best, flush=True)
        del cache
        torch.cuda.empty_cache()
    json.dump(res, open(f"{OUT}/e2e_like.json", "w"), indent=1)
    names = list(CANDS)
    print("| point | " + " | ".join(names) + " |")
    for k, r in res.items():
        base = r["split e3 (run14)"]
        print(f"| {k} | " + " | ".join(f"{r[n] / base:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()

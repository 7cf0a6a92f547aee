"""Where the time of one MoA decode step goes: per-kernel GPU time of a whole-model step (torch.profiler).

    PYTHONPATH=. python benchmarks/profile_step.py --cases 4096+1024:371,16384+4096:88 --out $OUT

For each case (context+new:batch) the Llama-3-8B-shaped model (``--model llama-3.2-1b``: the 1B shape) (random bf16 weights, bench_e2e.build) with the 50%
plan decodes through ``MoaDecodeLoop`` at the midpoint context, as in bench_e2e. Printed: the step time of CUDA-graph
replays, the sum of kernel times per step, and kernel time per step grouped by kind and by kernel name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_e2e as e2e  # noqa: E402
from moa_hub.apply import moa_twin, set_plan  # noqa: E402

KINDS = [  # first match wins
    ("attention (MoA decode)", r"_moa_decode"),
    ("cache write", r"scatter|_moa_cache"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|sm90|cublas|matmul"),
    ("reduce / argmax", r"reduce|argmax|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill|index|cat|where"),
]

DEVICE_TYPE = torch.autograd.DeviceType.CUDA if e2e.CUDA else torch.autograd.DeviceType.CPU  # CPU: smoke test


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pat in KINDS if re.search(pat, low)), "other")


def kernel_table(prof, steps: int) -> tuple[dict, list]:
    by_name: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == DEVICE_TYPE:
            entry = by_name.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.device_time_total if e2e.CUDA else evt.cpu_time_total  # us
            entry[1] += 1
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    kinds: dict[str, float] = {}
    for name, (us, _) in names:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us / steps
    rows = [dict(name=name[:90], us_per_step=round(us / steps, 1), calls_per_step=cnt / steps, kind=kind_of(name))
            for name, (us, cnt) in names]  # fmt: skip
    return {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}, rows


def midpoint_loop(dense, moa, context: int, new: int, bsz: int, max_steps: int):
    """The MoA 50% plan of context + new on ``moa``, a prompt of the midpoint length prefilled once and its cache
    copied to ``bsz`` rows, and a ``MoaDecodeLoop`` over it, warmed up (3 steps: eager, capture, replay)."""
    total, mid = context + new, context + new // 2
    set_plan(moa, e2e.plans(dense, total)["moa-50"])
    prompt = torch.randint(3, dense.config.vocab_size, (1, mid), device=e2e.DEV)
    cache1, first = e2e.moa_prefill(moa, prompt, total)
    cache = e2e.expand_rows(e2e.to_host(cache1), bsz)
    loop = e2e.code_of(moa, "moa_generate").MoaDecodeLoop(moa, cache, max_steps=3 + max_steps)
    loop.prime(first.expand(bsz), cache.layers[0].next_pos)
    loop.run(3)
    return loop


def run_case(dense, moa, context: int, new: int, bsz: int, steps: int, fused: str) -> dict:
    os.environ["MOA_FUSED"] = fused  # read when a step is traced (eager warm-up and capture)
    loop = midpoint_loop(dense, moa, context, new, bsz, 5 * steps)
    times = [t * 1e3 for t in e2e.time_steps(lambda: None, loop.run, steps, 3)[0]]
    out = dict(context=context, new=new, batch=bsz, fused=fused, step_ms_graph=round(statistics.median(times), 3))
    for label, fn in (("graph", lambda: loop.run(steps)), ("eager", None)):
        with profile(activities=[ProfilerActivity.CUDA if e2e.CUDA else ProfilerActivity.CPU]) as prof:
            if fn is not None:
                fn()
            else:
                with torch.inference_mode():
                    for _ in range(steps):
                        loop._step()
            e2e.sync()
        kinds, rows = kernel_table(prof, steps)
        out[f"{label}_kernel_ms_per_step"] = round(sum(kinds.values()) / 1e3, 3)
        out[f"{label}_kinds_us"] = kinds
        out[f"{label}_top"] = rows[:25]
        out[f"{label}_kernels_per_step"] = sum(r["calls_per_step"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="4096+1024:371,16384+4096:88")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fused", default="1", help="MOA_FUSED values to profile, e.g. 1,0 (fused kernels on / off)")
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(e2e.SHAPES))
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dense = e2e.build(args.model if e2e.CUDA else "tiny")
    moa = moa_twin(dense, e2e.plans(dense, 4096)["moa-50"])
    results = []
    for case, fused in ((c, f) for c in args.cases.split(",") for f in args.fused.split(",")):
        ctx_new, bsz = case.split(":")
        context, new = (int(x) for x in ctx_new.split("+"))
        e2e.cleanup()
        try:
            res = run_case(dense, moa, context, new, int(bsz), args.steps, fused)
        except torch.OutOfMemoryError as err:
            res = dict(case=case, error=str(err)[:200])
        results.append(res)
        e2e.log(json.dumps({k: v for k, v in res.items() if not k.endswith("_top")}))
        for label in ("graph", "eager"):
            for row in res.get(f"{label}_top", [])[:18]:
                e2e.log(
                    f"  {label} {row['us_per_step']:>9} us {row['calls_per_step']:>6} x  {row['kind']:<24} {row['name']}"
                )
        (args.out / "profile_step.json").write_text(json.dumps(results, indent=1))
        e2e.cleanup()


if __name__ == "__main__":
    main()

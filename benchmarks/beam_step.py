"""Where a beam-search step of the MoA model's ``generate()`` goes: the cache reorder and the rest.

    PYTHONPATH=. python benchmarks/beam_step.py --context 32768 --beams 4 --out $OUT

Llama-3-8B shape, random bf16 weights, the mixed 50% plan (bench_e2e). A static MoaCache of ``beams`` rows is
prefilled, then:
- the reorder of the whole cache (``MoaCache.reorder_cache``, in place, as beam search calls it every step) is timed
  with CUDA events, next to a plain copy of the same bytes and other ways to move the rows;
- one ``generate(num_beams=beams)`` runs under torch.profiler: GPU time per step by kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_e2e as e2e  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

MoaCache = remote_module("moa_cache").MoaCache
move_rows = remote_module("moa_cache").move_rows
cache_argument = remote_module("moa_model").cache_argument


def timed(fn, repeats: int = 10) -> float:
    """Median ms of fn() by CUDA events, after one untimed call (on the CPU, smoke runs: the wall clock)."""
    fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dense = e2e.build("llama-3-8b")
    moa = moa_twin(dense, e2e.plans(dense, args.context + 2 * args.new)["moa-50"])
    moa.generation_config.pad_token_id = 0
    ids = torch.randint(3, 1000, (1, args.context), generator=torch.Generator().manual_seed(0)).to(e2e.DEV)
    rows = ids.expand(args.beams, -1)
    cache = MoaCache(moa.config, max_cache_len=args.context + 2 * args.new)
    with torch.inference_mode():
        moa(rows, use_cache=True, logits_to_keep=1, **{cache_argument(type(moa).forward): cache})
    all_tensors = cache.row_tensors()
    nbytes = sum(t.numel() * t.element_size() for t in all_tensors)
    orders = {  # typical beam steps: copy one beam over the next ones, swap pairs (cycles), keep all
        "chain [0,0,1,2..]": [0, *range(args.beams - 1)],
        "swaps [1,0,3,2..]": [i ^ 1 if (i ^ 1) < args.beams else i for i in range(args.beams)],
        "identity": list(range(args.beams)),
    }
    scratch = torch.empty(max(t.numel() * t.element_size() for t in all_tensors), dtype=torch.uint8, device=e2e.DEV)

    def copy_same_bytes():
        for t in all_tensors:
            scratch[: t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)

    def select_then_copy(idx):  # the reorder before move_rows
        for t in all_tensors:
            t.copy_(t.index_select(0, idx))

    def copy_each(dst, src):  # the waves of move_rows with one copy_ per row instead of a batched copy
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def gather_then_copy(idx):
        for t in all_tensors:
            t.copy_(t[idx])

    rows_out = {"copy of the same bytes (1 read + 1 write)": timed(copy_same_bytes)}
    with torch.inference_mode():
        for label, order in orders.items():
            idx = torch.tensor(order, device=e2e.DEV)
            rows_out[f"{label}: index_select + copy_ (before)"] = timed(lambda idx=idx: select_then_copy(idx))
            rows_out[f"{label}: t.copy_(t[idx])"] = timed(lambda idx=idx: gather_then_copy(idx))
            rows_out[f"{label}: MoaCache.reorder_cache (move_rows)"] = timed(lambda idx=idx: cache.reorder_cache(idx))
            rows_out[f"{label}: move_rows, one copy_ per tensor row"] = timed(
                lambda order=order: move_rows(all_tensors, order, copy=copy_each)
            )
    result = dict(context=args.context, beams=args.beams, cache_GB=round(nbytes / 1e9, 3), reorder_ms=rows_out)
    for name, ms in rows_out.items():
        e2e.log(f"{name}: {ms:.3f} ms ({nbytes / ms / 1e6:.0f} GB/s of cache bytes)")

    kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, num_beams=args.beams, do_sample=False)
    with torch.inference_mode():
        moa.generate(ids, **kwargs)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        moa.generate(ids, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            moa.generate(ids, **kwargs)
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.device_time / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    result.update(generate_wall_s=round(wall, 3), gpu_ms_total=round(sum(per_kernel.values()), 2),
                  top_kernels_ms=[(name[:90], round(ms, 2)) for name, ms in top])  # fmt: skip
    e2e.log(f"generate({args.new} new, {args.beams} beams): {wall:.3f} s wall, GPU {sum(per_kernel.values()):.1f} ms")
    for name, ms in top:
        e2e.log(f"  {ms:9.2f} ms  {name[:110]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"beam_step_{args.context}x{args.beams}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Attention with gradients (training, fine-tuning): one layer at Llama-3-8B shapes, forward + backward.

Methods, each on the same q / k / v (32 query heads, 8 kv heads, d=128, bf16, batch 1):
- ``moa-flex``: what the Triton backend runs while gradients are needed (``moa_flex.py``: FlexAttention, compiled,
  with the MoA block mask). The block mask is built once per layer and forward; its creation is timed apart.
- ``moa-ref``: the pure-torch reference (what CPU / non-flex setups run), each chunk of queries recomputed in the
  backward pass.
- ``dense-sdpa``: dense causal ``scaled_dot_product_attention`` (default backend, ``enable_gqa``).
Reported: median ms of forward + backward, the peak memory above the inputs, and the largest relative error of
moa-flex's output and gradients against moa-ref (float32) where both ran.

    PYTHONPATH=. python benchmarks/bench_training.py --lengths 4096,16384,32768 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import make_plan  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

flex = remote_module("moa_flex")
reference = remote_module("moa_reference")
spans = remote_module("moa_spans")
SINK, MIN_SPAN = 64, 128


def log(*parts) -> None:
    print(*parts, flush=True)  # noqa: T201 (a script)


def timed(fn, repeats: int) -> tuple[float, float, list]:
    """(median ms, peak MiB above what was allocated before, the last result) of fn() on the GPU."""
    fn()  # compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20, result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_length(n: int, density: float, args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    shape_q, shape_kv = (1, 32, n, 128), (1, 8, n, 128)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in "kv")
    grad_out = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen)
    alpha, beta = (t.cuda() for t in make_plan(n, density, SINK, MIN_SPAN))
    pos = torch.arange(n, device="cuda")[None]
    scale = 128**-0.5
    fraction = spans.attention_fraction(alpha.cpu(), beta.cpu(), n, SINK, MIN_SPAN)

    def step(attend):
        def run():
            for t in (q, k, v):
                t.grad = None
            out = attend()
            out.backward(grad_out)
            return out.detach(), q.grad, k.grad, v.grad

        return run

    rows, results = [], {}
    # a new positions tensor each call: the memo misses and the mask is built (the clone is ~n int64s)
    mask_ms = timed(lambda: flex.block_mask(pos.clone(), alpha, beta, SINK, MIN_SPAN, 32), 3)[0]
    methods = {
        "moa-flex": lambda: flex.moa_flex_attention(q, k, v, pos, alpha, beta, SINK, MIN_SPAN, scale),
        "dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    if n <= args.ref_max:
        methods["moa-ref"] = lambda: reference.moa_attention_ref(q, k, v, pos, pos, alpha, beta, SINK, MIN_SPAN,
                                                                 scale=scale)  # fmt: skip
    for name, attend in methods.items():
        ms, peak_mib, results[name] = timed(step(attend), args.repeats)
        rows.append(dict(length=n, density=density, attention_fraction=round(fraction, 4), method=name,
                         ms=round(ms, 3), peak_extra_MiB=round(peak_mib, 1)))  # fmt: skip
    dense_ms = next(r["ms"] for r in rows if r["method"] == "dense-sdpa")
    for row in rows:
        row["x_dense"] = round(row["ms"] / dense_ms, 3)
        if row["method"] == "moa-flex":
            row["mask_ms"] = round(mask_ms, 2)
            if "moa-ref" in results:
                row["max_rel_err_vs_ref"] = max(
                    rel_err(a, b) for a, b in zip(results["moa-flex"], results["moa-ref"], strict=True)
                )
        log(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--densities", default="0.5,0.25")
    parser.add_argument("--ref-max", type=int, default=16384, help="longest length the reference runs at")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_training.py measures the GPU path: it needs CUDA")
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args) | {"out": str(args.out)}),
        rows=[],
    )  # fmt: skip
    for n in (int(x) for x in args.lengths.split(",")):
        for density in (float(x) for x in args.densities.split(",")):
            result["rows"] += run_length(n, density, args)
            (args.out / "training.json").write_text(json.dumps(result, indent=2))
    log("\n| N | density | f | method | fwd+bwd ms | x dense | peak extra MiB | mask ms | rel err vs ref |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        log(f"| {r['length']} | {r['density']} | {r['attention_fraction']} | {r['method']} | {r['ms']} | "
            f"{r['x_dense']} | {r['peak_extra_MiB']} | {r.get('mask_ms', '')} | {r.get('max_rel_err_vs_ref', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()

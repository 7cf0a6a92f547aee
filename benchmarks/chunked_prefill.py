"""Attention of a prefill in chunks over the MoA cache (chunked prefill, multi-turn) against one call for the whole
prompt, Llama-3-8B attention shapes (32 query heads, 8 kv heads, d=128, bf16), mixed plans at 50% and 25%.

    PYTHONPATH=. python benchmarks/chunked_prefill.py --out $OUT
    PYTHONPATH=. python benchmarks/chunked_prefill.py --before old_moa_prefill.py --out $OUT   # A/B, one process

A static ``MoaCacheLayer`` sized for the whole prompt is filled chunk by chunk (``moa_fused.write_chunk``); each
chunk's attention (``moa_prefill`` for the first, ``moa_prefill_with_cache`` after) is timed by ``do_bench`` (median,
L2 flushed) and the chunks' times summed. The chunks' outputs, concatenated, are checked against the one-call output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import CUDA, DEV, DTYPE, bench, make_plan  # noqa: E402
from benchmarks.specialize_ab import module_from  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

prefill = remote_module("moa_prefill")
cache_mod = remote_module("moa_cache")
fused = remote_module("moa_fused")
SINK, MIN_SPAN = 64, 128


def with_cache_of(module):
    """``moa_prefill_with_cache`` of a kernel module (another version's too), dropping the arguments it does not take
    (``cache_len`` and ``cache_tokens`` came later)."""
    known = module.moa_prefill_with_cache.__code__.co_varnames

    def call(*args, **kwargs):
        return module.moa_prefill_with_cache(*args, **{k: v for k, v in kwargs.items() if k in known})

    return call


def chunked(kernels, q, k, v, q_pos, alpha, beta, chunk: int, rep_ms: int) -> tuple[float, torch.Tensor]:
    """Summed ms of the chunks' attention calls, and their outputs concatenated."""
    n = q.shape[2]
    layer = cache_mod.MoaCacheLayer(alpha.tolist(), beta.tolist(), SINK, MIN_SPAN, max_cache_len=n)
    total, outs = 0.0, []
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        qc, kc, vc, pc = q[:, :, part], k[:, :, part], v[:, :, part], q_pos[:, part]
        if start == 0:
            args = (qc, kc, vc, pc, alpha, beta, SINK, MIN_SPAN)

            def call(args=args):
                return kernels.moa_prefill(*args)
        else:
            cache = (layer.keys, layer.values, layer.slot_pos, layer.head_offset, layer.head_capacity)
            args = (qc, kc, vc, pc, *cache, alpha, beta, SINK, MIN_SPAN)
            extra = {"cache_len": layer.next_pos, "cache_tokens": layer.seq_len}  # what the model passes

            def call(args=args, extra=extra):
                return with_cache_of(kernels)(*args, **extra)

        total += bench(call, rep_ms)
        outs.append(call())
        layer.write(kc, vc, pc, fused.write_chunk if fused.available(kc) else None)
    return total, torch.cat(outs, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="32768:4096,32768:8192,131072:8192,131072:16384", help="n:chunk,...")
    parser.add_argument("--densities", default="0.5,0.25")
    parser.add_argument("--before", type=Path, default=None, help="another moa_prefill.py, timed as a second arm")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    hq, hkv, dim, rep_ms = 32, 8, 128, 100
    if args.smoke:
        args.cases, hq, hkv, dim, rep_ms = "96:32", 8, 4, 16, 1
    arms = {"now": prefill}
    if args.before:
        arms["before"] = module_from(args.before)
    rows = []
    for case in args.cases.split(","):
        n, chunk = (int(x) for x in case.split(":"))
        gen = torch.Generator(device=DEV).manual_seed(n + chunk)
        q = torch.randn(1, hq, n, dim, device=DEV, generator=gen).to(DTYPE)
        k, v = (torch.randn(1, hkv, n, dim, device=DEV, generator=gen).to(DTYPE) for _ in range(2))
        q_pos = torch.arange(n, device=DEV)[None]
        for density in (float(x) for x in args.densities.split(",")):
            alpha, beta = make_plan(n, density, SINK, MIN_SPAN, hkv)
            alpha, beta = alpha.to(DEV), beta.to(DEV)
            whole = prefill.moa_prefill(q, k, v, q_pos, alpha, beta, SINK, MIN_SPAN)
            row = dict(n=n, chunk=chunk, density=density)
            one = (q, k, v, q_pos, alpha, beta, SINK, MIN_SPAN)
            row["one_call_ms"] = round(bench(lambda one=one: prefill.moa_prefill(*one), rep_ms), 3)
            for name, kernels in arms.items():
                ms, out = chunked(kernels, q, k, v, q_pos, alpha, beta, chunk, rep_ms)
                row[f"chunked_{name}_ms"] = round(ms, 3)
                row[f"max_diff_{name}"] = float((out.float() - whole.float()).abs().max())
                row[f"x_one_call_{name}"] = round(ms / row["one_call_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__)
    (args.out / "chunked_prefill.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    names = list(arms)
    print(
        "\n| n | chunk | density | one call ms | " + " | ".join(f"chunked ({a}) ms | x one call" for a in names) + " |"
    )
    print("| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in names) + " |")
    for r in rows:
        cells = " | ".join(f"{r[f'chunked_{a}_ms']} | {r[f'x_one_call_{a}']}" for a in names)
        print(f"| {r['n']} | {r['chunk']} | {r['density']} | {r['one_call_ms']} | {cells} |")


if __name__ == "__main__":
    main()

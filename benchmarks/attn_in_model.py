"""Why attention runs slower inside a model's decode step than alone: the same calls, replayed in different company.

    PYTHONPATH=. python benchmarks/attn_in_model.py --case 4096+1024:330 --out $OUT

The Llama-3-8B-shaped model (random bf16 weights) decodes with the MoA 50% plan at the midpoint context, as in
profile_step.py. One eager step records every layer's decode attention call (the model's own cache tensors, queries and
positions); the recorded calls are then replayed in CUDA graphs (bench_attention's timer: median, L2 flushed):

- ``layers``: the 32 layers' calls back to back (each on its own layer's cache, as in the step);
- ``same x32``: layer 0's call 32 times (one cache: what bench_attention's in-step timing resembles when one layer
  holds >= 512 MB);
- ``8 layers x4``: layers 0-7, four rounds;
- ``layers + MLP``: each call followed by that layer's MLP GEMMs on the model's weights; ``MLP only`` the same GEMMs
  alone (the difference is the attention's time in that company);
- ``standalone``: bench_attention's in-step timing of the same plan, rows and context on its own caches (1 or 8);
- ``in the step``: the attention kernels' time per layer in the model's own graph replay (torch.profiler).

Reported per variant: ms per layer and the KV read rate (the bytes the plan keeps at that context, as bench_e2e counts
them) against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention as ba  # noqa: E402
from benchmarks import bench_e2e as e2e  # noqa: E402
from benchmarks import profile_step as ps  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402


def record_decode_calls(moa, loop) -> list:
    """(args, kwargs) of every decode attention call of one eager step, in layer order (moa_attention._decode:
    the backend's kernel on CUDA, the torch reference on CPU)."""
    dec = e2e.code_of(moa, "moa_attention")
    calls, original = [], dec._decode

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    dec._decode = recording
    try:
        with torch.inference_mode():
            loop._step()
    finally:
        dec._decode = original
    return calls


def mlp_gemms(moa, bsz: int):
    """Per layer, a function running that layer's MLP weight GEMMs on bsz rows (the weights the step reads)."""
    inputs: dict[int, torch.Tensor] = {}
    per_layer = []
    for layer in moa.model.layers:
        weights = [p for p in layer.mlp.parameters() if p.dim() == 2]
        for w in weights:
            inputs.setdefault(w.shape[1], torch.randn(bsz, w.shape[1], device=e2e.DEV, dtype=e2e.DTYPE))
        per_layer.append(lambda ws=weights: [F.linear(inputs[w.shape[1]], w) for w in ws])
    return per_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="4096+1024:330")
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(e2e.SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    ba.patch_interpreter()
    ctx_new, bsz = args.case.split(":")
    context, new = (int(x) for x in ctx_new.split("+"))
    bsz, mid = int(bsz), context + int(new) // 2
    dense = e2e.build(args.model if e2e.CUDA else "tiny")
    plan = e2e.plans(dense, context + new)["moa-50"]
    moa = moa_twin(dense, plan)
    copy_gbps = e2e.copy_bandwidth()
    loop = ps.midpoint_loop(dense, moa, context, new, bsz, 8 * args.steps)
    step_ms = statistics.median(t * 1e3 for t in e2e.time_steps(lambda: None, loop.run, args.steps, 5)[0])
    with ps.profile(activities=[ps.ProfilerActivity.CUDA if e2e.CUDA else ps.ProfilerActivity.CPU]) as prof:
        loop.run(args.steps)
        e2e.sync()
    step_attention_ms = ps.kernel_table(prof, args.steps)[0].get("attention (MoA decode)", 0.0) / 1e3
    calls = record_decode_calls(moa, loop)
    dec = e2e.code_of(moa, "moa_attention")
    layers = len(calls)
    kv_bytes = bsz * e2e.kv_bytes_must_read(dense.config, plan, mid)  # all layers, one step
    result = dict(model=args.model, context=context, new=new, batch=bsz, midpoint=mid, layers=layers,
                  copy_GBps=round(copy_gbps, 1), step_ms=round(step_ms, 3), kv_GB_per_step=round(kv_bytes / 1e9, 3),
                  total_slots=calls[0][0][1].keys.shape[1] - 1, variants={})  # fmt: skip
    result["variants"]["in the step (profiler)"] = dict(ms_per_layer=round(step_attention_ms / layers, 4))
    e2e.log(json.dumps(result))

    def call(i: int):
        a, k = calls[i]
        return dec._decode(*a, **k)

    gemms = mlp_gemms(moa, bsz)
    variants = {
        "layers": lambda: [call(i) for i in range(layers)],
        "same x32": lambda: [call(0) for _ in range(layers)],
        "8 layers x4": lambda: [call(i % 8) for i in range(layers)],
        "layers + MLP": lambda: [(call(i), gemms[i]()) for i in range(layers)],
        "MLP only": lambda: [gemms[i]() for i in range(layers)],
    }
    for name, fn in variants.items():
        t0 = time.perf_counter()
        ms = ba.bench(ba.graphed(fn), rep_ms=300) / layers
        result["variants"][name] = dict(ms_per_layer=round(ms, 4))
        e2e.log(f"{name:>14}: {ms:.4f} ms per layer ({time.perf_counter() - t0:.0f} s)")
    alone = result["variants"]["layers + MLP"]["ms_per_layer"] - result["variants"]["MLP only"]["ms_per_layer"]
    result["variants"]["layers + MLP - MLP only"] = dict(ms_per_layer=round(alone, 4))
    # the same plan, rows and context on bench_attention's own caches (one layer holds far more than 512 MB here)
    cfg = ba.BenchConfig() if e2e.CUDA else ba.BenchConfig.smoke()
    cfg.hq, cfg.hkv = dense.config.num_attention_heads, dense.config.num_key_value_heads
    cfg.head_dim = dense.config.hidden_size // cfg.hq
    cfg.sink, cfg.min_span = plan.sink, plan.min_span
    alpha, beta = (torch.tensor(x[0], dtype=torch.float64) for x in (plan.alpha, plan.beta))
    calls.clear()  # the cache tensors they hold, and the loop's, are freed before the standalone caches
    variants.clear()
    del loop
    e2e.cleanup()
    ba.MIN_STEP_LAYERS = 1  # exactly the layer counts below
    for n_layers in (1, 8) if e2e.CUDA else ():  # CPU smoke: none (interpreted kernels take seconds a call)
        ba.STEP_BYTES = n_layers * kv_bytes // layers  # step_layers() then chains n_layers caches
        ms, _ = ba.time_moa_decode_in_step(bsz, mid, alpha, beta, cfg, kv_bytes // layers)
        result["variants"][f"standalone, {n_layers} cache(s)"] = dict(ms_per_layer=round(ms, 4))
        e2e.cleanup()
    for entry in result["variants"].values():
        if entry["ms_per_layer"] <= 0:  # CPU smoke: the profiler finds no decode kernel
            entry.update(kv_TBps=None, pct_copy=None)
            continue
        entry["kv_TBps"] = round(kv_bytes / layers / (entry["ms_per_layer"] * 1e-3) / 1e12, 3)
        entry["pct_copy"] = round(100 * entry["kv_TBps"] * 1e3 / copy_gbps, 1)
    e2e.log("| variant | ms per layer | KV TB/s | % of copy |\n| --- | --- | --- | --- |")
    for name, entry in result["variants"].items():
        e2e.log(f"| {name} | {entry['ms_per_layer']} | {entry['kv_TBps']} | {entry['pct_copy']} |")
    (args.out / "attn_in_model.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

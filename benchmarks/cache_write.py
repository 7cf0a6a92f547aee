"""The prefill's cache write alone: the torch scatter against ``moa_fused.write_chunk``, one layer.

    PYTHONPATH=. python benchmarks/cache_write.py --out $OUT

Llama-3-8B's kv shape (8 kv heads, d=128, bf16), the mixed plans of bench_attention at 50% and 25% KV density, a
static ``MoaCacheLayer`` sized for the prompt and one chunk of the whole prompt, its key/value as the transposed
views a fused projection gives. Each way is checked against the other slot for slot (the trash slot aside), then
timed by CUDA events (median of ``--repeats``, after a reset of the layer that is timed alone and taken off).
Bytes: what a write must move, the kept tokens' K and V read once and written once, plus the positions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.beam_step import timed  # noqa: E402
from benchmarks.bench_attention import make_plan  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

cache_mod = remote_module("moa_cache")
fused = remote_module("moa_fused")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SINK, MIN_SPAN, HKV, DIM = 64, 128, 8, 128


def case(n: int, density: float, rows: int, repeats: int) -> dict:
    alpha, beta = make_plan(n, density, SINK, MIN_SPAN, HKV)
    alpha, beta = alpha.tolist(), beta.tolist()
    gen = torch.Generator(device=DEV).manual_seed(n)
    proj = torch.randn(rows, n, 2 * HKV, DIM, device=DEV, generator=gen, dtype=torch.float32).to(DTYPE)
    key, value = proj[:, :, :HKV].transpose(1, 2), proj[:, :, HKV:].transpose(1, 2)  # [B, Hkv, L, D] views
    q_pos = torch.arange(n, device=DEV).expand(rows, -1)
    layers = {
        name: cache_mod.MoaCacheLayer(alpha, beta, SINK, MIN_SPAN, max_cache_len=n) for name in ("torch", "fused")
    }
    writers = {"torch": None, "fused": fused.write_chunk}
    for name, layer in layers.items():
        layer.write(key, value, q_pos, writers[name])
    a, b = layers["fused"], layers["torch"]
    same = all(
        torch.equal(getattr(a, t)[:, :-1], getattr(b, t)[:, :-1]) for t in ("keys", "values", "slot_pos")
    ) and torch.equal(a.next_pos, b.next_pos)  # fmt: skip
    if not same:
        raise AssertionError(f"write_chunk differs from the torch scatter at n={n}, density={density}")
    kept = sum(a.capacity)
    moved = rows * kept * (2 * 2 * DIM * key.element_size() + 4)  # K and V read + written, positions written

    def write(name):
        layer = layers[name]

        def run():
            layer.reset()
            layer.write(key, value, q_pos, writers[name])

        return run

    reset_ms = timed(lambda: layers["torch"].reset(), repeats)
    out = dict(
        n=n, density=density, rows=rows, kept_slots=kept, moved_MB=round(moved / 1e6, 1), reset_ms=round(reset_ms, 4)
    )
    for name in layers:
        ms = max(timed(write(name), repeats) - reset_ms, 1e-6)
        out[f"{name}_ms"] = round(ms, 4)
        out[f"{name}_GBps"] = round(moved / ms / 1e6, 1)
    out["speedup"] = round(out["torch_ms"] / out["fused_ms"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4096,32768,131072")
    parser.add_argument("--densities", default="0.5,0.25")
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny lengths (CPU check of the script)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.rows, args.repeats = "300", "1,2", 2
    results = []
    for n in (int(x) for x in args.lengths.split(",")):
        for rows in (int(x) for x in args.rows.split(",")):
            for density in (float(x) for x in args.densities.split(",")):
                results.append(case(n, density, rows, args.repeats))
                print(json.dumps(results[-1]), flush=True)
    env = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_write.json").write_text(json.dumps(dict(env=env, rows=results), indent=2))
    print("\n| n | rows | density | kept slots | MB moved | torch scatter ms | write_chunk ms | GB/s | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['n']} | {r['rows']} | {r['density']} | {r['kept_slots']} | {r['moved_MB']} | {r['torch_ms']} | "
              f"{r['fused_ms']} | {r['fused_GBps']} | {r['speedup']}x |")  # fmt: skip


if __name__ == "__main__":
    main()

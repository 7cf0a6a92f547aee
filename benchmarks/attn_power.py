"""Does MoA decode attention slow down next to the step's GEMMs because of the power limit, and does a plain read?

    PYTHONPATH=. python benchmarks/attn_power.py --out $OUT     # writes $OUT/attn_power.json

Llama-3-8B shapes at 4k+1k (the midpoint, 4608 tokens) with ``--rows`` rows and the MoA 50% plan of bench_e2e: 8
decode caches (bench_attention.decode_cache) cycled over 32 "layers", and per layer the weight GEMMs of a
Llama-3-8B layer (q/k/v, o, gate/up, down: random bf16 weights, 32 layers' worth, on ``--rows`` rows). Each
variant is a CUDA graph of 32 layers, replayed for ~``--seconds`` while nvidia-smi samples the SM clock and power
every 50 ms:

- ``attention {config}``: the decode calls alone, with the table's config for the shape updated by each of
  ``--configs``; ``+ GEMMs``: each call followed by its layer's GEMMs; ``GEMMs``: those alone;
- ``read``: a plain read of the same bytes per layer (``torch.sum`` over a buffer the size of the KV the plan keeps),
  alone and with the GEMMs.

The time a kernel gets in company is (with GEMMs - GEMMs alone); if the plain read slows down in company as much as
the attention does, the loss is the device's (clock / power), not the kernel's instruction mix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention as ba  # noqa: E402
from benchmarks import bench_e2e as e2e  # noqa: E402

SHAPE = e2e.SHAPES["llama-3-8b"]


class Sampler:
    """nvidia-smi's SM clock (MHz) and power (W) every 50 ms, with host timestamps; none on CPU."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if e2e.CUDA:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                clock, power = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), clock, power))

    def between(self, t0: float, t1: float) -> dict:
        got = [(c, p) for t, c, p in self.samples if t0 <= t <= t1]
        if not got:
            return {}
        return dict(sm_MHz=statistics.median(c for c, _ in got), power_W=statistics.median(p for _, p in got),
                    samples=len(got))  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def replay_for(replay, seconds: float) -> tuple[float, float, float]:
    """ms per replay (median of CUDA-event timings) over ~seconds of back-to-back replays; host start and end."""
    replay()
    e2e.sync()
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        if e2e.CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            s = time.perf_counter()
            replay()
            times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times), t0, time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=360)
    parser.add_argument("--n", type=int, default=4608)
    parser.add_argument(
        "--plan-n", type=int, default=5120, help="length the 50%% plan is made for (bench_e2e: context + new)"
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--configs",
        default="[{}]",
        help="JSON list of overrides of the table's decode config, each timed as its own variant",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    ba.patch_interpreter()
    cfg = ba.BenchConfig() if e2e.CUDA else ba.BenchConfig.smoke()
    hidden, inter = (SHAPE["hidden_size"], SHAPE["intermediate_size"]) if e2e.CUDA else (64, 128)
    layers, caches_n = (32, 8) if e2e.CUDA else (4, 2)
    rows, n = args.rows, args.n
    alpha, beta = ba.make_plan(args.plan_n if e2e.CUDA else n, 0.5, cfg.sink, cfg.min_span, cfg.hkv)
    caches = [ba.decode_cache(rows, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim) for _ in range(caches_n)]
    slots = caches[0][0].shape[1] - 1
    kv_bytes = ba.decode_bytes(rows, slots, cfg.head_dim)
    query = torch.randn(rows, cfg.hq, 1, cfg.head_dim, device=e2e.DEV, dtype=ba.DTYPE)  # the caches' dtype
    q_pos = torch.full((rows,), n - 1, device=e2e.DEV, dtype=torch.int64)
    rule = (alpha.to(e2e.DEV), beta.to(e2e.DEV), cfg.sink, cfg.min_span)
    read_buf = [torch.randn(kv_bytes // 2, device=e2e.DEV, dtype=e2e.DTYPE) for _ in range(2)]
    kv_dim = cfg.hkv * cfg.head_dim
    shapes = [(hidden + 2 * kv_dim, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    weights = [[torch.randn(*s, device=e2e.DEV, dtype=e2e.DTYPE) * 0.02 for s in shapes] for _ in range(layers)]
    xs = {k: torch.randn(rows, k, device=e2e.DEV, dtype=e2e.DTYPE) for k in (hidden, inter)}

    table = ba.decode.decode_config(rows, slots, cfg.head_dim, cfg.hkv)
    overrides = json.loads(args.configs)
    scale = cfg.head_dim**-0.5

    def attention(i: int, conf: dict):
        cache = caches[i % caches_n]
        if not e2e.CUDA:  # CPU smoke: the torch reference
            return ba.decode.moa_decode_ref(query, *cache, q_pos, *rule)
        return ba.decode._launch_decode(query, cache, q_pos, *rule[:2], scale, *rule[2:], dict(table, **conf))

    def gemms(i: int):
        return [F.linear(xs[w.shape[1]], w) for w in weights[i]]

    def read(i: int):
        return read_buf[i % 2].sum(dtype=torch.float32)

    variants = {}
    for conf in overrides:
        key = json.dumps(conf)
        variants[f"attention {key}"] = lambda c=conf: [attention(i, c) for i in range(layers)]
        variants[f"attention {key} + GEMMs"] = lambda c=conf: [(attention(i, c), gemms(i)) for i in range(layers)]
    variants |= {
        "GEMMs": lambda: [gemms(i) for i in range(layers)],
        "read": lambda: [read(i) for i in range(layers)],
        "read + GEMMs": lambda: [(read(i), gemms(i)) for i in range(layers)],
    }
    sampler = Sampler()
    graphs = {name: ba.graphed(fn) for name, fn in variants.items()}
    result = dict(
        rows=rows, n=n, table_config=table, slots_per_row=slots, kv_GB_per_layer=round(kv_bytes / 1e9, 3), variants={}
    )
    for rnd in range(args.rounds):  # rounds: the device's state after each variant differs
        for name, replay in graphs.items():
            ms, t0, t1 = replay_for(replay, args.seconds)
            entry = dict(ms_per_layer=round(ms / layers, 4), **sampler.between(t0 + 0.3, t1))
            result["variants"].setdefault(name, []).append(entry)
            e2e.log(f"round {rnd} {name}: {json.dumps(entry)}")
    sampler.stop()
    summary = {}
    for name in variants:
        summary[name] = statistics.median(e["ms_per_layer"] for e in result["variants"][name])
    for conf in overrides:
        key = json.dumps(conf)
        summary[f"attention {key} in company"] = summary[f"attention {key} + GEMMs"] - summary["GEMMs"]
    summary["read in company"] = summary["read + GEMMs"] - summary["GEMMs"]
    result["summary_ms_per_layer"] = {k: round(v, 4) for k, v in summary.items()}
    e2e.log(json.dumps(result["summary_ms_per_layer"]))
    (args.out / "attn_power.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The prefill of a whole model with the cache written by ``moa_fused.write_chunk`` or by the torch scatter (A/B).

    PYTHONPATH=. python benchmarks/prefill_write_ab.py --out $OUT

Llama-3-8B shape, random bf16 weights, the mixed 50% / 25% plans of bench_e2e, batch 1, one forward of the whole
prompt into a static MoaCache (bench_e2e's ``moa_prefill``). The two ways alternate in one process, ``--rounds``
times each after one untimed call of each; the wall time of each call is taken after a device sync.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_e2e as e2e  # noqa: E402
from moa_hub.apply import moa_twin, set_plan  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

layer_cls = remote_module("moa_cache").MoaCacheLayer
fused_write = layer_cls.write


def scatter_write(self, key, value, q_pos, write_chunk=None):
    return fused_write(self, key, value, q_pos, None)  # the torch scatter, whatever the attention passes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4096,32768,131072")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.lengths, args.rounds = "tiny", "128", 2
    dense = e2e.build(args.model)
    moa = moa_twin(dense, e2e.plans(dense, 4096)["moa-50"])
    ways = {"scatter": scatter_write, "write_chunk": fused_write}
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(3, dense.config.vocab_size, (1, n), device=e2e.DEV)
        rounds = args.rounds if n <= 32768 else max(1, args.rounds - 1)
        for method in ("moa-50", "moa-25"):
            set_plan(moa, e2e.plans(dense, n)[method])
            times: dict[str, list[float]] = {name: [] for name in ways}
            for r in range(rounds + 1):
                for name, write in ways.items():
                    layer_cls.write = write
                    e2e.cleanup()
                    e2e.sync()
                    t0 = time.perf_counter()
                    e2e.moa_prefill(moa, ids, n)
                    e2e.sync()
                    if r > 0:  # the first round compiles and warms up
                        times[name].append(time.perf_counter() - t0)
            layer_cls.write = fused_write
            row = dict(length=n, method=method, **{f"{k}_s": round(statistics.median(v), 4) for k, v in times.items()},
                       all_s={k: [round(t, 4) for t in v] for k, v in times.items()})  # fmt: skip
            row["saved_pct"] = round(100 * (1 - row["write_chunk_s"] / row["scatter_s"]), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if e2e.CUDA else "cpu", torch=torch.__version__)
    (args.out / "prefill_write_ab.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print("\n| length | plan | torch scatter s | write_chunk s | saved |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['length']} | {r['method']} | {r['scatter_s']} | {r['write_chunk_s']} | {r['saved_pct']}% |")


if __name__ == "__main__":
    main()

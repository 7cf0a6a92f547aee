"""A whole model's prefill in chunks (``generate(prefill_chunk_size=...)``) against one forward of the prompt, and,
with ``--before FILE``, the same with the chunks' attention from another ``moa_prefill.py`` (A/B in one process).

    PYTHONPATH=. python benchmarks/chunked_prefill_model.py --before old_moa_prefill.py --out $OUT

Llama-3-8B shape, random bf16 weights, the mixed 50% plan (bench_e2e), ``generate(max_new_tokens=1)`` so that the
time is the prefill's; each way runs once untimed (compiles), then ``--repeats`` times alternating; medians.
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
from benchmarks.chunked_prefill import with_cache_of  # noqa: E402
from benchmarks.specialize_ab import module_from  # noqa: E402
from moa_hub.apply import moa_twin, set_plan  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

kernels = remote_module("moa_prefill")
shipped = kernels.moa_prefill_with_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="8x16384:4096,2x65536:8192", help="rows x context : chunk, ...")
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    model_name = "llama-3-8b"
    if args.smoke:
        model_name, args.cases, args.repeats = "tiny", "2x320:96", 1
    dense = e2e.build(model_name)
    moa = moa_twin(dense, e2e.plans(dense, 4096)["moa-50"])
    ways = {"one call": (None, shipped), "chunked": ("chunk", shipped)}
    if args.before:
        ways["chunked, before"] = ("chunk", with_cache_of(module_from(args.before)))
    rows = []
    for case in args.cases.split(","):
        shape, chunk = case.split(":")
        bsz, context = (int(x) for x in shape.split("x"))
        set_plan(moa, e2e.plans(dense, context + 1)["moa-50"])
        ids = torch.randint(3, dense.config.vocab_size, (bsz, context), device=e2e.DEV)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.repeats + 1):
            for name, (chunked, fn) in ways.items():
                kernels.moa_prefill_with_cache = fn
                e2e.cleanup()
                e2e.sync()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    moa.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0,
                        **({"prefill_chunk_size": int(chunk)} if chunked else {}),
                    )  # fmt: skip
                e2e.sync()
                if r > 0:
                    times[name].append(time.perf_counter() - t0)
        kernels.moa_prefill_with_cache = shipped
        row = dict(rows=bsz, context=context, chunk=int(chunk), **{f"{k} s": round(statistics.median(v), 3) for k, v in times.items()},
                   all_s={k: [round(t, 3) for t in v] for k, v in times.items()})  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if e2e.CUDA else "cpu", torch=torch.__version__)
    (args.out / "chunked_prefill_model.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print("\n| rows x context | chunk | " + " | ".join(f"{k} s" for k in ways) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in ways) + " |")
    for r in rows:
        print(f"| {r['rows']} x {r['context']} | {r['chunk']} | " + " | ".join(str(r[f"{k} s"]) for k in ways) + " |")


if __name__ == "__main__":
    main()

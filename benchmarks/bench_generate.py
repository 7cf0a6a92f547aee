"""Per-token time of ``generate()`` itself, the call most users make, for dense and MoA models on one GPU.

    PYTHONPATH=. python benchmarks/bench_generate.py --out $OUT       # the H200 run (Llama-3-8B shapes)
    PYTHONPATH=. python benchmarks/bench_generate.py --smoke --out /tmp/gen   # CPU check of the script

Methods, on the same random bf16 weights (bench_e2e.build; the MoA plan mixes local and long heads at 50% KV
density at the case's context):
- ``hf-dynamic``: transformers dense, SDPA, DynamicCache, ``generate()``;
- ``hf-static``: transformers dense, SDPA, ``generate(cache_implementation="static")`` with one cache size for all
  calls (``max_cache_len``), so its automatic ``torch.compile`` (CUDA graphs) compiles once, in the warm-up;
- ``moa-eager``: the MoA model's ``generate(disable_compile=True)``: a dynamic MoaCache, every step eager;
- ``moa-graph``: the MoA model's ``generate()``: a static MoaCache and decode steps replayed from a CUDA graph
  (``GraphedDecodeStep``, through transformers' compiled-forward hook);
- ``moa-graph-reuse``: the same, on one static MoaCache the caller passes in and ``reset()``s before each call,
  so the graph captured in the warm-up is replayed from the first step of every call;
- ``moa-graph-kept``: ``generate(cache_implementation="static", max_cache_len=...)`` with one size for all calls:
  the model keeps that cache and its graph between calls (transformers' knob for one static cache size);
- ``moa_generate``: ``model.moa_generate()``, greedy, the whole step (pick and stop check too) in the graph;
- ``moa-graph-each-row``: ``moa-graph`` with the prefill run on every repeated prompt row (as transformers does, and
  as MoA did before its prefill ran each prompt once for beams / ``num_return_sequences``), for comparison.

With ``--num-beams K`` (> 1) every ``generate()`` method runs beam search over K beams per row instead (batch x K
cache rows); ``moa_generate`` is greedy only and is refused then.

Each repeat times generate() for 1, 1 + T and 1 + 2T new tokens (greedy, no early stop). ``ms_per_token`` is
(t(1 + 2T) - t(1)) / 2T, so the prefill drops out and a graph capture per call is spread over the tokens;
``steady_ms`` is (t(1 + 2T) - t(1 + T)) / T, after the capture; ``first_token_s`` is t(1), the prefill and the
first token. Medians over repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_e2e import CUDA, DEV, build, cleanup, log, plans, sync  # noqa: E402
from moa_hub.apply import moa_twin, set_plan  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

MoaCache = remote_module("moa_cache").MoaCache
cache_argument = remote_module("moa_model").cache_argument

METHODS = ("hf-dynamic", "hf-static", "moa-eager", "moa-graph", "moa-graph-reuse", "moa-graph-kept", "moa_generate",
           "moa-graph-each-row")  # fmt: skip


STATIC_ROOM = 1024  # new tokens hf-static's one cache size allows


_REUSED: dict = {}


def reusable_cache(model, max_cache_len: int):
    """One static MoaCache per (model, size), kept across calls (moa-graph-reuse)."""
    key = (id(model), max_cache_len)
    if key not in _REUSED:
        _REUSED.clear()  # the previous case's cache (and with it its graph) goes
        _REUSED[key] = MoaCache(model.config, max_cache_len=max_cache_len)
    return _REUSED[key]


def call(model, method: str, ids: torch.Tensor, new: int, beams: int = 1) -> float:
    """Seconds of one generate() of ``new`` tokens (greedy, or beam search over ``beams``; exactly ``new``)."""
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        if method == "moa_generate":
            model.moa_generate(ids, max_new_tokens=new)
        else:
            extra = dict(disable_compile=True) if method == "moa-eager" else {}
            if method in ("hf-static", "moa-graph-kept"):
                extra = dict(cache_implementation="static", max_cache_len=ids.shape[1] + STATIC_ROOM)
            if method == "moa-graph-reuse":
                cache = reusable_cache(model, ids.shape[1] + STATIC_ROOM)
                cache.reset()
                extra = {cache_argument(type(model).forward): cache}
            if beams > 1:
                extra["num_beams"] = beams
            if method == "moa-graph-each-row":
                model.__dict__["_moa_repeated_prompt_rows"] = lambda *args: None  # the prefill runs every row
            try:
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **extra)
            finally:
                model.__dict__.pop("_moa_repeated_prompt_rows", None)
    sync()
    return time.perf_counter() - start


def measure(model, method: str, ids: torch.Tensor, tokens: int, repeats: int, beams: int = 1) -> dict:
    call(model, method, ids, 3, beams)  # warm-up: kernels compile, the allocator settles
    per_token, steady, firsts, peak = [], [], [], 0
    for _ in range(repeats):
        first = call(model, method, ids, 1, beams)
        mid = call(model, method, ids, 1 + tokens, beams)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        full = call(model, method, ids, 1 + 2 * tokens, beams)
        if CUDA:
            peak = max(peak, torch.cuda.max_memory_allocated())
        per_token.append((full - first) / (2 * tokens) * 1e3)
        firsts.append(first)
        steady.append((full - mid) / tokens * 1e3)
    row = dict(ms_per_token=round(statistics.median(per_token), 3), steady_ms=round(statistics.median(steady), 3),
               first_token_s=round(statistics.median(firsts), 3),
               ms_per_token_all=[round(x, 3) for x in per_token], steady_ms_all=[round(x, 3) for x in steady])  # fmt: skip
    if CUDA:
        row["peak_GiB"] = round(peak / 2**30, 2)
    step = model.__dict__.get("_moa_graphed_step")
    if method.startswith("moa-graph") and step is not None:
        row["graph_replays_so_far"] = step.replays  # > 0 proves generate() took the graphed path
    return row


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--cases", default="4096x1,32768x1,4096x16", help="context x batch, comma-separated")
    parser.add_argument("--methods", default="hf-dynamic,moa-eager,moa-graph,moa-graph-reuse,moa_generate")
    parser.add_argument("--tokens", type=int, default=32, help="T: generate() runs 1, 1+T and 1+2T tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-beams", type=int, default=1, help="> 1: beam search in every generate() method")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.cases, args.tokens, args.repeats = "tiny", "256x1,192x2", 3, 1
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}: pick from {', '.join(METHODS)}")
    if args.num_beams < 1:
        parser.error(f"--num-beams {args.num_beams}: give 1 (greedy) or more beams")
    if args.num_beams > 1 and "moa_generate" in args.methods:
        parser.error("moa_generate is greedy only: leave it out of --methods with --num-beams > 1")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dense = build(args.model)
    moa = moa_twin(dense, plans(dense, 4096)["moa-50"])
    moa.generation_config.pad_token_id = 0
    result = dict(rows=[], meta=dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=args.model,
        gpu=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, args={k: str(v) for k, v in vars(args).items()},
    ))  # fmt: skip
    for case in args.cases.split(","):
        context, bsz = (int(x) for x in case.split("x"))
        set_plan(moa, plans(dense, context + 2 * args.tokens)["moa-50"])
        ids = torch.randint(
            3, min(1000, dense.config.vocab_size), (bsz, context), generator=torch.Generator().manual_seed(context)
        ).to(DEV)
        for method in args.methods:
            model = dense if method.startswith("hf-") else moa
            try:
                row = measure(model, method, ids, args.tokens, args.repeats, args.num_beams)
            except torch.cuda.OutOfMemoryError as err:
                row = dict(error=f"out of memory: {str(err)[:200]}")
            cleanup()
            result["rows"].append(dict(context=context, batch=bsz, beams=args.num_beams, method=method, **row))
            log(json.dumps(result["rows"][-1]))
            (args.out / "generate.json").write_text(json.dumps(result, indent=2))
    print_table(result["rows"])


def print_table(rows: list[dict]) -> None:
    print(
        "\n| context | batch | beams | method | ms / token (2T, capture included) | steady ms / token | x hf-dynamic "
        "| first token s | peak GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next((r for r in rows if r["method"] == "hf-dynamic" and r["context"] == row["context"]
                     and r["batch"] == row["batch"] and "error" not in r), None)  # fmt: skip
        if "error" in row:
            print(
                f"| {row['context']} | {row['batch']} | {row['beams']} | {row['method']} | {row['error'][:40]} | | | | |"
            )
            continue
        ratio = f"{base['ms_per_token'] / row['ms_per_token']:.2f}" if base else ""
        print(f"| {row['context']} | {row['batch']} | {row['beams']} | {row['method']} | {row['ms_per_token']} | "
              f"{row['steady_ms']} | {ratio} | {row['first_token_s']} | {row.get('peak_GiB', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()

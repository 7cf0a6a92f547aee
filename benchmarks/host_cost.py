"""Host cost of one decode step (eager, warm-up, capture, replay) of generate() on the GPU, and where it goes.

    PYTHONPATH=. python benchmarks/host_cost.py --out $OUT            # the H200 run
    PYTHONPATH=. python benchmarks/host_cost.py --smoke --out /tmp/hc  # CPU check of the script

Llama-3-8B shape, random bf16 weights, the mixed 50% plan; batch 1 at a 4k prompt. Times eager one-token forwards
(HF dense with a DynamicCache, MoA with a static MoaCache) and a cProfile of the eager MoA steps; then the first
steps of ``GraphedDecodeStep`` on new caches, and whole ``generate()`` calls at 1 and 16 rows, each two ways in
turn: with an eager warm-up step before every capture, and captured at the first step after
``moa_prepare_decode``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_e2e import DEV, build, log, plans, sync  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

MoaCache = remote_module("moa_cache").MoaCache
GraphedDecodeStep = remote_module("moa_generate").GraphedDecodeStep
WARMED = remote_module("moa_generate")._WARMED  # model -> devices where it ran its eager warm-up step
cache_argument = remote_module("moa_model").cache_argument


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def eager_steps(name: str, model, cache, ids: torch.Tensor, steps: int, profile: bool) -> dict:
    """Median time of a one-token forward (synced), the host time per step when steps are queued back to back, and
    with ``profile`` a cProfile of 10 steps."""
    kw = cache_argument(type(model).forward)
    tok = model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1:].argmax(-1)

    def one():
        return model(tok, use_cache=True, logits_to_keep=1, **{kw: cache})

    for _ in range(3):
        one()
    times = [timed(one) for _ in range(steps)]
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    launch = (time.perf_counter() - start) / steps * 1e3
    sync()
    row = dict(method=name, step_ms=round(statistics.median(times), 3), host_launch_ms=round(launch, 3))
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            one()
        prof.disable()
        sync()
        for order, lines in (("tottime", 35), ("cumtime", 45)):
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats(order).print_stats(lines)
            row[f"cprofile_{order}"] = text.getvalue()
    return row


def first_steps(moa, step, ids: torch.Tensor, context: int) -> dict:
    """ms of each of the first 4 steps of ``step`` (a GraphedDecodeStep) on a new cache after its prefill."""
    kw = cache_argument(type(moa).forward)
    cache = MoaCache(moa.config, max_cache_len=context + 16)
    tok = moa(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1:].argmax(-1)
    row = {}
    for index in range(1, 5):
        mask = torch.ones(1, context + index, dtype=torch.long, device=DEV)
        row[f"step {index}"] = round(
            timed(
                lambda m=mask: step(input_ids=tok, attention_mask=m, use_cache=True, logits_to_keep=1, **{kw: cache})
            ),
            3,
        )
    row["first 4 steps"] = round(sum(row.values()), 3)
    return row


def call_breakdown(moa, ids: torch.Tensor, calls: int = 3) -> list[dict]:
    """Where the per-call work of generate() (33 new tokens) and moa_generate() goes: each step of the graph's life
    timed on its own (synced before and after), summed per call."""
    module = remote_module("moa_generate")
    wrapped = {"new state (frees the old graph)": (module.GraphedDecodeStep, "_new_state"),
               "release at the call's end": (module.GraphedDecodeStep, "release"),
               "prepare (memos)": (module, "_prepare"), "capture": (module, "_capture")}  # fmt: skip
    spent: dict[str, float] = {}
    originals = {}
    for label, (owner, name) in wrapped.items():
        original = originals[label] = getattr(owner, name)

        def timed_call(*a, _original=original, _label=label, **k):
            sync()
            start = time.perf_counter()
            out = _original(*a, **k)
            sync()
            spent[_label] = spent.get(_label, 0.0) + (time.perf_counter() - start) * 1e3
            return out

        setattr(owner, name, timed_call)
    rows = []
    try:
        for api in ("generate", "moa_generate"):
            for _ in range(calls):
                spent.clear()
                if api == "generate":
                    total = timed(lambda: moa.generate(ids, max_new_tokens=33, do_sample=False))
                else:
                    total = timed(lambda: moa.moa_generate(ids, max_new_tokens=33))
                rows.append(dict(api=api, total=round(total, 2), **{k: round(v, 2) for k, v in spent.items()}))
                log(rows[-1])
    finally:
        for label, (owner, name) in wrapped.items():
            setattr(owner, name, originals[label])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (a check of the script)")
    parser.add_argument("--breakdown-only", action="store_true", help="only the per-call breakdown")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.context, args.steps = "tiny", 64, 3
    args.out.mkdir(parents=True, exist_ok=True)
    dense = build(args.model)
    moa = moa_twin(dense, plans(dense, args.context + 64)["moa-50"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(1000, dense.config.vocab_size), (1, args.context), generator=gen).to(DEV)
    result: dict = {}
    if args.breakdown_only:
        moa.generate(ids, max_new_tokens=4, do_sample=False)  # the model's first graph: kernels compile
        result["call_breakdown_ms"] = call_breakdown(moa, ids)
        (args.out / "host_cost.json").write_text(json.dumps(result, indent=2))
        return
    with torch.inference_mode():
        room = args.context + 4 * args.steps + 8
        eager = [eager_steps("hf-dense-dynamic", dense, DynamicCache(config=dense.config), ids, args.steps, False),
                 eager_steps("moa-static", moa, MoaCache(moa.config, max_cache_len=room), ids, args.steps, True)]  # fmt: skip
        result["eager_steps"] = eager
        for row in eager:
            log(row["method"], row["step_ms"], row["host_launch_ms"])

        # GraphedDecodeStep on new caches (as each generate() call makes), the two ways in turn: "warm-up" runs an
        # eager first step before the capture (the model taken out of WARMED: the code before moa_prepare_decode),
        # "prepared" captures the first step at once (the model's first graph ran its warm-up)
        steps = {"warm-up": GraphedDecodeStep(moa), "prepared": GraphedDecodeStep(moa)}
        phases = []
        for trial in range(3):
            for variant, step in steps.items():
                if variant == "warm-up":
                    WARMED.pop(moa, None)
                phases.append(dict(variant=variant, trial=trial, **first_steps(moa, step, ids, args.context)))
                log(phases[-1])
        result["graphed_phases_ms"] = phases

        # whole generate() calls, greedy, the two ways in turn
        calls = []
        for rows in (1, 16):
            batch = ids.expand(rows, -1).contiguous()
            moa.generate(batch, max_new_tokens=4, do_sample=False)  # compile and settle
            for new in (1, 2, 33):
                times = {"warm-up": [], "prepared": []}
                for _ in range(5):
                    for variant, runs in times.items():
                        if variant == "warm-up":
                            WARMED.pop(moa, None)
                        runs.append(timed(lambda b=batch, n=new: moa.generate(b, max_new_tokens=n, do_sample=False)))
                row = dict(rows=rows, context=args.context, new_tokens=new,
                           **{f"{v} ms": round(statistics.median(t), 2) for v, t in times.items()},
                           **{f"{v} all": [round(x, 2) for x in t] for v, t in times.items()})  # fmt: skip
                calls.append(row)
                log(row)
        result["generate_calls_ms"] = calls
        result["call_breakdown_ms"] = call_breakdown(moa, ids)
    (args.out / "host_cost.json").write_text(json.dumps(result, indent=2))
    log(eager[1]["cprofile_tottime"])
    log("| rows | new tokens | generate() with a warm-up step per call, ms | captured at step 1, ms |")
    for row in calls:
        log(f"| {row['rows']} | {row['new_tokens']} | {row['warm-up ms']} | {row['prepared ms']} |")


if __name__ == "__main__":
    main()

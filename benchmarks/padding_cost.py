"""What the padding layout check and the right-padding reorder cost in a prefill (``padding_first`` in moa_model).

    PYTHONPATH=. python benchmarks/padding_cost.py --out $OUT

Llama-3-8B shape, random bf16 weights, the mixed 50% plan (bench_e2e). One forward with a fresh cache per call, in
four ways that alternate: no mask (nothing is checked), a mask of ones (checked: one host sync), left padding and
right padding (rows after the first lose ``--pad`` of their tokens; right padding is also reordered). Each way runs
once untimed, then ``--repeats`` times; medians. The right-padded rows' last hidden states are compared with the left-padded
ones (the same tokens at the same positions).
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


def layouts(ids: torch.Tensor, pad: int) -> dict[str, dict]:
    """The forward's inputs per way: the same tokens of every row, padded on the left or on the right."""
    bsz, length = ids.shape
    left, right = ids.clone(), ids.clone()
    left_mask, right_mask = torch.ones_like(ids), torch.ones_like(ids)
    if bsz > 1 and pad:
        keep = length - pad
        left[1:, :pad], left_mask[1:, :pad] = 0, 0
        left[1:, pad:] = ids[1:, :keep]
        right[1:, keep:], right_mask[1:, keep:] = 0, 0
    return {
        "no mask": dict(input_ids=ids),
        "mask of ones": dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
        "left padded": dict(input_ids=left, attention_mask=left_mask),
        "right padded": dict(input_ids=right, attention_mask=right_mask),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="1x4096,4x4096,1x32768,2x32768", help="rows x length, ...")
    parser.add_argument("--pad", type=float, default=0.1, help="share of the padded rows' tokens that is padding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", action="store_true", help="profile one more call of each way: kernel totals")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    model_name = "llama-3-8b"
    if args.smoke:
        model_name, args.cases, args.repeats = "tiny", "1x320,3x320", 1
    dense = e2e.build(model_name)
    moa = moa_twin(dense, e2e.plans(dense, 4096)["moa-50"])
    rows = []
    for case in args.cases.split(","):
        bsz, length = (int(x) for x in case.split("x"))
        set_plan(moa, e2e.plans(dense, length)["moa-50"])
        pad = int(args.pad * length)
        ids = torch.randint(3, dense.config.vocab_size, (bsz, length), device=e2e.DEV)
        ways = layouts(ids, pad)
        times: dict[str, list[float]] = {name: [] for name in ways}
        hidden: dict[str, torch.Tensor] = {}
        for r in range(args.repeats + 1):
            for name, inputs in ways.items():
                e2e.cleanup()
                e2e.sync()
                t0 = time.perf_counter()
                with torch.inference_mode():  # the untimed first round keeps every position's hidden state
                    out = moa.model(**inputs, use_cache=True) if r == 0 else moa(**inputs, use_cache=True)
                e2e.sync()
                if r > 0:
                    times[name].append(time.perf_counter() - t0)
                else:
                    hidden[name] = out.last_hidden_state
                del out
        keep = length - pad
        kernels = {}
        if args.kernels:
            for name, inputs in ways.items():
                e2e.cleanup()
                with torch.inference_mode():
                    kernels[name] = e2e.prefill_kernels(lambda: moa(**inputs, use_cache=True))  # noqa: B023
        diff = None
        if bsz > 1:
            diff = (hidden["right padded"][1:, :keep].float() - hidden["left padded"][1:, pad:].float()).abs().max()
        row = dict(rows=bsz, length=length, pad=pad if bsz > 1 else 0,
                   right_vs_left_max_abs=None if diff is None else round(float(diff), 6),
                   **{f"{k} ms": round(1e3 * statistics.median(v), 2) for k, v in times.items()},
                   all_ms={k: [round(1e3 * t, 2) for t in v] for k, v in times.items()}, kernels=kernels)  # fmt: skip
        del hidden
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if e2e.CUDA else "cpu", torch=torch.__version__)
    (args.out / "padding_cost.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    names = list(ways)
    print("\n| rows x length | padding per row | " + " | ".join(f"{k} ms" for k in names) + " | right vs left |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- |")
    for r in rows:
        cells = " | ".join(str(r[f"{k} ms"]) for k in names)
        print(f"| {r['rows']} x {r['length']} | {r['pad']} | {cells} | {r['right_vs_left_max_abs']} |")


if __name__ == "__main__":
    main()

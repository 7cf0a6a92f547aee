"""`make demo`: convert the shipped demo model with the full MoA search on CPU, load it, ask it, evaluate it.

Steps (each a public moa-hub API call; the work folder makes a re-run resume):
1. `moa-hub convert` on examples/demo/model: calibrate, profile at 512/1k tokens, optimize at 50% KV
   density, validate at 1.5k, export to out/demo-moa;
2. `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` answers a key-value retrieval prompt;
3. `moa-hub eval`: MoA vs dense vs a uniform window of the same density at 1x, 2x, 4x the profile length.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from moa_hub import tasks  # noqa: E402
from moa_hub.card import CardConfig, write_card  # noqa: E402
from moa_hub.compare import EvalConfig, card_entries, report_rows, run_eval  # noqa: E402
from moa_hub.pipeline import ConvertConfig, convert  # noqa: E402
from moa_hub.summary import print_summary  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "out" / "demo-moa")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--eval-lengths", default="1024,2048")  # 4096 on CPU takes ~6 min more (RESULTS has it)
    parser.add_argument("--items-per-depth", type=int, default=1)
    return parser.parse_args()


def ask(folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    sample = tasks.GENERATORS["kv_retrieval"](tokenizer, 2048, 7, depth=0.3)
    enc = tasks.encode(tokenizer, sample)
    ids = torch.tensor([enc.input_ids[: enc.answer_start]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\n{type(model).__name__} loaded with trust_remote_code=True; a 2k-token retrieval prompt ends with:")
    print("  ..." + tokenizer.decode(ids[0, -24:]).replace("\n", "\n  "))
    print(f"  model answer: {answer.strip()!r}   expected: {sample.answer!r}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    torch.manual_seed(0)
    start = time.time()
    config = ConvertConfig(
        model=str(ROOT / "examples" / "demo" / "model"),
        output=args.output,
        density=args.density,
        profile_lengths=(512, 1024),
        extend_length=1536,
        num_samples=4,
        device="cpu",
        dtype="fp32",
        overwrite=True,
        command="make demo",
    )
    print_summary(convert(config))
    ask(args.output)
    lengths = tuple(int(n) for n in args.eval_lengths.split(","))
    eval_config = EvalConfig(
        model=args.output, lengths=lengths, tasks=("retrieval", "ppl"), items_per_depth=args.items_per_depth
    )
    report = run_eval(eval_config)
    write_card(args.output, CardConfig(evaluation=card_entries(report)))
    print("\nEvaluation (retrieval: accuracy, ppl: perplexity; uniform = one window of MoA's density):")
    rows = report_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"\nDone in {time.time() - start:.0f} s. The converted model is in {args.output}")


if __name__ == "__main__":
    main()

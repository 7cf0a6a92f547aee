"""End-to-end generate() through the public API on real model shapes (random bf16 weights, no download).

Preliminary version of issue 7's benchmark: dense transformers (SDPA + DynamicCache) against the MoA model
(Triton kernels, MoaCache) on the same weights, both through ``generate()``; eager decode loops on both sides
(no CUDA graphs, no torch.compile yet). Prints one row per case and writes JSON to --out.

    PYTHONPATH=. python benchmarks/bench_e2e.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import make_plan  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402
from moa_hub.plan import MoaPlan  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
}


def build(name: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SHAPES[name], num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def plan_for(model, n: int, density: float) -> MoaPlan:
    alpha, beta = make_plan(n, density, 64, 128)
    layers = model.config.num_hidden_layers
    return MoaPlan(alpha=[alpha.tolist()] * layers, beta=[beta.tolist()] * layers).with_density([n])


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(model, batch: int, context: int, new_tokens: int) -> dict:
    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :256], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up (kernels compile)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        prefill = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs))
        total = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs))
    decode = total - prefill
    return dict(
        prefill_s=round(prefill, 4), decode_s=round(decode, 4),
        decode_tok_s=round(batch * (new_tokens - 1) / decode, 1),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--cases", default="llama-3.2-1b:8:8192:64,llama-3-8b:8:8192:64,llama-3-8b:1:32768:32")
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        name, batch, context, new_tokens = case.split(":")
        batch, context, new_tokens = int(batch), int(context), int(new_tokens)
        dense = build(name)
        moa = moa_twin(dense, plan_for(dense, context + new_tokens, 0.5))
        for method, model in (("dense sdpa+dynamic", dense), ("moa 50% triton", moa)):
            try:
                row = dict(model=name, method=method, batch=batch, context=context, new=new_tokens)
                row.update(run_case(model, batch, context, new_tokens))
            except Exception as err:  # report and go on: one failing case must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del dense, moa
        torch.cuda.empty_cache()
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__,
    )  # fmt: skip
    (args.out / "e2e.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

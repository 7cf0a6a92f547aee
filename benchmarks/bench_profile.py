"""Benchmark the profile stage: one calibration item through a Llama-3-8B-shaped model (random bf16 weights).

Checks the fused attention backward's influence against the float64 torch path first, then times `profile_model`
for one item per length and reports peak GPU memory. Also prints the memory an approach that
materialises the N x N attention matrix (and its gradient) per layer would need, computed analytically.

    PYTHONPATH=. python benchmarks/bench_profile.py                 # H200: 8k and 32k
    PYTHONPATH=. python benchmarks/bench_profile.py --tiny          # CPU smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from moa_hub.profile import CalibrationItem, ProfileConfig, load_profile, profile_model
from moa_hub.remote import remote_module

LLAMA3_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
)  # fmt: skip
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
)


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def check_kernel(device: torch.device, seq_len: int, heads: tuple[int, int], head_dim: int) -> dict:
    """The fused backward's influence (bf16 and fp32 inputs) against the float64 torch path, fresh random inputs."""
    infl, bwd = remote_module("moa_influence"), remote_module("moa_influence_bwd")
    num_q, num_kv = heads
    q, do = (torch.randn(1, num_q, seq_len, head_dim, dtype=torch.float64, device=device) for _ in range(2))
    k, v = (torch.randn(1, num_kv, seq_len, head_dim, dtype=torch.float64, device=device) for _ in range(2))
    o = infl._causal_attention(q, k, v, head_dim**-0.5)  # the real output: the backward recomputes P from it
    ref = infl.influence_blocks_torch(q, k, v, o, do, block_size=64)
    result = {}
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)  # interpreter: no bf16 dot
    for dtype in dtypes:
        args = [t.to(dtype) for t in (q, k, v, o, do)]
        ref_same = infl.influence_blocks_torch(*args, block_size=64).double()  # torch from the same rounded inputs
        got = bwd.attention_backward_with_influence(*args, 64)[3].double()
        name = str(dtype).removeprefix("torch.")
        result[f"rel_err_triton_{name}"] = float((got - ref_same).norm() / ref_same.norm())
        result[f"rel_err_torch_{name}_vs_fp64"] = float((ref_same - ref).norm() / ref.norm())
        assert torch.isfinite(got).all(), f"non-finite influence from the kernel ({name})"
    return result


def time_kernel(device: torch.device, seq_len: int, reps: int = 3) -> float:
    """Milliseconds of the fused attention backward + influence for one Llama-3-8B layer (32 q / 8 kv heads, d 128)."""
    bwd = remote_module("moa_influence_bwd")
    q, o, do = (torch.randn(1, 32, seq_len, 128, dtype=torch.bfloat16, device=device) for _ in range(3))
    k, v = (torch.randn(1, 8, seq_len, 128, dtype=torch.bfloat16, device=device) for _ in range(2))
    bwd.attention_backward_with_influence(q, k, v, o, do, 64)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        bwd.attention_backward_with_influence(q, k, v, o, do, 64)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def build_model(shape: dict, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def profile_one(model, length: int, answer: int, device: torch.device, vocab: int, backend: str) -> dict:
    ids = torch.randint(0, vocab, (length,)).tolist()
    item = CalibrationItem(ids, answer_start=length - answer)
    config = ProfileConfig(
        lengths=(length,), block_size=64, model_name="random-llama-3-8b-shape", backend=backend, importance="gradient"
    )
    with tempfile.TemporaryDirectory() as work:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        path = profile_model(model, {length: [item]}, config, Path(work))[length]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        influence, _ = load_profile(path)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    assert torch.isfinite(influence).all() and influence.abs().sum() > 0, "profile is empty or not finite"
    return {
        "length": length,
        "seconds": seconds,
        "peak_gib": peak,
        "shape": list(influence.shape),
        "weights_gib": _weights_gib(model),
    }


def _weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def eager_gib(length: int, heads: int = 32, layers: int = 32) -> dict:
    """Memory of materialising A (bf16) and dL/dA per layer: [heads, N, N] each."""
    per_layer = 2 * heads * length * length * 2 / 2**30
    return {"one_layer_A_and_dA_gib": per_layer, "all_layers_A_gib": per_layer / 2 * layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--answer", type=int, default=256, help="answer tokens (the loss) at the end of the item")
    parser.add_argument("--repeat", type=int, default=2, help="profiled items per length (each timed)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test of this script)")
    parser.add_argument("--out", type=Path, default=Path("bench_profile.json"))
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if args.tiny else LLAMA3_8B
    lengths = [64, 100] if args.tiny else args.lengths
    report = {"env": environment(device), "lengths": lengths, "answer_tokens": args.answer}
    print(json.dumps(report["env"]), flush=True)
    backend = "auto"
    try:
        report["kernel_check"] = check_kernel(
            device, 200 if args.tiny else 1000, (4, 2) if args.tiny else (8, 2), 16 if args.tiny else 128
        )
        print("kernel check:", json.dumps(report["kernel_check"]), flush=True)
        if device.type == "cuda":
            ms = {n: time_kernel(device, n) for n in lengths}
            report["kernel_ms_per_layer"] = ms
            # 8 causal matrix products: lse (QK), then QK, dO V, dS K (dQ); QK, dO V, P dO, dS Q (dK / dV)
            report["kernel_tflops"] = {n: 8 * 2 * 128 * 32 * n * n / 2 / (t * 1e-3) / 1e12 for n, t in ms.items()}
            print("kernel ms per layer:", ms, "TFLOP/s:", report["kernel_tflops"], flush=True)
    except Exception as err:  # keep the one GPU call useful: fall back to the chunked torch path
        traceback.print_exc()
        report["kernel_error"] = repr(err)
        backend = "torch"
    model = build_model(shape, device)
    profile_one(
        model, 256 if not args.tiny else 32, 16, device, shape["vocab_size"], backend
    )  # warm-up (compiles Triton)
    rows = []
    for length in lengths:
        for _ in range(args.repeat):
            try:
                row = profile_one(model, length, min(args.answer, length // 2), device, shape["vocab_size"], backend)
            except torch.cuda.OutOfMemoryError as err:
                row = {"length": length, "seconds": float("nan"), "peak_gib": float("nan"), "error": repr(err)[:200]}
                torch.cuda.empty_cache()
            row["backend"] = backend
            row.update(eager_gib(length, shape["num_attention_heads"], shape["num_hidden_layers"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    args.out.write_text(json.dumps(report, indent=2))
    print(
        "\n| length | backend | seconds / item | peak GiB | eager A + dA, one layer (GiB) | eager A, all layers (GiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['length']} | {r['backend']} | {r['seconds']:.2f} | {r['peak_gib']:.1f} "
            f"| {r['one_layer_A_and_dA_gib']:.1f} | {r['all_layers_A_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()

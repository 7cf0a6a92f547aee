"""End-to-end serving speed of whole models on one GPU: decode throughput at max batch, memory, prefill.

    PYTHONPATH=. python benchmarks/bench_e2e.py --out $OUT                 # the H200 run (Llama-3-8B shapes)
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_e2e.py --smoke --out /tmp/e2e   # CPU smoke test

Models are built from their published configs with random bf16 weights (no download). Methods, all on the
same weights, all through the models' public forward / generate() with their caches:
- ``hf-dynamic``: transformers dense, SDPA, DynamicCache, ``generate()`` (the paper's "HF" row);
- ``hf-static``: transformers dense, SDPA, StaticCache, ``generate()`` with its automatic ``torch.compile``
  (mode reduce-overhead = CUDA graphs), the fastest dense path in transformers;
- ``moa-50`` / ``moa-25``: the MoA model (remote code, Triton kernels, static MoaCache) decoding with
  ``MoaDecodeLoop`` (one CUDA graph per step, no host sync per token); plans mix 2 local heads and 6 long heads
  per layer, scaled to 50% / 25% KV density at context + new tokens;
- ``uniform-50``: sink + one window per head at the same density, same kernels and loop;
- ``moa-50-generate`` (and ``moa-25-generate``, ``uniform-50-generate``): the same plan and cache, decoding through
  the model's own ``generate()`` (graph-replayed steps inside transformers' loop), timed like the dense methods.

Decode throughput for "N+T" (context N, T new tokens) is measured at each method's largest batch that fits
with a cache for N+T tokens, over ``--steps`` steps taken at the midpoint context N + T/2 (decode cost grows
linearly with context, so this is the mean over the generation); the cache is filled by a batch-1 prefill
copied to every row (timing does not depend on the values). Roofline: bytes that must move per step (weights
without the embedding table + the KV the method must read at that context) / measured copy bandwidth.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # batches fill the card: no fragmentation

import argparse
import copy
import datetime
import functools
import gc
import importlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StaticCache,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import make_plan  # noqa: E402
from moa_hub.apply import moa_twin, set_plan, sharing_twin  # noqa: E402
from moa_hub.export import write_moa_folder  # noqa: E402
from moa_hub.model_folder import read_model_folder  # noqa: E402
from moa_hub.plan import MoaPlan, uniform_like  # noqa: E402
from moa_hub.remote import remote_module  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SINK, MIN_SPAN = 64, 128
SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0),
    # per-head q / k RMSNorms before RoPE
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0),
    # MHA, as the paper's Vicuna-7B (Llama-2-7B's shape; its 4k positions are not enforced here)
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=512, rope_theta=10000.0),
}  # fmt: skip


def code_of(moa, name: str):
    """Module ``name`` of the remote code the MoA model was built from (moa-hub's, or a loaded folder's copy:
    its MoaCache is another class, and the model accepts only its own)."""
    package = type(moa).__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.{name}") if package else remote_module(name)


def log(*parts) -> None:
    print(*parts, flush=True)  # noqa: T201 (a script)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cleanup() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def dense_classes(name: str):
    if name.startswith("qwen3"):
        return Qwen3Config, Qwen3ForCausalLM
    return (Qwen2Config, Qwen2ForCausalLM) if name.startswith("qwen") else (LlamaConfig, LlamaForCausalLM)


def build(name: str) -> LlamaForCausalLM:
    config_cls, model_cls = dense_classes(name)
    config = config_cls(
        **SHAPES[name], max_position_embeddings=262144, tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEV):
        model = model_cls(config).to(DTYPE)
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def plans(model, n: int) -> dict[str, MoaPlan]:
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads

    def mixed(density: float) -> MoaPlan:
        alpha, beta = make_plan(n, density, SINK, MIN_SPAN, hkv)
        return MoaPlan(alpha=[alpha.tolist()] * layers, beta=[beta.tolist()] * layers, sink=SINK, min_span=MIN_SPAN)

    moa50, moa25 = mixed(0.5), mixed(0.25)
    return {"moa-50": moa50, "moa-25": moa25, "uniform-50": uniform_like(moa50, n)}


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting read + write (the same figure bench_attention.py uses)."""
    src = torch.randn(1024 * 2**19, device=DEV, dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * 2**30 / statistics.median(times[2:]) / 1e9


def kv_bytes_per_token_dense(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(DTYPE).bits // 8


def kv_bytes_must_read(config, plan: MoaPlan | None, context: int) -> int:
    """KV bytes one row must read per decode step at this context (dense: all; MoA: the spans, + slot ids)."""
    if plan is None:
        return kv_bytes_per_token_dense(config) * context
    spans = remote_module("moa_spans")
    alpha = torch.tensor(plan.alpha, dtype=torch.float64)
    beta = torch.tensor(plan.beta, dtype=torch.float64)
    slots = int(spans.span_at(context, alpha, beta, plan.sink, plan.min_span).sum())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return slots * (2 * head_dim * torch.finfo(DTYPE).bits // 8 + 4)


def max_batch(per_row: int, cap: int, margin_gib: float) -> int:
    if not CUDA:
        return min(cap, 4)
    free = torch.cuda.mem_get_info()[0] - margin_gib * 2**30
    return int(max(1, min(cap, free // per_row)))


# -- dense (transformers) ------------------------------------------------------------------------------
def dense_prefill(model, ids: torch.Tensor):
    cache = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def static_from(model, dyn, bsz: int, max_len: int) -> StaticCache:
    """A StaticCache of batch bsz for max_len tokens holding the batch-1 DynamicCache's tokens in every row."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for src, dst in zip(dyn.layers, cache.layers, strict=True):
        length = src.keys.shape[2]
        shape = (bsz, *src.keys.shape[1:2], 1, src.keys.shape[-1])
        probe = torch.empty(shape, dtype=src.keys.dtype, device=DEV)  # src lives on the host (to_host)
        dst.lazy_initialization(probe, probe)
        for name in ("keys", "values"):  # src is on the host (to_host): upload row 0, broadcast on the device
            out, row0 = getattr(dst, name), getattr(src, name)[0]
            out[0, :, :length].copy_(row0)
            out[1:, :, :length].copy_(out[:1, :, :length].expand(bsz - 1, -1, -1, -1))
        dst.cumulative_length.fill_(length)
    return cache


ROW_TENSORS = ("keys", "values", "slot_pos", "next_pos")  # per-row state of a cache layer (MoA and dense)


def to_host(cache):
    """The batch-1 cache with its per-row tensors moved to host memory (so it costs no GPU memory)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        for name in ROW_TENSORS:
            if isinstance(getattr(layer, name, None), torch.Tensor):
                setattr(layer, name, getattr(layer, name).cpu())
    return out


def expand_rows(host_cache, bsz: int):
    """A GPU copy of a host batch-1 cache with bsz identical rows (one upload, then a device-side broadcast)."""
    out = copy.copy(host_cache)
    out.layers = []
    for layer in host_cache.layers:
        new = copy.copy(layer)
        for name in ROW_TENSORS:
            src = getattr(layer, name, None)
            if isinstance(src, torch.Tensor):
                dst = torch.empty((bsz, *src.shape[1:]), dtype=src.dtype, device=DEV)
                dst[:1].copy_(src[:1])
                dst[1:].copy_(dst[:1].expand(bsz - 1, *src.shape[1:]))
                setattr(new, name, dst)
        out.layers.append(new)
    return out


def time_steps(warm_up, decode, steps: int, repeats: int) -> tuple[list[float], float]:
    """Seconds of warm_up(), then seconds per step of `repeats` calls of decode(steps), synchronised."""
    t0 = time.perf_counter()
    warm_up()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        decode(steps)
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return times, warm_s


def time_generate(model, cache, ids: torch.Tensor, steps: int, repeats: int) -> tuple[list[float], float]:
    """Warm-up generate() (compiles when the cache is static), then `repeats` timed generate(steps)."""
    state = {"ids": ids}

    def generate(new: int) -> None:
        state["ids"] = model.generate(
            state["ids"], past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )

    with torch.inference_mode():
        return time_steps(lambda: generate(8), generate, steps, repeats)


def run_dense(model, method: str, dyn, prompt, bsz: int, *, total: int, steps: int, repeats: int):
    length = dyn.layers[0].keys.shape[2]
    ids = torch.cat([prompt, prompt[:, -1:]], dim=1).expand(bsz, -1)  # cache holds `length`; 1 token to feed
    if method == "hf-dynamic":
        cache = expand_rows(dyn, bsz)
    else:
        cache = static_from(model, dyn, bsz, total)
    assert ids.shape[1] == length + 1
    return time_generate(model, cache, ids, steps, repeats)


# -- MoA ------------------------------------------------------------------------------------------------
def moa_prefill(moa, ids: torch.Tensor, total: int):
    cache = code_of(moa, "moa_cache").MoaCache(moa.config, max_cache_len=total)
    kw = code_of(moa, "moa_model").cache_argument(type(moa).forward)
    with torch.inference_mode():
        logits = moa(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
    return cache, logits.argmax(-1)


def run_moa(moa, cache1, first, bsz: int, *, steps: int, repeats: int):
    cache = expand_rows(cache1, bsz)
    warm = 3
    loop = code_of(moa, "moa_generate").MoaDecodeLoop(moa, cache, max_steps=warm + steps * repeats)
    loop.prime(first.expand(bsz), cache.layers[0].next_pos)
    return time_steps(lambda: loop.run(warm), loop.run, steps, repeats)  # warm: eager step, capture, replay


def run_moa_generate(moa, cache1, prompt, bsz: int, *, steps: int, repeats: int):
    """The same decode through the model's own generate() (graphed steps; the cache is passed in, so its graph is
    kept from the warm-up call on), timed like the dense methods."""
    cache = expand_rows(cache1, bsz)
    ids = torch.cat([prompt, prompt[:, -1:]], dim=1).expand(bsz, -1)  # the cache holds the prompt; 1 token to feed
    return time_generate(moa, cache, ids, steps, repeats)


def with_oom_retry(fn, bsz: int, tries: int = 4):
    """Run fn(bsz); on out-of-memory retry with 85% of the batch (fragmentation, graph pools)."""
    for attempt in range(tries):
        try:
            return fn(bsz), bsz
        except torch.OutOfMemoryError:
            if attempt == tries - 1:
                raise
            cleanup()
            bsz = max(1, int(bsz * 0.85))
    raise AssertionError("unreachable")


def per_row_bytes(method: str, model, cache1, total: int) -> int:
    """Cache bytes per row for `total` tokens, with the transient a decode step adds on top."""
    if method.startswith("hf-"):
        # dynamic: torch.cat makes a new K and V of one layer per step (2 / layers); static: SDPA gets a mask,
        # so transformers repeats K and V to the query heads for one layer (2 x group / layers)
        layers, group = (
            model.config.num_hidden_layers,
            model.config.num_attention_heads // model.config.num_key_value_heads,
        )
        extra = (2 * group if method == "hf-static" else 2) / layers
        return int(kv_bytes_per_token_dense(model.config) * total * (1 + extra))
    return sum(
        layer.keys.numel() * 2 * layer.keys.element_size() + layer.slot_pos.numel() * 4 for layer in cache1.layers
    )


def release_compiled(model) -> None:
    """Drop transformers' compiled forward and torch.compile's CUDA-graph trees (and their memory pools)."""
    for name in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, name):
            setattr(model, name, None)
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except (ImportError, AttributeError):
        pass
    cleanup()


def load_converted(dense, plan: MoaPlan, workdir: Path):
    """The MoA model through the public API: ``dense`` saved, converted by moa-hub's exporter (config with the
    plan, flat remote code, the same weight files), loaded with ``from_pretrained(trust_remote_code=True)``;
    then a dense twin sharing the loaded weights (one copy on the GPU). Returns (dense, moa, seconds)."""
    t0 = time.perf_counter()
    dense.save_pretrained(workdir / "dense")
    folder = write_moa_folder(read_model_folder(workdir / "dense"), plan, workdir / "moa", overwrite=True)
    config, dense_cls = dense.config, type(dense)
    del dense
    cleanup()
    moa = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=DTYPE, device_map=DEV)
    moa.eval().requires_grad_(False)
    dense = sharing_twin(dense_cls, config, moa)
    dense.generation_config.pad_token_id = 0
    return dense, moa, time.perf_counter() - t0


def projections_joined(model) -> bool:
    """Whether the first layer's q/k/v weights lie in one storage (the fused path ran them as one GEMM)."""
    attn = next(m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj"))
    return attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()


def run_context(dense, moa, context: int, new: int, args, copy_gbps: float, weight_bytes: int) -> list[dict]:
    total, mid = context + new, context + new // 2
    prompt = torch.randint(3, dense.config.vocab_size, (1, mid), device=DEV)
    rows = []
    plan_of = plans(dense, total)
    dyn = None
    for method in args.methods:
        cleanup()
        row = dict(context=context, new=new, method=method, measured_at=mid)
        try:
            t0 = time.perf_counter()
            if method.startswith("hf-"):
                dyn = dyn if dyn is not None else to_host(dense_prefill(dense, prompt))
                cache1, plan = dyn, None
            else:
                plan = plan_of[method.removesuffix("-generate")]
                set_plan(moa, plan)
                cache1, first = moa_prefill(moa, prompt, total)
                cache1 = to_host(cache1)
            sync()
            row["prefill_b1_s"] = round(time.perf_counter() - t0, 3)
            per_row = per_row_bytes(method, dense, cache1, total)
            bsz = max_batch(per_row, args.max_batch, args.margin_gib)
            timing = dict(steps=args.steps, repeats=args.repeats)
            if method.startswith("hf-"):
                fn = functools.partial(run_dense, dense, method, cache1, prompt, total=total, **timing)
            elif method.endswith("-generate"):
                fn = functools.partial(run_moa_generate, moa, cache1, prompt, **timing)
            else:
                fn = functools.partial(run_moa, moa, cache1, first, **timing)
            (times, warm_s), bsz = with_oom_retry(fn, bsz)
            if not method.startswith("hf-"):
                row["joined_projections"] = projections_joined(moa)
            step_s = statistics.median(times)
            must = weight_bytes + bsz * kv_bytes_must_read(dense.config, plan, mid)
            row.update(
                batch=bsz, cache_gib_per_row=round(per_row / 2**30, 3), step_ms=round(step_s * 1e3, 3),
                step_ms_all=[round(t * 1e3, 3) for t in times], tok_s=round(bsz / step_s, 1),
                warmup_s=round(warm_s, 1), bytes_per_step_gb=round(must / 1e9, 2),
                roofline_pct=round(100 * must / (copy_gbps * 1e9) / step_s, 1),
                kv_density=None if plan is None else round(plan.kv_density(total), 4),
            )  # fmt: skip
        except Exception as err:  # one failing method must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        if not method.startswith("hf-"):
            cache1 = None
        if method == "hf-static":
            release_compiled(dense)  # its CUDA-graph pools would otherwise shrink every later method's batch
        rows.append(row)
        log(json.dumps(row))
    return rows


def memory_case(dense, moa, context: int, bsz: int, new: int, chunk: int) -> list[dict]:
    """Peak GPU memory of generate() on a full batch (chunked prefill for both), dense vs MoA 50%."""
    rows = []
    ids = torch.randint(3, dense.config.vocab_size, (bsz, context), device=DEV)
    set_plan(moa, plans(dense, context + new)["moa-50"])
    for method, model in (("hf-dynamic", dense), ("moa-50 (generate)", moa)):
        cleanup()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        row = dict(method=method, context=context, new=new, batch=bsz, prefill_chunk=chunk)
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0, prefill_chunk_size=chunk,
                )  # fmt: skip
            sync()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        rows.append(row)
        log(json.dumps(row))
    return rows


ATTENTION_KERNEL = re.compile(r"attn|attention|flash|fmha|cudnn|_moa_prefill|sdpa", re.IGNORECASE)


def prefill_kernels(call) -> dict:
    """One more call of ``call`` under torch.profiler: device time summed per kernel, split into attention and the
    rest (GEMMs, norms, RoPE, the cache write), in ms, with the five longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activity, device_type = (
        (ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA)
        if CUDA
        else (ProfilerActivity.CPU, torch.autograd.DeviceType.CPU)
    )  # the CPU (smoke test) sums its ops' own times instead
    with profile(activities=[activity]) as prof:
        call()
        sync()
    per_name: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == device_type:
            us = evt.device_time_total if CUDA else evt.self_cpu_time_total
            per_name[evt.name] = per_name.get(evt.name, 0.0) + us / 1e3
    attention = sum(ms for name, ms in per_name.items() if ATTENTION_KERNEL.search(name))
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:5]
    return dict(kernels_ms=round(sum(per_name.values()), 1), attention_ms=round(attention, 1),
                top=[dict(name=name[:80], ms=round(ms, 1)) for name, ms in top])  # fmt: skip


def prefill_latency(dense, moa, lengths: list[int], kernels: bool = False) -> list[dict]:
    rows = []
    for n in lengths:
        ids = torch.randint(3, dense.config.vocab_size, (1, n), device=DEV)
        for method in ("hf-dynamic", "moa-50", "moa-25"):
            cleanup()
            # Lengths over 32k: one untimed call first, so that the single timed one pays no Triton compile (the
            # kernels' >32k launch config is compiled at its first use) and no first-touch of the allocator.
            reps, warm = (3, 0) if n <= 32768 else (2, 1)
            if method != "hf-dynamic":
                set_plan(moa, plans(dense, n)[method])
            call = (
                functools.partial(dense_prefill, dense, ids)
                if method == "hf-dynamic"
                else functools.partial(moa_prefill, moa, ids, n)
            )
            times = []
            for i in range(warm + reps):
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                if i >= warm:
                    times.append(time.perf_counter() - t0)
            row = dict(length=n, method=method, prefill_s=round(statistics.median(times), 4), repeats=reps, warmup=warm,
                       all_s=[round(t, 4) for t in times])  # fmt: skip
            if kernels:
                row.update(prefill_kernels(call))
            rows.append(row)
            log(json.dumps(row))
    return rows


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--contexts", default="4096+1024,8192+2048,16384+4096,32768+4096,131072+1024")
    parser.add_argument("--methods", default="hf-dynamic,hf-static,moa-50,moa-25,uniform-50")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=384)
    parser.add_argument("--margin-gib", type=float, default=6.0)
    parser.add_argument(
        "--memory", default="16384:32:32", help="context:batch:new for the peak-memory case ('' = skip)"
    )
    parser.add_argument("--prefill-lengths", default="4096,32768,131072")
    parser.add_argument(
        "--prefill-kernels", action="store_true",
        help="profile one more prefill per length and method: device time of attention and of the other kernels",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths (CPU check of the script)")
    parser.add_argument(
        "--from-folder", type=Path, default=None, metavar="WORKDIR",
        help="save the dense model there, convert it with moa-hub's exporter and load the MoA model with "
        "from_pretrained(trust_remote_code=True) (the public API; needs ~2x the weights of disk)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.model, args.contexts, args.steps, args.repeats = "tiny", "96+32,160+64", 4, 2
        args.memory, args.prefill_lengths = "128:2:4", "128"
    args.methods = args.methods.split(",")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dense = build(args.model)
    loaded = None
    if args.from_folder:
        dense, moa, seconds = load_converted(dense, plans(dense, 4096)["moa-50"], args.from_folder)
        loaded = dict(folder=str(args.from_folder / "moa"), moa_class=type(moa).__module__ + "." + type(moa).__name__,
                      save_convert_load_s=round(seconds, 1))  # fmt: skip
        log(json.dumps(loaded))
    else:
        moa = moa_twin(dense, plans(dense, 4096)["moa-50"])
    copy_gbps = copy_bandwidth() if CUDA else 1.0
    embed = dense.get_input_embeddings().weight
    weight_bytes = sum(p.numel() * p.element_size() for p in dense.parameters()) - embed.numel() * embed.element_size()
    log(json.dumps(dict(copy_GBps=round(copy_gbps, 1), weight_GB_read_per_step=round(weight_bytes / 1e9, 2))))
    result = dict(decode=[], memory=[], prefill=[])
    result["meta"] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=args.model,
        gpu=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, copy_GBps=round(copy_gbps, 1), weight_bytes=weight_bytes, loaded=loaded,
        args={k: str(v) for k, v in vars(args).items()},
    )  # fmt: skip
    save = lambda: (args.out / "e2e.json").write_text(json.dumps(result, indent=2))  # noqa: E731
    for case in filter(None, args.contexts.split(",")):  # saved after every stage: a time-out keeps what was measured
        context, new = (int(x) for x in case.split("+"))
        result["decode"] += run_context(dense, moa, context, new, args, copy_gbps, weight_bytes)
        save()
    if args.memory:
        context, bsz, new = (int(x) for x in args.memory.split(":"))
        result["memory"] = memory_case(dense, moa, context, bsz, new, chunk=min(4096, context))
        save()
    if args.prefill_lengths:
        lengths = [int(x) for x in args.prefill_lengths.split(",")]
        result["prefill"] = prefill_latency(dense, moa, lengths, kernels=args.prefill_kernels)
        save()
    print_tables(result)


def print_tables(result: dict) -> None:
    by_ctx: dict = {}
    for row in result["decode"]:
        by_ctx.setdefault((row["context"], row["new"]), {})[row["method"]] = row
    log("\n| context+new | method | batch | step ms | tok/s | x hf-dynamic | x hf-static | % roofline |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (ctx, new), rows in by_ctx.items():
        base = {k: rows.get(k, {}).get("tok_s") for k in ("hf-dynamic", "hf-static")}
        for method, row in rows.items():
            if "error" in row:
                log(f"| {ctx}+{new} | {method} | error: {row['error'][:80]} |")
                continue
            ratios = [f"{row['tok_s'] / b:.2f}" if b else "-" for b in base.values()]
            log(f"| {ctx}+{new} | {method} | {row['batch']} | {row['step_ms']} | {row['tok_s']} | "
                f"{ratios[0]} | {ratios[1]} | {row['roofline_pct']} |")  # fmt: skip
    for row in result["memory"] + result["prefill"]:
        log(json.dumps(row))


if __name__ == "__main__":
    main()

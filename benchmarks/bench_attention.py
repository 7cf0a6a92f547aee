"""Benchmark the MoA Triton kernels against dense attention on one GPU; prints tables, writes RESULTS rows.

    python benchmarks/bench_attention.py --out results/          # the H200 run (Llama-3-8B attention shapes)
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke --out /tmp/b   # CPU smoke test

Measures in one run: device-to-device copy bandwidth, bf16 matmul rate, then
- decode: MoA kernel (CUDA graph replays) vs dense SDPA flash decode, bytes actually read, % of copy bandwidth, and
  dense SDPA over the same bytes (every head as long as MoA's mean head: what flash decode gets from them);
- prefill: MoA kernel vs SDPA FlashAttention dense causal and vs compiled FlexAttention with the same block mask
  (mask creation timed separately), with a roofline column (FLOPs and bytes the kernel must do).
Plans are heterogeneous: 2 local heads (beta 0) and 6 long heads (alpha 0, beta spread), scaled to a target
KV density with moa_spans.kv_density. Times are medians of CUDA-event timings (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moa_hub.remote import remote_module  # noqa: E402

spans = remote_module("moa_spans")
prefill = remote_module("moa_prefill")
decode = remote_module("moa_decode")
reference = remote_module("moa_reference")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16  # the interpreter cannot do bf16 dots
SPREAD = torch.tensor([0.7, 0.85, 1.0, 1.0, 1.15, 1.3], dtype=torch.float64)


def log(*parts) -> None:
    print(*parts, flush=True)  # noqa: T201 (a script, not library code)


def patch_interpreter() -> None:
    """Under TRITON_INTERPRET=1 (the scripts' CPU smoke runs), the tests' fix for numpy >= 2.4 against triton 3.6's
    interpreter (tests/conftest.py)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.conftest import patch_interpreter_index

        patch_interpreter_index()


def bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of fn (CUDA events, L2 flushed between runs; host clock under the interpreter)."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (decode is launch-bound at small sizes); plain fn on CPU."""
    if not CUDA:
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_plan(n: int, density: float, sink: int, min_span: int, hkv: int = 8):
    """alpha/beta [hkv]: 2 local heads (alpha 1024/2048, smaller at short n) + long heads scaled to density."""
    local = [min(1024.0, n / 8), min(2048.0, n / 4)]
    spread = SPREAD[: hkv - 2] if hkv == 8 else torch.linspace(0.7, 1.3, hkv - 2, dtype=torch.float64)
    alpha = torch.tensor(local + [0.0] * (hkv - 2), dtype=torch.float64)

    def with_scale(c: float):
        beta = torch.cat([torch.zeros(2, dtype=torch.float64), (c * spread).clamp(max=1.0)])
        return alpha, beta

    lo, hi = 0.0, 1.0 / float(spread.min())
    for _ in range(50):  # bisection on the long heads' scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spans.kv_density(*with_scale(mid), n, sink, min_span) < density else (lo, mid)
    return with_scale(hi)


def device_ceilings(size_mb: int) -> dict:
    src = torch.randn(size_mb * 2**19, device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    n = 8192 if CUDA else 256
    a, b = (torch.randn(n, n, device=DEV, dtype=DTYPE) for _ in range(2))
    mm_ms = bench(lambda: a @ b)
    tiny = torch.zeros(1, device=DEV)
    floor_ms = bench(graphed(lambda: tiny.add_(1)))  # one graph replay of a one-element kernel, timed like decode
    return {
        "copy_GBps": 2 * size_mb * 2**20 / copy_ms / 1e6,
        "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9,
        "replay_floor_ms": floor_ms,
    }


def decode_caps(n: int, alpha, beta, sink: int, min_span: int) -> list[int]:
    """Slots per kv head of a static cache holding exactly S_g(n) (at least sink + 1)."""
    return [max(sink + 1, int(s)) for s in spans.span_at(n, alpha, beta, sink, min_span).tolist()]


def decode_bytes(bsz: int, slots: int, head_dim: int) -> int:
    """Bytes a decode reads over bsz rows of ``slots`` cache slots: K and V (bf16) and the int32 slot positions."""
    return bsz * slots * (2 * head_dim * 2 + 4)


def decode_entry(cfg, bsz: int, slots: int) -> int:
    """Index of the entry of the head size's decode table that serves bsz rows of ``slots`` cache slots."""
    conf = decode.decode_config(bsz, slots, cfg.head_dim, cfg.hkv)
    return next(i for i, entry in enumerate(decode.decode_table(cfg.head_dim)) if entry[2] is conf)


def decode_cache(bsz: int, n: int, alpha, beta, sink: int, min_span: int, head_dim: int):
    """Static cache holding exactly S_g(n) slots per head, filled as docs/internals.md places tokens."""
    caps = decode_caps(n, alpha, beta, sink, min_span)
    offsets = [sum(caps[:g]) for g in range(len(caps))]
    total = sum(caps)
    keys = torch.randn(bsz, total + 1, head_dim, device=DEV, dtype=DTYPE)
    values = torch.randn_like(keys)
    slot_pos = torch.full((bsz, total + 1), -1, dtype=torch.int32, device=DEV)
    for off, cap in zip(offsets, caps, strict=True):
        ring = cap - sink
        recent = torch.arange(max(sink, n - ring), n, device=DEV)
        slot_pos[:, off : off + sink] = torch.arange(sink, device=DEV, dtype=torch.int32)
        slot_pos[:, off + sink + (recent - sink) % ring] = recent.to(torch.int32)
    as_dev = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEV)  # noqa: E731
    return keys, values, slot_pos, as_dev(offsets), as_dev(caps)


STEP_BYTES = 512e6  # in-step timing: enough layers that one replay reads ~10x the 50 MB L2
MIN_STEP_LAYERS = 4  # and at least this many, so one replay's own cost (~4.6 us) is shared by layers as in a model
STEP_MEMORY = 24e9  # unless their tensors would pass this (the largest shapes, where a layer takes milliseconds)


def step_layers(bytes_per_layer: float) -> int:
    """Layers to chain in one graph for the in-step timing, MoA and dense alike: enough to read STEP_BYTES, at least
    MIN_STEP_LAYERS, at most 32 (a 32-layer model's decode step) and what fits in STEP_MEMORY (at least one)."""
    want = max(MIN_STEP_LAYERS, -(-STEP_BYTES // bytes_per_layer))
    return int(max(1, min(32, want, STEP_MEMORY // bytes_per_layer)))


def per_layer_in_step(fns) -> float:
    """ms per call of fns (one per layer, each on its own tensors) replayed back to back in one CUDA graph.

    This is how attention runs inside a captured decode step: no launch latency or L2 flush between layers,
    and the layers' data together far exceed the L2, so no layer reads another's (or its own last) bytes from it.
    """
    return bench(graphed(lambda: [fn() for fn in fns])) / len(fns)


def time_dense_decode(bsz: int, n: int, cfg) -> tuple[float, float, int]:
    """Dense decode baseline: SDPA (flash) with the group's query heads as rows, over the whole cache.

    Returns (ms of one call, ms per layer in a graph of `layers` layers, layers)."""
    layers = step_layers(bsz * cfg.hkv * n * cfg.head_dim * 2 * 2) if CUDA else 1
    dense_q = torch.randn(bsz, cfg.hkv, cfg.hq // cfg.hkv, cfg.head_dim, device=DEV, dtype=DTYPE)
    fns = []
    for _ in range(layers):
        dense_k, dense_v = (torch.randn(bsz, cfg.hkv, n, cfg.head_dim, device=DEV, dtype=DTYPE) for _ in range(2))
        fns.append(lambda k=dense_k, v=dense_v: torch.nn.functional.scaled_dot_product_attention(dense_q, k, v))
    return bench(graphed(fns[0])), per_layer_in_step(fns), layers


def time_moa_decode(bsz: int, n: int, alpha, beta, cfg) -> tuple[float, int]:
    """MoA decode over a static cache of S_g(n) slots per head; returns (ms, slots read per row)."""
    cache = decode_cache(bsz, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim)
    query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device=DEV, dtype=DTYPE)
    q_pos = torch.full((bsz,), n - 1, device=DEV, dtype=torch.int64)
    rule = (alpha.to(DEV), beta.to(DEV), cfg.sink, cfg.min_span)
    return bench(graphed(lambda: decode.moa_decode(query, *cache, q_pos, *rule))), cache[0].shape[1] - 1


def time_moa_decode_in_step(bsz: int, n: int, alpha, beta, cfg, bytes_per_layer: int) -> tuple[float, int]:
    """MoA decode per layer, `layers` layers (own caches, same plan) back to back in one graph: (ms, layers)."""
    layers = step_layers(bytes_per_layer) if CUDA else 1
    query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device=DEV, dtype=DTYPE)
    q_pos = torch.full((bsz,), n - 1, device=DEV, dtype=torch.int64)
    rule = (alpha.to(DEV), beta.to(DEV), cfg.sink, cfg.min_span)
    caches = [decode_cache(bsz, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim) for _ in range(layers)]
    fns = [lambda c=c: decode.moa_decode(query, *c, q_pos, *rule) for c in caches]
    return per_layer_in_step(fns), layers


def time_copy(nbytes: int) -> float:
    """ms of a device-to-device copy of nbytes (graph replay, L2 flushed). The graph's memcpy node is the driver's: at
    one size it ran at 62% of the large-copy rate in one run and 96% in another, and odd sizes are always slow
    (RESULTS.md, "Dense at equal bytes"), so it is no bound on a kernel; dense at equal bytes is the reference."""
    src = torch.empty(max(1, nbytes // 2), device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    return bench(graphed(lambda: dst.copy_(src)))


def run_decode(cfg, ceil: dict, rows: list) -> None:
    for n in cfg.decode_n:
        for bsz in cfg.decode_b:
            t_dense, t_dense_step, dense_layers = time_dense_decode(bsz, n, cfg)
            for target in cfg.densities:
                alpha, beta = make_plan(n, target, cfg.sink, cfg.min_span, cfg.hkv)
                density = spans.kv_density(alpha, beta, n, cfg.sink, cfg.min_span)
                t, slots = time_moa_decode(bsz, n, alpha, beta, cfg)
                read = decode_bytes(bsz, slots, cfg.head_dim)
                t_step, layers = time_moa_decode_in_step(bsz, n, alpha, beta, cfg, read)
                t_copy = time_copy(read)
                # dense over the same K/V bytes: SDPA at this batch with every kv head as long as MoA's mean head
                n_equal = max(1, round(slots / cfg.hkv))
                t_equal, t_equal_step, _ = time_dense_decode(bsz, n_equal, cfg)
                bw = read / t / 1e6
                row = dict(kind="decode", n=n, batch=bsz, density=round(density, 4), moa_ms=t, dense_ms=t_dense,
                           ratio=t / t_dense, target_ratio=1.25 * density, bytes=read, GBps=bw,
                           pct_copy=100 * bw / ceil["copy_GBps"], step_layers=layers, moa_step_ms=t_step,
                           dense_step_layers=dense_layers, dense_step_ms=t_dense_step, step_ratio=t_step / t_dense_step,
                           step_pct_copy=100 * read / t_step / 1e6 / ceil["copy_GBps"], copy_same_ms=t_copy,
                           copy_same_pct=100 * 2 * read / t_copy / 1e6 / ceil["copy_GBps"], dense_equal_n=n_equal,
                           dense_equal_ms=t_equal, dense_equal_step_ms=t_equal_step)  # fmt: skip
                rows.append(row)
                log(json.dumps(row))


def flex_setup(q_len: int, lo: torch.Tensor, hq: int, group: int, sink: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (kv_idx >= lo[h // group, q_idx]))

    return lambda: create_block_mask(mask_mod, B=None, H=hq, Q_LEN=q_len, KV_LEN=q_len, device=DEV, _compile=True)


def dense_flash(query, key, value, rep_ms: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = query.shape[1] // key.shape[1]
    rep_k, rep_v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if CUDA else [SDPBackend.MATH]):
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(query, rep_k, rep_v, is_causal=True)  # noqa: E731
        t_graph = bench(graphed(fn)) if query.shape[2] <= 4096 else None
        return bench(fn, rep_ms=rep_ms), t_graph


def prefill_case(cfg, n: int, target: float, tensors, ceil: dict, t_flash: tuple, flex) -> dict:
    query, key, value, q_pos = tensors
    hq, hkv, d, sink, ms = cfg.hq, cfg.hkv, cfg.head_dim, cfg.sink, cfg.min_span
    alpha, beta = make_plan(n, target, sink, ms, hkv)
    rule = (alpha.to(DEV), beta.to(DEV), sink, ms)
    frac = spans.attention_fraction(alpha, beta, n, sink, ms)
    t = bench(lambda: prefill.moa_prefill(query, key, value, q_pos, *rule), rep_ms=cfg.prefill_rep_ms)
    t_graph = bench(graphed(lambda: prefill.moa_prefill(query, key, value, q_pos, *rule))) if n <= 4096 else None
    flops = 4 * hq * d * frac * n * (n + 1) / 2
    moved = (2 * hq + 2 * hkv) * n * d * 2
    floor_ms = max(flops / ceil["matmul_TFLOPs"] / 1e9, moved / ceil["copy_GBps"] / 1e6)
    row = dict(kind="prefill", n=n, density=round(spans.kv_density(alpha, beta, n, sink, ms), 4), frac=frac,
               moa_ms=t, flash_ms=t_flash[0], ratio=t / t_flash[0], moa_graph_ms=t_graph, flash_graph_ms=t_flash[1], target_ratio=1.2 * frac, flops=flops, bytes=moved,
               TFLOPs=flops / t / 1e9, pct_roofline=100 * floor_ms / t)  # fmt: skip
    if flex is not None and time.time() < cfg.flex_deadline:
        lo = prefill.window_lo(q_pos, rule[0], rule[1], sink, ms)[0]  # [Hkv, N]
        make_mask = flex_setup(n, lo, hq, hq // hkv, sink)
        make_mask()  # compile the mask creation
        start = time.perf_counter()
        block_mask = make_mask()
        torch.cuda.synchronize()
        row["flex_mask_ms"] = (time.perf_counter() - start) * 1e3
        flex_fn = lambda: flex(query, key, value, block_mask=block_mask, enable_gqa=True)  # noqa: E731
        row["flex_ms"] = bench(flex_fn, rep_ms=cfg.prefill_rep_ms)
        row["flex_vs_moa_err"] = rel(flex(query, key, value, block_mask=block_mask, enable_gqa=True),
                                     prefill.moa_prefill(query, key, value, q_pos, *rule))  # fmt: skip
    return row


def run_prefill(cfg, ceil: dict, rows: list) -> None:
    flex = None
    if CUDA and not cfg.skip_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    for n in cfg.prefill_n:
        query = torch.randn(1, cfg.hq, n, cfg.head_dim, device=DEV, dtype=DTYPE)
        key, value = (torch.randn(1, cfg.hkv, n, cfg.head_dim, device=DEV, dtype=DTYPE) for _ in range(2))
        q_pos = torch.arange(n, device=DEV)[None]
        t_flash = dense_flash(query, key, value, cfg.prefill_rep_ms)
        for target in cfg.densities:
            try:
                row = prefill_case(cfg, n, target, (query, key, value, q_pos), ceil, t_flash, flex)
            except Exception as exc:  # record, keep the run going
                row = dict(kind="prefill", n=n, target=target, error=repr(exc)[:300])
            rows.append(row)
            log(json.dumps(row))


def rel(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check_correct(cfg) -> dict:
    """Kernel vs float64 reference on fresh inputs before any timing (Llama shapes, shorter lengths)."""
    hq, hkv, d, sink, ms = cfg.hq, cfg.hkv, cfg.head_dim, cfg.sink, cfg.min_span
    n = cfg.check_n
    alpha, beta = make_plan(n, 0.25, sink, ms, hkv)
    rule = (alpha.to(DEV), beta.to(DEV), sink, ms)
    query = torch.randn(2, hq, n, d, device=DEV, dtype=DTYPE)
    key, value = (torch.randn(2, hkv, n, d, device=DEV, dtype=DTYPE) for _ in range(2))
    q_pos = torch.arange(n, device=DEV)[None].repeat(2, 1)
    q_pos[1] -= n // 3  # left padding in row 1
    q_pos[1] = q_pos[1].clamp(min=-1)
    out = prefill.moa_prefill(query, key, value, q_pos, *rule)
    ref = reference.moa_attention_ref(query.double(), key.double(), value.double(), q_pos, q_pos, *rule)
    cache = decode_cache(3, n, alpha, beta, sink, ms, d)
    dq = torch.randn(3, hq, 1, d, device=DEV, dtype=DTYPE)
    dpos = torch.full((3,), n - 1, device=DEV)
    dout = decode.moa_decode(dq, *cache, dpos, *rule)  # 3 rows: the balanced kernel (DECODE_CONFIGS)
    dref = decode.moa_decode_ref(dq.double(), cache[0].double(), cache[1].double(), *cache[2:], dpos, *rule)
    result = {"prefill_rel_err": rel(out, ref), "decode_rel_err": rel(dout, dref)}
    for fused in (True, False):  # the split kernel's two merge variants, with small splits (many per head)
        conf = {"BLOCK_N": 16 if decode.INTERPRETED else 64, "num_warps": 1 if decode.INTERPRETED else 4,
                "num_stages": 1 if decode.INTERPRETED else 3, "split_len": 32 if decode.INTERPRETED else 128,
                "fused_merge": fused}  # fmt: skip
        variant = decode._launch_decode(dq, cache, dpos, *rule[:2], d**-0.5, sink, ms, config=conf)
        result[f"decode_fused_{fused}_rel_err"] = rel(variant, dref)
    log(json.dumps(result))
    if not all(err < 1e-2 for err in result.values()):
        raise SystemExit(f"kernels disagree with the reference: {result}")
    return result


def prefill_inputs(cfg, n: int, density: float):
    alpha, beta = make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
    rule = (alpha.to(DEV), beta.to(DEV), cfg.sink, cfg.min_span)
    query = torch.randn(1, cfg.hq, n, cfg.head_dim, device=DEV, dtype=DTYPE)
    key, value = (torch.randn(1, cfg.hkv, n, cfg.head_dim, device=DEV, dtype=DTYPE) for _ in range(2))
    return query, key, value, torch.arange(n, device=DEV)[None], rule


def sweep_prefill(cfg, bucket: int, n: int) -> dict:
    """Time every prefill candidate at length n (densities 50% and 25%); install the best sum in PREFILL_CONFIGS[bucket]."""
    inputs = [prefill_inputs(cfg, n, density) for density in cfg.densities]
    # each candidate's output against the installed config's (itself checked against float64 in check_correct)
    expected = [prefill.moa_prefill(query, key, value, q_pos, *rule) for query, key, value, q_pos, rule in inputs]
    timings: dict = {}
    for bm, bn, warps, stages, pack in cfg.prefill_candidates:
        conf = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "PACK": pack}
        try:
            for (query, key, value, q_pos, (alpha, beta, sink, min_span)), want in zip(inputs, expected, strict=True):
                args = (query, key, value, q_pos, alpha, beta, None, cfg.head_dim**-0.5, sink, min_span, conf)
                if (err := rel(prefill._launch_prefill(*args), want)) > 1e-2:
                    raise ValueError(f"output differs from the installed config's: rel err {err:.2e}")
                t = bench(lambda: prefill._launch_prefill(*args), rep_ms=cfg.sweep_rep_ms)  # noqa: B023
                timings.setdefault(json.dumps(conf), []).append(t)
        except Exception as exc:
            timings.pop(json.dumps(conf), None)
            log("prefill config failed", conf, repr(exc)[:200])
    log(f"prefill sweep n={n} (ms at densities {cfg.densities})", json.dumps(timings))
    best = json.loads(min(timings, key=lambda c: sum(timings[c])))
    prefill.PREFILL_CONFIGS[bucket] = (prefill.PREFILL_CONFIGS[bucket][0], best)
    return {"n": n, "best": best, "ms": timings, "densities": cfg.densities}


def decode_candidate(candidate: tuple) -> dict:
    """A decode launch config (of DECODE_CONFIGS or DECODE_CONFIGS_D64) from (BLOCK_N, num_warps, num_stages,
    programs_per_sm, fused_merge, merge_splits [, split_cap]) for the split kernel, or ("balanced", BLOCK_N, num_warps, num_stages, programs_per_sm
    [, segment_cost]) for the balanced kernel with the table's row merge; a dict is the config itself."""
    if isinstance(candidate, dict):
        return candidate
    if candidate[0] == "balanced":
        keys = ("BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "segment_cost")
        return {"balanced": True, **dict(zip(keys, candidate[1:], strict=False)), "merge_splits": 16, "row_merge": True}
    keys = ("BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "fused_merge", "merge_splits", "split_cap")
    return dict(zip(keys[: len(candidate)], candidate, strict=True))


def time_decode_candidates(cfg, n: int, bsz: int, density: float, candidates, entry: int, deadline=None) -> dict:
    """ms of decode (CUDA-graph replays) at (n, bsz, density) for each candidate, installed in entry ``entry`` of the
    head size's table (``decode.decode_table(cfg.head_dim)``).

    The entry is restored afterwards; a shape that another entry would serve stops the run (the timing would be of
    the wrong config). Candidates left when time.time() passes ``deadline`` are skipped.
    """
    alpha, beta = make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
    table = decode.decode_table(cfg.head_dim)
    original = table[entry]
    timings = {}
    try:
        for candidate in candidates:
            if deadline is not None and time.time() > deadline:
                break
            conf = decode_candidate(candidate)
            table[entry] = decode.with_config(original, conf)
            try:
                ms, slots = time_moa_decode(bsz, n, alpha, beta, cfg)
            except Exception as exc:
                log("decode config failed", conf, repr(exc)[:200])
                continue
            if not decode.INTERPRETED and decode.decode_config(bsz, slots, cfg.head_dim, cfg.hkv) is not conf:
                raise SystemExit(f"decode shape n={n} b={bsz} is not served by entry {entry}: fix the shapes")
            timings[json.dumps(conf)] = ms
    finally:
        table[entry] = original
    return timings


def sweep_decode(cfg, n: int, bsz: int) -> dict:
    """Time every decode candidate at (n, bsz, density 50%); install the best in the entry that serves it."""
    alpha, beta = make_plan(n, 0.5, cfg.sink, cfg.min_span, cfg.hkv)
    bucket = decode_entry(cfg, bsz, sum(decode_caps(n, alpha, beta, cfg.sink, cfg.min_span)))
    timings = time_decode_candidates(cfg, n, bsz, 0.5, cfg.decode_candidates, bucket)
    log(f"decode sweep n={n} b={bsz}", json.dumps(timings))
    table = decode.decode_table(cfg.head_dim)
    best = json.loads(min(timings, key=timings.get)) if timings else table[bucket][2]
    table[bucket] = decode.with_config(table[bucket], best)
    return {"n": n, "batch": bsz, "best": best, "ms": timings}


def sweep(cfg, stages: tuple) -> dict:
    """Pick the launch configs on this device before the tables: prefill and decode, one shape per length bucket."""
    chosen = {}
    if run_prefill in stages:
        chosen = {f"prefill_{n}": sweep_prefill(cfg, bucket, n) for bucket, n in enumerate(cfg.sweep_n)}
    for n, bsz in cfg.sweep_decode if run_decode in stages else ():
        chosen[f"decode_{n}x{bsz}"] = sweep_decode(cfg, n, bsz)
    log("# tables to paste into kernels/moa_prefill.py and kernels/moa_decode.py:\n" + config_tables())
    return chosen


def config_tables() -> str:
    """The installed launch-config tables as Python source (the winners of this run's sweep)."""
    lines = ["PREFILL_CONFIGS = ["]
    lines += [f"    ({limit}, {conf})," for limit, conf in prefill.PREFILL_CONFIGS]
    for name, head_dim in (("DECODE_CONFIGS", 128), ("DECODE_CONFIGS_D64", 64)):
        lines += ["]", f"{name} = ["]
        lines += [f"    {entry}," for entry in decode.decode_table(head_dim)]
    return "\n".join(lines + ["]"]).replace("2305843009213693952", "2**61").replace("4611686018427387904", "2**62")


class BenchConfig(argparse.Namespace):
    """Shapes of one run (Llama-3-8B attention: 32 q heads, 8 kv heads, d=128, bf16; sink 64, min_span 128)."""

    hq, hkv, head_dim, sink, min_span = 32, 8, 128, 64, 128
    densities = (0.5, 0.25)
    decode_n = (8192, 32768, 131072)
    decode_b = (1, 16, 64)
    prefill_n = (1024, 4096, 16384, 32768, 131072)
    check_n = 3000
    # one length per PREFILL_CONFIGS bucket (<= 2k, <= 8k, <= 32k, longer); one (n, batch) per DECODE_CONFIGS
    # bucket (<= 2 rows; rows x slots <= 3 * 2**18, more; slots ~ 8 heads x n x density 0.5: 131k, 524k, 33.5M)
    sweep_n = (1024, 4096, 16384, 65536)
    sweep_decode = ((32768, 1), (8192, 16), (131072, 64))
    sweep_rep_ms, prefill_rep_ms = 300, 1000
    # (BLOCK_M, BLOCK_N, num_warps, num_stages, PACK): BLOCK_M tile rows = PACK query heads x BLOCK_M / PACK positions
    prefill_candidates = ((128, 64, 8, 3, 1), (128, 128, 8, 3, 1), (128, 64, 4, 3, 1), (64, 64, 4, 3, 1),
                          (64, 32, 4, 3, 1), (128, 32, 4, 4, 1), (128, 128, 8, 2, 1), (64, 64, 4, 2, 1),
                          (64, 128, 4, 3, 1), (128, 64, 8, 3, 4), (128, 128, 8, 2, 4), (128, 128, 8, 3, 4),
                          (128, 64, 4, 3, 4), (128, 32, 4, 3, 4), (128, 32, 8, 3, 4), (64, 64, 4, 3, 4),
                          (64, 32, 4, 3, 4), (256, 64, 8, 3, 4), (256, 32, 8, 3, 4), (128, 64, 8, 4, 4),
                          (64, 128, 4, 3, 4), (128, 64, 8, 3, 2), (64, 64, 4, 3, 2))  # fmt: skip
    # split kernel: (BLOCK_N, num_warps, num_stages, programs_per_sm, fused_merge, merge_splits); balanced kernel:
    # ("balanced", BLOCK_N, num_warps, num_stages, programs_per_sm[, segment_cost])
    decode_candidates = ((64, 4, 4, 8, True, 8), (64, 4, 4, 8, False, 8), (64, 4, 4, 8, True, 16),
                         (64, 4, 4, 24, True, 8), (64, 8, 4, 8, True, 8), (128, 8, 3, 8, True, 8),
                         (32, 4, 4, 24, True, 16), (64, 4, 3, 4, True, 8), (64, 8, 3, 48, True, 16),
                         (32, 2, 4, 16, True, 8), (64, 2, 3, 1, True, 16), ("balanced", 64, 2, 2, 4, 2),
                         ("balanced", 64, 4, 3, 2, 3), ("balanced", 64, 2, 2, 4, 0), ("balanced", 64, 4, 3, 2, 0),
                         ("balanced", 64, 2, 2, 3, 2), ("balanced", 128, 4, 2, 2, 2))  # fmt: skip
    copy_mb = 4096
    flex_deadline = float("inf")

    @classmethod
    def quick(cls) -> BenchConfig:
        """The issue's tables in about 5 minutes on one H200: fewer candidates, shorter timings, little flex."""
        cfg = cls()
        cfg.sweep_rep_ms, cfg.prefill_rep_ms, cfg.copy_mb = 100, 300, 2048
        cfg.prefill_candidates = ((64, 64, 4, 3, 1), (64, 32, 4, 3, 1), (128, 64, 8, 3, 4), (128, 128, 8, 2, 4),
                                  (128, 64, 4, 3, 4), (128, 32, 4, 3, 4), (64, 64, 4, 3, 4), (64, 32, 4, 3, 4),
                                  (256, 64, 8, 3, 4))  # fmt: skip
        cfg.decode_candidates = ((64, 4, 4, 8, True, 16), (64, 2, 3, 1, True, 16), (64, 2, 3, 4, True, 16),
                                 ("balanced", 64, 2, 2, 4, 2), ("balanced", 64, 4, 3, 2, 3))  # fmt: skip
        return cfg

    @classmethod
    def smoke(cls) -> BenchConfig:
        cfg = cls()
        cfg.hq, cfg.hkv, cfg.head_dim, cfg.sink, cfg.min_span = 8, 4, 16, 4, 8
        cfg.decode_n, cfg.decode_b, cfg.prefill_n = (96,), (2,), (64, 100)
        cfg.check_n, cfg.sweep_n, cfg.sweep_decode, cfg.copy_mb = 70, (64, 80, 96, 100), ((96, 2),), 8
        cfg.prefill_candidates = ((16, 16, 1, 1, 1), (16, 16, 1, 1, 2))
        cfg.decode_candidates = ((16, 1, 1, 8, True, 8), (16, 1, 1, 8, False, 4), ("balanced", 16, 1, 1, 2, 1))
        return cfg


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list, ceil: dict) -> str:
    lines = ["### Decode (one token per row; dense = SDPA flash over the full cache)", "",
             "One call: CUDA-graph replay of one kernel, L2 flushed before it. In step: the per-layer time of `layers` "
             "layers (own caches) replayed back to back in one graph, as in a captured decode step. Same-size copy: a "
             "device copy of the bytes read (a graph memcpy node, whose speed varies between runs), as % of the large-copy "
             "bandwidth. Dense at equal bytes: SDPA flash at the same "
             "batch over a cache as long as MoA's mean head (the same K/V bytes, every head equal).", "",
             "| context | batch | KV density | MoA ms | dense ms | time ratio | target <= 1.25 x density "
             "| bytes read (MB) | % of copy BW (target >= 80) | layers | in step: MoA ms | dense ms | time ratio "
             "| % of copy BW | same-size copy, % | dense at equal bytes: context | ms | in step ms | MoA / it, in step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]  # fmt: skip
    for r in (r for r in rows if r["kind"] == "decode"):
        ok = "yes" if r["ratio"] <= r["target_ratio"] else "NO"
        ok_step = "yes" if r["step_ratio"] <= r["target_ratio"] else "NO"
        lines.append(f"| {r['n']} | {r['batch']} | {r['density']:.3f} | {r['moa_ms']:.4f} | {r['dense_ms']:.4f} "
                     f"| {r['ratio']:.3f} | {r['target_ratio']:.3f} ({ok}) | {r['bytes'] / 1e6:.1f} "
                     f"| {r['pct_copy']:.1f} | {r['step_layers']} | {r['moa_step_ms']:.4f} | {r['dense_step_ms']:.4f} "
                     f"| {r['step_ratio']:.3f} ({ok_step}) | {r['step_pct_copy']:.1f} | {r['copy_same_pct']:.1f} "
                     f"| {r['dense_equal_n']} | {r['dense_equal_ms']:.4f} | {r['dense_equal_step_ms']:.4f} "
                     f"| {r['moa_step_ms'] / r['dense_equal_step_ms']:.3f} |")  # fmt: skip
    lines += ["", "### Prefill (B=1; dense = SDPA FlashAttention causal; flex = compiled FlexAttention, same mask)", "",
              "| N | KV density | f (kept fraction) | MoA ms | flash ms | ratio | target <= 1.2 f (N >= 16k) "
              "| flex ms | flex mask ms | MoA / flash ms, graph replay | TFLOP/s | % of roofline |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in (r for r in rows if r["kind"] == "prefill"):
        if "error" in r:
            lines.append(f"| {r['n']} | target {r['target']} | error: {r['error']} |")
            continue
        ok = "yes" if r["ratio"] <= r["target_ratio"] else "NO"
        lines.append(f"| {r['n']} | {r['density']:.3f} | {r['frac']:.3f} | {r['moa_ms']:.3f} | {r['flash_ms']:.3f} "
                     f"| {r['ratio']:.3f} | {r['target_ratio']:.3f} ({ok}) | {fmt(r.get('flex_ms'), '.3f')} "
                     f"| {fmt(r.get('flex_mask_ms'), '.1f')} | {fmt(r.get('moa_graph_ms'), '.3f')} / "
                     f"{fmt(r.get('flash_graph_ms'), '.3f')} | {r['TFLOPs']:.0f} | {r['pct_roofline']:.1f} |")  # fmt: skip
    lines += ["", f"Ceilings measured in this run: copy {ceil['copy_GBps']:.0f} GB/s (read + write), "
              f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s (8192^3); one graph replay of a one-element kernel "
              f"{ceil.get('replay_floor_ms', 0) * 1e3:.1f} us (timed like a one-call decode)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import triton

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="the issue's tables in ~5 min (short sweep, flex 60 s)")
    parser.add_argument("--skip-flex", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill table and its sweep")
    parser.add_argument("--prefill-only", action="store_true", help="skip the decode table and its sweep")
    parser.add_argument("--flex-budget-s", type=float, default=None, help="stop timing flex after this many s")
    args = parser.parse_args()
    patch_interpreter()
    cfg = BenchConfig.smoke() if args.smoke else BenchConfig.quick() if args.quick else BenchConfig()
    if args.flex_budget_s is None:
        args.flex_budget_s = 60.0 if args.quick else 330.0
    cfg.skip_flex = args.skip_flex
    cfg.flex_deadline = time.time() + args.flex_budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    info = {"env": environment(), "check": check_correct(cfg)}
    info["ceilings"] = device_ceilings(cfg.copy_mb)
    log(json.dumps(info))
    stages = (run_decode,) if args.decode_only else (run_prefill,) if args.prefill_only else (run_decode, run_prefill)
    info["chosen"] = {} if args.no_sweep else sweep(cfg, stages)
    rows: list = []
    for stage in stages:
        stage(cfg, info["ceilings"], rows)
        (args.out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        (args.out / "results.md").write_text(markdown(rows, info["ceilings"]))
    log(json.dumps(info))
    log(markdown(rows, info["ceilings"]))


if __name__ == "__main__":
    main()

"""MoA Triton kernels against the reference: CPU under TRITON_INTERPRET=1 (tiny shapes), GPU when present.

Every check compares the kernel, plain torch in the same dtype and a float64 reference on fresh random
inputs; the kernel may drift from float64 by a small multiple of what torch in the same dtype drifts.
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
from conftest import interpret_triton_without_gpu

from moa_hub.remote import remote_module

os.environ.setdefault("HF_TOKEN", "")
INTERPRET = interpret_triton_without_gpu()
triton = pytest.importorskip("triton")

prefill = remote_module("moa_prefill")
decode = remote_module("moa_decode")
# triton's own helpers (tl.max, tl.sum) are compiled or interpreted when triton is first imported, so the
# interpreter works only if TRITON_INTERPRET=1 was set before that (here, or in tests/conftest.py)
needs_interpreter = pytest.mark.skipif(
    INTERPRET and not prefill.INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set: set it at the top of tests/conftest.py",
)
reference = remote_module("moa_reference")
spans = remote_module("moa_spans")
gpu = pytest.mark.gpu
from conftest import patch_interpreter_index  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


if INTERPRET:
    patch_interpreter_index()  # also done in conftest; harmless twice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _zeroed_tickets():
    """Every test starts with the merge tickets at zero: a kernel that fails part-way under the interpreter leaves
    some set, which would fail every later merge (and the ticket checks) instead of only the test that broke."""
    decode._COUNTERS.clear()  # the next call makes zeroed ones (a buffer made under inference_mode cannot be zeroed)


# interpreter tiles are 16 wide: spans 15/16/17/32 straddle block boundaries
PLANS = {
    "mha_sink4": dict(hkv=4, hq=4, sink=4, min_span=8, alpha=[16.0, 15.0, 2.0, 40.0], beta=[0.0, 0.0, 0.5, 1.0]),
    "gqa_sink0": dict(hkv=2, hq=6, sink=0, min_span=8, alpha=[17.0, -3.0], beta=[0.0, 0.55]),
    "gqa_sink5": dict(hkv=2, hq=4, sink=5, min_span=9, alpha=[32.0, 1.5], beta=[0.0, 0.3]),
}


def skip_bf16_on_interpreter(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bf16 dots wrongly (numpy has no bf16); checked on GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def plan_tensors(plan: dict):
    return torch.tensor(plan["alpha"], device=DEVICE), torch.tensor(plan["beta"], device=DEVICE)


# the balanced kernel with a few programs, so that (row, head) pairs are cut into pieces at tile boundaries
BALANCED = {"balanced": True, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "num_programs": 5, "merge_splits": 4}


def decode_call(kernel: str, query, cache, q_pos, alpha, beta, sink: int, min_span: int, **config):
    """moa_decode through the split kernel (the default config) or the balanced kernel ("balanced swapped": with the
    tile's slots as the dots' M)."""
    if kernel == "split":
        return decode.moa_decode(query, *cache, q_pos, alpha, beta, sink, min_span)
    if kernel == "balanced swapped":
        config = dict(config, swap_ab=True)
    conf = dict(BALANCED, **config) if INTERPRET else {"balanced": True, "BLOCK_N": 64, "num_warps": 2,
                                                       "num_stages": 2, "programs_per_sm": 4, **config}  # fmt: skip
    scale = query.shape[-1] ** -0.5
    return decode._launch_decode(query, cache, q_pos, alpha.to(DEVICE), beta.to(DEVICE), scale, sink, min_span, conf)


def torch_same_dtype(query, key, value, q_pos, k_pos, alpha, beta, sink, min_span):
    """Plain torch in the inputs' dtype: masked SDPA with repeated K/V (the drift yardstick)."""
    group = query.shape[1] // key.shape[1]
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None].expand(-1, key.shape[1], -1)
    a, b = alpha.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)
    qp = q_pos[:, None].expand(-1, key.shape[1], -1)
    mask = spans.visible_mask(qp, k_pos, a, b, sink, min_span) & (qp >= 0)[..., None]  # [B, Hkv, Lq, Lk]
    mask = mask.repeat_interleave(group, 1)
    bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out = torch.softmax((query @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5 + bias, dim=-1).nan_to_num(0.0) @ v
    return out


def check_close(out, ref64, same_dtype, dtype) -> None:
    """Kernel error vs float64 within a few times the drift of torch in the same dtype."""
    assert not torch.isnan(out).any()
    err, drift = rel_err(out, ref64), rel_err(same_dtype, ref64)
    limit = 1e-5 if dtype == torch.float32 else 3 * drift + 1e-3
    assert err <= limit, f"kernel error {err:.2e} > {limit:.2e} (torch {dtype} drift {drift:.2e})"


def chunk_positions(lengths: list[int], width: int, starts: list[int]) -> torch.Tensor:
    """q_pos [B, width]: row b has lengths[b] valid tokens at the end (left padding -1) from starts[b]."""
    pos = torch.full((len(lengths), width), -1, dtype=torch.int64)
    for b, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        pos[b, width - n :] = torch.arange(s, s + n)
    return pos.to(DEVICE)


def build_cache(keys, values, lengths: list[int], caps: list[int], sink: int):
    """Cache in the docs/internals.md layout from full histories keys/values [B, Hkv, T, D] (token t at pos t).

    Sink position p < sink at off + p; ring position p at off + sink + (p - sink) % (cap - sink), only the
    last cap - sink positions kept. Empty slots hold random keys with position -1; last slot is trash.
    """
    bsz, num_kv_heads, _, head_dim = keys.shape
    offsets = [sum(caps[:g]) for g in range(num_kv_heads)]
    total = sum(caps)
    cache_k = torch.randn(bsz, total + 1, head_dim, dtype=keys.dtype, device=keys.device)
    cache_v = torch.randn(bsz, total + 1, head_dim, dtype=keys.dtype, device=keys.device)
    slot_pos = torch.full((bsz, total + 1), -1, dtype=torch.int32, device=keys.device)
    for b, n in enumerate(lengths):
        for g, (off, cap) in enumerate(zip(offsets, caps, strict=True)):
            ring = cap - sink
            for p in list(range(min(sink, n))) + list(range(max(sink, n - ring), n)):
                slot = off + p if p < sink else off + sink + (p - sink) % ring
                cache_k[b, slot], cache_v[b, slot], slot_pos[b, slot] = keys[b, g, p], values[b, g, p], p
    as_dev = lambda xs: torch.tensor(xs, dtype=torch.int32, device=keys.device)  # noqa: E731
    return cache_k, cache_v, slot_pos, as_dev(offsets), as_dev(caps)


def cache_caps(plan: dict, n_max: int, extra: list[int]) -> list[int]:
    alpha, beta = plan_tensors(plan)
    need = spans.span_at(torch.tensor(n_max), alpha.double().cpu(), beta.double().cpu(), plan["sink"], plan["min_span"])
    return [max(plan["sink"] + 1, int(s)) + e for s, e in zip(need.tolist(), extra, strict=True)]


PREFILL_CASES = [  # (plan, dtype, lengths, starts, width)
    ("mha_sink4", torch.float32, [37, 50], [0, 0], 50),
    ("gqa_sink0", torch.float16, [45, 33], [0, 0], 45),
    ("gqa_sink5", torch.bfloat16, [64, 17], [3, 0], 64),
    ("gqa_sink5", torch.float16, [64, 17], [3, 0], 64),
    ("gqa_sink5", torch.float32, [20, 31], [70, 9], 33),
    ("gqa_sink0", torch.float32, [0, 29], [0, 4], 29),  # a row of padding only
    ("gqa_sink5", torch.float64, [40, 23], [0, 2], 40),  # GPU: float64 runs the torch reference
    ("gqa_sink5", torch.float32, [11, 7], [5, 0], 11),  # shorter than 16: every block is the tail
    ("gqa_sink0", torch.float32, [37, 5], [0, 2], 37),  # row 2's first 32 tokens (the blocks below the tail) padding
]


@needs_interpreter
@pytest.mark.parametrize("pack", [1, 2, 4])
@pytest.mark.parametrize("with_cache", [False, True])
def test_prefill_query_heads_per_program(pack, with_cache):
    """1, 2 or 4 query heads of a group share one tile (rows stacked): every packing equals the reference."""
    plan = dict(hkv=2, hq=8, sink=3, min_span=8, alpha=[20.0, -2.0], beta=[0.0, 0.5])
    alpha, beta = plan_tensors(plan)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    history, lengths, width, head_dim = [0, 0], [30, 19], 30, 16
    if with_cache:
        history, lengths, width = [37, 50], [21, 9], 21
    total = [h + n for h, n in zip(history, lengths, strict=True)]
    keys = torch.randn(2, 2, max(total), head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    q_pos = chunk_positions(lengths, width, history)
    gather = torch.where(q_pos >= 0, q_pos, 0)[:, None, :, None].expand(-1, 2, -1, head_dim)
    key, value = keys.gather(2, gather), values.gather(2, gather)
    query = torch.randn(2, 8, width, head_dim, device=DEVICE)
    cache = None
    if with_cache:
        cache_k, cache_v, _, offsets, caps = build_cache(
            keys, values, history, cache_caps(plan, max(history), extra=[2, 0]), plan["sink"]
        )
        cache = (cache_k, cache_v, torch.tensor(history, device=DEVICE), offsets, caps)  # the launch takes lengths
    conf = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "PACK": pack}
    if not INTERPRET:
        conf = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "PACK": pack}
    assert prefill.query_heads_per_program(pack, 4, conf["BLOCK_M"]) == pack
    out = prefill._launch_prefill(query, key, value, q_pos, alpha, beta, cache, head_dim**-0.5, *rule[2:], conf)
    hist_pos = torch.arange(max(total), device=DEVICE)[None].expand(2, -1)
    hist_pos = torch.where(hist_pos < torch.tensor(total, device=DEVICE)[:, None], hist_pos, -1)
    ref64 = reference.moa_attention_ref(query.double(), keys.double(), values.double(), q_pos, hist_pos, *rule)
    assert rel_err(out, ref64) < 1e-5
    assert out[(q_pos < 0)[:, None].expand_as(out[..., 0])].abs().sum().item() == 0


def test_query_heads_per_program_divides_group_and_tile():
    assert [prefill.query_heads_per_program(4, g, 64) for g in (1, 2, 3, 4, 6, 7, 8)] == [1, 2, 1, 4, 2, 1, 4]
    assert prefill.query_heads_per_program(8, 8, 16) == 8 and prefill.query_heads_per_program(8, 8, 4) == 4


@needs_interpreter
@pytest.mark.parametrize("name,dtype,lengths,starts,width", PREFILL_CASES)
def test_prefill_matches_reference(name, dtype, lengths, starts, width):
    skip_bf16_on_interpreter(dtype)
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    bsz, head_dim = len(lengths), 16
    query = torch.randn(bsz, plan["hq"], width, head_dim, device=DEVICE, dtype=dtype)
    key = torch.randn(bsz, plan["hkv"], width, head_dim, device=DEVICE, dtype=dtype)
    value = torch.randn(bsz, plan["hkv"], width, head_dim, device=DEVICE, dtype=dtype)
    q_pos = chunk_positions(lengths, width, starts)
    args = (q_pos, alpha, beta, plan["sink"], plan["min_span"])
    out = prefill.moa_prefill(query, key, value, *args)
    ref64 = reference.moa_attention_ref(query.double(), key.double(), value.double(), q_pos, *args)
    same = torch_same_dtype(query, key, value, q_pos, *args)
    check_close(out, ref64, same, dtype)
    padding = (q_pos < 0)[:, None].expand_as(out[..., 0])  # [B, Hq, L]
    assert out[padding].abs().sum().item() == 0


@needs_interpreter
@pytest.mark.parametrize("name,dtype", [("mha_sink4", torch.float32), ("gqa_sink5", torch.float16),
                                        ("gqa_sink0", torch.bfloat16)])  # fmt: skip
def test_prefill_with_cache_matches_reference(name, dtype):
    skip_bf16_on_interpreter(dtype)
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    history, chunk_lengths, width, head_dim = [41, 66], [18, 11], 18, 16
    total = [h + c for h, c in zip(history, chunk_lengths, strict=True)]
    keys = torch.randn(2, plan["hkv"], max(total), head_dim, device=DEVICE, dtype=dtype)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, max(history), extra=[0, 3, 1, 0][: plan["hkv"]])
    cache = build_cache(keys, values, history, caps, plan["sink"])
    q_pos = chunk_positions(chunk_lengths, width, history)
    gather = torch.where(q_pos >= 0, q_pos, 0)[:, None, :, None].expand(-1, plan["hkv"], -1, head_dim)
    key, value = keys.gather(2, gather), values.gather(2, gather)  # [B, Hkv, width, D] the chunk's own keys
    query = torch.randn(2, plan["hq"], width, head_dim, device=DEVICE, dtype=dtype)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    out = prefill.moa_prefill_with_cache(query, key, value, q_pos, *cache, *rule)
    ref64 = prefill.moa_prefill_with_cache_ref(query.double(), key.double(), value.double(), q_pos,
                                               cache[0].double(), cache[1].double(), *cache[2:], *rule)  # fmt: skip
    hist_pos = torch.arange(max(total), device=DEVICE)[None].expand(2, -1)
    hist_pos = torch.where(hist_pos < torch.tensor(total, device=DEVICE)[:, None], hist_pos, -1)
    full64 = reference.moa_attention_ref(query.double(), keys.double(), values.double(), q_pos, hist_pos, *rule)
    assert rel_err(ref64, full64) < 1e-12  # the layout keeps every key the contract can still see
    same = torch_same_dtype(query, keys, values, q_pos, hist_pos, *rule)
    check_close(out, ref64, same, dtype)


@needs_interpreter
@pytest.mark.parametrize("name", sorted(PLANS))
def test_prefill_with_cache_visits_the_window_of_roomy_rings(name):
    """The cache part of a chunk's prefill goes by position: sinks, then the ring from the block's lowest window edge,
    masked up to its highest edge, unmasked whole tiles after, a masked last tile. Rings much longer than the window
    (a static cache sized for later), histories whose ring wrapped, did not, are shorter than the sink or empty (with
    left padding in the chunk), over chunks of several tiles, give the reference result; the cache lengths are
    passed (as the model does, its ``next_pos``) or found from the slot positions."""
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    history, chunk_lengths, width, head_dim = [150, 61, 3, 97, 0], [40, 33, 40, 25, 17], 40, 16
    total = [h + c for h, c in zip(history, chunk_lengths, strict=True)]
    keys = torch.randn(len(history), plan["hkv"], max(total), head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, 3 * max(total) // 2, extra=[7, 0, 3, 11][: plan["hkv"]])
    cache = build_cache(keys, values, history, caps, plan["sink"])
    q_pos = chunk_positions(chunk_lengths, width, history)
    gather = torch.where(q_pos >= 0, q_pos, 0)[:, None, :, None].expand(-1, plan["hkv"], -1, head_dim)
    key, value = keys.gather(2, gather), values.gather(2, gather)
    query = torch.randn(len(history), plan["hq"], width, head_dim, device=DEVICE)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    hist_pos = torch.arange(max(total), device=DEVICE)[None].expand(len(history), -1)
    hist_pos = torch.where(hist_pos < torch.tensor(total, device=DEVICE)[:, None], hist_pos, -1)
    full64 = reference.moa_attention_ref(query.double(), keys.double(), values.double(), q_pos, hist_pos, *rule)
    for cache_len in (torch.tensor(history, device=DEVICE), None):
        out = prefill.moa_prefill_with_cache(query, key, value, q_pos, *cache, *rule, cache_len=cache_len)
        assert rel_err(out, full64) < 1e-5
        assert out[(q_pos < 0)[:, None].expand_as(out[..., 0])].abs().sum().item() == 0


@needs_interpreter
@pytest.mark.parametrize("name,dtype", [("mha_sink4", torch.float32), ("gqa_sink0", torch.float16),
                                        ("gqa_sink5", torch.float16), ("gqa_sink5", torch.bfloat16),
                                        ("gqa_sink0", torch.float64)])  # fmt: skip
def test_decode_matches_reference(name, dtype):
    skip_bf16_on_interpreter(dtype)
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    lengths, head_dim = [75, 16, 130], 16
    keys = torch.randn(3, plan["hkv"], max(lengths), head_dim, device=DEVICE, dtype=dtype)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, max(lengths), extra=[2, 0, 5, 1][: plan["hkv"]])
    cache = build_cache(keys, values, lengths, caps, plan["sink"])
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    query = torch.randn(3, plan["hq"], 1, head_dim, device=DEVICE, dtype=dtype)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    out = decode.moa_decode(query, *cache, q_pos, *rule)
    ref64 = decode_ref64(query, cache, q_pos, rule)
    hist_pos = torch.arange(max(lengths), device=DEVICE)[None].expand(3, -1)
    hist_pos = torch.where(hist_pos < q_pos[:, None] + 1, hist_pos, -1)
    full64 = reference.moa_attention_ref(
        query.double(), keys.double(), values.double(), q_pos[:, None], hist_pos, *rule
    )
    assert rel_err(ref64, full64) < 1e-12
    same = torch_same_dtype(query, keys, values, q_pos[:, None], hist_pos, *rule)
    check_close(out, ref64, same, dtype)


@needs_interpreter
@pytest.mark.parametrize("kernel", ["split", "balanced", "balanced swapped"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_decode_reads_only_the_visible_arc_of_roomy_rings(name, kernel):
    """Rings much longer than the window (a static cache sized for later, a grown cache's slack): rows whose
    window arc wraps, does not wrap, starts in the sink, or has no window yet, give the reference result."""
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    lengths, head_dim = [150, 61, 3, 97, 118], 16
    keys = torch.randn(len(lengths), plan["hkv"], max(lengths), head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, 3 * max(lengths) // 2, extra=[7, 0, 3, 11][: plan["hkv"]])
    cache = build_cache(keys, values, lengths, caps, plan["sink"])
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    query = torch.randn(len(lengths), plan["hq"], 1, head_dim, device=DEVICE)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    out = decode_call(kernel, query, cache, q_pos, *rule)
    ref64 = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(out, ref64) < 1e-5


def ring_cases(cache, q_pos, lo, sink: int) -> set[str]:
    """Which layouts the (row, kv head) pairs of a cache exercise: the window arc wraps, or not, past a gap."""
    _, _, _, offsets, caps = cache
    cases = set()
    for b, qp in enumerate(q_pos.tolist()):
        for g, cap in enumerate(caps.tolist()):
            ring, w_lo = cap - sink, max(int(lo[b, g]), sink)
            if qp < w_lo:
                cases.add("no window")
                continue
            a, e = (w_lo - sink) % ring, (qp - sink) % ring
            cases.add("wraps, gap" if a > e + 1 else "wraps" if a > e else "gap before the arc" if a > 0 else "arc")
    return cases


@needs_interpreter
@pytest.mark.parametrize("kernel", ["split", "balanced", "balanced swapped"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_decode_never_reads_a_slot_it_cannot_see(name, kernel):
    """K and V of every slot the query cannot see (empty, evicted, out of the window, in the gap of a ring with
    room) are NaN: one read of them would make the output NaN (p = 0 times NaN), so the kernel reads none."""
    plan = PLANS[name]
    alpha, beta = plan_tensors(plan)
    lengths, head_dim = [150, 61, 3, 97, 118, 133], 16
    keys = torch.randn(len(lengths), plan["hkv"], max(lengths), head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, 5 * max(lengths) // 4, extra=[7, 0, 3, 11][: plan["hkv"]])
    cache_k, cache_v, slot_pos, offsets, caps_t = build_cache(keys, values, lengths, caps, plan["sink"])
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    query = torch.randn(len(lengths), plan["hq"], 1, head_dim, device=DEVICE)
    ref64 = decode.moa_decode_ref(query.double(), cache_k.double(), cache_v.double(), slot_pos, offsets, caps_t,
                                  q_pos, *rule)  # fmt: skip
    lo = prefill.window_lo(q_pos[:, None], alpha, beta, plan["sink"], plan["min_span"])[..., 0]  # [B, Hkv]
    cases = ring_cases((cache_k, cache_v, slot_pos, offsets, caps_t), q_pos, lo, plan["sink"])
    assert {"wraps, gap", "gap before the arc"} <= cases, cases  # the layouts with a gap inside the head
    head_of_slot = torch.repeat_interleave(torch.arange(len(caps), device=DEVICE), caps_t.long())
    lo_of_slot = torch.cat([lo[:, head_of_slot], torch.zeros_like(lo[:, :1])], dim=1)  # trash slot last
    pos = slot_pos.long()
    seen = (pos >= 0) & (pos <= q_pos[:, None]) & ((pos < plan["sink"]) | (pos >= lo_of_slot))
    cache_k[~seen], cache_v[~seen] = float("nan"), float("nan")
    out = decode_call(kernel, query, (cache_k, cache_v, slot_pos, offsets, caps_t), q_pos, *rule)
    assert not out.isnan().any()
    assert rel_err(out, ref64) < 1e-5


@needs_interpreter
def test_kernels_run_triton_not_the_reference():
    probe = torch.zeros(1, device=DEVICE)
    assert prefill.use_triton(probe), "the Triton path is off: these tests would compare the reference with itself"


def test_decode_work_list_covers_every_slot_once():
    caps = torch.tensor([5, 300, 64, 129, 1], dtype=torch.int32)
    head, split, start, count = decode.decode_work_list(caps, 64, int(caps.sum()))
    for g, cap in enumerate(caps.tolist()):
        items = (head == g).nonzero().flatten()
        assert items.tolist() == list(range(int(start[g]), int(start[g]) + int(count[g])))
        covered = sorted(
            s for w in items.tolist() for s in range(int(split[w]) * 64, min(cap, int(split[w]) * 64 + 64))
        )
        assert covered == list(range(cap))
    assert (head[int(count.sum()) :] == -1).all()


def test_decode_split_len_for_fractional_programs_per_sm():
    # 1 row x 131072 slots over 132 SMs: 2 programs per SM -> 496-slot target -> 256; half a program per SM -> 1024
    assert decode.decode_split_len(1, 131072, 132, 2) == 256
    assert decode.decode_split_len(1, 131072, 132, 0.5) == 1024
    assert decode.decode_split_len(1, 2**30, 132, 0.5, cap=4096) == 4096  # capped
    assert decode.decode_split_len(1, 100, 132, 0.5) == 128  # floor
    # with a granule: the nearest multiple of it (target 496 -> 512 in tiles of 64; 1985 -> 1984 / 2048 in 64 / 512)
    assert decode.decode_split_len(1, 131072, 132, 2, granule=64) == 512
    assert decode.decode_split_len(1, 131072, 132, 0.5, granule=64) == 1984
    assert decode.decode_split_len(1, 131072, 132, 0.5, granule=512) == 2048
    assert decode.decode_split_len(1, 100, 132, 0.5, granule=64) == 128  # floor


@needs_interpreter
@pytest.mark.parametrize("split_len", [48, 80])
def test_decode_split_length_not_a_power_of_two(split_len):
    """The split length is a kernel argument: splits of 3 or 5 tiles (heads cut mid-ring) equal the reference."""
    plan = PLANS["gqa_sink5"]
    alpha, beta = plan_tensors(plan)
    lengths, head_dim = [200, 37, 131], 16
    keys = torch.randn(3, plan["hkv"], max(lengths), head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    cache = build_cache(keys, values, lengths, cache_caps(plan, max(lengths), extra=[3, 1]), plan["sink"])
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    query = torch.randn(3, plan["hq"], 1, head_dim, device=DEVICE)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    tile = 16 if INTERPRET else 64
    conf = {"BLOCK_N": tile, "num_warps": 1 if INTERPRET else 2, "num_stages": 1 if INTERPRET else 3,
            "split_len": split_len * tile // 16, "fused_merge": True, "merge_splits": 4}  # fmt: skip
    out = decode._launch_decode(query, cache, q_pos, alpha, beta, head_dim**-0.5, *rule[2:], conf)
    ref64 = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(out, ref64) < 1e-5


def test_window_lo_is_the_contract_edge():
    alpha, beta = torch.tensor([20.0, -7.0]), torch.tensor([0.0, 0.7])
    q_pos = torch.tensor([[-1, 0, 5, 6, 40, 41]])
    lo = prefill.window_lo(q_pos, alpha, beta, 4, 10)  # [1, 2, 6]
    k_pos = torch.arange(45)
    for g in range(2):
        mask = spans.visible_mask(q_pos[0, 1:], k_pos, alpha[g].item(), beta[g].item(), 4, 10)
        for row, i in zip(mask, q_pos[0, 1:].tolist(), strict=True):
            edge = int(lo[0, g, q_pos[0].tolist().index(i)])
            assert row.tolist() == [(j < 4 or j >= edge) and j <= i for j in range(45)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_long_ragged(dtype):
    """``moa_prefill`` (the table's config) and every PREFILL_CONFIGS entry (the one for chunks over 32k too, at a
    short length), on left-padded rows whose positions start above 0, with windows wider and narrower than a tile
    (their diagonal tiles test causality alone) and a sink of 64 and 0, against float64."""
    plans = [
        dict(hkv=2, hq=8, sink=64, min_span=128, alpha=[300.0, -100.0], beta=[0.0, 0.45]),
        dict(hkv=2, hq=8, sink=0, min_span=8, alpha=[20.0, 3.0], beta=[0.0, 0.05]),
    ]
    lengths, width = [1000, 777], 1000
    q_pos = chunk_positions(lengths, width, [0, 50])
    configs = [None] + [config for _, config in prefill.PREFILL_CONFIGS]
    for plan, config in itertools.product(plans, configs):
        alpha, beta = plan_tensors(plan)
        query = torch.randn(2, 8, width, 128, device=DEVICE, dtype=dtype)
        key, value = (torch.randn(2, 2, width, 128, device=DEVICE, dtype=dtype) for _ in range(2))
        rule = (alpha, beta, plan["sink"], plan["min_span"])
        if config is None:
            out = prefill.moa_prefill(query, key, value, q_pos, *rule)
        else:
            out = prefill._launch_prefill(query, key, value, q_pos, alpha, beta, None, 128**-0.5, *rule[2:], config)
        ref64 = reference.moa_attention_ref(query.double(), key.double(), value.double(), q_pos, q_pos, *rule)
        check_close(out, ref64, torch_same_dtype(query, key, value, q_pos, q_pos, *rule), dtype)


@gpu
@needs_cuda
def test_gpu_prefill_with_cache_every_config():
    """A chunk over a roomy cache (rings much longer than the window; histories whose ring wrapped, did not, are
    shorter than the sink, or empty with left padding in the chunk) with every PREFILL_CONFIGS entry and through
    ``moa_prefill_with_cache``, in bf16 with head dim 128, against float64: the cache part's masked and unmasked
    ranges at the GPU's tile sizes."""
    plan = dict(hkv=2, hq=8, sink=64, min_span=128, alpha=[300.0, -100.0], beta=[0.0, 0.45])
    alpha, beta = plan_tensors(plan)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    history, chunk_lengths, width = [3000, 1700, 40, 0], [700, 650, 700, 333], 700
    total = [h + c for h, c in zip(history, chunk_lengths, strict=True)]
    keys = torch.randn(len(history), 2, max(total), 128, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    cache_k, cache_v, slot_pos, offsets, caps = build_cache(
        keys, values, history, cache_caps(plan, 2 * max(total), [5, 0]), plan["sink"]
    )
    q_pos = chunk_positions(chunk_lengths, width, history)
    gather = torch.where(q_pos >= 0, q_pos, 0)[:, None, :, None].expand(-1, 2, -1, 128)
    key, value = keys.gather(2, gather), values.gather(2, gather)
    query = torch.randn(len(history), 8, width, 128, device=DEVICE, dtype=torch.bfloat16)
    hist_pos = torch.arange(max(total), device=DEVICE)[None].expand(len(history), -1)
    hist_pos = torch.where(hist_pos < torch.tensor(total, device=DEVICE)[:, None], hist_pos, -1)
    ref64 = reference.moa_attention_ref(query.double(), keys.double(), values.double(), q_pos, hist_pos, *rule)
    same = torch_same_dtype(query, keys, values, q_pos, hist_pos, *rule)
    cache = (cache_k, cache_v, torch.tensor(history, device=DEVICE), offsets, caps)
    for config in [config for _, config in prefill.PREFILL_CONFIGS]:
        out = prefill._launch_prefill(query, key, value, q_pos, alpha, beta, cache, 128**-0.5, *rule[2:], config)
        check_close(out, ref64, same, torch.bfloat16)
    out = prefill.moa_prefill_with_cache(query, key, value, q_pos, cache_k, cache_v, slot_pos, offsets, caps, *rule)
    check_close(out, ref64, same, torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph():
    plan = dict(hkv=2, hq=8, sink=64, min_span=128, alpha=[200.0, 10.0], beta=[0.0, 0.6])
    alpha, beta = plan_tensors(plan)
    lengths = [3000, 1700]
    keys = torch.randn(2, 2, 3000, 128, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    cache = build_cache(keys, values, lengths, cache_caps(plan, 3000, [0, 7]), plan["sink"])
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    query = torch.randn(2, 8, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    rule = (alpha, beta, plan["sink"], plan["min_span"])
    eager = decode.moa_decode(query, *cache, q_pos, *rule)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode.moa_decode(query, *cache, q_pos, *rule)
    query.copy_(torch.randn_like(query))
    graph.replay()
    ref64 = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(captured, ref64) < 1e-2 and rel_err(eager, captured) > 0


def test_dense_length_is_where_the_first_head_stops_being_dense():
    alpha, beta = torch.tensor([300.0, 40.0, -5.0]), torch.tensor([0.0, 0.5, 1.0])
    steps = torch.arange(1, 3000)
    dense = [bool((spans.span_at(n, alpha.double(), beta.double(), 4, 16) == n).all()) for n in steps.tolist()]
    expected = dense.index(False)  # lengths 1..expected are dense for every head
    assert prefill.dense_length(alpha, beta, 4, 16) == expected == 16  # head 2 (n - 5) is dense only up to min_span
    assert prefill.dense_length(torch.tensor([5000.0]), torch.tensor([0.0]), 4, 16) == 5000


def test_tensor_memo_never_serves_a_freed_tensors_result():
    from moa_hub.remote import remote_module

    memo = remote_module("moa_tensor_cache").TensorMemo()
    calls = []
    for value in range(5):  # new tensors that may reuse a freed one's address
        t = torch.full((4,), value, dtype=torch.int64)
        got = memo.get((t,), (), lambda t=t: calls.append(1) or int(t[0]))
        assert got == value and memo.get((t,), (), lambda: -1) == value
        del t
    assert len(calls) == 5
    with torch.inference_mode():  # inference tensors have no version counter
        t = torch.arange(3)
        assert memo.get((t,), ("x",), lambda: 7) == 7


def decode_setup(plan: dict, lengths: list[int], dtype=torch.float32, head_dim: int = 16):
    alpha, beta = plan_tensors(plan)
    keys = torch.randn(len(lengths), plan["hkv"], max(lengths), head_dim, device=DEVICE, dtype=dtype)
    values = torch.randn_like(keys)
    caps = cache_caps(plan, max(lengths), extra=[3, 0, 1, 2][: plan["hkv"]])
    cache = build_cache(keys, values, lengths, caps, plan["sink"])
    query = torch.randn(len(lengths), plan["hq"], 1, head_dim, device=DEVICE, dtype=dtype)
    return query, cache, (alpha.double(), beta.double(), plan["sink"], plan["min_span"])


def decode_ref64(query, cache, q_pos, rule):
    """The decode contract in float64 (``moa_decode_ref``) for a ``decode_setup`` case."""
    return decode.moa_decode_ref(query.double(), cache[0].double(), cache[1].double(), *cache[2:], q_pos, *rule)


def prefill_ref64(query, key, value, q_pos, alpha, beta, plan: dict):
    """The prefill contract in float64 for a fresh chunk (keys = the chunk's own tokens)."""
    rule = (alpha.double(), beta.double(), plan["sink"], plan["min_span"])
    return reference.moa_attention_ref(query.double(), key.double(), value.double(), q_pos, q_pos, *rule)


@needs_interpreter
@pytest.mark.parametrize("fused, row_merge, merge_splits", [(True, False, 8), (True, True, 2), (False, False, 2)])
def test_decode_merge_variants_and_repeated_calls(fused, row_merge, merge_splits):
    """Fused (last split merges, tickets reset; either merge, in one step or in steps with a partial last one) and
    separate merge agree with the reference, call after call; int64 head tensors and a strided q_pos (a column of
    [B, 2]) are read as they are."""
    plan = PLANS["gqa_sink5"]
    lengths = [150, 9, 97, 33]  # 150 slots: 5 splits of 32 under the interpreter; 9 < min_span; 33 straddles 32
    query, cache, rule = decode_setup(plan, lengths)
    cache = (*cache[:3], cache[3].to(torch.int64), cache[4].to(torch.int64))
    q_pos = torch.stack([torch.tensor(lengths, device=DEVICE) - 1, torch.zeros(4, device=DEVICE, dtype=torch.long)], 1)
    split = decode._INTERPRETER_CONFIG if INTERPRET else decode.DECODE_CONFIGS[0][2]  # the split kernel
    config = dict(split, fused_merge=fused, row_merge=row_merge, merge_splits=merge_splits)
    ref64 = decode.moa_decode_ref(query.double(), cache[0].double(), cache[1].double(), *cache[2:], q_pos[:, 0], *rule)
    for _ in range(3):
        out = decode._launch_decode(query, cache, q_pos[:, 0], *rule[:2], 16**-0.5, *rule[2:], config=config)
        assert rel_err(out, ref64) < 1e-5
    if fused:
        assert int(decode._split_counters(query.device, 1).abs().sum()) == 0  # every ticket back at zero


@needs_interpreter
@pytest.mark.parametrize("row_merge", [False, True])
@pytest.mark.parametrize("segment_cost", [0, 2])
@pytest.mark.parametrize("programs", [1, 2, 5, 13, 200])
def test_balanced_decode_any_program_count_and_repeated_calls(programs, segment_cost, row_merge):
    """The balanced kernel cut at any number of programs (one program for all, pairs in 2..many pieces, more
    programs than tiles, programs holding only a head's slotless units) agrees with the reference call after
    call, its tickets back at zero, with either merge; int64 head tensors and a strided q_pos are read as they are."""
    plan = PLANS["gqa_sink5"]
    lengths = [150, 9, 97, 33]
    query, cache, rule = decode_setup(plan, lengths)
    cache = (*cache[:3], cache[3].to(torch.int64), cache[4].to(torch.int64))
    q_pos = torch.stack([torch.tensor(lengths, device=DEVICE) - 1, torch.zeros(4, device=DEVICE, dtype=torch.long)], 1)
    ref64 = decode.moa_decode_ref(query.double(), cache[0].double(), cache[1].double(), *cache[2:], q_pos[:, 0], *rule)
    for _ in range(2):
        out = decode_call("balanced", query, cache, q_pos[:, 0], *rule, num_programs=programs,
                          segment_cost=segment_cost, row_merge=row_merge)  # fmt: skip
        assert rel_err(out, ref64) < 1e-5
    assert int(decode._split_counters(query.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("seg_cost", [0, 1, 3])
def test_balanced_head_meta_and_pieces_bound(seg_cost):
    balanced = remote_module("moa_decode_balanced")
    caps = torch.tensor([5, 300, 64, 129], dtype=torch.int32)
    offsets = torch.cumsum(caps, 0) - caps
    alpha, beta = torch.tensor([1.5, -2.0, 0.1, 7.0], dtype=torch.float64), torch.tensor([0.0, 0.3, 1.0, 0.7])
    meta = balanced.head_meta(offsets, caps, alpha, beta, 64, seg_cost)
    assert meta[:, 0].tolist() == offsets.tolist() and meta[:, 1].tolist() == caps.tolist()
    assert torch.equal(meta[:, 2].view(torch.float64), alpha)
    assert torch.equal(meta[:, 3].view(torch.float64), beta.double())
    tiles = [1, 5, 1, 3]  # ceil(cap / 64); each head is seg_cost slotless units, then its tiles
    units = [t + seg_cost for t in tiles]
    assert meta[:, 4].tolist() == [0, units[0], sum(units[:2]), sum(units[:3])]
    assert meta[:, 5].tolist() == [sum(units)] * 4
    # the bound on pieces per (row, head) holds for every cut: P programs over rows of sum(units) units
    for rows, programs in ((1, 7), (3, 5), (4, 100), (2, 1), (5, 37)):
        per_prog = -(-rows * sum(units) // programs)
        for b in range(rows):
            for g in range(4):
                first = b * sum(units) + int(meta[g, 4]) + seg_cost  # the unit of the head's first tile
                pieces = (first + tiles[g] - 1) // per_prog - first // per_prog + 1
                assert pieces <= balanced.pieces_bound(programs, rows)


def test_host_built_tables_equal_the_device_ones():
    """The split kernel's work items and the balanced kernel's head table, built on the host from lists (what
    ``moa_prepare_decode`` uploads before a capture), equal the device-built ones, on random layouts."""
    decode, balanced = remote_module("moa_decode"), remote_module("moa_decode_balanced")
    gen = torch.Generator().manual_seed(11)
    for trial in range(30):
        heads = int(torch.randint(1, 9, (1,), generator=gen))
        caps = torch.randint(17, 3000, (heads,), generator=gen).tolist()
        offsets = [sum(caps[:g]) for g in range(heads)]
        alpha = (torch.rand(heads, generator=gen, dtype=torch.float64) * 200 - 50).tolist()
        beta = torch.rand(heads, generator=gen, dtype=torch.float64).tolist()
        rules = (torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))  # as _rules makes
        device = (torch.tensor(offsets), torch.tensor(caps, dtype=torch.int32), *rules)
        split_len = (128, 256, 4096)[trial % 3]
        expected = decode.decode_items(*device, split_len, sum(caps))
        assert torch.equal(decode.decode_items_host(offsets, caps, alpha, beta, split_len, sum(caps)), expected)
        for block_n, seg_cost in ((32, 4), (64, 0)):
            expected = balanced.head_meta(*device, block_n, seg_cost)
            assert torch.equal(balanced.head_meta_host(offsets, caps, alpha, beta, block_n, seg_cost), expected)


@needs_interpreter
def test_decode_and_prefill_launch_no_torch_ops(monkeypatch):
    """After a warm-up call, a decode or prefill call dispatches no torch kernel: allocations and views only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allowed = {"empty.memory_format", "select.int", "slice.Tensor", "empty_like.default", "alias.default",
               "as_strided.default"}  # fmt: skip

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket.__name__) + "." + func._overloadname)
            return func(*args, **(kwargs or {}))

    class Launch:  # stands in for the Triton kernels: the interpreter itself runs torch ops on CPU tensors
        def __init__(self):
            self.calls = 0

        def __getitem__(self, grid):
            return lambda *args, **kwargs: setattr(self, "calls", self.calls + 1)

    plan = PLANS["gqa_sink0"]
    query, cache, rule = decode_setup(plan, [40, 70])
    q_pos = torch.tensor([39, 69], device=DEVICE)
    decode.moa_decode(query, *cache, q_pos, *rule)  # warm-up: builds the work list and the tickets
    pq = torch.randn(2, plan["hq"], 33, 16, device=DEVICE)
    pk, pv = (torch.randn(2, plan["hkv"], 33, 16, device=DEVICE) for _ in range(2))
    p_pos = chunk_positions([33, 20], 33, [0, 5])
    prefill.moa_prefill(pq, pk, pv, p_pos, *rule)  # warm-up: on CUDA, the plan's dense length (memoised)
    for module, name in ((decode, "_moa_decode_split"), (prefill, "_moa_prefill_fwd")):
        monkeypatch.setattr(module, name, Launch())
    with Ops() as ops:
        decode.moa_decode(query, *cache, q_pos, *rule)
        prefill.moa_prefill(pq, pk, pv, p_pos, *rule)
    assert decode._moa_decode_split.calls == 1 and prefill._moa_prefill_fwd.calls == 1
    assert ops.seen <= allowed, f"torch ops per call: {sorted(ops.seen - allowed)}"


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "variant", ["fused", "separate merge", "balanced", "balanced, few programs", "balanced swapped, few programs"]
)
def test_gpu_decode_many_splits_graph_replays(variant):
    """Dozens of splits (or balanced pieces) per head race to merge: 20 graph replays with fresh queries all
    match float64."""
    plan = dict(hkv=4, hq=16, sink=64, min_span=128, alpha=[300.0, 0.0, 0.0, 5000.0], beta=[0.0, 0.9, 0.6, 0.0])
    lengths = [6000, 3001, 5999, 7]  # the long heads get ~40 splits of 128 slots
    query, cache, rule = decode_setup(plan, lengths, torch.bfloat16, 128)
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    split = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 4, "merge_splits": 16}
    few = {"balanced": True, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "num_programs": 7}
    config = {
        "fused": dict(split, fused_merge=True),
        "separate merge": dict(split, fused_merge=False),
        "balanced": {"balanced": True, "BLOCK_N": 64, "num_warps": 2, "num_stages": 2, "programs_per_sm": 4},
        "balanced, few programs": few,
        "balanced swapped, few programs": dict(few, swap_ab=True),
    }[variant]
    call = lambda: decode._launch_decode(query, cache, q_pos, *rule[:2], 128**-0.5, *rule[2:], config=config)  # noqa: E731
    call()  # compile and cache the work list before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(20):
        query.copy_(torch.randn_like(query))
        graph.replay()
        ref64 = decode_ref64(query, cache, q_pos, rule)
        assert rel_err(out, ref64) < 1e-2


def test_decode_table_follows_the_head_size():
    """d <= 64 takes its own table (half the bytes per slot), any larger head the d=128 one; in each, one or two
    rows get the split kernel and more rows the balanced kernel."""
    assert decode.decode_table(64) is decode.DECODE_CONFIGS_D64 and decode.decode_table(32) is decode.DECODE_CONFIGS_D64
    assert decode.decode_table(128) is decode.DECODE_CONFIGS and decode.decode_table(96) is decode.DECODE_CONFIGS
    for head_dim in (64, 128):
        table = decode.decode_table(head_dim)
        assert decode.decode_config(1, 10**6, head_dim) is table[0][2] and not table[0][2].get("balanced")
        assert decode.decode_config(816, 37_000, head_dim) is table[-1][2] and table[-1][2]["balanced"]
    assert decode.decode_config(816, 37_000, 64) is not decode.decode_config(816, 37_000, 128)


def test_decode_swaps_the_dots_only_where_asked_and_at_most_d128():
    """The d=128 4-warp entry asks for the slots as the dots' M; heads wider than 128 run the 16-row dots."""
    entry = decode.decode_config(372, 20_000, 128)
    assert entry["balanced"] and entry["num_warps"] == 4 and decode.swap_ab(entry, 128) and decode.swap_ab(entry, 64)
    assert not decode.swap_ab(entry, 256)
    assert not decode.swap_ab(decode.decode_config(16, 10_000, 128), 128)  # the 2-warp entry
    assert not any(decode.swap_ab(conf, 64) for _, _, conf, *_ in decode.DECODE_CONFIGS_D64)


def test_decode_table_gives_many_short_pairs_the_split_kernel():
    """d=128: 4096+ (row, kv head) pairs of <= 1024 slots on average take the split kernel with short splits (MHA
    at 25%); fewer pairs, longer pairs, or one or two rows do not."""
    short = decode.decode_config(256, 32 * 768, 128, 32)  # MHA, 3k context at 25%: 8192 pairs of 768 slots
    assert not short.get("balanced") and short["programs_per_sm"] == 8
    assert decode.decode_config(96, 32 * 1536, 128, 32).get("balanced")  # 3072 pairs
    assert decode.decode_config(384, 8 * 1152, 128, 8).get("balanced")  # Llama-3-8B 4k+1k at 25%: 1152 slots a pair
    assert decode.decode_config(2, 32 * 768, 128, 32) is decode.DECODE_CONFIGS[0][2]
    assert decode.decode_config(512, 32 * 512, 64, 32).get("balanced")  # d=64: not measured there, no such entry


@gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_decode_every_table_config(head_dim):
    """Every launch config of the head size's table (d=256 takes the d=128 one), on ragged rows and many pieces per
    head, in bf16 and fp16, against float64."""
    plan = dict(hkv=4, hq=16, sink=64, min_span=128, alpha=[300.0, 0.0, 0.0, 5000.0], beta=[0.0, 0.9, 0.6, 0.0])
    for (rows, _, config, *_), dtype in itertools.product(
        decode.decode_table(head_dim), (torch.bfloat16, torch.float16)
    ):
        lengths = [6000, 3001, 5999, 7, 1500][: min(rows, 5)]
        query, cache, rule = decode_setup(plan, lengths, dtype, head_dim)
        q_pos = torch.tensor(lengths, device=DEVICE) - 1
        out = decode._launch_decode(query, cache, q_pos, *rule[:2], head_dim**-0.5, *rule[2:], config=config)
        ref64 = decode_ref64(query, cache, q_pos, rule)
        assert rel_err(out, ref64) < 1e-2, config


class _SmallGpu:
    """Stands in for a Triton kernel on a GPU with little shared memory: raises OutOfResources for tiles wider than
    16 or more than one stage, and runs the real (interpreted) kernel otherwise."""

    def __init__(self, kernel):
        self.kernel, self.refused, self.ran = kernel, 0, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs["BLOCK_N"] > 16 or kwargs.get("BLOCK_M", 16) > 16 or kwargs["num_stages"] > 1:
                self.refused += 1
                raise triton.runtime.errors.OutOfResources(120_000, 101_376, "shared memory")
            self.ran.append({k: kwargs[k] for k in ("BLOCK_N", "num_stages")})
            return self.kernel[grid](*args, **kwargs)

        return launch


@needs_interpreter
def test_launch_configs_shrink_to_what_the_gpu_can_load(monkeypatch):
    """A table config the GPU cannot load (OutOfResources) falls back to smaller ones with one warning per shape;
    the next call goes straight to the config that loaded, and the results match the reference."""
    window = remote_module("moa_window")
    monkeypatch.setattr(window, "_FITTED", {})
    plan = PLANS["gqa_sink0"]
    query, cache, rule = decode_setup(plan, [40, 70])
    q_pos = torch.tensor([39, 69], device=DEVICE)
    fake = _SmallGpu(decode._moa_decode_split)
    monkeypatch.setattr(decode, "_moa_decode_split", fake)
    big = {"BLOCK_N": 32, "num_warps": 1, "num_stages": 3, "split_len": 64, "fused_merge": True, "merge_splits": 8}
    monkeypatch.setattr(decode, "_INTERPRETER_CONFIG", big)  # the config a call takes, interpreted or compiled
    monkeypatch.setattr(decode, "decode_config", lambda *args: big)
    with pytest.warns(RuntimeWarning, match="MoA decode: launch config"):
        out = decode.moa_decode(query, *cache, q_pos, *rule)
    # refused: 3 stages, 2 stages, 2 stages merging 4 splits a step, 1 stage of 32 slots; ran: 1 stage of 16
    assert fake.ran == [{"BLOCK_N": 16, "num_stages": 1}] and fake.refused == 4
    ref = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(out, ref) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode.moa_decode(query, *cache, q_pos, *rule)  # straight to the fitted config: no warning, no refusal
    assert fake.refused == 4 and len(fake.ran) == 2

    pfake = _SmallGpu(prefill._moa_prefill_fwd)
    monkeypatch.setattr(prefill, "_moa_prefill_fwd", pfake)
    pbig = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 1, "num_stages": 2, "PACK": 2}
    monkeypatch.setattr(prefill, "_prefill_config", lambda *args: pbig)
    pq = torch.randn(2, plan["hq"], 33, 16, device=DEVICE)
    pk, pv = (torch.randn(2, plan["hkv"], 33, 16, device=DEVICE) for _ in range(2))
    p_pos = chunk_positions([33, 20], 33, [0, 5])
    with pytest.warns(RuntimeWarning, match="MoA prefill: launch config"):
        pout = prefill.moa_prefill(pq, pk, pv, p_pos, *rule)
    assert pfake.ran == [{"BLOCK_N": 16, "num_stages": 1}]
    pref = reference.moa_attention_ref(pq.double(), pk.double(), pv.double(), p_pos, p_pos, *rule)
    assert rel_err(pout, pref) < 1e-5


def test_smaller_config_order():
    """Stages first (down to 2), then tiles, then one stage; None when nothing is left; segment cost keeps slots."""
    smaller = remote_module("moa_window").smaller_config
    steps, conf = [], {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 3}
    while conf is not None:
        steps.append((conf["BLOCK_M"], conf["BLOCK_N"], conf["num_stages"]))
        conf = smaller(conf)
    assert steps == [(64, 64, 3), (64, 64, 2), (64, 32, 2), (32, 32, 2), (32, 32, 1), (32, 16, 1), (16, 16, 1)]
    assert smaller({"balanced": True, "BLOCK_N": 64, "num_stages": 2, "segment_cost": 2}) == {
        "balanced": True, "BLOCK_N": 32, "num_stages": 2, "segment_cost": 4
    }  # fmt: skip
    assert smaller({"BLOCK_N": 32, "num_stages": 2, "merge_splits": 16})["merge_splits"] == 8


@gpu
@needs_cuda
def test_gpu_table_config_too_big_for_the_device_falls_back(monkeypatch):
    """A table config that needs more shared memory than the device has (as an H200-tuned config on a 99 KB GPU):
    real OutOfResources from Triton, one warning, a smaller config, results equal to float64."""
    monkeypatch.setattr(remote_module("moa_window"), "_FITTED", {})
    plan = dict(hkv=4, hq=16, sink=64, min_span=128, alpha=[300.0, 0.0, 0.0, 5000.0], beta=[0.0, 0.9, 0.6, 0.0])
    query, cache, rule = decode_setup(plan, [6000], torch.bfloat16, 128)
    q_pos = torch.tensor([5999], device=DEVICE)
    huge = {
        "BLOCK_N": 256,
        "num_warps": 4,
        "num_stages": 5,
        "programs_per_sm": 1,
        "fused_merge": True,
        "merge_splits": 8,
    }
    monkeypatch.setattr(decode, "DECODE_CONFIGS", [(2, 2**62, huge), *decode.DECODE_CONFIGS[1:]])
    with pytest.warns(RuntimeWarning, match="MoA decode: launch config .* needs more than this GPU has"):
        out = decode.moa_decode(query, *cache, q_pos, *rule)
    ref64 = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(out, ref64) < 1e-2

    alpha, beta = plan_tensors(plan)
    pq = torch.randn(1, 16, 3000, 128, device=DEVICE, dtype=torch.bfloat16)
    pk, pv = (torch.randn(1, 4, 3000, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    p_pos = torch.arange(3000, device=DEVICE)[None]
    wide = {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 8, "num_stages": 4, "PACK": 4}
    monkeypatch.setattr(prefill, "PREFILL_CONFIGS", [(2**62, wide)])
    with pytest.warns(RuntimeWarning, match="MoA prefill: launch config .* needs more than this GPU has"):
        pout = prefill.moa_prefill(pq, pk, pv, p_pos, alpha, beta, plan["sink"], plan["min_span"])
    pref = prefill_ref64(pq, pk, pv, p_pos, alpha, beta, plan)
    assert rel_err(pout, pref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 5])
def test_gpu_head_dim_256(rows):
    """Gemma's head size: prefill and decode with the tables' configs (or smaller ones where the device cannot load
    them) against float64."""
    plan = dict(hkv=2, hq=8, sink=64, min_span=128, alpha=[300.0, 2000.0], beta=[0.0, 0.5])
    lengths = [4000, 3001, 2999, 7, 1500][:rows]
    query, cache, rule = decode_setup(plan, lengths, torch.bfloat16, 256)
    q_pos = torch.tensor(lengths, device=DEVICE) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # whether the d=128 table fits at d=256 is the device's
        out = decode.moa_decode(query, *cache, q_pos, *rule)
    ref64 = decode_ref64(query, cache, q_pos, rule)
    assert rel_err(out, ref64) < 1e-2
    alpha, beta = plan_tensors(plan)
    pq = torch.randn(rows, 8, 2500, 256, device=DEVICE, dtype=torch.bfloat16)
    pk, pv = (torch.randn(rows, 2, 2500, 256, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    p_pos = torch.arange(2500, device=DEVICE)[None].expand(rows, -1).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pout = prefill.moa_prefill(pq, pk, pv, p_pos, alpha, beta, plan["sink"], plan["min_span"])
    pref = prefill_ref64(pq, pk, pv, p_pos, alpha, beta, plan)
    assert rel_err(pout, pref) < 1e-2

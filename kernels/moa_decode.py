"""Triton decode kernel for MoA attention: one query token per row over each kv head's ragged cache.

Work is a static list of (kv head, split) items: head g's slots ``[off_g, off_g + cap_g)`` are cut
into splits of ``split_len`` slots, so a long head is spread over many programs (split-K) and a short
head takes one or two. The list is built on the device from ``head_capacity`` with static shapes, so
a decode step has no host synchronisation and can be captured in a CUDA graph. Each program serves
all query heads of the GQA group with one read of K/V (the group is the M dimension of the dot),
writes a partial output and log-sum-exp; a second kernel merges the splits of each (row, kv head).
"""

from __future__ import annotations

import functools

import torch

from .moa_prefill import INTERPRETED, gather_head_slots, use_triton, window_lo
from .moa_reference import moa_attention_ref
from .moa_tensor_cache import TensorMemo

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs fall back to the torch reference
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _moa_decode_split(
        Q, CacheK, CacheV, SlotPos, HeadOff, HeadCap, QPos, WinLo, WorkHead, WorkSplit, PartO, PartLse,
        stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb,
        stride_wb, stride_pb, stride_pw, stride_pg, stride_lb, stride_lw,
        sm_scale_log2,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SINK: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        w = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)  # int64: b * stride of a large cache passes 2**31
        g = tl.load(WorkHead + w)  # -1: this item has no work
        split = tl.load(WorkSplit + w)
        g_safe = tl.maximum(g, 0)
        head_end = tl.load(HeadOff + g_safe) + tl.load(HeadCap + g_safe)
        first = tl.load(HeadOff + g_safe) + split * SPLIT_LEN
        stop = tl.where(g >= 0, tl.minimum(first + SPLIT_LEN, head_end), first)

        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_group = offs_g < GROUP
        qp = tl.load(QPos + b)
        lo = tl.load(WinLo + b * stride_wb + g_safe)
        # q: [BLOCK_G, D], the query heads of group g (rows past GROUP are zero padding for the dot)
        q_ptrs = Q + b * stride_qb + (g_safe * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=in_group[:, None], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for start in range(first, stop, BLOCK_N):
            slots = start + offs_n
            ok = slots < stop
            kp = tl.load(SlotPos + b * stride_sb + slots, mask=ok, other=-1).to(tl.int64)
            k = tl.load(CacheK + b * stride_ckb + slots[:, None] * stride_ckn + offs_d[None, :], mask=ok[:, None])
            v = tl.load(CacheV + b * stride_cvb + slots[:, None] * stride_cvn + offs_d[None, :], mask=ok[:, None])
            visible = ok & (kp >= 0) & (kp <= qp) & ((kp < SINK) | (kp >= lo))  # [BLOCK_N]
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
            qk = tl.where(visible[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            corr = tl.math.exp2(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, 1)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        o_ptrs = PartO + b * stride_pb + w * stride_pw + offs_g[:, None] * stride_pg + offs_d[None, :]
        tl.store(o_ptrs, out, mask=in_group[:, None])
        tl.store(PartLse + b * stride_lb + w * stride_lw + offs_g, lse, mask=in_group)

    @triton.jit
    def _moa_decode_merge(
        PartO, PartLse, WorkStart, WorkCount, Out,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        in_group = offs_g < GROUP
        first = tl.load(WorkStart + g)
        stop = first + tl.load(WorkCount + g)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for w in range(first, stop):  # log2-domain merge of the splits' (output, lse)
            lse = tl.load(PartLse + b * stride_lb + w * stride_lw + offs_g, mask=in_group, other=float("-inf"))
            o = tl.load(
                PartO + b * stride_pb + w * stride_pw + offs_g[:, None] * stride_pg + offs_d[None, :],
                mask=in_group[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m_i, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            corr = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(lse - m_safe)
            l_i = l_i * corr + p
            acc = acc * corr[:, None] + p[:, None] * o
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + b * stride_ob + (g * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_group[:, None])


def decode_split_len(bsz: int, total_slots: int, num_sms: int = 132, programs_per_sm: int = 8) -> int:
    """Slots per split: a power of two in [128, 4096] giving about programs_per_sm programs per SM (static shapes)."""
    target = max(1, bsz * total_slots // (programs_per_sm * num_sms))
    return int(min(4096, max(128, 1 << (target.bit_length() - 1))))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_work_list(head_capacity: torch.Tensor, split_len: int, total_slots: int):
    """Static-shape work list on the device: (head, split) per item, and each head's first item and count.

    Items past the real work have head -1. Length ``total_slots // split_len + Hkv`` bounds
    ``sum_g ceil(cap_g / split_len)`` for any capacities summing to ``total_slots``.
    """
    cap = head_capacity.to(torch.int64)
    count = (cap + split_len - 1) // split_len  # [Hkv]
    ends = torch.cumsum(count, 0)
    starts = ends - count
    items = torch.arange(total_slots // split_len + cap.numel(), device=cap.device)
    head = torch.searchsorted(ends, items, right=True)  # [W]
    valid = head < cap.numel()
    head_safe = head.clamp(max=cap.numel() - 1)
    split = items - starts[head_safe]
    work_head = torch.where(valid, head, -1).to(torch.int32)
    work_split = torch.where(valid, split, 0).to(torch.int32)
    return work_head, work_split, starts.to(torch.int32), count.to(torch.int32)


_WORK_LISTS = TensorMemo()


def _cached_work_list(head_capacity: torch.Tensor, split_len: int, total_slots: int):
    """decode_work_list, reused while this head_capacity tensor lives unchanged."""
    compute = lambda: decode_work_list(head_capacity, split_len, total_slots)  # noqa: E731
    return _WORK_LISTS.get((head_capacity,), (split_len, total_slots), compute)


def _launch_decode(query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, lo, q_pos, scale, sink):
    # query: [B, Hq, 1, D]; cache_keys/values: [B, C + 1, D]; lo: [B, Hkv]
    bsz, num_q_heads, _, head_dim = query.shape
    num_kv_heads = head_capacity.numel()
    group = num_q_heads // num_kv_heads
    total_slots = cache_keys.shape[1] - 1
    interpret = INTERPRETED
    if interpret:
        split_len = 32
    else:
        per_sm = DECODE_CONFIG["programs_per_sm"]
        split_len = decode_split_len(bsz, total_slots, _num_sms(query.device), per_sm)
    block_n = 16 if interpret else DECODE_CONFIG["BLOCK_N"]
    head_offset = head_offset.to(device=query.device, dtype=torch.int32)
    head_capacity = head_capacity.to(device=query.device, dtype=torch.int32)
    work_head, work_split, work_start, work_count = _cached_work_list(head_capacity, split_len, total_slots)
    num_items = work_head.numel()
    block_g = max(16, triton.next_power_of_2(group))
    part_o = torch.empty(bsz, num_items, group, head_dim, device=query.device, dtype=torch.float32)
    part_lse = torch.empty(bsz, num_items, group, device=query.device, dtype=torch.float32)
    q = query[:, :, 0]  # [B, Hq, D]
    q = q if q.stride(-1) == 1 else q.contiguous()
    slot_pos = slot_pos.to(torch.int32)
    q_pos = q_pos.to(torch.int64).contiguous()
    lo = lo.contiguous()
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    warps = 1 if interpret else DECODE_CONFIG["num_warps"]
    stages = 1 if interpret else DECODE_CONFIG["num_stages"]
    _moa_decode_split[(num_items, bsz)](
        q, cache_keys, cache_values, slot_pos, head_offset, head_capacity, q_pos, lo, work_head, work_split,
        part_o, part_lse,
        q.stride(0), q.stride(1), cache_keys.stride(0), cache_keys.stride(1),
        cache_values.stride(0), cache_values.stride(1), slot_pos.stride(0),
        lo.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        scale * 1.4426950408889634,
        GROUP=group, BLOCK_G=block_g, SINK=sink, HEAD_DIM=head_dim, BLOCK_N=block_n, SPLIT_LEN=split_len,
        DOT_PRECISION=precision, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    out = torch.empty(bsz, num_q_heads, 1, head_dim, device=query.device, dtype=query.dtype)
    _moa_decode_merge[(num_kv_heads, bsz)](
        part_o, part_lse, work_start, work_count, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, num_warps=1 if interpret else 4,
    )  # fmt: skip
    return out


# d=128 bf16: the winner of the H200 sweep in benchmarks/RESULTS.md (2026-11-24)
DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "programs_per_sm": 8}


def moa_decode(
    query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, q_pos,
    alpha, beta, sink: int, min_span: int, scale: float | None = None,
):  # fmt: skip
    """MoA attention of one new token per row over its kv head's cache slots (token already written).

    query: [B, Hq, 1, D]; cache_keys/values: [B, C + 1, D]; slot_pos: [B, C + 1] int32 (-1 = empty);
    head_offset/head_capacity: [Hkv]; q_pos: [B] int64; alpha/beta: [Hkv]. Returns [B, Hq, 1, D].
    No host synchronisation on the Triton path (CUDA-graph capturable once compiled).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if query.shape[1] % head_capacity.numel() != 0 or query.shape[2] != 1:
        raise ValueError(f"decode query shape {tuple(query.shape)} needs [B, k * Hkv, 1, D]: pass one token per row")
    if not use_triton(query):
        return moa_decode_ref(
            query,
            cache_keys,
            cache_values,
            slot_pos,
            head_offset,
            head_capacity,
            q_pos,
            alpha,
            beta,
            sink,
            min_span,
            scale,
        )
    lo = window_lo(q_pos, alpha, beta, sink, min_span)  # [B, Hkv]
    return _launch_decode(query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, lo, q_pos, scale, sink)


def moa_decode_ref(
    query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, q_pos,
    alpha, beta, sink: int, min_span: int, scale: float | None = None,
):  # fmt: skip
    """Pure-torch ``moa_decode``: the reference over each head's slots (host-side gather, not graph-safe)."""
    keys, values, pos = gather_head_slots(cache_keys, cache_values, slot_pos, head_offset, head_capacity)
    return moa_attention_ref(query, keys, values, q_pos.reshape(-1, 1), pos, alpha, beta, sink, min_span, scale)

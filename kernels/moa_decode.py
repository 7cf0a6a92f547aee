"""Triton decode kernel for MoA attention: one query token per row over each kv head's ragged cache.

Work is a static list of (kv head, split) items: head g's slots ``[off_g, off_g + cap_g)`` are cut
into splits of ``split_len`` slots, so a long head is spread over many programs (split-K) and a short
head takes one or two. The list is built on the device from ``head_capacity`` with static shapes, so
a decode step has no host synchronisation and can be captured in a CUDA graph. Each program serves
all query heads of the GQA group with one read of K/V (the group is the M dimension of the dot),
computes the window edge of its head in the kernel (``moa_window.window_edge``) and writes a partial
output and log-sum-exp; the last split of each (row, kv head) to finish, found with an atomic ticket that it
resets, merges the splits (a head with one split writes its output directly). So a decode step is one launch.
A separate merge kernel remains for ``fused_merge=False`` configs.
"""

from __future__ import annotations

import functools
import struct

import torch

from .moa_prefill import gather_head_slots, use_triton
from .moa_reference import moa_attention_ref
from .moa_tensor_cache import TensorMemo
from .moa_window import INTERPRETED, dot_precision, fitted_config, launch_fitting

try:
    import triton
    import triton.language as tl

    from .moa_window import window_edge

    HAS_TRITON = True
except ImportError:  # CPU-only installs fall back to the torch reference
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _merge_splits(
        PartO, PartLse, Out, b, g, first, count,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        GROUP: tl.constexpr, MERGE_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # log2-domain merge of the (output, lse) of splits [first, first + count), BLOCK_S splits at a time, in one
        # pass (online rescaling, as in the attention loop): one round of loads per BLOCK_S splits
        offs_s = tl.arange(0, BLOCK_S)
        offs_g = tl.arange(0, MERGE_G)
        offs_d = tl.arange(0, HEAD_DIM)
        in_group = offs_g < GROUP
        lse_base = PartLse + b * stride_lb + offs_g[None, :]
        m_i = tl.full([MERGE_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([MERGE_G], dtype=tl.float32)
        acc = tl.zeros([MERGE_G, HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, count, BLOCK_S):
            ws = first + s0 + offs_s
            ok = ((s0 + offs_s) < count)[:, None] & in_group[None, :]
            lse = tl.load(lse_base + ws[:, None] * stride_lw, mask=ok, other=float("-inf"), cache_modifier=".cg")
            o_ptrs = (PartO + b * stride_pb + ws[:, None, None] * stride_pw + offs_g[None, :, None] * stride_pg
                      + offs_d[None, None, :])  # fmt: skip
            o = tl.load(o_ptrs, mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # [BLOCK_S, MERGE_G, D]
            m_new = tl.maximum(m_i, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(lse - m_safe[None, :])  # [BLOCK_S, MERGE_G]; 0 for empty splits
            corr = tl.math.exp2(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, 0)
            acc = acc * corr[:, None] + tl.sum(p[:, :, None] * o, 0)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + b * stride_ob + (g * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_group[:, None])

    @triton.jit
    def _merge_rows(
        PartO, PartLse, Out, b, g, first, count,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        GROUP: tl.constexpr, MERGE_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # the same merge with no reduction across threads: a split's [MERGE_G, D] output is taken as R rows of 4 (one
        # 16-byte load each) and its lse as an [R, 1] column (entry r: the lse of row r's query head), so each thread
        # merges whole rows on its own, online, one exp2 per row, with no layout change; BLOCK_S splits per step, their
        # loads independent. The balanced kernel, whose programs merge often, is up to 2.4% faster with it; the split
        # kernel at one row was 1-4% slower (``row_merge`` in DECODE_CONFIGS).
        VEC: tl.constexpr = 4
        R: tl.constexpr = MERGE_G * HEAD_DIM // VEC
        offs_r = tl.arange(0, R)
        offs_v = tl.arange(0, VEC)
        head = offs_r // (HEAD_DIM // VEC)  # the query head of each row
        ok_r = (head < GROUP)[:, None]
        d = (offs_r % (HEAD_DIM // VEC))[:, None] * VEC + offs_v[None, :]
        o_base = PartO + b * stride_pb + head[:, None] * stride_pg + d
        lse_base = PartLse + b * stride_lb + head[:, None]
        m_i = tl.full([R, 1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([R, 1], dtype=tl.float32)
        acc = tl.zeros([R, VEC], dtype=tl.float32)
        for s0 in range(0, count, BLOCK_S):
            for u in tl.static_range(BLOCK_S):
                w = first + s0 + u
                # a full [R, 1] mask: Triton 3.9's interpreter rejects a load mask made with a scalar (same PTX)
                ok = ok_r & ((s0 + u + tl.zeros([R, 1], dtype=tl.int32)) < count)
                lse = tl.load(lse_base + w * stride_lw, mask=ok, other=float("-inf"), cache_modifier=".cg")
                o = tl.load(o_base + w * stride_pw, mask=ok, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_i, lse)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                corr = tl.math.exp2(m_i - m_safe)
                p = tl.math.exp2(lse - m_safe)  # 0 for an empty split and past the last
                l_i = l_i * corr + p
                acc = acc * corr + p * o
                m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        o_ptrs = Out + b * stride_ob + (g * GROUP + head)[:, None] * stride_oh + d
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_r)

    @triton.jit
    def _visible_part(first, stop, head_first, head_end, qp, lo, SINK: tl.constexpr):
        """The slots of the split [first, stop) that can hold keys visible to the query at qp, as a virtual range.

        Cache layout: position p < SINK at head_first + p, later ones in a ring of cap - SINK slots, which holds
        the window. Keys visible at qp are the sink positions and the window [max(lo, SINK), qp], one arc of
        the ring; relative to head_first they fill at most two slot intervals, [0, i_hi) and [j_lo, j_hi):
        sink + arc end + arc start when the arc wraps, sink + arc when it does not. Slots between them are
        empty, evicted or out of the window (a static cache sized for a longer generation, a growing cache's
        slack, the ring's stale part) and are skipped, not read and masked.

        Returns (v_first, v_stop, gap_at, gap_len): the kernel reads slot v + gap_len * (v >= gap_at) for v in
        [v_first, v_stop). Every key read is still masked by its position, so correctness never depends on this.
        """
        ring = tl.maximum(head_end - head_first - SINK, 1)
        s0 = first - head_first
        s1 = stop - head_first
        sink_end = tl.minimum(SINK, qp + 1)
        w_lo = tl.maximum(lo, SINK)
        has_window = qp >= w_lo
        a = (w_lo - SINK) % ring  # ring slot of the window's first position
        e = (qp - SINK) % ring  # ring slot of the query's position (used only with a window, so qp >= SINK)
        wraps = has_window & (a > e)
        i_hi = tl.where(wraps, SINK + e + 1, sink_end)
        j_lo = SINK + a
        j_hi = tl.where(has_window, tl.where(wraps, SINK + ring, SINK + e + 1), j_lo)
        x0 = tl.maximum(s0, 0)
        n1 = tl.maximum(tl.minimum(s1, i_hi) - x0, 0)
        y0 = tl.maximum(s0, j_lo)
        n2 = tl.maximum(tl.minimum(s1, j_hi) - y0, 0)
        v_first = tl.where(n1 > 0, x0, y0)
        gap_len = tl.where((n1 > 0) & (n2 > 0), y0 - (x0 + n1), 0)
        return head_first + v_first, head_first + v_first + n1 + n2, head_first + v_first + n1, gap_len

    @triton.jit
    def _load_tile(
        CacheK, CacheV, SlotPos, b, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb,
        start, stop, gap_at, gap_len, qp, lo, offs_n, offs_d, SINK: tl.constexpr,
    ):  # fmt: skip
        """K and V [BLOCK_N, D] of the tile at virtual slot ``start`` of row b (slot v + gap_len past gap_at; nothing
        read at or past ``stop``), and which of its keys the query at qp sees (sink, or in the window from lo)."""
        virtual = start + offs_n
        ok = virtual < stop
        slots = virtual + tl.where(virtual >= gap_at, gap_len, 0)
        kp = tl.load(SlotPos + b * stride_sb + slots, mask=ok, other=-1).to(tl.int64)
        k = tl.load(CacheK + b * stride_ckb + slots[:, None] * stride_ckn + offs_d[None, :], mask=ok[:, None])
        v = tl.load(CacheV + b * stride_cvb + slots[:, None] * stride_cvn + offs_d[None, :], mask=ok[:, None])
        visible = ok & (kp >= 0) & (kp <= qp) & ((kp < SINK) | (kp >= lo))  # [BLOCK_N]
        return k, v, visible

    @triton.jit
    def _attend_range(
        q, CacheK, CacheV, SlotPos, b, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb,
        first, stop, gap_at, gap_len, qp, lo, sm_scale_log2,
        BLOCK_G: tl.constexpr, SINK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr = False,
    ):  # fmt: skip
        """Attention of q [BLOCK_G, D] over the virtual slot range [first, stop) of row b (slot v + gap_len past
        gap_at, see _visible_part), every key masked by its position: (output, log2-domain lse), -inf if none.
        SWAP_AB: the same sums with the tile's slots as the dots' M (scores [BLOCK_N, BLOCK_G], output [D, BLOCK_G]
        transposed once at the end)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        # SLOTS: the scores' axis over the tile's slots (the accumulator holds the head's D on that axis)
        SLOTS: tl.constexpr = 0 if SWAP_AB else 1
        if SWAP_AB:  # slots as the dots' M (scores [BLOCK_N, BLOCK_G]): the query heads pad only the dots' N
            q_op = tl.trans(q)  # [D, BLOCK_G]
            acc = tl.zeros([HEAD_DIM, BLOCK_G], dtype=tl.float32)
        else:
            q_op = q
            acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for start in range(first, stop, BLOCK_N):
            k, v, visible = _load_tile(
                CacheK, CacheV, SlotPos, b, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb,
                start, stop, gap_at, gap_len, qp, lo, offs_n, offs_d, SINK,
            )  # fmt: skip
            if SWAP_AB:
                qk = tl.dot(k, q_op, input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_N, BLOCK_G]
            else:
                qk = tl.dot(q_op, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
            qk = tl.where(tl.expand_dims(visible, 1 - SLOTS), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, SLOTS))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - tl.expand_dims(m_safe, SLOTS))
            corr = tl.math.exp2(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, SLOTS)
            acc = acc * tl.expand_dims(corr, SLOTS)
            if SWAP_AB:
                acc += tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)  # [D, BLOCK_G]
            else:
                acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BLOCK_G, D]
            m_i = m_new
        if SWAP_AB:
            acc = tl.trans(acc)
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        return out, lse

    @triton.jit
    def _attend_segment(
        Q, CacheK, CacheV, SlotPos, QPos, b, g, first, stop, head_first, head_end, alpha, beta,
        stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb, stride_qpos, sm_scale_log2,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SINK: tl.constexpr, MIN_SPAN: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr = False,
    ):  # fmt: skip
        """Attention of row b's query heads of kv head g over the head's slots [first, stop): the row's window
        edge, the visible part of the range, then the tile loop. Returns (output, log2-domain lse)."""
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        qp = tl.load(QPos + b * stride_qpos).to(tl.int64)
        lo = window_edge(qp, alpha, beta, SINK, MIN_SPAN)
        first, stop, gap_at, gap_len = _visible_part(first, stop, head_first, head_end, qp, lo, SINK)
        # q: [BLOCK_G, D], the query heads of group g (rows past GROUP are zero padding for the dot)
        q_ptrs = Q + b * stride_qb + (g * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_g < GROUP)[:, None], other=0.0)
        return _attend_range(
            q, CacheK, CacheV, SlotPos, b, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb,
            first, stop, gap_at, gap_len, qp, lo, sm_scale_log2, BLOCK_G, SINK, HEAD_DIM, BLOCK_N, DOT_PRECISION,
            SWAP_AB,
        )  # fmt: skip

    @triton.jit
    def _write_or_merge(
        out, lse, PartO, PartLse, Counter, Out, b, g, w, pieces, merge_first, valid,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh, num_kv_heads,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr, ROW_MERGE: tl.constexpr,
    ):  # fmt: skip
        """A piece of (row b, kv head g): the output itself when the pair has one piece, else partial w, and the
        last of the pair's pieces to finish (its ticket) merges the pieces at merge_first, merge_first + 1, ...
        (``valid`` false: an empty item, which stores its partial but takes no ticket and writes no output)."""
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        in_group = offs_g < GROUP
        if pieces == 1:  # the pair's only piece: its result is the output
            if valid:
                o_ptrs = Out + b * stride_ob + (g * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_group[:, None])
        else:
            part_o = PartO + b * stride_pb + w * stride_pw + offs_g[:, None] * stride_pg + offs_d[None, :]
            tl.store(part_o, out, mask=in_group[:, None])
            tl.store(PartLse + b * stride_lb + w * stride_lw + offs_g, lse, mask=in_group)
            if valid:
                # the last piece of (row, head) to finish merges: every thread's stores precede the barrier, the
                # acq_rel ticket publishes them and makes the others' visible to the last one
                tl.debug_barrier()
                counter = Counter + b * num_kv_heads + g
                ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                if ticket == pieces - 1:
                    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call
                    if ROW_MERGE:
                        _merge_rows(
                            PartO, PartLse, Out, b, g, merge_first, pieces,
                            stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
                            GROUP, MERGE_G, HEAD_DIM, BLOCK_S,
                        )  # fmt: skip
                    else:
                        _merge_splits(
                            PartO, PartLse, Out, b, g, merge_first, pieces,
                            stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
                            GROUP, MERGE_G, HEAD_DIM, BLOCK_S,
                        )  # fmt: skip

    @triton.jit
    def _moa_decode_split(
        Q, CacheK, CacheV, SlotPos, Items, QPos, PartO, PartLse, Counter, Out,
        stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb, stride_qpos,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        num_kv_heads, split_len, sm_scale_log2,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_G: tl.constexpr, SINK: tl.constexpr,
        MIN_SPAN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
        FUSED_MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr = False,
        ROW_MERGE: tl.constexpr = False,
    ):  # fmt: skip
        w = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)  # int64: b * stride of a large cache passes 2**31
        # the item's record in one load (decode_items): head (-1: no work), head slots, split, splits, first split
        field = tl.arange(0, 8)
        rec = tl.load(Items + w * 8 + field)
        g = tl.sum(tl.where(field == 0, rec, 0))
        g_safe = tl.maximum(g, 0)
        head_first = tl.sum(tl.where(field == 1, rec, 0))
        head_end = tl.sum(tl.where(field == 2, rec, 0))
        first = tl.sum(tl.where(field == 3, rec, 0))
        stop = tl.where(g >= 0, tl.minimum(first + split_len, head_end), first)
        count = tl.sum(tl.where(field == 4, rec, 0))  # splits of this head
        alpha = tl.sum(tl.where(field == 6, rec, 0)).to(tl.float64, bitcast=True)
        beta = tl.sum(tl.where(field == 7, rec, 0)).to(tl.float64, bitcast=True)

        out, lse = _attend_segment(
            Q, CacheK, CacheV, SlotPos, QPos, b, g_safe, first, stop, head_first, head_end, alpha, beta,
            stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb, stride_qpos, sm_scale_log2,
            GROUP, BLOCK_G, SINK, MIN_SPAN, HEAD_DIM, BLOCK_N, DOT_PRECISION, SWAP_AB,
        )  # fmt: skip
        if FUSED_MERGE:
            _write_or_merge(
                out, lse, PartO, PartLse, Counter, Out, b, g_safe, w, count, tl.sum(tl.where(field == 5, rec, 0)),
                g >= 0, stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh, num_kv_heads,
                GROUP, BLOCK_G, MERGE_G, HEAD_DIM, BLOCK_S, ROW_MERGE,
            )  # fmt: skip
        else:
            offs_g = tl.arange(0, BLOCK_G)
            in_group = offs_g < GROUP
            offs_d = tl.arange(0, HEAD_DIM)
            part_o = PartO + b * stride_pb + w * stride_pw + offs_g[:, None] * stride_pg + offs_d[None, :]
            tl.store(part_o, out, mask=in_group[:, None])
            tl.store(PartLse + b * stride_lb + w * stride_lw + offs_g, lse, mask=in_group)

    @triton.jit
    def _moa_decode_merge(
        PartO, PartLse, WorkStart, WorkCount, Out,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        GROUP: tl.constexpr, MERGE_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        _merge_splits(
            PartO, PartLse, Out, b, g, tl.load(WorkStart + g), tl.load(WorkCount + g),
            stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
            GROUP, MERGE_G, HEAD_DIM, BLOCK_S,
        )  # fmt: skip


def decode_split_len(
    bsz: int,
    total_slots: int,
    num_sms: int = 132,
    programs_per_sm: float = 8,
    cap: int = 4096,
    granule: int | None = None,
) -> int:
    """Slots per split in [128, cap] giving about programs_per_sm programs per SM (static shapes; a fraction below 1
    asks for fewer, longer splits than SMs): the power of two at or below the target, or with ``granule`` the
    multiple of it nearest the target (the split length is a kernel argument: no compile per length)."""
    target = max(1, int(bsz * total_slots / (programs_per_sm * num_sms)))
    if granule:
        return int(min(cap, max(128, granule * max(1, round(target / granule)))))
    return int(min(cap, max(128, 1 << (target.bit_length() - 1))))


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


def decode_items(head_offset, head_capacity, alpha, beta, split_len: int, total_slots: int) -> torch.Tensor:
    """[W, 8] int64 item records for the split kernel, one load per program: head (-1: none), the head's first
    and end slot, the split's first slot, the head's split count and first item, and the bits of the head's
    float64 alpha and beta (``decode_work_list`` order)."""
    head, split, start, count = (x.to(torch.int64) for x in decode_work_list(head_capacity, split_len, total_slots))
    g = head.clamp(min=0)
    off, cap = head_offset.to(torch.int64)[g], head_capacity.to(torch.int64)[g]
    bits = lambda x: x.to(torch.float64).contiguous().view(torch.int64)[g]  # noqa: E731
    cols = (head, off, off + cap, off + split * split_len, count[g], start[g], bits(alpha), bits(beta))
    return torch.stack(cols, 1).contiguous()


def float_bits(x: float) -> int:
    """The bits of ``x`` as a float64, read as an int64 (what ``.view(torch.int64)`` gives on the device)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def decode_items_host(offsets, capacities, alpha, beta, split_len: int, total_slots: int) -> torch.Tensor:
    """``decode_items`` from the host's lists of the heads' offsets, capacities and rules: the same [W, 8] records,
    built in Python (a few hundred rows) instead of ~25 small device ops, on the CPU."""
    counts = [(cap + split_len - 1) // split_len for cap in capacities]
    starts = [sum(counts[:g]) for g in range(len(counts))]
    rows = []
    for g, (off, cap) in enumerate(zip(offsets, capacities, strict=True)):
        rule = (counts[g], starts[g], float_bits(alpha[g]), float_bits(beta[g]))
        rows += [(g, off, off + cap, off + split * split_len, *rule) for split in range(counts[g])]
    width = total_slots // split_len + len(capacities)
    none = (
        -1,
        offsets[0],
        offsets[0] + capacities[0],
        offsets[0],
        counts[0],
        starts[0],
        *map(float_bits, (alpha[0], beta[0])),
    )
    return torch.tensor(rows + [none] * (width - len(rows)), dtype=torch.int64)


_WORK_LISTS = TensorMemo()
_ITEMS = TensorMemo()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached_work_list(head_capacity: torch.Tensor, split_len: int, total_slots: int):
    """decode_work_list, reused while this head_capacity tensor lives unchanged.

    Made inside a CUDA-graph capture, the list would hold values only once the graph replays: it is then
    recomputed inside the graph and not kept (an eager call before the capture, the usual warm-up, keeps it).
    """
    compute = lambda: decode_work_list(head_capacity, split_len, total_slots)  # noqa: E731
    store = not _capturing(head_capacity.device)
    return _WORK_LISTS.get((head_capacity,), (split_len, total_slots), compute, store=store)


def _cached_items(head_offset, head_capacity, alpha, beta, split_len: int, total_slots: int, host=None):
    """decode_items, reused while these tensors live unchanged (recomputed, not kept, inside a capture). ``host``:
    the same offsets, capacities, alpha and beta as host lists, to build the records there (one upload)."""
    if host is not None:
        compute = lambda: decode_items_host(*host, split_len, total_slots).to(head_capacity.device)  # noqa: E731
    else:
        compute = lambda: decode_items(head_offset, head_capacity, alpha, beta, split_len, total_slots)  # noqa: E731
    store = not _capturing(head_capacity.device)
    return _ITEMS.get((head_offset, head_capacity, alpha, beta), (split_len, total_slots), compute, store=store)


_COUNTERS: dict = {}


def _split_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per (row, kv head); the fused merge leaves them at zero after each call.

    One buffer per device, shared by every call: calls on one stream run one after another. Decode calls
    running at the same time on two streams of one device would share tickets (not supported).
    """
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= size:
        return buf
    buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    if not _capturing(device):  # made in a capture, its zeros exist only in replays: keep it to that graph
        _COUNTERS[device] = buf
    return buf


# d=128 bf16 (and any head size above 64): (most rows, most rows x cache slots, launch config), the first entry
# holding a call wins. One or two rows: the split kernel with few, long splits (the merge of many pieces is serial
# per head; the 2026-11-24 21:4x sweep, sweep_decode.py ... small). More rows: the balanced kernel
# (moa_decode_balanced.py, one wave of equal programs), which beat the best split config by 1-7% from 8k x 16 up to
# 128k x 64 and 4.6k x 371 rows in the 2026-11-25 01:xx UTC sweep, and lost by 13-45% at one row (RESULTS.md); each
# (row, head) a program starts is charged segment_cost tiles (sweep_decode.py ... segcost, 2026-11-25 03:4x UTC:
# 1-3.5%). The 4-warp config wins from 8k x 64 and 32k x 16 (2**20 rows x slots) up, so the 2-warp entry ends at
# 3 * 2**18 (8k x 16 at 50% is 524k); its tiles are 32 slots with 3 stages and a cost of 4 (128 slots) since
# sweep_decode.py ... retune and a check (2026-11-25 05:1x UTC: 1.9-3.4% in step at every shape of the entry,
# twice). benchmarks/bench_attention.py's sweep re-times one shape per entry.
DECODE_CONFIGS = [
    (2, 2**62, {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 1, "fused_merge": True,
                "merge_splits": 16}),
    # many short (row, kv head) pairs (the 4th field: at least 4096 pairs of at most 1024 slots on average; MHA at 25%,
    # as Llama-2 / Vicuna at 2-3k tokens and a batch of 256-512): each balanced program would start 30-60 segments,
    # and the split kernel with short splits (about one program per pair, scheduled by the hardware) was 7% faster at
    # 3k x 256 and 23% at 2k x 512 (sweep_decode.py --heads 32,32 ... splitbig, 2026-11-25 07:4x UTC). With fewer or
    # longer pairs the balanced kernel is as fast or faster (Llama-3-8B at 25%, 3k pairs of 1.2k slots: equal; MHA at
    # 50%, 3k pairs of 1.5k: 2.8% faster; RESULTS.md).
    (2**62, 2**62, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 8, "fused_merge": True,
                    "merge_splits": 16}, (4096, 1024)),
    # row_merge (_merge_rows, in both balanced entries): 1-2.4% faster in step at 8k x 64 and 32k x 16, within 1% at
    # 8k x 16 and from 128k x 16 up; with Qwen2.5-7B's groups of 7, 2.9% at 9.2k x 424 and 14% at 8k x 16 at 25%; in
    # the split kernel it was 1-4% slower at one row (bench_attention.py, sweep_decode.py ... rows step, 2026-11-25
    # afternoon; RESULTS.md "Where a batch-1 call's fixed cost goes").
    (2**62, 3 * 2**18, {"balanced": True, "BLOCK_N": 32, "num_warps": 2, "num_stages": 3, "programs_per_sm": 4,
                        "merge_splits": 16, "segment_cost": 4, "row_merge": True}),
    # swap_ab: the dots take the 64 slots of a tile as M and the group's query heads (padded to 16) as N, which a
    # warpgroup runs as Hopper's wgmma, not as 16-row mma.sync tiles: as fast alone at Llama-3-8B's serving shapes,
    # 3% faster with groups of 7 (Qwen2.5-7B), and drawing less power, so that a whole decode step, power-bound at
    # the H200's 700 W next to its GEMMs, is 1-2% faster (benchmarks/attn_power.py, sweep_decode.py ... swap;
    # 2026-11-25 RESULTS.md "Slots as the dots' M"). Slower in the 2-warp and split configs, so only here.
    (2**62, 2**62, {"balanced": True, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2,
                    "merge_splits": 16, "segment_cost": 3, "swap_ab": True, "row_merge": True}),
]  # fmt: skip
# d <= 64 (Llama-3.2-1B, Qwen2.5-0.5B, SmolLM2): a slot is half the bytes, and one config serves every batch above
# two rows: 64-slot tiles (the bytes of the d=128 2-warp entry's 32), 2 warps, 4 programs per SM. The d=128 4-warp
# entry took 26% longer at Llama-3.2-1B's 8k+2k serving shape (9.2k x 816 rows: 2.226 vs 1.763 ms;
# sweep_decode.py --head-dim 64 ... d64, 2026-11-25 06:4x UTC; RESULTS.md "Decode at head size 64"). row_merge: equal
# at 9.2k x 816, 0.5-1.3% faster in step at 8k x 64 and 8k x 16 (sweep_decode.py --head-dim 64 ... rows step).
DECODE_CONFIGS_D64 = [
    (2, 2**62, {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 1, "fused_merge": True,
                "merge_splits": 16}),
    (2**62, 2**62, {"balanced": True, "BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "programs_per_sm": 4,
                    "merge_splits": 16, "segment_cost": 4, "row_merge": True}),
]  # fmt: skip


def decode_table(head_dim: int) -> list:
    """The launch-config table of this head size (d <= 64 has its own: half the bytes per slot)."""
    return DECODE_CONFIGS_D64 if head_dim <= 64 else DECODE_CONFIGS


def decode_config(bsz: int, total_slots: int, head_dim: int = 128, num_kv_heads: int = 8) -> dict:
    """Launch config of the first entry of the head size's table holding bsz rows and bsz * total_slots (and, for an
    entry with a 4th field (pairs, slots), at least that many (row, kv head) pairs of at most that many slots each on
    average)."""
    table = decode_table(head_dim)
    work, pairs = bsz * total_slots, bsz * num_kv_heads
    for rows, limit, cfg, *short_pairs in table:
        if short_pairs and (pairs < short_pairs[0][0] or total_slots > short_pairs[0][1] * num_kv_heads):
            continue
        if bsz <= rows and work <= limit:
            return cfg
    return table[-1][2]


def swap_ab(config: dict, head_dim: int) -> bool:
    """Whether a launch takes the tile's slots as the dots' M: where the config asks for it and the head is at most
    128 wide (at d=256 the swapped tiles need 207 KB of shared memory, spill 44 registers and ran 3% slower at
    8k x 64; 2026-11-25 09:2x UTC)."""
    return bool(config.get("swap_ab")) and head_dim <= 128


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def decode_constexprs(config: dict, group: int, head_dim: int, num_kv_heads: int, sink: int, min_span: int, dtype):
    """The compile-time arguments a decode launch gives its kernel (balanced or split, as the config says): with the
    config's warps and stages, what decides the compiled code (``benchmarks/kernel_ptx.py`` compiles the same)."""
    merge_g = _pow2_at_least(group)
    common = dict(
        GROUP=group, BLOCK_G=max(16, merge_g), MERGE_G=merge_g, SINK=sink, MIN_SPAN=min_span, HEAD_DIM=head_dim,
        BLOCK_N=config["BLOCK_N"], DOT_PRECISION=dot_precision(dtype), SWAP_AB=swap_ab(config, head_dim),
        ROW_MERGE=bool(config.get("row_merge", False)),
    )  # fmt: skip
    if config.get("balanced"):
        return dict(common, BLOCK_H=_pow2_at_least(num_kv_heads), BLOCK_S=config.get("merge_splits", 16),
                    SEG_COST=int(config.get("segment_cost", 0)))  # fmt: skip
    # BLOCK_S: splits merged per step, [BLOCK_S, group, D] fp32 at once
    return dict(common, BLOCK_S=config.get("merge_splits", 8), FUSED_MERGE=bool(config["fused_merge"]))


def with_config(entry: tuple, config: dict) -> tuple:
    """A table entry with its launch config replaced (sweeps install candidates this way)."""
    return (*entry[:2], config, *entry[3:])


_INTERPRETER_CONFIG = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "split_len": 32, "fused_merge": True}


def _launch_decode(query, cache, q_pos, alpha, beta, scale: float, sink: int, min_span: int, config=None):
    # query: [B, Hq, 1, D]; cache = (keys, values [B, C + 1, D], slot_pos [B, C + 1], head_offset, head_capacity)
    cache_keys, cache_values, slot_pos, head_offset, head_capacity = cache
    bsz, num_q_heads, _, head_dim = query.shape
    num_kv_heads = head_capacity.numel()
    group = num_q_heads // num_kv_heads
    if config is None:  # the table's config, or a smaller one where this GPU cannot load it
        return launch_fitting(
            lambda c: _launch_decode(query, cache, q_pos, alpha, beta, scale, sink, min_span, c),
            _table_config(bsz, cache_keys, num_kv_heads), _fit_key(head_dim, group, query.dtype, query.device),
            "MoA decode",
        )  # fmt: skip
    if config.get("balanced"):
        return launch_balanced(query, cache, q_pos, alpha, beta, scale, sink, min_span, config)
    split_len, items, constexprs, counters, work_list = _split_state(
        bsz, group, query.dtype, cache, alpha, beta, sink, min_span, config
    )
    num_items = items.shape[0]
    part_o, part_lse = partials(bsz, num_items, group, head_dim, query.device)
    out = torch.empty(bsz, num_q_heads, 1, head_dim, device=query.device, dtype=query.dtype)
    counters = part_lse if counters is None else counters  # unused when the merge is not fused
    q = query[:, :, 0]  # [B, Hq, D]
    q = q if q.stride(-1) == 1 else q.contiguous()
    part_strides = (part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1))
    _moa_decode_split[(num_items, bsz)](
        q, cache_keys, cache_values, slot_pos, items, q_pos, part_o, part_lse, counters, out,
        q.stride(0), q.stride(1), cache_keys.stride(0), cache_keys.stride(1),
        cache_values.stride(0), cache_values.stride(1), slot_pos.stride(0), q_pos.stride(0),
        *part_strides, out.stride(0), out.stride(1),
        num_kv_heads, split_len, scale * 1.4426950408889634,
        **constexprs, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    if work_list is not None:
        _, _, work_start, work_count = work_list
        _moa_decode_merge[(num_kv_heads, bsz)](
            part_o, part_lse, work_start, work_count, out, *part_strides, out.stride(0), out.stride(1),
            GROUP=group, MERGE_G=constexprs["MERGE_G"], HEAD_DIM=head_dim, BLOCK_S=constexprs["BLOCK_S"],
            num_warps=1 if INTERPRETED else 4,
        )  # fmt: skip
    return out


def partials(bsz: int, items: int, group: int, head_dim: int, device: torch.device):
    """Buffers of the splits' partial results: out [B, items, group, D] and log-sum-exp [B, items, group], fp32, with
    row strides rounded up to multiples of 16 elements. Triton specializes integer arguments on divisibility by 16,
    so a row stride that followed ``items`` (the cache's size) would compile the kernels again."""

    def rows(*shape: int) -> torch.Tensor:
        strides = [1]
        for size in reversed(shape[1:]):
            strides.insert(0, strides[0] * size)
        row = -(-strides[0] * shape[0] // 16) * 16  # set explicitly: a view would give a batch of one any row stride
        flat = torch.empty(bsz, row, device=device, dtype=torch.float32)
        return flat.as_strided((bsz, *shape), (row, *strides))

    return rows(items, group, head_dim), rows(items, group)


def _table_config(bsz: int, cache_keys: torch.Tensor, num_kv_heads: int) -> dict:
    if INTERPRETED:
        return _INTERPRETER_CONFIG
    return decode_config(bsz, cache_keys.shape[1] - 1, cache_keys.shape[-1], num_kv_heads)


def _fit_key(head_dim: int, group: int, dtype, device) -> tuple:
    """What decides whether a config's shared memory fits (launch_fitting's key)."""
    return head_dim, group, dtype, device


def _split_state(bsz: int, group: int, dtype, cache, alpha, beta, sink: int, min_span: int, config: dict, host=None):
    """What a split launch reads besides its inputs: (split length, work items, constexprs, merge tickets or None,
    the separate merge's work list or None); the items, tickets and work list are memoised per cache."""
    cache_keys, _, _, head_offset, head_capacity = cache
    head_dim, num_kv_heads, total_slots = cache_keys.shape[-1], head_capacity.numel(), cache_keys.shape[1] - 1
    device = cache_keys.device
    split_len = config.get("split_len") or decode_split_len(
        bsz,
        total_slots,
        _num_sms(device),
        config["programs_per_sm"],
        config.get("split_cap", 4096),
        config.get("split_granule"),
    )
    items = _cached_items(head_offset, head_capacity, alpha, beta, split_len, total_slots, host)
    constexprs = decode_constexprs(config, group, head_dim, num_kv_heads, sink, min_span, dtype)
    if constexprs["FUSED_MERGE"]:
        return split_len, items, constexprs, _split_counters(device, bsz * num_kv_heads), None
    return split_len, items, constexprs, None, _cached_work_list(head_capacity, split_len, total_slots)


def prepare_decode(bsz: int, num_q_heads: int, dtype, cache, alpha, beta, sink: int, min_span: int, host=None):
    """Fill, without launching, the memos a ``moa_decode`` call of ``bsz`` rows over ``cache`` reads: the work
    items or head table of its kernel (from the cache's head capacities) and the merge tickets. A CUDA-graph
    capture of the call made afterwards finds them, so the graph holds no ops rebuilding them at every replay;
    without this, an eager call before the capture (a warm-up step) fills them. ``host``: the heads' offsets,
    capacities, alpha and beta as host lists, to build the records on the host (one upload per table)."""
    cache_keys, _, _, head_offset, head_capacity = cache
    if not use_triton(cache_keys):
        return
    device = cache_keys.device
    cache = (*cache[:3], _on(head_offset, device), _on(head_capacity, device))
    alpha, beta = _on(alpha, device), _on(beta, device)
    num_kv_heads = head_capacity.numel()
    group = num_q_heads // num_kv_heads
    table = _table_config(bsz, cache_keys, num_kv_heads)
    config = fitted_config(table, _fit_key(cache_keys.shape[-1], group, dtype, device), "MoA decode")
    if config.get("balanced"):
        balanced_state(bsz, group, dtype, cache, alpha, beta, sink, min_span, config, host)
    else:
        _split_state(bsz, group, dtype, cache, alpha, beta, sink, min_span, config, host)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def moa_decode(
    query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, q_pos,
    alpha, beta, sink: int, min_span: int, scale: float | None = None,
):  # fmt: skip
    """MoA attention of one new token per row over its kv head's cache slots (token already written).

    query: [B, Hq, 1, D]; cache_keys/values: [B, C + 1, D]; slot_pos: [B, C + 1] int32 (-1 = empty);
    head_offset/head_capacity: [Hkv] (any int dtype); q_pos: [B] (any int dtype, any stride); alpha/beta: [Hkv]
    (float64 on the device for the exact contract). Returns [B, Hq, 1, D]. On the Triton path a call is one
    kernel launch (two without the fused merge): no torch op, no host synchronisation, CUDA-graph capturable
    once compiled and warmed up eagerly (the warm-up caches the work list).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if query.shape[1] % head_capacity.numel() != 0 or query.shape[2] != 1:
        raise ValueError(f"decode query shape {tuple(query.shape)} needs [B, k * Hkv, 1, D]: pass one token per row")
    cache = (cache_keys, cache_values, slot_pos, head_offset, head_capacity)
    if not use_triton(query):
        return moa_decode_ref(query, *cache, q_pos, alpha, beta, sink, min_span, scale)
    if slot_pos.stride(-1) != 1 or cache_keys.stride(-1) != 1 or cache_values.stride(-1) != 1:
        raise ValueError("decode cache tensors need a contiguous last dim: pass the MoaCacheLayer tensors as they are")
    dev = query.device
    cache = (cache_keys, cache_values, slot_pos, _on(head_offset, dev), _on(head_capacity, dev))
    return _launch_decode(query, cache, q_pos, _on(alpha, dev), _on(beta, dev), scale, sink, min_span)


def moa_decode_ref(
    query, cache_keys, cache_values, slot_pos, head_offset, head_capacity, q_pos,
    alpha, beta, sink: int, min_span: int, scale: float | None = None,
):  # fmt: skip
    """Pure-torch ``moa_decode``: the reference over each head's slots (host-side gather, not graph-safe)."""
    keys, values, pos = gather_head_slots(cache_keys, cache_values, slot_pos, head_offset, head_capacity)
    return moa_attention_ref(query, keys, values, q_pos.reshape(-1, 1), pos, alpha, beta, sink, min_span, scale)


from .moa_decode_balanced import balanced_state, launch_balanced  # noqa: E402  (it builds on this module's kernel helpers)

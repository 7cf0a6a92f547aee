"""Balanced MoA decode: every program reads the same number of cache tiles, in one wave of the device.

The split kernel (``moa_decode._moa_decode_split``) cuts each head into splits of a fixed length: a head's
last split is partial, and the number of (row, split) programs is rarely a multiple of the programs the
device runs at once, so the last wave runs part-empty. Here the tiles of ``BLOCK_N`` slots of every
(row, kv head) are laid end to end (rows, then the heads of a row, then a head's tiles), each (row, head)
preceded by ``segment_cost`` units without slots (what starting a segment costs a program, in tiles), and
program ``p`` of ``P`` takes units ``[p * T, (p + 1) * T)`` with ``T = ceil(rows * units per row / P)``.
A program walks its range one (row, head) segment at a time: the segment's visible part (``_visible_part``: only slots the
query can see are read), then a partial output and log-sum-exp. The pieces of a (row, head) come from a run
of consecutive programs, known by arithmetic: piece ``p - first program`` of that pair. As in the split
kernel, a pair done by one program writes its output, and otherwise the last piece to finish (an atomic
ticket, reset by it) merges them. Every head's offset, capacity, alpha, beta and first unit come from one
load of a small table (``head_meta``, built once per plan). Static shapes: one launch, no host
synchronisation, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

from .moa_decode import _capturing, _num_sms, _split_counters, decode_constexprs, float_bits, partials
from .moa_tensor_cache import TensorMemo

try:
    import triton
    import triton.language as tl

    from .moa_decode import _attend_segment, _write_or_merge  # jit helpers: defined only where triton imports

    HAS_TRITON = True
except ImportError:  # CPU-only installs fall back to the torch reference
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:
    # rows, programs and pieces change with the batch and the cache's size: not specialized on (1, multiple of 16)
    @triton.jit(do_not_specialize=["bsz", "num_programs", "pieces_per_pair"])
    def _moa_decode_balanced(
        Q, CacheK, CacheV, SlotPos, HeadMeta, QPos, PartO, PartLse, Counter, Out,
        stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb, stride_qpos,
        stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob, stride_oh,
        num_kv_heads, bsz, num_programs, pieces_per_pair, sm_scale_log2,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_G: tl.constexpr, SINK: tl.constexpr,
        MIN_SPAN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_S: tl.constexpr, SEG_COST: tl.constexpr, DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr = False,
        ROW_MERGE: tl.constexpr = False,
    ):  # fmt: skip
        p = tl.program_id(0).to(tl.int64)
        # every head's (offset, capacity, alpha, beta, first unit, units per row) in one load (head_meta); rows
        # past Hkv get a first unit no unit reaches
        offs_h = tl.arange(0, BLOCK_H)
        col = tl.arange(0, 8)[None, :]
        meta = tl.load(HeadMeta + offs_h[:, None] * 8 + col, mask=(offs_h < num_kv_heads)[:, None], other=2**62)
        head_unit = tl.sum(tl.where(col == 4, meta, 0), 1)  # [BLOCK_H]
        per_row = tl.sum(tl.where((offs_h == 0)[:, None] & (col == 5), meta, 0))
        total = bsz * per_row
        per_prog = (total + num_programs - 1) // num_programs
        # global unit index: rows, then the heads of a row, then per head SEG_COST units with no slots (the cost of
        # starting a segment, in tiles) and its tiles of BLOCK_N slots
        t = p * per_prog
        end = tl.minimum(t + per_prog, total)

        while t < end:
            b = t // per_row
            r = t - b * per_row  # unit of the row
            g = tl.sum((head_unit <= r).to(tl.int64)) - 1  # the head holding unit r
            row = tl.sum(tl.where((offs_h == g)[:, None], meta, 0), 0)  # [8]: head g's fields
            field = tl.arange(0, 8)
            head_first = tl.sum(tl.where(field == 0, row, 0))
            head_end = head_first + tl.sum(tl.where(field == 1, row, 0))
            alpha = tl.sum(tl.where(field == 2, row, 0)).to(tl.float64, bitcast=True)
            beta = tl.sum(tl.where(field == 3, row, 0)).to(tl.float64, bitcast=True)
            g_tile0 = tl.sum(tl.where(field == 4, row, 0)) + SEG_COST  # the unit of the head's first tile
            g_tile1 = g_tile0 + (head_end - head_first + BLOCK_N - 1) // BLOCK_N
            seg_end = tl.minimum(end, b * per_row + g_tile1)
            tile_lo = tl.maximum(r - g_tile0, 0)
            tile_hi = seg_end - b * per_row - g_tile0
            if tile_hi > tile_lo:  # else this program holds only the head's slotless units: no piece of it
                first = head_first + tile_lo * BLOCK_N
                stop = tl.minimum(head_first + tile_hi * BLOCK_N, head_end)
                out, lse = _attend_segment(
                    Q, CacheK, CacheV, SlotPos, QPos, b, g, first, stop, head_first, head_end, alpha, beta,
                    stride_qb, stride_qh, stride_ckb, stride_ckn, stride_cvb, stride_cvn, stride_sb, stride_qpos,
                    sm_scale_log2, GROUP, BLOCK_G, SINK, MIN_SPAN, HEAD_DIM, BLOCK_N, DOT_PRECISION, SWAP_AB,
                )  # fmt: skip
                # the programs holding this (row, head)'s tiles: a run from first_prog, found from the unit ranges
                first_prog = (b * per_row + g_tile0) // per_prog
                pieces = (b * per_row + g_tile1 - 1) // per_prog - first_prog + 1
                _write_or_merge(
                    out, lse, PartO, PartLse, Counter, Out, b, g, g * pieces_per_pair + (p - first_prog), pieces,
                    g * pieces_per_pair, True, stride_pb, stride_pw, stride_pg, stride_lb, stride_lw, stride_ob,
                    stride_oh, num_kv_heads, GROUP, BLOCK_G, MERGE_G, HEAD_DIM, BLOCK_S, ROW_MERGE,
                )  # fmt: skip
            t = seg_end


def head_meta(head_offset, head_capacity, alpha, beta, block_n: int, seg_cost: int = 0) -> torch.Tensor:
    """[Hkv, 8] int64 on the device, a row per head: slot offset, capacity, the bits of the float64 alpha and
    beta, the head's first unit in a row, the units per row, and two unused fields. A head is ``seg_cost`` units
    without slots (what starting a segment costs a program, in tiles) and then its tiles of ``block_n`` slots."""
    cap = head_capacity.to(torch.int64)
    units = (cap + block_n - 1) // block_n + seg_cost
    first_unit = torch.cumsum(units, 0) - units
    bits = lambda x: x.to(torch.float64).contiguous().view(torch.int64)  # noqa: E731
    zero = torch.zeros_like(cap)
    cols = (head_offset.to(torch.int64), cap, bits(alpha), bits(beta), first_unit, units.sum().expand_as(cap))
    return torch.stack((*cols, zero, zero), 1).contiguous()


def head_meta_host(offsets, capacities, alpha, beta, block_n: int, seg_cost: int = 0) -> torch.Tensor:
    """``head_meta`` from the host's lists of the heads' offsets, capacities and rules (built in Python, on the CPU)."""
    units = [(cap + block_n - 1) // block_n + seg_cost for cap in capacities]
    rows = [(off, cap, float_bits(a), float_bits(b), sum(units[:g]), sum(units), 0, 0)
            for g, (off, cap, a, b) in enumerate(zip(offsets, capacities, alpha, beta, strict=True))]  # fmt: skip
    return torch.tensor(rows, dtype=torch.int64)


def pieces_bound(num_programs: int, bsz: int) -> int:
    """A bound on the programs sharing one (row, kv head), for any capacities: a pair's tiles are at most a row's
    units (U), each program takes ceil(bsz * U / P) >= bsz * U / P units, and a run may start and end part-way."""
    return num_programs // bsz + 2


_METAS = TensorMemo()


def _cached_meta(head_offset, head_capacity, alpha, beta, block_n: int, seg_cost: int, host=None) -> torch.Tensor:
    """head_meta, reused while these tensors live unchanged (recomputed, not kept, inside a capture); ``host``: the
    same as host lists, to build the table there (one upload)."""
    if host is not None:
        compute = lambda: head_meta_host(*host, block_n, seg_cost).to(head_capacity.device)  # noqa: E731
    else:
        compute = lambda: head_meta(head_offset, head_capacity, alpha, beta, block_n, seg_cost)  # noqa: E731
    store = not _capturing(head_capacity.device)
    return _METAS.get((head_offset, head_capacity, alpha, beta), (block_n, seg_cost), compute, store=store)


def balanced_programs(bsz: int, total_slots: int, num_sms: int, programs_per_sm: float, block_n: int) -> int:
    """Programs of a balanced launch: programs_per_sm per SM, never more than there are tiles of block_n slots."""
    return int(max(1, min(-(-bsz * total_slots // block_n), round(programs_per_sm * num_sms))))


def balanced_state(bsz: int, group: int, dtype, cache, alpha, beta, sink: int, min_span: int, config: dict, host=None):
    """What a balanced launch reads besides its inputs: (constexprs, head table, merge tickets); the table and the
    tickets are memoised (``moa_decode.prepare_decode`` fills them before a capture)."""
    _, _, _, head_offset, head_capacity = cache
    num_kv_heads = head_capacity.numel()
    constexprs = decode_constexprs(config, group, cache[0].shape[-1], num_kv_heads, sink, min_span, dtype)
    meta = _cached_meta(head_offset, head_capacity, alpha, beta, config["BLOCK_N"], constexprs["SEG_COST"], host)
    return constexprs, meta, _split_counters(head_capacity.device, bsz * num_kv_heads)


def launch_balanced(query, cache, q_pos, alpha, beta, scale: float, sink: int, min_span: int, config: dict):
    """The balanced kernel on ``moa_decode._launch_decode``'s arguments; config: BLOCK_N, num_warps, num_stages,
    programs_per_sm, merge_splits, segment_cost (tiles a program is charged per (row, head) it starts; default 0),
    swap_ab (``moa_decode.swap_ab``), and optionally num_programs (tests)."""
    cache_keys, cache_values, slot_pos, head_offset, head_capacity = cache
    bsz, num_q_heads, _, head_dim = query.shape
    num_kv_heads = head_capacity.numel()
    group = num_q_heads // num_kv_heads
    block_n = config["BLOCK_N"]
    total_slots = cache_keys.shape[1] - 1
    programs = config.get("num_programs") or balanced_programs(
        bsz, total_slots, _num_sms(query.device), config["programs_per_sm"], block_n
    )
    pieces = pieces_bound(programs, bsz)
    constexprs, meta, counters = balanced_state(bsz, group, query.dtype, cache, alpha, beta, sink, min_span, config)
    part_o, part_lse = partials(bsz, num_kv_heads * pieces, group, head_dim, query.device)
    out = torch.empty(bsz, num_q_heads, 1, head_dim, device=query.device, dtype=query.dtype)
    q = query[:, :, 0]
    q = q if q.stride(-1) == 1 else q.contiguous()
    _moa_decode_balanced[(programs,)](
        q, cache_keys, cache_values, slot_pos, meta, q_pos, part_o, part_lse, counters, out,
        q.stride(0), q.stride(1), cache_keys.stride(0), cache_keys.stride(1),
        cache_values.stride(0), cache_values.stride(1), slot_pos.stride(0), q_pos.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), num_kv_heads, bsz, programs, pieces, scale * 1.4426950408889634,
        **constexprs, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out

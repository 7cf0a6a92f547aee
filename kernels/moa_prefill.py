"""Triton prefill kernel for MoA attention: causal flash attention over the sink and the band only.

Each program owns one block of query positions of ``PACK`` query heads of one GQA group (their rows stacked in
one tile: the group's K/V tiles are read once for all of them). It visits (1) the old cache of its kv head
(chunked prefill / multi-turn only), in position order: the sink positions, then the ring's positions from the
lowest window edge of its queries on, gathered by slot; (2) the chunk's key blocks that hold sink positions;
(3) the chunk's band from the lowest window edge of its queries to the diagonal.
Visibility inside every visited tile is the contract's, element by element, with the window edge
``lo = i - W(i + 1) + 1`` computed in the kernel by ``moa_window.window_edge`` (the contract's arithmetic,
tested equal to ``window_at``) from the float64 alpha/beta of the head, so a launch needs no torch ops
before it and the result equals ``moa_attention_ref``. Tiles strictly inside the band skip the mask; tiles on the
diagonal test causality only (by index); the others test the whole contract, in int32 (positions below 2**31). GQA:
query head h reads kv head ``h // group`` directly; K/V are never repeated. Inputs bf16/fp16/fp32, fp32 accumulation.
"""

from __future__ import annotations

import torch

from .moa_reference import moa_attention_ref
from .moa_spans import window_at
from .moa_tensor_cache import TensorMemo
from .moa_window import BIG, INTERPRETED, dot_precision, launch_fitting, window_lo  # noqa: F401 (window_lo: the torch reference, re-exported)

try:
    import triton
    import triton.language as tl

    from .moa_window import window_edge

    HAS_TRITON = True
    _BIG_C = tl.constexpr(BIG)
    _INT32_MAX = tl.constexpr(2**31 - 1)
    _NO_MASK = tl.constexpr(0)  # which visibility tests a tile of keys needs (_attend_tile)
    _CAUSAL = tl.constexpr(1)
    _FULL = tl.constexpr(2)
except ImportError:  # CPU-only installs fall back to the torch reference
    triton = None
    tl = None
    HAS_TRITON = False


def use_triton(tensor: torch.Tensor) -> bool:
    """The Triton path runs on CUDA tensors, or on CPU tensors when imported under TRITON_INTERPRET=1.

    float64 on the GPU runs the torch reference (exact in float64): the kernels accumulate in float32.
    """
    return HAS_TRITON and (INTERPRETED or (tensor.is_cuda and tensor.dtype != torch.float64))


if HAS_TRITON:

    @triton.jit
    def _attend_tile(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, k_pos, load_mask, qp, lo,
        sm_scale_log2, SINK: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # k, v: [BLOCK_N, D]; k_pos: [BLOCK_N] int32, negative where no key; qp, lo: [BLOCK_M] int32; m_i in scaled
        # (log2) units. MASK (_NO_MASK, _CAUSAL, _FULL) says which tests the tile needs: unmasked tiles are whole and
        # valid (no load mask, no test); causal ones need only kp <= qp; full ones the whole contract
        if MASK != _NO_MASK:
            k = tl.load(k_ptrs, mask=load_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=load_mask[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
        if MASK == _CAUSAL:
            qk = tl.where(k_pos[None, :] <= qp[:, None], qk, float("-inf"))
        if MASK == _FULL:
            # per key first: no key is a huge position (after every query); then two int32 tests per element
            kp = tl.where(k_pos >= 0, k_pos, _INT32_MAX)
            sink = (kp < SINK)[None, :]
            kp = kp[None, :]
            qk = tl.where((kp <= qp[:, None]) & (sink | (kp >= lo[:, None])), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(tl.fma(qk, sm_scale_log2, -m_safe[:, None]))  # the scale folded into one multiply-add
        corr = tl.math.exp2(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _attend_range(
        acc, m_i, l_i, q, k_base, v_base, q_row, first, stop, qp, lo, stride_kn, stride_vn,
        sm_scale_log2, SINK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # keys [first, stop) of the chunk. _FULL tiles load their positions (the chunk's q_pos, row q_row); a _CAUSAL
        # range compares key and query indices instead (qp holds the queries' indices). Unmasked ranges start and stop
        # at multiples of BLOCK_N inside the chunk (the inner range): every tile is whole
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        stop32 = stop.to(tl.int32)
        for start in range(first, stop, BLOCK_N):
            idx = start + offs_n  # int64 (the bounds are): 64-bit offsets
            idx32 = idx.to(tl.int32)  # the tests in int32
            ok = idx32 < stop32
            kp = idx32
            if MASK == _FULL:
                kp = tl.load(q_row + idx, mask=ok, other=-1).to(tl.int32)
            k_ptrs = k_base + idx[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + idx[:, None] * stride_vn + offs_d[None, :]
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_ptrs, v_ptrs, kp, ok, qp, lo, sm_scale_log2, SINK, MASK, DOT_PRECISION
            )
        return acc, m_i, l_i

    @triton.jit
    def _attend_cache(
        acc, m_i, l_i, q, ck_base, cv_base, off, ring, first, stop, qp, lo, stride_ckn, stride_cvn,
        sm_scale_log2, SINK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # cache positions [first, stop) of one row and kv head, tiles in position order: position p sits at slot
        # off + p (p < SINK) or off + SINK + (p - SINK) % ring (docs/internals.md), so a tile's keys are gathered by
        # row (each a contiguous head_dim run) and their positions are known without a load. Unmasked ranges hold
        # whole tiles only
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        # a range of ring positions spans at most one turn of the ring: (p - SINK) % ring is p - base, less one ring
        # past the turn (a compare, not a division per key)
        base = SINK + (tl.maximum(first - SINK, 0) // ring) * ring
        for start in range(first, stop, BLOCK_N):
            pos = start + offs_n  # int32
            ok = pos < stop
            rel = pos - base
            slot = off + tl.where(pos < SINK, pos, SINK + tl.where(rel >= ring, rel - ring, rel))
            slot64 = slot.to(tl.int64)
            k_ptrs = ck_base + slot64[:, None] * stride_ckn + offs_d[None, :]
            v_ptrs = cv_base + slot64[:, None] * stride_cvn + offs_d[None, :]
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_ptrs, v_ptrs, tl.where(ok, pos, -1), ok, qp, lo, sm_scale_log2, SINK, MASK,
                DOT_PRECISION,
            )  # fmt: skip
        return acc, m_i, l_i

    # The position ids' row stride follows the prompt's length (rows > 1): not specialized on, or Triton would compile
    # again whenever it became or stopped being a multiple of 16 (benchmarks/compile_variants.py); knowing it made no
    # difference in time. The length itself stays specialized: at lengths that are multiples of 16 the kernel runs
    # 4-6% faster at 4k, 2-4% at 16k and 1-2% at 32k (benchmarks/specialize_ab.py, run S4; 15-20% at 4k before the
    # masked tiles tested in int32), for one more compile per config.
    @triton.jit(do_not_specialize=["stride_pb"])
    def _moa_prefill_fwd(
        Q, K, V, Out, QPos, Alpha, Beta,
        CacheK, CacheV, CacheLen, HeadOff, HeadCap,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_pb, stride_ckb, stride_ckn, stride_cvb, stride_cvn,
        seq_len, num_q_heads, sm_scale_log2,
        GROUP: tl.constexpr, SINK: tl.constexpr, MIN_SPAN: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr, HAS_CACHE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # a tile row r is query head h0 + r // BLOCK_P at position index pid_m * BLOCK_P + r % BLOCK_P
        BLOCK_P: tl.constexpr = BLOCK_M // PACK
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
        pid_bh = tl.program_id(1)
        packs = num_q_heads // PACK
        b = (pid_bh // packs).to(tl.int64)  # int64: offsets of large batches pass 2**31
        h0 = (pid_bh % packs).to(tl.int64) * PACK
        g = h0 // GROUP
        rows = tl.arange(0, BLOCK_M)
        h = h0 + rows // BLOCK_P  # [BLOCK_M]
        offs_m = pid_m * BLOCK_P + rows % BLOCK_P
        offs_d = tl.arange(0, HEAD_DIM)
        in_seq = offs_m < seq_len

        # query positions and window edges of this block (the contract, in float64); padding rows have qp < 0
        q_row = QPos + b * stride_pb
        qp = tl.load(q_row + offs_m, mask=in_seq, other=-1).to(tl.int64)
        alpha = tl.load(Alpha + g).to(tl.float64)
        beta = tl.load(Beta + g).to(tl.float64)
        lo = window_edge(qp, alpha, beta, SINK, MIN_SPAN)  # [BLOCK_M], huge for padding
        q_ok = qp >= 0
        # the tiles test visibility in int32 (positions below 2**31): a 64-bit compare is two or three instructions
        # per element, and the masked tiles are bound by instruction issue, not by the tensor cores
        qp32 = qp.to(tl.int32)
        lo32 = tl.minimum(lo, _INT32_MAX).to(tl.int32)
        q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=in_seq[:, None])

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        lo_min = tl.min(tl.where(q_ok, lo, _BIG_C))  # the block's lowest and highest window edges (valid rows)
        lo_max = tl.max(tl.where(q_ok, lo, -1))
        if HAS_CACHE:
            # the old cache of kv head g holds positions [0, P) of row b (the row's positions are consecutive: left
            # padding only): the sink positions at their own slots, and the last ``ring`` positions in the ring. A
            # query block visits the sink, then the ring positions from its lowest window edge on: masked up to its
            # highest edge, unmasked after (each key is older than every valid query: causal), masked in the last
            # partial tile
            off = tl.load(HeadOff + g).to(tl.int32)
            ring = tl.load(HeadCap + g).to(tl.int32) - SINK
            cached = tl.load(CacheLen + b).to(tl.int32)
            any_q = tl.max(q_ok.to(tl.int32)) > 0
            cached = tl.where(any_q, cached, 0)  # a block of padding rows reads nothing
            lo_lo = tl.minimum(lo_min, _INT32_MAX).to(tl.int32)
            lo_hi = lo_max.to(tl.int32)
            ck_base = CacheK + b * stride_ckb
            cv_base = CacheV + b * stride_cvb
            ring_lo = tl.minimum(tl.maximum(tl.maximum(cached - ring, SINK), lo_lo), cached)
            ring_mid = tl.minimum(tl.maximum(lo_hi, ring_lo), cached)
            ring_whole = ring_mid + ((cached - ring_mid) // BLOCK_N) * BLOCK_N
            acc, m_i, l_i = _attend_cache(
                acc, m_i, l_i, q, ck_base, cv_base, off, ring, 0, tl.minimum(cached, SINK), qp32, lo32,
                stride_ckn, stride_cvn, sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _FULL, DOT_PRECISION,
            )  # fmt: skip
            acc, m_i, l_i = _attend_cache(
                acc, m_i, l_i, q, ck_base, cv_base, off, ring, ring_lo, ring_mid, qp32, lo32,
                stride_ckn, stride_cvn, sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _FULL, DOT_PRECISION,
            )  # fmt: skip
            acc, m_i, l_i = _attend_cache(
                acc, m_i, l_i, q, ck_base, cv_base, off, ring, ring_mid, ring_whole, qp32, lo32,
                stride_ckn, stride_cvn, sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _NO_MASK, DOT_PRECISION,
            )  # fmt: skip
            acc, m_i, l_i = _attend_cache(
                acc, m_i, l_i, q, ck_base, cv_base, off, ring, ring_whole, cached, qp32, lo32,
                stride_ckn, stride_cvn, sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _FULL, DOT_PRECISION,
            )  # fmt: skip

        # positions of valid tokens are consecutive and end the row: index t holds position t + shift
        last_pos = tl.load(q_row + seq_len - 1).to(tl.int64)
        shift = last_pos - (seq_len - 1)
        row_end = tl.minimum(pid_m * BLOCK_P + BLOCK_P, seq_len)
        band_lo = tl.minimum(tl.maximum(lo_min - shift, 0), row_end)
        band_lo = (band_lo // BLOCK_N) * BLOCK_N
        band_hi = tl.where(last_pos >= 0, row_end, 0)
        sink_end = tl.minimum(tl.maximum(SINK - shift, 0), band_lo)
        # the chunk's sink positions start at its first position (0, or the cache's length): the keys before them
        # are padding, which a masked range would still load, for every query block (a 10% left padding made the
        # kernel 21-25% slower at 16k-32k before this)
        first_pos = 0
        if HAS_CACHE:
            first_pos = cached
        sink_lo = tl.minimum(tl.maximum(first_pos - shift, 0), sink_end)
        full_lo = lo_max - shift  # tiles at or after this index (and before the block) need no mask
        k_base = K + b * stride_kb + g * stride_kh
        v_base = V + b * stride_vb + g * stride_vh

        # three key ranges of the band, tiles aligned to BLOCK_N: [band_lo, inner_lo) left edge (masked),
        # [inner_lo, inner_hi) every key valid, in every query's window and before the block (no mask),
        # [inner_hi, band_hi) the diagonal (masked)
        inner_lo = tl.minimum(tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, band_lo), band_hi)
        # padding precedes the valid tokens: if key inner_lo is valid, all later keys are; else mask everything
        inner_ok = tl.load(q_row + inner_lo, mask=inner_lo < seq_len, other=-1) >= 0
        inner_lo = tl.where(inner_ok, inner_lo, band_hi)
        inner_hi = tl.minimum(tl.maximum(((pid_m * BLOCK_P) // BLOCK_N) * BLOCK_N, inner_lo), band_hi)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, q_row, sink_lo, sink_end, qp32, lo32, stride_kn, stride_vn, sm_scale_log2,
            SINK, HEAD_DIM, BLOCK_N, _FULL, DOT_PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, q_row, band_lo, inner_lo, qp32, lo32, stride_kn, stride_vn,
            sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _FULL, DOT_PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, q_row, inner_lo, inner_hi, qp32, lo32, stride_kn, stride_vn,
            sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _NO_MASK, DOT_PRECISION,
        )  # fmt: skip
        # the diagonal: every key valid and at or after every query's window edge (it starts at or after inner_lo),
        # so only causality is left, by index: key idx <= query row (valid rows: both positions are index + shift;
        # padding rows precede every valid key)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, q_row, inner_hi, band_hi, offs_m.to(tl.int32), lo32, stride_kn,
            stride_vn, sm_scale_log2, SINK, HEAD_DIM, BLOCK_N, _CAUSAL, DOT_PRECISION,
        )  # fmt: skip

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = tl.where(q_ok[:, None], acc / l_safe[:, None], 0.0)
        o_ptrs = Out + b * stride_ob + h[:, None] * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_seq[:, None])


def _prefill_config(head_dim: int, seq_len: int, interpret: bool) -> dict:
    """Launch config by length (the chunk's, plus the tokens before it for a chunk over a cache): tiny tiles under the
    interpreter, else the first PREFILL_CONFIGS bucket that fits."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "PACK": 2}
    if head_dim <= 64:  # Llama-3.2-1B shapes, H200 2026-11-25 04:2x UTC: pack 4 is 17-26% faster than 1 (RESULTS.md)
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "PACK": 4}
    for max_len, config in PREFILL_CONFIGS:
        if seq_len <= max_len:
            return config
    return PREFILL_CONFIGS[-1][1]


# (longest chunk, launch config), d=128 bf16, by length bucket. benchmarks/bench_attention.py's sweep times the
# candidates per bucket on the GPU (both densities) and prints this table filled with the winners (H200 sweeps of
# 2026-11-25 02:4x and 22:1x UTC, 23 candidates, `--prefill-only --skip-flex`; the second changed only the last
# bucket: 6% faster at 64k, 231,424 bytes of shared memory). PACK: query heads of a group per program.
PREFILL_CONFIGS = [
    (2048, {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "PACK": 4}),
    (8192, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "PACK": 4}),
    (32768, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "PACK": 4}),
    (2**62, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PACK": 4}),
]


def query_heads_per_program(requested: int, group: int, block_m: int) -> int:
    """The largest power of two <= ``requested`` that divides the GQA group and the tile rows (1 for MHA)."""
    pack = 1
    while pack * 2 <= requested and group % (pack * 2) == 0 and block_m % (pack * 2) == 0:
        pack *= 2
    return pack


def _rule_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """alpha/beta as the kernel reads them (any float dtype, widened to float64 inside); no op when on device."""
    return t if t.device == device else t.to(device)


def _launch_prefill(query, key, value, q_pos, alpha, beta, cache, scale: float, sink: int, min_span: int,
                    config: dict | None = None, key_len: int | None = None):  # fmt: skip
    # query: [B, Hq, L, D]; key/value: [B, Hkv, L, D]; q_pos: [B, L]; alpha/beta: [Hkv]
    bsz, num_q_heads, seq_len, head_dim = query.shape
    group = num_q_heads // key.shape[1]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    q_pos = q_pos if q_pos.stride(-1) == 1 else q_pos.contiguous()
    alpha, beta = _rule_on(alpha, query.device), _rule_on(beta, query.device)
    if config is None:  # the table's config, or a smaller one where this GPU cannot load it
        return launch_fitting(
            lambda c: _launch_prefill(query, key, value, q_pos, alpha, beta, cache, scale, sink, min_span, c),
            _prefill_config(head_dim, seq_len if key_len is None else key_len, INTERPRETED),
            (head_dim, group, query.dtype, cache is not None, query.device), "MoA prefill",
        )  # fmt: skip
    out = torch.empty_like(query)
    pack = query_heads_per_program(config.get("PACK", 1), group, config["BLOCK_M"])
    cfg = {**config, "PACK": pack}
    if cache is None:
        cache_k, cache_v, cache_len, head_off, head_cap = key, value, q_pos, q_pos, q_pos  # unused placeholders
        ck_strides = (0, 0, 0, 0)
    else:
        cache_k, cache_v, cache_len, head_off, head_cap = cache
        ck_strides = (cache_k.stride(0), cache_k.stride(1), cache_v.stride(0), cache_v.stride(1))
    precision = dot_precision(query.dtype)
    grid = (triton.cdiv(seq_len, cfg["BLOCK_M"] // pack), bsz * num_q_heads // pack)
    _moa_prefill_fwd[grid](
        query, key, value, out, q_pos, alpha, beta,
        cache_k, cache_v, cache_len, head_off, head_cap,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), *ck_strides,
        seq_len, num_q_heads, scale * 1.4426950408889634,
        GROUP=group, SINK=sink, MIN_SPAN=min_span, HEAD_DIM=head_dim, HAS_CACHE=cache is not None,
        DOT_PRECISION=precision, **cfg,
    )  # fmt: skip
    return out


def _check_shapes(query: torch.Tensor, key: torch.Tensor, q_pos: torch.Tensor) -> None:
    bsz, num_q_heads, seq_len, head_dim = query.shape
    if num_q_heads % key.shape[1] != 0:
        raise ValueError(f"query heads {num_q_heads} not a multiple of kv heads {key.shape[1]}: check the model config")
    if q_pos.shape != (bsz, seq_len):
        raise ValueError(f"q_pos shape {tuple(q_pos.shape)} != (batch, length) {(bsz, seq_len)}: pass one id per token")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {head_dim} unsupported by the Triton kernel: use MOA_BACKEND=torch")


_DENSE_LEN = TensorMemo()


def dense_length(alpha: torch.Tensor, beta: torch.Tensor, sink: int, min_span: int) -> int:
    """Largest n (up to 2**20) at which every head is still dense (S(n) == n), cached per plan tensor.

    The first call for a plan copies alpha/beta to the host (one sync); later calls cost nothing.
    """

    def compute() -> int:
        a, b = alpha.detach().double().cpu().reshape(-1, 1), beta.detach().double().cpu().reshape(-1, 1)
        steps = torch.arange(1, 2**20 + 1, dtype=torch.int64)
        dense = (window_at(steps, a, b, sink, min_span) + sink == steps).all(dim=0)  # S(n) == n for every head
        return int(dense.to(torch.int64).cumprod(0).sum())  # dense for all n <= this (S(n) <= n)

    return _DENSE_LEN.get((alpha, beta), (sink, min_span), compute)


def _all_dense(q_pos, alpha, beta, sink: int, min_span: int) -> bool:
    """Every head dense over the chunk and rows start at 0 unpadded; syncs only for chunks short enough."""
    if q_pos.shape[-1] > dense_length(alpha, beta, sink, min_span):
        return False
    return bool((q_pos[:, 0] == 0).all())


def moa_prefill(query, key, value, q_pos, alpha, beta, sink: int, min_span: int, scale: float | None = None):
    """MoA self-attention of a fresh chunk (keys = the chunk's own tokens).

    query: [B, Hq, L, D]; key/value: [B, Hkv, L, D]; q_pos: [B, L] int64 (negative = left padding).
    alpha/beta: [Hkv]. Returns [B, Hq, L, D]; padding rows are zeros. Equals
    ``moa_attention_ref(query, key, value, q_pos, q_pos, alpha, beta, sink, min_span)``.
    """
    _check_shapes(query, key, q_pos)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(query):
        return moa_attention_ref(query, key, value, q_pos, q_pos, alpha, beta, sink, min_span, scale)
    if query.is_cuda and _all_dense(q_pos, alpha, beta, sink, min_span):  # short inputs: dense flash is faster
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
        )
    return _launch_prefill(query, key, value, q_pos, alpha, beta, None, scale, sink, min_span)


def moa_prefill_with_cache(
    query, key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity,
    alpha, beta, sink: int, min_span: int, scale: float | None = None, cache_len: torch.Tensor | None = None,
    cache_tokens: int | None = None,
):  # fmt: skip
    """MoA attention of a chunk over (old cache contents of its kv head) + (its own keys).

    cache_keys/values: [B, C + 1, D]; slot_pos: [B, C + 1] int32 (-1 = empty); head g owns slots
    ``[head_offset[g], head_offset[g] + head_capacity[g])``. Other arguments as in ``moa_prefill``.

    The kernel takes the cache as ``MoaCacheLayer`` writes it for rows whose positions are consecutive (left padding
    only): row b holds positions ``[0, cache_len[b])``, position p < sink at slot ``head_offset + p`` and the last
    ``head_capacity - sink`` positions in the ring at ``head_offset + sink + (p - sink) % (head_capacity - sink)``.
    So it reads no slot positions: it visits each query block's window by arithmetic. cache_len: [B] (the layer's
    ``next_pos``); None takes ``slot_pos.amax(-1) + 1``. cache_tokens: the tokens before the chunk, as a host int (the
    layer's ``seq_len``), for the launch config (a chunk over a long cache runs the long prompts' config); None takes
    the cache's slots per kv head.
    """
    _check_shapes(query, key, q_pos)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(query):
        return moa_prefill_with_cache_ref(
            query, key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity,
            alpha, beta, sink, min_span, scale,
        )  # fmt: skip
    if cache_len is None:
        cache_len = slot_pos.amax(dim=-1).to(torch.int64) + 1
    cache = (  # each a no-op for the cache's own tensors (contiguous, on the device)
        cache_keys if cache_keys.stride(-1) == 1 else cache_keys.contiguous(),
        cache_values if cache_values.stride(-1) == 1 else cache_values.contiguous(),
        cache_len if cache_len.stride(-1) == 1 else cache_len.contiguous(),
        _rule_on(head_offset, query.device),
        _rule_on(head_capacity, query.device),
    )
    before = cache_tokens if cache_tokens is not None else cache_keys.shape[1] // key.shape[1]
    key_len = query.shape[2] + before
    return _launch_prefill(query, key, value, q_pos, alpha, beta, cache, scale, sink, min_span, key_len=key_len)


def gather_head_slots(cache_keys, cache_values, slot_pos, head_offset, head_capacity):
    """Cache slots per kv head as dense tensors: keys/values [B, Hkv, Cmax, D], positions [B, Hkv, Cmax]."""
    offsets = [int(o) for o in head_offset.tolist()]
    caps = [int(c) for c in head_capacity.tolist()]
    width = max(caps)
    bsz, _, head_dim = cache_keys.shape
    keys = cache_keys.new_zeros(bsz, len(caps), width, head_dim)
    values = cache_values.new_zeros(bsz, len(caps), width, head_dim)
    pos = torch.full((bsz, len(caps), width), -1, dtype=torch.int64, device=cache_keys.device)
    for g, (off, cap) in enumerate(zip(offsets, caps, strict=True)):
        keys[:, g, :cap] = cache_keys[:, off : off + cap]
        values[:, g, :cap] = cache_values[:, off : off + cap]
        pos[:, g, :cap] = slot_pos[:, off : off + cap]
    return keys, values, pos


def moa_prefill_with_cache_ref(
    query, key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity,
    alpha, beta, sink: int, min_span: int, scale: float | None = None,
):  # fmt: skip
    """Pure-torch ``moa_prefill_with_cache``: the reference on (cache slots of each head) + (the chunk)."""
    keys, values, pos = gather_head_slots(cache_keys, cache_values, slot_pos, head_offset, head_capacity)
    k_all = torch.cat([keys, key], dim=2)  # [B, Hkv, Cmax + L, D]
    v_all = torch.cat([values, value], dim=2)
    chunk_pos = q_pos.to(torch.int64)[:, None].expand(-1, key.shape[1], -1)
    return moa_attention_ref(
        query, k_all, v_all, q_pos, torch.cat([pos, chunk_pos], dim=-1), alpha, beta, sink, min_span, scale
    )

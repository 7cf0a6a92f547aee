"""Fused Triton kernels for the small ops around MoA attention in a decoder layer (CUDA / Triton backend).

A decode step of an 8B model at a large batch spends ~10% of its time in kernels other than the
attention and the weight GEMMs: RMSNorm is 7 torch kernels, RoPE about 10, the residual adds, SiLU x up
and the cache write another 15 (benchmarks/profile_step.py; RESULTS.md). Each function here is one
launch and computes the same thing as the transformers ops it replaces, rounding to the model's dtype
where those ops do (so results match torch up to the order of the RMSNorm sum):

- ``rms_norm(x, weight, eps, residual=None)``: ``weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)``
  (Llama / Mistral / Qwen2 RMSNorm) of ``h = residual + x`` when a residual is given, returning (h, normed);
- ``rope(q, k, cos, sin)``: ``x * cos + rotate_half(x) * sin`` for the query and key heads at once;
- ``silu_mul(gate, up)``: ``silu(gate) * up`` (the Llama MLP's activation; gate and up may be row-strided views);
- ``append_token(...)``: the cache write of one decode token per row (``MoaCacheLayer.write_token``);
- ``write_chunk(...)``: the cache write of a prefill chunk (``MoaCacheLayer.write``), only the tokens kept.
"""

from __future__ import annotations

import torch

from .moa_window import INTERPRETED

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice  # mul_rn (used only when compiled)

    HAS_TRITON = True
except ImportError:  # CPU-only installs use the transformers ops
    triton = None
    tl = None
    libdevice = None
    HAS_TRITON = False


if HAS_TRITON:
    # torch multiplies and adds in separate kernels; compiled, ``a * b + c`` would become one fused multiply-add
    # (one rounding), so products that torch rounds on their own use mul_rn (the interpreter never fuses)
    _ROUND_EACH = tl.constexpr(not INTERPRETED)

    @triton.jit
    def _mul(a, b):
        if _ROUND_EACH:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def _silu(x):
        # torch's CUDA silu: x / (1 + expf(-x)) with an IEEE division; Triton's own exp and "/" are approximate
        if _ROUND_EACH:
            return libdevice.div_rn(x, 1.0 + libdevice.exp(-x))
        else:
            return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:  # h = residual + x, rounded to the input dtype like the torch add
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(ResOut.dtype.element_ty)
            tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / n_cols
        y = (xf * tl.math.rsqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)  # .to(input_dtype)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_o + cols, _mul(w, y).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(X, Out, b, t, sxb, sxh, sxt, sob, soh, sot, cos, sin, d, rot, sign, n_heads,
                    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
        # x [BLOCK_H, D] of token (b, t): x * cos + rotate_half(x) * sin, each product rounded like torch
        h = tl.arange(0, BLOCK_H)
        ok = (h < n_heads)[:, None] & (d < HEAD_DIM)[None, :]
        base = X + b * sxb + t * sxt + h[:, None] * sxh
        x = tl.load(base + d[None, :], mask=ok, other=0.0)
        xr = tl.load(base + rot[None, :], mask=ok, other=0.0).to(tl.float32) * sign[None, :]
        dt = Out.dtype.element_ty
        a = _mul(x.to(tl.float32), cos[None, :]).to(dt).to(tl.float32)
        c = _mul(xr, sin[None, :]).to(dt).to(tl.float32)
        tl.store(Out + b * sob + t * sot + h[:, None] * soh + d[None, :], (a + c).to(dt), mask=ok)

    @triton.jit(do_not_specialize=["seq_len"])  # the chunk's length: no compile per length modulo 16
    def _rope_kernel(
        Q, K, Cos, Sin, QO, KO, seq_len, n_q, n_k,
        sqb, sqh, sqt, skb, skh, skt, scb, sct, ssb, sst, sqob, sqoh, sqot, skob, skoh, skot,
        HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq_len
        t = tok % seq_len
        half: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, HEAD_DIM)
        rot = tl.where(d < half, d + half, d - half)  # rotate_half = cat(-x2, x1)
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(Cos + b * scb + t * sct + d).to(tl.float32)
        sin = tl.load(Sin + b * ssb + t * sst + d).to(tl.float32)
        _rope_heads(Q, QO, b, t, sqb, sqh, sqt, sqob, sqoh, sqot, cos, sin, d, rot, sign, n_q, BLOCK_HQ, HEAD_DIM)
        _rope_heads(K, KO, b, t, skb, skh, skt, skob, skoh, skot, cos, sin, d, rot, sign, n_k, BLOCK_HK, HEAD_DIM)

    @triton.jit
    def _silu_mul_kernel(G, U, Out, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
        # one program per (row, block of columns): gate and up may be the two halves of one joined projection
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        act = _silu(g).to(Out.dtype.element_ty).to(tl.float32)  # silu rounded to the dtype, then * up
        tl.store(Out + row * stride_o + cols, _mul(act, u).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _slot_of(pos, off, ring, SINK: tl.constexpr):
        # the slot of position pos >= 0 in a head at slot off with a ring of ``ring`` slots (docs/internals.md)
        return tl.where(pos < SINK, off + pos, off + SINK + tl.maximum(pos - SINK, 0) % ring)

    @triton.jit(do_not_specialize=["trash"])  # the last slot: its value follows the cache's size
    def _append_token_kernel(
        Key, Value, QPos, CacheK, CacheV, SlotPos, HeadOff, HeadCap, NextPos,
        skb, skh, svb, svh, sqp, sckb, sckn, scvb, scvn, ssb, trash,
        SINK: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        # one program per (row, kv head): the token at position pos goes to its slot (docs/internals.md)
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        pos = tl.load(QPos + b * sqp).to(tl.int64)
        off = tl.load(HeadOff + g).to(tl.int64)
        ring = tl.load(HeadCap + g).to(tl.int64) - SINK
        slot = tl.where(pos < 0, trash, _slot_of(pos, off, ring, SINK))
        d = tl.arange(0, HEAD_DIM)
        k = tl.load(Key + b * skb + g * skh + d)
        v = tl.load(Value + b * svb + g * svh + d)
        tl.store(CacheK + b * sckb + slot * sckn + d, k.to(CacheK.dtype.element_ty))
        tl.store(CacheV + b * scvb + slot * scvn + d, v.to(CacheV.dtype.element_ty))
        tl.store(SlotPos + b * ssb + slot, tl.where(pos < 0, -1, pos).to(tl.int32))
        if g == 0:
            tl.store(NextPos + b, tl.load(NextPos + b) + (pos >= 0).to(tl.int64))

    @triton.jit(do_not_specialize=["length", "skb", "svb", "sqb"])  # these follow the chunk's length
    def _write_chunk_kernel(
        Key, Value, QPos, Last, CacheK, CacheV, SlotPos, HeadOff, HeadCap,
        length, skb, skh, skl, svb, svh, svl, sqb, sql, sckb, sckn, scvb, scvn, ssb,
        SINK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        # one program per (block of the chunk's tokens, row, kv head); only the tokens the head keeps are read and
        # written (evicted ones and padding touch nothing), each to its own slot (docs/internals.md)
        t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        b = tl.program_id(1).to(tl.int64)
        g = tl.program_id(2).to(tl.int64)
        tt = t.to(tl.int64)
        pos = tl.load(QPos + b * sqb + tt * sql, mask=t < length, other=-1).to(tl.int64)
        last = tl.load(Last + b).to(tl.int64)
        off = tl.load(HeadOff + g).to(tl.int64)
        ring = tl.load(HeadCap + g).to(tl.int64) - SINK
        keep = (pos >= 0) & ((pos < SINK) | (pos > last - ring))
        slot = _slot_of(pos, off, ring, SINK)
        d = tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(Key + b * skb + g * skh + tt[:, None] * skl + d[None, :], mask=mask)
        v = tl.load(Value + b * svb + g * svh + tt[:, None] * svl + d[None, :], mask=mask)
        tl.store(CacheK + b * sckb + slot[:, None] * sckn + d[None, :], k.to(CacheK.dtype.element_ty), mask=mask)
        tl.store(CacheV + b * scvb + slot[:, None] * scvn + d[None, :], v.to(CacheV.dtype.element_ty), mask=mask)
        tl.store(SlotPos + b * ssb + slot, pos.to(tl.int32), mask=keep)


def available(tensor: torch.Tensor) -> bool:
    """The fused kernels run on CUDA tensors of 16/32-bit floats (or anywhere under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (INTERPRETED or (tensor.is_cuda and tensor.dtype != torch.float64))


def _warps(elements: int) -> int:
    """Warps for a program handling ``elements`` values: a power of two in [1, 16] (~512 values per warp)."""
    if INTERPRETED:
        return 1
    per_512 = max(1, elements // 512)
    return min(16, 1 << (per_512.bit_length() - 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of the last dim; with ``residual``: returns (residual + x, RMSNorm(residual + x)).

    Output dtype = promote(weight, x) as in ``weight * normed.to(x.dtype)``.
    """
    shape, cols = x.shape, x.shape[-1]
    x2 = x.reshape(-1, cols)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(cols)
    if residual is not None:
        r2 = residual.reshape(-1, cols)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        r2, res_out = x2, out
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), cols, eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    if residual is None:
        return out.view(shape)
    return res_out.view(shape), out.view(shape)


def rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``apply_rotary_pos_emb`` of Llama / Mistral / Qwen2: query [B, Hq, L, D], key [B, Hkv, L, D] (any strides
    with a contiguous last dim), cos/sin [B, L, D]. Outputs keep the inputs' memory layout."""
    bsz, n_q, length, dim = query.shape
    n_k = key.shape[1]
    q_out = torch.empty_like(query)  # same strides as the input (a transposed projection: [B, L, H, D] memory)
    k_out = torch.empty_like(key)
    cos = cos.expand(bsz, length, dim)
    sin = sin.expand(bsz, length, dim)
    strides = [*query.stride()[:3], *key.stride()[:3], *cos.stride()[:2], *sin.stride()[:2]]
    strides += [*q_out.stride()[:3], *k_out.stride()[:3]]
    _rope_kernel[(bsz * length,)](
        query, key, cos, sin, q_out, k_out, length, n_q, n_k, *strides, HEAD_DIM=dim,
        BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=triton.next_power_of_2(n_k), num_warps=_warps(n_q * dim),
    )  # fmt: skip
    return q_out, k_out


def rope_supported(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor) -> bool:
    dim = query.shape[-1]
    return (
        available(query) and dim % 2 == 0 and dim == triton.next_power_of_2(dim) and cos.shape[-1] == dim
        and cos.dim() == 3 and query.stride(-1) == 1 and key.stride(-1) == 1 and cos.stride(-1) == 1
    )  # fmt: skip


def silu_mul(gate: torch.Tensor, up: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` (each rounded to the dtype, as the two torch ops do).

    gate/up: [..., I] with a contiguous last dim, any row stride (e.g. the halves of a joined gate/up GEMM). The
    output is a new contiguous tensor, or with ``in_place`` written over ``gate`` and returned (same strides): each
    element is read before it is written, by the same program, so no extra [..., I] buffer is needed.
    """
    shape, cols = gate.shape, gate.shape[-1]
    g2, u2 = gate.reshape(-1, cols), up.reshape(-1, cols)  # views unless the leading dims do not merge
    if in_place and (g2.stride(-1) != 1 or g2.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()):
        in_place = False  # reshape copied (or a copy follows): writing it would not reach gate
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    out = g2 if in_place else torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(2048, triton.next_power_of_2(cols))  # the interpreter too: one program per row there
    if out.numel():
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(cols, block))](
            g2, u2, out, cols, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return gate if in_place else out.view(shape)


def append_token(key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity, next_pos,
                 sink: int, trash_slot: int) -> None:  # fmt: skip
    """Write one token per row into its kv heads' slots; q_pos [B] (-1: padding, written to the trash slot).

    key/value: [B, Hkv, 1, D]; the cache tensors as ``MoaCacheLayer`` holds them. One launch, no host sync;
    ``next_pos`` grows by one for each row whose token is not padding.
    """
    bsz, num_heads, _, dim = key.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    _append_token_kernel[(bsz, num_heads)](
        key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity, next_pos,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), q_pos.stride(0),
        cache_keys.stride(0), cache_keys.stride(1), cache_values.stride(0), cache_values.stride(1),
        slot_pos.stride(0), trash_slot, SINK=sink, HEAD_DIM=dim, num_warps=1,
    )  # fmt: skip


def write_chunk(key, value, q_pos, cache_keys, cache_values, slot_pos, head_offset, head_capacity, sink: int) -> None:
    """Write a chunk of tokens into their kv heads' slots (``MoaCacheLayer.write``, without its scatter).

    key/value: [B, Hkv, L, D] (any strides with a contiguous last dim); q_pos: [B, L] position ids, -1 for padding;
    the cache tensors as ``MoaCacheLayer`` holds them, already sized for the chunk. A head keeps its sink positions
    and the last ``capacity - sink`` positions of the row; only those tokens are read and written, and the other
    slots are left as they are. One launch, no host sync.
    """
    bsz, num_heads, length, dim = key.shape
    if length == 0 or bsz == 0:  # nothing to write (and no position to take the newest of)
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    last = q_pos.amax(dim=-1)  # [B] the newest position of each row
    block_d = triton.next_power_of_2(dim)
    block_l = 16 if INTERPRETED else max(16, 8192 // block_d)
    _write_chunk_kernel[(triton.cdiv(length, block_l), bsz, num_heads)](
        key, value, q_pos, last, cache_keys, cache_values, slot_pos, head_offset, head_capacity,
        length, key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        q_pos.stride(0), q_pos.stride(1), cache_keys.stride(0), cache_keys.stride(1), cache_values.stride(0),
        cache_values.stride(1), slot_pos.stride(0),
        SINK=sink, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=1 if INTERPRETED else 4,
    )  # fmt: skip

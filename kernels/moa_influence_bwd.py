"""The profile's attention backward, fused with the block-summed influence: deterministic by construction.

``attention_backward_with_influence`` returns dQ, dK, dV of causal attention (GQA: K/V per kv head, never
repeated) and the block-summed influence of ``moa_influence.influence_blocks_torch`` (same contract) from two
Triton kernels that use no atomics: every output element is written by one program, in a fixed order.

- ``_bwd_dq_influence``, one program per (query block, query head, batch): pass 1 is the row log-sum-exp
  (online softmax over the visible keys), stored with delta_i = dO_i . O_i; pass 2 walks the key blocks up to
  the diagonal: P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K * scale, and the influence
  E = dS / max(1 - P, EPS) summed over each (query block, key block) pair.
- ``_bwd_dkdv``, one program per (key block, kv head, batch): over the GROUP query heads of the kv head and
  the query blocks from the diagonal on, P from the stored lse; dV += P^T dO, dK += dS^T Q * scale.

Tiles strictly below the diagonal skip the causal mask. Work is in base 2 (exp2, lse in log2 units).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .moa_influence import INFLUENCE_EPS
from .moa_window import dot_precision, launch_fitting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: moa_influence keeps the SDPA + torch path
    triton = None


def _check_power_of_two(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 16 for the fused attention backward")


@dataclass(frozen=True)
class BackwardLaunch:
    """Launch settings (any valid choice gives the same gradients to rounding; tune per GPU).

    The dQ/influence kernel's tiles are the influence block (``block_size``) along queries and keys; the
    dK/dV kernel's tiles are free: ``key_block`` keys per program, ``query_block`` query rows per step
    (powers of two >= 16, query_block <= key_block)."""

    dq_warps: int = 4
    dq_stages: int = 2
    key_block: int = 64
    query_block: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 2

    def __post_init__(self) -> None:
        _check_power_of_two("BackwardLaunch.key_block", self.key_block)
        _check_power_of_two("BackwardLaunch.query_block", self.query_block)
        if self.query_block > self.key_block:
            raise ValueError(f"query_block={self.query_block} must be <= key_block={self.key_block}")


if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e)

    @triton.jit
    def _lse2_step(m_i, l_i, q, k_base, offs_m, offs_n, offs_d, seq_len, qk_scale, HEAD_DIM: tl.constexpr,
                   DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
        k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=(offs_n < seq_len)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * qk_scale
        if DIAGONAL:  # keys past a row (and past the end: seq_len <= them for every real row) are hidden
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        return m_new, l_i

    @triton.jit
    def _dq_influence_step(dq, q, do, delta, lse2, k_base, v_base, infl_ptr, offs_m, offs_n, offs_d, seq_len,
                           qk_scale, HEAD_DIM: tl.constexpr, EPS: tl.constexpr, DIAGONAL: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):  # fmt: skip
        key_ok = (offs_n < seq_len)[:, None]
        k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=key_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=key_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * qk_scale
        p = tl.exp2(s - lse2[:, None])  # A_ij
        if DIAGONAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(tl.float32)  # dL/dA_ij = dO_i . V_j
        ds = p * (dp - delta[:, None])  # dL/dS_ij (rows past the end have dO = 0, delta = 0: ds = 0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        infl = ds / tl.maximum(1.0 - p, EPS)
        if DIAGONAL:  # query 0 has one key (A = 1, 0 / 0): it adds 0
            infl = tl.where((offs_m > 0)[:, None], infl, 0.0)
        tl.store(infl_ptr, tl.sum(tl.sum(infl, 1), 0))
        return dq

    @triton.jit
    def _bwd_dq_influence(
        Q, K, V, OUT, DO, DQ, LSE2, DELTA, INFL,
        stride_qb, stride_qh, stride_kb, stride_kh,
        seq_len, scale,
        GROUP: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, EPS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # [B, Hq, L, D] tensors (Q, OUT, DO, DQ) share strides, so do K/V; LSE2/DELTA: [B, Hq, L]; INFL: [B, Hq, nb, nb]
        num_blocks = tl.num_programs(0)
        block_m = num_blocks - 1 - tl.program_id(0)  # the longest rows (most key blocks) start first
        head = tl.program_id(1)
        bsz_idx = tl.program_id(2)
        offs_m = block_m * BLOCK + tl.arange(0, BLOCK)
        offs_n0 = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_len
        qk_scale = scale * _LOG2E

        # this program's rows: Q, dO and delta = dO . O
        row_off = bsz_idx * stride_qb + head * stride_qh + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
        o = tl.load(OUT + row_off, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        kv_off = bsz_idx * stride_kb + (head // GROUP) * stride_kh
        k_base, v_base = K + kv_off, V + kv_off
        infl_base = INFL + ((bsz_idx * tl.num_programs(1) + head) * num_blocks + block_m) * num_blocks

        # pass 1: row log-sum-exp (log2 units) over the key blocks before the diagonal, then the diagonal one
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        for block_n in range(0, block_m):
            m_i, l_i = _lse2_step(m_i, l_i, q, k_base, offs_m, block_n * BLOCK + offs_n0, offs_d, seq_len,
                                  qk_scale, HEAD_DIM, False, DOT_PRECISION)  # fmt: skip
        m_i, l_i = _lse2_step(m_i, l_i, q, k_base, offs_m, offs_m, offs_d, seq_len, qk_scale, HEAD_DIM, True,
                              DOT_PRECISION)  # fmt: skip
        lse2 = m_i + tl.log2(l_i)  # every row sees at least its own key (l_i >= 1)

        # pass 2: dQ and the influence block sums, key block by key block up to the diagonal
        dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        for block_n in range(0, block_m):
            dq = _dq_influence_step(dq, q, do, delta, lse2, k_base, v_base, infl_base + block_n, offs_m,
                                    block_n * BLOCK + offs_n0, offs_d, seq_len, qk_scale, HEAD_DIM, EPS, False,
                                    DOT_PRECISION)  # fmt: skip
        dq = _dq_influence_step(dq, q, do, delta, lse2, k_base, v_base, infl_base + block_m, offs_m, offs_m, offs_d,
                                seq_len, qk_scale, HEAD_DIM, EPS, True, DOT_PRECISION)  # fmt: skip

        tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
        stat_off = (bsz_idx * tl.num_programs(1) + head) * seq_len + offs_m
        tl.store(LSE2 + stat_off, lse2, mask=row_ok)
        tl.store(DELTA + stat_off, delta, mask=row_ok)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, offs_m, offs_n, offs_d, seq_len, qk_scale,
                   HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
        row_ok = offs_m < seq_len
        q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=float("inf"))  # rows past the end: P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # transposed tiles, [keys, queries]: the sums over queries are plain dots
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION).to(tl.float32) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        if DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(tl.float32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv(
        Q, K, V, DO, DK, DV, LSE2, DELTA,
        stride_qb, stride_qh, stride_kb, stride_kh,
        seq_len, scale,
        GROUP: tl.constexpr, KEY_BLOCK: tl.constexpr, QUERY_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        block_n = tl.program_id(0)
        kv_head = tl.program_id(1)
        bsz_idx = tl.program_id(2)
        offs_n = block_n * KEY_BLOCK + tl.arange(0, KEY_BLOCK)
        offs_m0 = tl.arange(0, QUERY_BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        key_ok = offs_n < seq_len
        qk_scale = scale * _LOG2E

        kv_off = bsz_idx * stride_kb + kv_head * stride_kh + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_off, mask=key_ok[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=key_ok[:, None], other=0.0)
        dk = tl.zeros([KEY_BLOCK, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([KEY_BLOCK, HEAD_DIM], dtype=tl.float32)

        # query steps: the first KEY_BLOCK // QUERY_BLOCK cross the diagonal (masked), the rest lie below it
        first = block_n * (KEY_BLOCK // QUERY_BLOCK)
        num_steps = tl.cdiv(seq_len, QUERY_BLOCK)
        past_diagonal = tl.minimum(first + KEY_BLOCK // QUERY_BLOCK, num_steps)
        for g in range(0, GROUP):  # the query heads of this kv head, in order
            head = kv_head * GROUP + g
            q_base = Q + bsz_idx * stride_qb + head * stride_qh
            do_base = DO + bsz_idx * stride_qb + head * stride_qh
            stat_base = (bsz_idx * GROUP * tl.num_programs(1) + head) * seq_len
            lse2_base, delta_base = LSE2 + stat_base, DELTA + stat_base
            for step in range(first, past_diagonal):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                                    step * QUERY_BLOCK + offs_m0, offs_n, offs_d, seq_len, qk_scale, HEAD_DIM,
                                    True, DOT_PRECISION)  # fmt: skip
            for step in range(past_diagonal, num_steps):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                                    step * QUERY_BLOCK + offs_m0, offs_n, offs_d, seq_len, qk_scale, HEAD_DIM,
                                    False, DOT_PRECISION)  # fmt: skip

        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


def attention_backward_with_influence(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    launch: BackwardLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of causal attention and its block-summed influence, deterministic (no atomics).

    query/out/grad_out: [B, Hq, L, D]; key/value: [B, Hkv, L, D] (Hq = GROUP * Hkv). Returns dq [B, Hq, L, D],
    dk/dv [B, Hkv, L, D] in the input dtype and float32 blocks [Hkv, nb, nb] (the contract of
    ``influence_blocks_torch``). head_dim and block_size: powers of two >= 16. On CPU it runs only under
    ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("attention_backward_with_influence needs triton: pip install 'moa-hub[gpu]'")
    bsz, num_q_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    _check_power_of_two("head_dim", head_dim)
    _check_power_of_two("block_size", block_size)
    fit = launch is None  # the defaults shrink where the GPU cannot load them; settings passed in run as given
    launch = launch or BackwardLaunch()
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    nb = math.ceil(seq_len / block_size)
    query, key, value, out, grad_out = (t.contiguous() for t in (query, key, value, out, grad_out))
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    lse2 = torch.empty(bsz, num_q_heads, seq_len, dtype=torch.float32, device=query.device)
    delta = torch.empty_like(lse2)
    per_head = torch.zeros(bsz, num_q_heads, nb, nb, dtype=torch.float32, device=query.device)
    strides = (query.stride(0), query.stride(1), key.stride(0), key.stride(1))
    precision = dot_precision(query.dtype)

    def dq_influence(conf: dict) -> None:
        _bwd_dq_influence[(nb, num_q_heads, bsz)](
            query, key, value, out, grad_out, dq, lse2, delta, per_head, *strides, seq_len, scale,
            GROUP=group, BLOCK=block_size, HEAD_DIM=head_dim, EPS=INFLUENCE_EPS,
            DOT_PRECISION=precision, **conf,
        )  # fmt: skip

    def dkdv(conf: dict) -> None:  # BLOCK_M: keys per program, BLOCK_N: query rows per step (<= BLOCK_M)
        _bwd_dkdv[(math.ceil(seq_len / conf["BLOCK_M"]), num_kv_heads, bsz)](
            query, key, value, grad_out, dk, dv, lse2, delta, *strides, seq_len, scale,
            GROUP=group, KEY_BLOCK=conf["BLOCK_M"], QUERY_BLOCK=conf["BLOCK_N"], HEAD_DIM=head_dim,
            DOT_PRECISION=precision, num_warps=conf["num_warps"], num_stages=conf["num_stages"],
        )  # fmt: skip

    dq_conf = {"num_warps": launch.dq_warps, "num_stages": launch.dq_stages}
    dkdv_conf = {"BLOCK_M": launch.key_block, "BLOCK_N": launch.query_block, "num_warps": launch.dkdv_warps,
                 "num_stages": launch.dkdv_stages}  # fmt: skip
    shape = (head_dim, group, block_size, query.dtype, query.device)
    # Triton launches on the current device: make it the tensors' (a device_map-sharded model spans GPUs)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        if fit:
            launch_fitting(dq_influence, dq_conf, shape, "attention backward (dQ, influence)")
            launch_fitting(dkdv, dkdv_conf, shape, "attention backward (dK, dV)")
        else:
            dq_influence(dq_conf)
            dkdv(dkdv_conf)
    return dq, dk, dv, per_head.sum(0).reshape(num_kv_heads, group, nb, nb).sum(1)

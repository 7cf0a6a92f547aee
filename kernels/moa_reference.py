"""Pure-torch reference of MoA attention: the contract's per-head mask, GQA without repeating K/V.

This is the CPU path and the yardstick every kernel is compared with (run it in float64 for the
"exact" answer). Keys carry their own position ids, so the same function serves a fresh prefill,
a chunked prefill over a cache, and decode.
"""

from __future__ import annotations

import torch

from .moa_spans import visible_mask


def moa_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    sink: int,
    min_span: int,
    scale: float | None = None,
    q_chunk: int = 1024,
) -> torch.Tensor:
    """MoA attention in plain torch.

    query: [B, Hq, Lq, D]; key/value: [B, Hkv, Lk, D]
    q_pos: [B, Lq] position ids of the queries (negative = padding query, output zeros)
    k_pos: [B, Lk] or [B, Hkv, Lk] position ids of the keys (negative = empty slot, never visible)
    alpha, beta: [Hkv] the rule of each kv head. Returns [B, Hq, Lq, D] in query's dtype.
    Softmax runs in float32, or float64 when the inputs are float64.
    """
    bsz, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    acc_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32

    if k_pos.dim() == 2:
        k_pos = k_pos[:, None, :].expand(bsz, num_kv_heads, k_pos.shape[-1])
    alpha = torch.as_tensor(alpha, device=query.device).reshape(1, num_kv_heads, 1, 1)
    beta = torch.as_tensor(beta, device=query.device).reshape(1, num_kv_heads, 1, 1)

    # q: [B, Hkv, G, Lq, D] against k: [B, Hkv, 1, Lk, D], so K/V are never repeated
    q = query.reshape(bsz, num_kv_heads, group, q_len, head_dim).to(acc_dtype)
    k = key[:, :, None].to(acc_dtype)
    v = value[:, :, None].to(acc_dtype)
    out = torch.zeros(bsz, num_kv_heads, group, q_len, head_dim, dtype=acc_dtype, device=query.device)
    for start in range(0, q_len, q_chunk):
        stop = min(start + q_chunk, q_len)
        qp = q_pos[:, None, start:stop].expand(bsz, num_kv_heads, stop - start)  # [B, Hkv, Lc]
        visible = visible_mask(qp, k_pos, alpha, beta, sink, min_span) & (qp >= 0)[..., None]  # [B, Hkv, Lc, Lk]
        scores = torch.matmul(q[:, :, :, start:stop], k.transpose(-1, -2)) * scale  # [B, Hkv, G, Lc, Lk]
        scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
        out[:, :, :, start:stop] = torch.matmul(probs, v)
    return out.reshape(bsz, num_q_heads, q_len, head_dim).to(query.dtype)

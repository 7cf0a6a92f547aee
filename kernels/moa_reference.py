"""Pure-torch reference of MoA attention: the contract's per-head mask, GQA without repeating K/V.

This is the CPU path and the yardstick every kernel is compared with (run it in float64 for the
"exact" answer). Keys carry their own position ids, so the same function serves a fresh prefill,
a chunked prefill over a cache, and decode.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .moa_spans import visible_mask

# With gradients, each chunk of queries is recomputed in the backward pass (activation checkpointing), so what
# autograd keeps is q, k and v, not every chunk's [B, Hq, chunk, Lk] probabilities: the chunk is cut to at most this
# many scores, and memory no longer grows with the square of the length.
GRAD_CHUNK_SCORES = 2**25


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
    rule = (k_pos, alpha, beta, sink, min_span, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # checkpoint() saves every tensor input: copies, since positions or rules made under inference_mode()
        # (the plan's device tensors are made once and kept) cannot be saved for backward
        q_pos, rule = q_pos.clone(), (*(t.clone() for t in rule[:3]), *rule[3:])
        q_chunk = max(1, min(q_chunk, GRAD_CHUNK_SCORES // (bsz * num_q_heads * max(1, key.shape[2]))))
        pieces = [
            checkpoint(_attend_chunk, q[:, :, :, start : start + q_chunk], k, v, q_pos[:, start : start + q_chunk],
                       *rule, use_reentrant=False)
            for start in range(0, q_len, q_chunk)
        ]  # fmt: skip
        out = torch.cat(pieces, dim=3) if pieces else q.new_zeros(q.shape)
    else:
        out = torch.zeros(bsz, num_kv_heads, group, q_len, head_dim, dtype=acc_dtype, device=query.device)
        for start in range(0, q_len, q_chunk):
            stop = min(start + q_chunk, q_len)
            out[:, :, :, start:stop] = _attend_chunk(q[:, :, :, start:stop], k, v, q_pos[:, start:stop], *rule)
    return out.reshape(bsz, num_q_heads, q_len, head_dim).to(query.dtype)


def _attend_chunk(q, k, v, q_pos, k_pos, alpha, beta, sink: int, min_span: int, scale: float) -> torch.Tensor:
    """One chunk of queries: q [B, Hkv, G, Lc, D], k / v [B, Hkv, 1, Lk, D], q_pos [B, Lc], k_pos [B, Hkv, Lk]."""
    qp = q_pos[:, None, :].expand(q.shape[0], q.shape[1], q.shape[3])  # [B, Hkv, Lc]
    visible = visible_mask(qp, k_pos, alpha, beta, sink, min_span) & (qp >= 0)[..., None]  # [B, Hkv, Lc, Lk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, G, Lc, Lk]
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
    return torch.matmul(probs, v)

"""MoA attention with gradients on the GPU: FlexAttention with a block mask of the contract's per-head windows.

The Triton prefill kernel has no backward pass. While gradients are needed (training, fine-tuning), a prefill on CUDA
runs ``torch.nn.attention.flex_attention`` (compiled: forward and backward are Triton kernels that PyTorch generates)
with a block mask that holds, for each query block, only the sink blocks and the band of its window. So the work and
the memory follow the plan, as in the forward kernel, and nothing of size length x length is built: the block tables
come from each block's first and last position (``block_tables``), not from evaluating the mask on every pair as
``create_block_mask`` does (130 ms a layer at 32k on the H200).

The mask is the contract's (``moa_spans``), evaluated on position ids (left padding has -1 and sees nothing):
key ``j`` is visible to query ``i`` iff ``0 <= j <= i`` and (``j < sink`` or ``j > i - W(i + 1)``). ``W`` is read from
a table of each kv head's window edge per position, computed with ``window_at`` in float64, so the rule is written
once. Every query head of a GQA group uses its kv head's row; K and V are not repeated (``enable_gqa``).

``MOA_FLEX=0`` turns this path off (the pure-torch reference then serves gradients: exact, and memory linear in
the length, but slower).
"""

from __future__ import annotations

import functools
import os

import torch

from .moa_spans import window_at
from .moa_tensor_cache import TensorMemo

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None

BLOCK = 128  # FlexAttention's block size: the mask's granularity
_MASKS = TensorMemo()  # one block mask per (positions, layer rule): reused when a layer's forward is recomputed


def supported(query: torch.Tensor) -> bool:
    """Whether this path serves ``query`` (CUDA, a dtype and head size that FlexAttention compiles for)."""
    head_dim = query.shape[-1]
    return (
        flex_attention is not None
        and os.environ.get("MOA_FLEX", "1").strip() != "0"
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def window_edges(alpha: torch.Tensor, beta: torch.Tensor, sink: int, min_span: int, length: int) -> torch.Tensor:
    """[Hkv, length] int32: ``p - W(p + 1)`` for a query at position ``p``; its recent keys are those above it."""
    pos = torch.arange(length, dtype=torch.int64, device=alpha.device)
    window = window_at((pos + 1)[None, :], alpha[:, None], beta[:, None], sink, min_span)
    return (pos[None, :] - window).to(torch.int32)


def mask_mod(q_pos: torch.Tensor, edges: torch.Tensor, sink: int, group: int):
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of the contract for position ids ``q_pos`` [B, L], with
    ``edges`` = ``window_edges`` up to the largest position."""
    pos = q_pos.to(torch.int32).contiguous()

    def visible(b, h, q_idx, kv_idx):
        pq, pk = pos[b, q_idx], pos[b, kv_idx]
        left = edges[h // group, pq.clamp(min=0)]
        return (pq >= 0) & (pk >= 0) & (pk <= pq) & ((pk < sink) | (pk > left))

    return visible


def block_mask(q_pos: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, sink: int, min_span: int,
               num_q_heads: int):  # fmt: skip
    """The FlexAttention block mask of one layer for a chunk with position ids ``q_pos`` [B, L] (-1 = padding)."""
    bsz, length = q_pos.shape
    group = num_q_heads // alpha.shape[0]

    def build():
        # positions may start past 0 (a chunk scored alone): one host sync per layer and forward, while training
        top = int(q_pos.max()) + 1 if q_pos.numel() else 1
        edges = window_edges(alpha, beta, sink, min_span, max(top, 1))
        partial, full = block_tables(q_pos, edges, sink)
        tables = [t.repeat_interleave(group, dim=1) for t in (*_ordered(partial), *_ordered(full))]
        return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=mask_mod(q_pos, edges, sink, group),
                                        seq_lengths=(length, length))  # fmt: skip

    return _MASKS.get((q_pos, alpha, beta), (sink, min_span, num_q_heads), build)


def block_tables(q_pos: torch.Tensor, edges: torch.Tensor, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs hold a visible pair, and which hold only visible pairs: two bool tensors
    [B, Hkv, blocks, blocks], from each block's first and last position, with no length x length work.

    Each row's positions are -1 (padding) and then consecutive (the model's forward puts padding first), so a
    block's valid positions are one range [lo, hi]. For queries [plo, phi] and keys [klo, khi]:
    - some pair is visible iff klo <= phi and (klo < sink, or the ranges overlap: the diagonal pair, or
      khi > left(plo), the lowest window edge of the queries);
    - every pair is visible (a block that needs no mask) iff neither block holds padding, khi <= plo, and khi < sink
      or klo > left(phi). A block counted as partial when it is full costs time, never a wrong value.
    """
    bsz, length = q_pos.shape
    blocks = -(-length // BLOCK)
    pos = torch.full((bsz, blocks * BLOCK), -1, dtype=torch.int64, device=q_pos.device)
    pos[:, :length] = q_pos
    pos = pos.view(bsz, blocks, BLOCK)
    valid = pos >= 0
    any_valid, padded = valid.any(-1), ~valid.all(-1)  # [B, nb]
    lo = torch.where(valid, pos, torch.iinfo(torch.int64).max).amin(-1).clamp(max=edges.shape[1] - 1)
    hi = pos.amax(-1)  # [B, nb]
    left_lo = edges[:, lo.clamp(min=0)].permute(1, 0, 2)  # [B, Hkv, nb]: the window edge of each block's first query
    left_hi = edges[:, hi.clamp(min=0)].permute(1, 0, 2)
    qlo, qhi, klo, khi = lo[:, None, :, None], hi[:, None, :, None], lo[:, None, None, :], hi[:, None, None, :]
    both = (any_valid[:, :, None] & any_valid[:, None, :])[:, None]  # [B, 1, nq, nk]
    overlap = (khi >= qlo) & (klo <= qhi)
    visible = both & (klo <= qhi) & ((klo < sink) | overlap | (khi > left_lo[..., :, None]))
    clean = ~(padded[:, :, None] | padded[:, None, :])[:, None]
    full = visible & clean & (khi <= qlo) & ((khi < sink) | (klo > left_hi[..., :, None]))
    return visible & ~full, full


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [B, H, nq], indices [B, H, nq, nk]) of the True key blocks of each query block, in ascending order."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def moa_flex_attention(query, key, value, q_pos, alpha, beta, sink: int, min_span: int, scale: float) -> torch.Tensor:
    """MoA prefill with autograd: query [B, Hq, L, D], key / value [B, Hkv, L, D], q_pos [B, L]; [B, Hq, L, D]
    with zeros for padding queries (a query that sees no key)."""
    mask = block_mask(q_pos, alpha, beta, sink, min_span, query.shape[1])
    return _compiled_flex()(query, key, value, block_mask=mask, scale=scale, enable_gqa=True)

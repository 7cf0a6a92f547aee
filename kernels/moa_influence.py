"""Block-summed attention influence for profiling, without any N x N matrix for the whole model.

The influence of key j on query i (one query head) is

    E_ij = A_ij * (dL/dA_ij - sum_k dL/dA_ik A_ik) / (1 - A_ij)

With O = A V:  dL/dA_ij = dO_i . V_j  and  sum_k dL/dA_ik A_ik = dO_i . O_i  (called delta_i), so a
blockwise pass needs only Q, K, V, O, dO and the row log-sum-exp (recomputed here). Where
1 - A_ij < INFLUENCE_EPS (a query with a single visible key, A_ij = 1, where the numerator is 0 too)
the denominator is clamped to INFLUENCE_EPS. Query 0 sees one key (A = 1, E = 0 / 0) and adds 0.

Two implementations with one contract, both returning [Hkv, nb, nb] (summed over the batch and over
the query heads of each kv group; nb = ceil(L / block_size)):
- ``influence_blocks_torch``: chunked pure torch (CPU path and reference; exact in float64);
- ``moa_influence_bwd.attention_backward_with_influence``: Triton (GPU), fused with the attention backward.

``profiled_attention`` is an attention function for transformers' ``AttentionInterface``: causal
attention whose backward also hands the block-summed influence of the layer to an ``InfluenceStore``
passed through the model's forward kwargs (``moa_influence_store=store``). With Triton (CUDA) that backward
is ``moa_influence_bwd.attention_backward_with_influence``: dQ, dK, dV and the influence from one fused,
deterministic pair of kernels; otherwise SDPA's gradients are recomputed and ``influence_blocks_torch`` added.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

try:
    import triton
except ImportError:  # CPU-only install: the torch path is used
    triton = None

INFLUENCE_EPS = 1e-6
ATTENTION_KEY = "moa_profile_v1"
STORE_KWARG = "moa_influence_store"


def _row_logsumexp(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, Hkv, G, C, D], k: [B, Hkv, 1, L, D] -> lse: [B, Hkv, G, C, 1]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.arange(k.shape[-2], device=q.device) > rows[:, None], float("-inf"))
    return torch.logsumexp(scores, dim=-1, keepdim=True)


def influence_blocks_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    q_chunk: int = 512,
) -> torch.Tensor:
    """Block-summed causal influence in chunked torch; float64 in -> float64 out, else float32.

    query/out/grad_out: [B, Hq, L, D]; key/value: [B, Hkv, L, D]. Returns [Hkv, nb, nb].
    Memory: one [B, Hq, q_chunk, L] slab at a time (q_chunk is rounded to a multiple of block_size).
    """
    bsz, num_q_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    nb = math.ceil(seq_len / block_size)
    q_chunk = max(block_size, q_chunk // block_size * block_size)

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [B, Hq, L, D] -> [B, Hkv, G, L, D]
        return t.reshape(bsz, num_kv_heads, group, seq_len, head_dim).to(acc)

    q, o, do = grouped(query), grouped(out), grouped(grad_out)
    k, v = key[:, :, None].to(acc), value[:, :, None].to(acc)  # [B, Hkv, 1, L, D]
    delta = (do * o).sum(-1, keepdim=True)  # [B, Hkv, G, L, 1]
    result = torch.zeros(num_kv_heads, nb, nb, dtype=acc, device=query.device)
    padded = nb * block_size
    for start in range(0, seq_len, q_chunk):
        stop = min(start + q_chunk, seq_len)
        rows = torch.arange(start, stop, device=query.device)
        lse = _row_logsumexp(q[..., start:stop, :], k, rows, scale)
        probs = torch.exp(torch.matmul(q[..., start:stop, :], k.transpose(-1, -2)) * scale - lse)
        grad_probs = torch.matmul(do[..., start:stop, :], v.transpose(-1, -2))  # dL/dA: [B, Hkv, G, C, L]
        infl = probs * (grad_probs - delta[..., start:stop, :]) / (1 - probs).clamp_min(INFLUENCE_EPS)
        hidden = (torch.arange(seq_len, device=query.device) > rows[:, None]) | (rows[:, None] == 0)
        infl = infl.masked_fill(hidden, 0.0)  # future keys, and query 0 (one key, A = 1, 0 / 0)
        infl = F.pad(infl.sum(dim=(0, 2)), (0, padded - seq_len))  # [Hkv, C, nb * bs]
        first, count = start // block_size, math.ceil((stop - start) / block_size)
        infl = F.pad(infl, (0, 0, 0, count * block_size - (stop - start)))
        result[:, first : first + count] += infl.reshape(num_kv_heads, count, block_size, nb, block_size).sum((2, 4))
    return result


def _use_triton(backend: str, query: torch.Tensor) -> bool:
    """The Triton kernels: asked for, or ``auto`` on CUDA with triton installed and a power-of-two head_dim >= 16
    (the kernels' tile; e.g. d = 96 takes the torch path); never for float64."""
    head_dim = query.shape[-1]
    fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    wanted = backend == "triton" or (backend == "auto" and triton is not None and query.is_cuda and fits)
    return wanted and query.dtype != torch.float64


class InfluenceStore:
    """Per-run accumulator: layer index -> [Hkv, nb, nb] block sums (kept on the layer's device).

    ``backend``: ``auto`` / ``triton`` take the fused Triton backward (``moa_influence_bwd``: gradients and
    influence in two kernels, deterministic by construction); ``torch`` (and float64, or ``auto`` off CUDA)
    recomputes SDPA's gradients and adds ``influence_blocks_torch``. ``deterministic``: that recompute uses
    PyTorch's deterministic algorithms (SDPA's default CUDA backwards accumulate in an order that changes from
    run to run), so a profile gives the same influence every time it runs."""

    def __init__(self, block_size: int = 64, backend: str = "auto", deterministic: bool = True) -> None:
        self.block_size = block_size
        self.backend = backend
        self.deterministic = deterministic
        self.sums: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, blocks: torch.Tensor) -> None:
        if layer_idx in self.sums:
            held = self.sums[layer_idx]
            if held.shape != blocks.shape:  # a longer item: grow to the larger block grid
                blocks, held = _pad_to(blocks, held), _pad_to(held, blocks)
            self.sums[layer_idx] = held + blocks.to(held.dtype)
        else:
            self.sums[layer_idx] = blocks.clone()

    def reset(self) -> None:
        self.sums.clear()


def _pad_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    extra = max(like.shape[-1] - t.shape[-1], 0)
    return F.pad(t, (0, extra, 0, extra))


def _per_query_head(t: torch.Tensor, group: int) -> torch.Tensor:
    # [B, Hkv, L, D] -> [B, Hkv * group, L, D], kv head h serving query heads h * group ... (an expand: its
    # backward is a sum over the group, deterministic, where repeat_interleave's is an index_add)
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


def _causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    # query: [B, Hq, L, D], key/value: [B, Hkv, L, D]; K/V repeated per query head (one layer at a time)
    group = query.shape[1] // key.shape[1]
    key, value = _per_query_head(key, group), _per_query_head(value, group)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(True)`` for the duration (raising, not warn-only: in warn-only mode
    SDPA keeps its non-deterministic backward); the previous setting is restored."""
    if not enabled:
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


class _ProfiledAttention(torch.autograd.Function):
    """Causal attention; backward = its gradients + block-summed influence to the store (``InfluenceStore``
    says which implementation)."""

    @staticmethod
    def forward(ctx, query, key, value, scale, store, layer_idx):
        out = _causal_attention(query, key, value, scale)
        ctx.save_for_backward(query, key, value, out)
        ctx.scale, ctx.store, ctx.layer_idx = scale, store, layer_idx
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        store = ctx.store
        if _use_triton(store.backend, query):  # one fused, deterministic Triton backward: no SDPA recompute
            from .moa_influence_bwd import attention_backward_with_influence  # imports this module

            with torch.no_grad():
                *grads, blocks = attention_backward_with_influence(
                    query, key, value, out, grad_out, store.block_size, scale=ctx.scale
                )
        else:
            with torch.enable_grad(), deterministic_algorithms(store.deterministic):
                leaves = [t.detach().requires_grad_(True) for t in (query, key, value)]
                recomputed = _causal_attention(*leaves, ctx.scale)
                grads = torch.autograd.grad(recomputed, leaves, grad_out)
            with torch.no_grad():
                blocks = influence_blocks_torch(query, key, value, out, grad_out, store.block_size, scale=ctx.scale)
        with torch.no_grad():
            store.add(ctx.layer_idx, blocks)
        return (*grads, None, None, None)


def profiled_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function: causal attention over unpadded rows, recording influence in backward.

    query: [B, Hq, L, D], key/value: [B, Hkv, L, D]; returns ([B, L, Hq, D], None). Without a store in
    kwargs (``moa_influence_store``) it is plain causal attention.
    """
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_KEY} profiles one unpadded row at a time; got an attention_mask: pass none")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{ATTENTION_KEY} needs a fresh prefill (no cache): {query.shape[2]} queries, {key.shape[2]} keys"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    store = kwargs.get(STORE_KWARG)
    if store is None or not torch.is_grad_enabled():
        out = _causal_attention(query, key, value, scale)
    else:
        out = _ProfiledAttention.apply(query, key, value, scale, store, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def register_profiled_attention() -> str:
    """Register ``profiled_attention`` under its versioned key; returns the key for ``attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_KEY, profiled_attention)
    return ATTENTION_KEY

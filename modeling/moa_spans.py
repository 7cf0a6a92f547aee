"""The MoA attention contract: span, window and visibility, written once.

Every path (torch reference, Triton kernels, the cache, the converter's density numbers)
derives from these functions. For a query at position ``i`` (0-based, left padding not
counted) and ``n = i + 1``::

    S(n) = min(n, max(min_span, floor(alpha + beta * n)))   # the span
    W    = S(n) - sink                                      # recent window, includes the query
    key j visible  <=>  j <= i  and  (j < sink  or  j > i - W)
"""

from __future__ import annotations

import math

import torch


def span_at(n, alpha, beta, sink: int, min_span: int):
    """Span S(n) of a head with rule (alpha, beta). Works on python numbers and on tensors.

    ``n``, ``alpha`` and ``beta`` broadcast against each other when they are tensors.
    """
    if isinstance(n, torch.Tensor) or isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        n_t = torch.as_tensor(n)
        raw = torch.floor(
            torch.as_tensor(alpha, dtype=torch.float64) + torch.as_tensor(beta, dtype=torch.float64) * n_t
        )
        raw = raw.clamp(min=min_span)
        return torch.minimum(n_t.to(torch.float64), raw).to(torch.int64)
    raw = max(min_span, math.floor(alpha + beta * n))
    return int(min(n, raw))


def window_at(n, alpha, beta, sink: int, min_span: int):
    """Recent window W(n) = S(n) - sink (may be <= 0 while n <= sink: then only sink keys exist)."""
    return span_at(n, alpha, beta, sink, min_span) - sink


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, alpha, beta, sink: int, min_span: int) -> torch.Tensor:
    """Boolean visibility of keys for queries, exactly as the contract says.

    q_pos: [..., Lq] query positions; k_pos: [..., Lk] key positions (negative = empty slot);
    alpha/beta broadcast against the leading dims (e.g. [B, H, 1, 1] after unsqueeze).
    Returns [..., Lq, Lk].
    """
    i = q_pos.unsqueeze(-1).to(torch.int64)  # [..., Lq, 1]
    j = k_pos.unsqueeze(-2).to(torch.int64)  # [..., 1, Lk]
    w = window_at(i + 1, alpha, beta, sink, min_span)  # [..., Lq, 1]
    return (j >= 0) & (j <= i) & ((j < sink) | (j > i - w))


def kv_density(alpha, beta, n: int, sink: int, min_span: int) -> float:
    """KV density of a plan at length n: mean over heads of S(n) / n."""
    spans = span_at(
        n, torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(beta, dtype=torch.float64), sink, min_span
    )
    return float(spans.to(torch.float64).mean() / n)


def attention_fraction(alpha, beta, n: int, sink: int, min_span: int) -> float:
    """Fraction of the causal n x n attention matrix the plan keeps (the prefill work), mean over heads."""
    steps = torch.arange(1, n + 1, dtype=torch.float64)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    b = torch.as_tensor(beta, dtype=torch.float64).reshape(-1, 1)
    kept = span_at(steps, a, b, sink, min_span).to(torch.float64).sum(dim=-1)
    return float(kept.mean() / (n * (n + 1) / 2))

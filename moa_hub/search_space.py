"""The rules a kv head can take, their spans, and what each rule masks inside each profile block.

A rule is one elastic span ``(alpha, beta)``; its span, window and visibility come from the
contract (``modeling/moa_spans.py``), never re-derived here. For the optimizer we need, per rule:

- ``S_r(N)`` at every length the density is bounded at (profile lengths + extend length);
- the fraction of the causal (query, key) entries of every block pair ``(bi, bj)`` that the rule
  masks out at a profile length, so that the loss of rule r for head h is
  ``sum_blocks influence[h, bi, bj] * masked_fraction[r, bi, bj]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import OptimizeError
from .remote import remote_module

DEFAULT_BETAS = tuple(round(0.1 * k, 1) for k in range(11))


@dataclass(frozen=True)
class SearchSpace:
    """The grid of rules. ``alphas=None`` builds a grid from the largest length considered.

    The automatic alpha grid is the union of a geometric ladder ``min_span * 2^k`` (fine steps for
    short windows) and ``2 * alpha_points + 1`` evenly spaced values in ``[-N_max, N_max]``
    (negative alphas make sense with beta > 0: the span starts growing later).
    """

    betas: tuple[float, ...] = DEFAULT_BETAS
    alphas: tuple[int, ...] | None = None
    alpha_points: int = 16

    def __post_init__(self) -> None:
        bad = [b for b in self.betas if not 0.0 <= b <= 1.0]
        if bad or not self.betas:
            raise OptimizeError(
                f"betas must be a non-empty list in [0, 1], got {list(self.betas)}: fix the search space"
            )
        if self.alphas is None and self.alpha_points < 1:
            raise OptimizeError(f"alpha_points must be >= 1, got {self.alpha_points}")

    def alpha_grid(self, max_length: int, min_span: int) -> list[int]:
        """The alphas to combine with every beta."""
        if self.alphas is not None:
            return sorted({int(a) for a in self.alphas})
        ladder = {min_span << k for k in range(64) if (min_span << k) <= max_length}
        step = max_length / self.alpha_points
        linear = {round(k * step) for k in range(-self.alpha_points, self.alpha_points + 1)}
        return sorted(ladder | linear)


@dataclass(frozen=True)
class RuleSet:
    """Distinct rules (no two give the same span at every n up to the largest length).

    ``spans[N]``: ``[R]`` int64, ``S_r(N)``; ``density(N) = spans[N] / N``.
    """

    alpha: np.ndarray  # [R] float64
    beta: np.ndarray  # [R] float64
    sink: int
    min_span: int
    spans: dict[int, np.ndarray]  # N -> [R] int64

    def __len__(self) -> int:
        return len(self.alpha)

    def density(self, length: int) -> np.ndarray:
        return self.spans[length] / length  # [R]


def _span_table(alpha: np.ndarray, beta: np.ndarray, max_length: int, sink: int, min_span: int) -> np.ndarray:
    """S_r(n) for n = 1..max_length, from the contract: [R, max_length] int64."""
    spans = remote_module("moa_spans")
    n = torch.arange(1, max_length + 1, dtype=torch.int64)  # [N]
    a = torch.as_tensor(alpha, dtype=torch.float64)[:, None]  # [R, 1]
    b = torch.as_tensor(beta, dtype=torch.float64)[:, None]
    return spans.span_at(n, a, b, sink, min_span).numpy()


def build_rules(space: SearchSpace, lengths: list[int], sink: int, min_span: int) -> RuleSet:
    """Every (alpha, beta) of the grid, deduplicated by their span at each n <= max(lengths).

    The smallest rule (span ``min_span`` everywhere) and the dense rule (``S(n) = n``) are always in.
    """
    if not 0 <= sink < min_span:
        raise OptimizeError(f"need 0 <= sink < min_span, got sink={sink}, min_span={min_span}")
    max_length = max(lengths)
    pairs = [(float(min_span), 0.0), (0.0, 1.0)]
    pairs += [(float(a), float(b)) for b in space.betas for a in space.alpha_grid(max_length, min_span)]
    alpha = np.array([p[0] for p in pairs], dtype=np.float64)
    beta = np.array([p[1] for p in pairs], dtype=np.float64)
    table = _span_table(alpha, beta, max_length, sink, min_span)  # [R, N_max]
    _, first = np.unique(table, axis=0, return_index=True)
    keep = np.sort(first)  # first occurrence of each distinct span sequence, grid order
    spans = {n: table[keep, n - 1].copy() for n in sorted(set(lengths))}
    return RuleSet(alpha=alpha[keep], beta=beta[keep], sink=sink, min_span=min_span, spans=spans)


def block_pairs(num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The causal block pairs (bi, bj), bj <= bi, in row-major order: two [T] arrays."""
    return np.tril_indices(num_blocks)


def _keys_below(limit: np.ndarray, block_size: int, num_blocks: int) -> np.ndarray:
    """out[r, bi, bj] = sum over queries i in block bi of #{keys j in block bj : j < limit[r, i]}.

    limit: [R, N] int64 with 0 <= limit <= N. O(R * (N + nb^2)): one bincount, no [N, nb] table.
    """
    rules, length = limit.shape
    q_block = np.arange(length) // block_size  # [N]
    full, rem = np.divmod(limit, block_size)  # keys j < limit: blocks < full entirely, `rem` keys of block `full`
    flat = (np.arange(rules)[:, None] * num_blocks + q_block[None, :]) * (num_blocks + 1) + full  # [R, N]
    size = rules * num_blocks * (num_blocks + 1)
    count = np.bincount(flat.ravel(), minlength=size).reshape(rules, num_blocks, num_blocks + 1)
    part = np.bincount(flat.ravel(), weights=rem.ravel(), minlength=size).reshape(rules, num_blocks, num_blocks + 1)
    # queries whose limit lies in a block > bj see all block_size keys of bj
    above = count[..., ::-1].cumsum(axis=-1)[..., ::-1]  # above[..., q] = #queries with full >= q
    return block_size * above[..., 1:] + part[..., :num_blocks]  # [R, nb, nb]


def masked_fraction(rules: RuleSet, length: int, block_size: int, chunk: int = 32) -> np.ndarray:
    """Fraction of the causal entries of each causal block pair that each rule masks: [R, T].

    T follows ``block_pairs(ceil(length / block_size))``. Exact per token (contract's window).
    """
    spans = remote_module("moa_spans")
    num_blocks = math.ceil(length / block_size)
    rows, cols = block_pairs(num_blocks)
    i = torch.arange(length, dtype=torch.int64)  # query positions [N]
    causal = _keys_below((i + 1).numpy()[None, :], block_size, num_blocks)[0][rows, cols]  # [T]
    sink_keys = _keys_below(np.full((1, length), min(rules.sink, length)), block_size, num_blocks)[0][rows, cols]
    out = np.empty((len(rules), len(rows)), dtype=np.float64)
    for start in range(0, len(rules), chunk):
        a = torch.as_tensor(rules.alpha[start : start + chunk])[:, None]  # [Rc, 1]
        b = torch.as_tensor(rules.beta[start : start + chunk])[:, None]
        window = spans.window_at(i + 1, a, b, rules.sink, rules.min_span)  # [Rc, N]
        # masked keys of query i: sink <= j <= i - W (visible iff j < sink or j > i - W)
        upper = torch.clamp(torch.minimum(i - window + 1, i + 1), min=rules.sink).clamp(max=length)  # [Rc, N]
        masked = _keys_below(upper.numpy(), block_size, num_blocks)[:, rows, cols] - sink_keys  # [Rc, T]
        out[start : start + chunk] = masked / causal
    return out


def rule_losses(influence: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Loss of each rule for each head: [H, R] from influence [L, G, nb, nb] and fraction [R, T]."""
    layers, groups, num_blocks, _ = influence.shape
    rows, cols = block_pairs(num_blocks)
    causal = np.asarray(influence, dtype=np.float64).reshape(layers * groups, num_blocks, num_blocks)[:, rows, cols]
    return causal @ fraction.T  # [H, T] @ [T, R]

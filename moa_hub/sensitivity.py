"""Measured head sensitivity: the answer-loss change when one kv head alone is made local.

The gradient profile predicts the loss of masking to first order. That is accurate for heads whose
masked attention is a small change, and wrong (even in sign) for a retrieval head whose attention
sits on one far token: masking it is a large change and the model answers its calibration items
so confidently that the gradients there are near zero. The measurement is exact for the one rule
it tries: for each kv head h, every other head dense, h restricted to ``sink`` + a window of
``min_span - sink`` tokens (the smallest span of the search space), through the remote code::

    delta[h] = answer_loss(h local) - answer_loss(dense)      (token-weighted mean over the items)

``calibrate_influence`` then keeps the gradient profile's *shape* within each head (where over the
(query, key) blocks the head's influence lies, as |E|) and scales it so that the smallest rule's
predicted loss equals the measured ``max(delta, 0)``. Other rules get the share of that measured loss
their masked blocks carry, so the per-head ranking comes from measurement and the curve over spans
from the gradients.

Cost: one forward (no backward) per kv head per item per profile length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .apply import moa_twin, set_plan
from .errors import ProfileError
from .plan import MoaPlan
from .search_space import RuleSet, block_pairs, masked_fraction

logger = logging.getLogger(__name__)


def local_plan(num_layers: int, num_kv_heads: int, head: int, sink: int, min_span: int) -> MoaPlan:
    """Every kv head dense (alpha 0, beta 1) except flat index ``head`` (none if < 0), which gets ``min_span``."""
    alpha = np.zeros((num_layers, num_kv_heads))
    beta = np.ones((num_layers, num_kv_heads))
    if head >= 0:
        alpha.flat[head], beta.flat[head] = float(min_span), 0.0
    return MoaPlan(alpha=alpha.tolist(), beta=beta.tolist(), sink=sink, min_span=min_span)


def _answer_loss_sum(model, item, device) -> tuple[float, int]:
    ids = torch.tensor([item.input_ids], device=device)  # [1, T]
    answer = len(item.input_ids) - item.answer_start
    logits = model(ids, use_cache=False, logits_to_keep=answer + 1).logits[0, :-1].float()  # [A, V]
    targets = ids[0, item.answer_start :]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(), answer


def _mean_loss(model, items, device) -> float:
    total, count = 0.0, 0
    for item in items:
        loss, tokens = _answer_loss_sum(model, item, device)
        total, count = total + loss, count + tokens
    if count == 0:
        raise ProfileError("calibration items have no answer tokens: check answer_start")
    return total / count


@torch.no_grad()
def measure_head_sensitivity(
    dense: torch.nn.Module, items: Sequence, sink: int, min_span: int, desc: str = "sensitivity", ranks=None
) -> tuple[np.ndarray, float]:
    """``delta`` [L, Hkv] (answer-loss change with each kv head alone local) and the dense answer loss.

    ``ranks`` (``profile_runtime.Ranks``): heads are split over data-parallel ranks and the rows all-reduced.
    """
    config = dense.config.get_text_config()
    layers, groups = config.num_hidden_layers, config.num_key_value_heads
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    device = next(dense.parameters()).device
    twin = moa_twin(dense, local_plan(layers, groups, -1, sink, min_span))  # every head dense
    base = _mean_loss(twin, items, device)  # dense through the remote code: same numerics as the rows below
    delta = torch.zeros(layers * groups, dtype=torch.float64)
    for head in tqdm(range(rank, layers * groups, world), desc=desc, leave=False):
        set_plan(twin, local_plan(layers, groups, head, sink, min_span))
        delta[head] = _mean_loss(twin, items, device) - base
    if world > 1:
        delta = delta.to(ranks.device)
        ranks.all_reduce(delta)
    return delta.cpu().numpy().reshape(layers, groups), base


def smallest_rule(sink: int, min_span: int, length: int) -> RuleSet:
    """The one-rule set of the measured rule: span ``min_span`` at every n."""
    spans = {length: np.array([min(min_span, length)], dtype=np.int64)}
    return RuleSet(np.array([float(min_span)]), np.array([0.0]), sink, min_span, spans)


def calibrate_influence(
    masking_loss: np.ndarray, delta: np.ndarray, length: int, block_size: int, sink: int, min_span: int
) -> np.ndarray:
    """Influence [L, Hkv, nb, nb] (loss increase of masking) whose smallest rule costs ``max(delta, 0)``.

    ``masking_loss``: the gradient profile (-E) [L, Hkv, nb, nb]; its magnitude gives each head's shape.
    A head whose shape has no mass where the smallest rule masks gets its measured loss spread evenly.
    """
    layers, groups, nb, _ = masking_loss.shape
    rows, cols = block_pairs(nb)
    fraction = masked_fraction(smallest_rule(sink, min_span, length), length, block_size)[0]  # [T]
    shape = np.abs(np.asarray(masking_loss, dtype=np.float64)).reshape(layers * groups, nb, nb)[:, rows, cols]
    masked_mass = shape @ fraction  # [H]
    even = np.broadcast_to((fraction > 0).astype(np.float64), shape.shape)
    empty = masked_mass <= 0
    shape = np.where(empty[:, None], even, shape)
    masked_mass = np.where(empty, even @ fraction, masked_mass)
    scale = np.clip(np.asarray(delta, dtype=np.float64).reshape(-1), 0.0, None) / np.maximum(masked_mass, 1e-30)
    out = np.zeros((layers * groups, nb, nb))
    out[:, rows, cols] = shape * scale[:, None]
    return out.reshape(layers, groups, nb, nb).astype(np.float32)

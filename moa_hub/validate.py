"""Validation: the loss of each candidate plan at an unseen longer length, measured with the remote code."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .apply import moa_twin, set_plan
from .calibration import CalibrationItem
from .calibration import answer_loss as _answer_loss
from .errors import MoaHubError
from .plan import MoaPlan

logger = logging.getLogger(__name__)


class AnswerItem(Protocol):
    input_ids: list[int]
    answer_start: int


@dataclass(frozen=True)
class ValidationResult:
    """Answer loss of every candidate and of the dense model at ``length``; ``best`` indexes candidates."""

    length: int
    num_items: int
    dense_loss: float
    losses: list[float]
    densities: list[float]
    best: int = field(default=0)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> ValidationResult:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def answer_loss(model: torch.nn.Module, items: Sequence[AnswerItem], desc: str = "loss") -> float:
    """Mean cross-entropy over the answer tokens of ``items`` (token-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for item in tqdm(items, desc=desc, leave=False):
        ids = torch.tensor([item.input_ids], device=device)
        with torch.no_grad():
            logits = model(ids, use_cache=False, logits_to_keep=len(item.input_ids) - item.answer_start + 1).logits
        answer_tokens = len(item.input_ids) - item.answer_start
        total += answer_loss_of_logits(logits[0], item.input_ids[item.answer_start - 1 :]) * answer_tokens
        count += answer_tokens
    if count == 0:
        raise MoaHubError("validation items have no answer tokens: check the calibration set (answer_start)")
    return total / count


def answer_loss_of_logits(logits: torch.Tensor, tail_ids: list[int]) -> float:
    """Mean answer cross-entropy from the logits of the last answer tokens + 1 ([A + 1, V])."""
    item = CalibrationItem(input_ids=list(tail_ids), answer_start=1, task="", length=len(tail_ids))
    return _answer_loss(logits, item).item()


def validate_plans(
    dense: torch.nn.Module, candidates: Sequence[MoaPlan], items: Sequence[AnswerItem], length: int
) -> ValidationResult:
    """Score every candidate at ``length`` on held-out ``items``; the lowest loss wins."""
    if not candidates:
        raise MoaHubError("no candidate plans to validate: run the optimize stage first")
    twin = moa_twin(dense, candidates[0])
    losses = []
    for index, plan in enumerate(candidates):
        set_plan(twin, plan)
        losses.append(answer_loss(twin, items, desc=f"validate plan {index + 1}/{len(candidates)}"))
    dense_loss = answer_loss(dense, items, desc="validate dense")
    finite = [loss if math.isfinite(loss) else math.inf for loss in losses]
    best = min(range(len(finite)), key=finite.__getitem__)
    result = ValidationResult(
        length=length,
        num_items=len(items),
        dense_loss=dense_loss,
        losses=losses,
        densities=[plan.kv_density(length) for plan in candidates],
        best=best,
    )
    logger.info("validation at %d: best plan %d loss %.4f (dense %.4f)", length, best, losses[best], dense_loss)
    return result

"""Read plan files: the design's ``moa`` block, or the research code's ``{"alphas", "betas"}`` files.

The research code (thu-nics/MoA) stores one rule per *query* head, often of a model converted to
multi-head attention. Here every kv head serves a group of consecutive query heads, so a kv head
gets the elementwise maximum alpha and beta of its group: its span is then at least the span of
every query head it serves (a superset). Sentinel alphas such as -1024 are plain numbers: the
contract clips every span at min_span.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import PlanError
from .plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, MoaPlan, read_json

logger = logging.getLogger(__name__)


def from_thu_nics(
    data: Mapping[str, Any],
    num_layers: int,
    num_kv_heads: int,
    sink: int = DEFAULT_SINK,
    min_span: int = DEFAULT_MIN_SPAN,
) -> MoaPlan:
    """Map a research-code plan (one rule per query head) onto the model's kv heads."""
    alphas, betas = data.get("alphas"), data.get("betas")
    for name, rows in (("alphas", alphas), ("betas", betas)):
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise PlanError(
                f"'{name}' must be a non-empty list of per-layer lists of numbers, got {type(rows).__name__}"
            )
    if len(alphas) != num_layers or len(betas) != num_layers:
        raise PlanError(
            f"the plan file has {len(alphas)} layers of alphas and {len(betas)} of betas but the model has "
            f"{num_layers} layers (num_hidden_layers): use the plan made for this model"
        )
    alpha = [_group_max(row, num_kv_heads, f"alphas[{layer}]") for layer, row in enumerate(alphas)]
    beta = [_group_max(row, num_kv_heads, f"betas[{layer}]") for layer, row in enumerate(betas)]
    return MoaPlan(alpha=alpha, beta=beta, sink=sink, min_span=min_span)


def _group_max(row: list, num_kv_heads: int, name: str) -> list[float]:
    """[num_q_heads] -> [num_kv_heads]: max over each group of consecutive query heads."""
    if len(row) % num_kv_heads:
        raise PlanError(
            f"{name} has {len(row)} query heads, not a multiple of the model's {num_kv_heads} kv heads "
            f"(num_key_value_heads): use the plan made for this model"
        )
    group = len(row) // num_kv_heads
    try:
        return [max(float(x) for x in row[g * group : (g + 1) * group]) for g in range(num_kv_heads)]
    except (TypeError, ValueError) as err:
        raise PlanError(f"{name} holds a value that is not a number ({err}): fix the plan file") from err


def detect_format(data: Any) -> str:
    """'moa' for a design plan (bare block or a config.json with one), 'thu-nics' for alphas/betas files."""
    if isinstance(data, Mapping):
        if "moa" in data and isinstance(data["moa"], Mapping):
            return "moa"
        if "alpha" in data and "beta" in data:
            return "moa"
        if "alphas" in data and "betas" in data:
            return "thu-nics"
    keys = sorted(data)[:8] if isinstance(data, Mapping) else type(data).__name__
    raise PlanError(
        f"unrecognised plan file (top level: {keys}): expected a moa plan {{'alpha', 'beta', 'sink', ...}}, "
        f"a config.json with a 'moa' block, or a research-code file {{'alphas', 'betas'}}"
    )


def load_plan(
    path: str | Path,
    num_layers: int,
    num_kv_heads: int,
    sink: int | None = None,
    min_span: int | None = None,
) -> MoaPlan:
    """Load any supported plan file and check it fits a model with this many layers and kv heads.

    ``sink``/``min_span`` set those of a research-code file (which has none; defaults 64/128).
    A design plan carries its own: passing different values is an error rather than silently ignored.
    """
    data = read_json(path)
    kind = detect_format(data)
    if kind == "thu-nics":
        logger.info("importing research-code plan %s (query heads -> %d kv heads, group max)", path, num_kv_heads)
        return from_thu_nics(
            data,
            num_layers,
            num_kv_heads,
            sink=DEFAULT_SINK if sink is None else sink,
            min_span=DEFAULT_MIN_SPAN if min_span is None else min_span,
        )
    plan = MoaPlan.from_dict(data["moa"] if "moa" in data else data)
    for name, given, stored in (("sink", sink, plan.sink), ("min_span", min_span, plan.min_span)):
        if given is not None and given != stored:
            raise PlanError(
                f"{name}={given} was given but the plan {str(path)!r} fixes {name}={stored}: "
                f"drop the option (it only applies to research-code plan files)"
            )
    plan.check_fits(num_layers, num_kv_heads)
    return plan

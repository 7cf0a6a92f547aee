"""A readable summary of a plan (``moa-hub inspect``): densities and per-layer spans at a few lengths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import PlanError
from .export import PLAN_FILE
from .plan import MoaPlan, read_json

REPORT_LENGTHS = (1024, 4096, 16384, 32768, 65536, 131072)
MAX_SPAN_COLUMNS = 3


def report_lengths(max_length: int | None) -> list[int]:
    """The standard lengths up to the model's context (and the context itself if it is not one of them)."""
    if max_length is None or max_length <= 0:
        return list(REPORT_LENGTHS)
    lengths = [n for n in REPORT_LENGTHS if n <= max_length]
    if not lengths or lengths[-1] != max_length:
        lengths.append(max_length)
    return lengths


def span_lengths(lengths: Sequence[int]) -> list[int]:
    """At most three lengths for the per-layer span table: first, middle, last."""
    if len(lengths) <= MAX_SPAN_COLUMNS:
        return list(lengths)
    return [lengths[0], lengths[len(lengths) // 2], lengths[-1]]


def read_folder_plan(path: str | Path) -> tuple[MoaPlan, int | None]:
    """(plan, context length) from an exported folder (its config.json or moa_plan.json) or a plan file."""
    path = Path(path)
    if path.is_dir():
        config_path, plan_path = path / "config.json", path / PLAN_FILE
        config = read_json(config_path) if config_path.is_file() else {}
        if "moa" in config:
            return MoaPlan.from_dict(config["moa"]), config.get("max_position_embeddings")
        if plan_path.is_file():
            return MoaPlan.load(plan_path), config.get("max_position_embeddings")
        raise PlanError(
            f"{str(path)!r} holds no MoA plan (no 'moa' block in config.json, no {PLAN_FILE}): pass an exported folder"
        )
    return MoaPlan.load(path), None


def format_plan_report(plan: MoaPlan, lengths: Sequence[int]) -> str:
    """Header, density per length, and a per-layer span table (mean / min / max over kv heads)."""
    lines = [
        f"MoA plan (format {plan.format_version}): {plan.num_layers} layers x {plan.num_kv_heads} kv heads",
        f"sink {plan.sink} tokens, min_span {plan.min_span} tokens",
    ]
    if plan.provenance is not None and plan.provenance.base_model:
        revision = f" @ {plan.provenance.base_revision}" if plan.provenance.base_revision else ""
        lines.append(f"base model {plan.provenance.base_model}{revision}")
    lines += ["", f"{'length':>9}  {'kv density':>10}  {'dense heads':>11}"]
    for n in lengths:
        dense = int((plan.spans_at(n) == n).sum())
        lines.append(f"{n:>9,}  {plan.kv_density(n):>10.3f}  {dense:>5} / {plan.num_layers * plan.num_kv_heads:<5}")
    lines += ["", *_span_table(plan, span_lengths(lengths))]
    return "\n".join(lines)


def _span_table(plan: MoaPlan, lengths: Sequence[int]) -> list[str]:
    width = 22
    header = f"{'layer':>5}" + "".join(f"  {'span at ' + format(n, ','):>{width}}" for n in lengths)
    sub = f"{'':>5}" + "".join(f"  {'mean':>8} {'min':>6} {'max':>6}" for _ in lengths)
    rows = [header, sub]
    spans = [plan.spans_at(n) for n in lengths]  # each: [num_layers, num_kv_heads]
    for layer in range(plan.num_layers):
        cells = "".join(f"  {s[layer].mean():>8.0f} {s[layer].min():>6} {s[layer].max():>6}" for s in spans)
        rows.append(f"{layer:>5}{cells}")
    return rows


def inspect_folder(path: str | Path) -> str:
    """The report for an exported folder or a plan file."""
    plan, max_length = read_folder_plan(path)
    return format_plan_report(plan, report_lengths(max_length))

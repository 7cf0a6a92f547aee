"""The model card (README.md) of a converted repo, from ``templates/model_card.md.j2``.

Metadata starts from the base model's card (license fields, language only; gating fields never carry
over) and adds what the Hub needs to list the repo as a derivative of the base model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .assets import template_path
from .errors import ExportError
from .plan_summary import PlanSummary

logger = logging.getLogger(__name__)

KEPT_BASE_FIELDS = ("license", "license_name", "license_link", "language")
TAGS = ["moa", "sparse-attention"]
# The Hub's allowed relations are adapter / merge / quantized / finetune. MoA keeps every weight and compresses
# the attention (KV cache), which the Hub's "quantized" (a compressed form of the base) describes best.
BASE_MODEL_RELATION = "quantized"


@dataclass
class CardConfig:
    """What the card says beyond the plan. ``base_card`` is the base model's README.md, when known."""

    repo_id: str | None = None
    revision: str = "main"
    base_card: Path | None = None
    command: str | None = None
    validation: dict | None = None
    evaluation: dict | None = None
    plots: bool = True
    extra_tags: list[str] = field(default_factory=list)


def read_plan(folder: Path) -> dict:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"cannot read {config_path} ({err}): export the model first (moa-hub export).") from None
    if "moa" not in config:
        raise ExportError(f"{config_path} has no 'moa' block: this folder is not a moa-hub export.")
    return config["moa"]


def base_metadata(base_card: Path | None) -> dict:
    """License fields and language of the base card; everything else (gating, widgets, ...) is dropped."""
    if base_card is None or not Path(base_card).is_file():
        return {}
    from huggingface_hub import ModelCard

    data = ModelCard.load(base_card).data.to_dict()
    return {key: data[key] for key in KEPT_BASE_FIELDS if data.get(key)}


def card_metadata(plan: dict, config: CardConfig) -> dict:
    provenance = plan.get("provenance") or {}
    meta = base_metadata(config.base_card)
    base_model = provenance.get("base_model")
    if base_model and "/" in str(base_model) and not Path(str(base_model)).exists():
        meta["base_model"] = base_model
        meta["base_model_relation"] = BASE_MODEL_RELATION
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = TAGS + [t for t in config.extra_tags if t not in TAGS]
    return meta


def render_card(folder: Path, config: CardConfig, images: dict[str, str] | None = None):
    """The card as a ``huggingface_hub.ModelCard`` (not written)."""
    from huggingface_hub import ModelCard, ModelCardData

    plan = read_plan(folder)
    summary = PlanSummary.from_plan(plan)
    provenance = summary.provenance
    repo_id = config.repo_id or folder.name
    return ModelCard.from_template(
        ModelCardData(**card_metadata(plan, config)),
        template_path=str(template_path("model_card.md.j2")),
        title=f"{repo_id.split('/')[-1]} (MoA)",
        repo_id=repo_id,
        revision=config.revision,
        base_model=provenance.get("base_model", "the base model"),
        base_revision=provenance.get("base_revision"),
        tool_version=provenance.get("moa_hub_version", __version__),
        sink=summary.sink,
        min_span=summary.min_span,
        num_layers=summary.num_layers,
        num_kv_heads=summary.num_kv_heads,
        density_rows=summary.density_rows(),
        layer_rows=summary.layer_rows(),
        span_length=summary.lengths[-1],
        images=images or {},
        validation=config.validation or provenance.get("validation"),
        evaluation=config.evaluation or provenance.get("evaluation"),
        calibration=provenance.get("calibration") if isinstance(provenance.get("calibration"), dict) else None,
        profile_lengths=provenance.get("profile_lengths"),
        command=config.command or provenance.get("command"),
    )


def write_card(folder: Path, config: CardConfig) -> Path:
    """Write README.md (and its PNGs under images/, when the ``plots`` extra is installed) into ``folder``."""
    folder = Path(folder)
    images = write_plots(folder) if config.plots else {}
    card = render_card(folder, config, images)
    path = folder / "README.md"
    card.save(path)
    logger.info("Wrote model card %s (%d picture(s))", path, len(images))
    return path


def write_plots(folder: Path) -> dict[str, str]:
    """The card's pictures; none (with a warning) when matplotlib is missing."""
    from . import plots

    summary = PlanSummary.from_plan(read_plan(folder))
    try:
        plots.plot_spans(summary, folder / plots.SPANS_PNG)
        plots.plot_density(summary, folder / plots.DENSITY_PNG)
    except ImportError as err:
        logger.warning("Model card without pictures: %s", err)
        return {}
    return {"spans": plots.SPANS_PNG, "density": plots.DENSITY_PNG}

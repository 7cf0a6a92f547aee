"""``moa-hub convert``: resolve -> calibrate -> profile -> optimize -> validate -> export (-> push).

Every stage writes its artifact into the work folder and is skipped when the artifact exists, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .calibration import CalibrationConfig, build_calibration, by_length
from .card import CardConfig, write_card
from .errors import MoaHubError
from .export import check_output, write_moa_folder
from .model_folder import read_model_folder
from .optimize import OptimizeConfig, optimize_plans
from .pareto import load_pareto, save_pareto
from .plan import MoaPlan, Provenance
from .profile import ProfileConfig, profile_model
from .push import PushConfig, push_folder
from .resolve import ResolveConfig, ResolvedModel, resolve_model
from .validate import ValidationResult, validate_plans

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertConfig:
    """Everything ``moa-hub convert`` needs. ``extend_length`` defaults to 1.5 x the longest profile length."""

    model: str
    output: Path
    density: float = 0.5
    profile_lengths: tuple[int, ...] = (2048, 4096, 8192)
    extend_length: int | None = None
    calibration: str = "builtin"
    num_samples: int = 4
    block_size: int = 64
    importance: str = "measured"  # measured | gradient (see moa_hub/sensitivity.py)
    temperature: float = 1.0  # profiling loss: cross-entropy of logits / temperature
    sink: int = 64
    min_span: int = 128
    device: str = "auto"
    dtype: str = "auto"
    work_dir: Path | None = None
    overwrite: bool = False
    resume: bool = True  # False: delete the work folder's artifacts and start over
    resolve: ResolveConfig = field(default_factory=ResolveConfig)
    push: PushConfig | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise MoaHubError(f"--density {self.density} must be in (0, 1]: e.g. --density 0.5")
        if not self.profile_lengths or min(self.profile_lengths) <= self.min_span:
            raise MoaHubError(
                f"--profile-lengths {list(self.profile_lengths)} must each exceed min_span={self.min_span}: "
                "pass longer lengths (e.g. 2048 4096 8192)"
            )
        if self.importance not in ("measured", "gradient"):
            raise MoaHubError(f"--importance {self.importance!r} must be measured or gradient")
        if not self.temperature > 0:
            raise MoaHubError(f"--temperature {self.temperature} must be > 0 (1 = the plain answer loss)")
        if self.extend_length is not None and self.extend_length <= max(self.profile_lengths):
            raise MoaHubError(
                f"--extend-length {self.extend_length} must be longer than the profile lengths "
                f"(max {max(self.profile_lengths)}): it is the unseen length plans are validated at"
            )

    @property
    def validation_length(self) -> int:
        return self.extend_length or int(1.5 * max(self.profile_lengths))

    @property
    def work(self) -> Path:
        return Path(self.work_dir or Path(self.output).with_name(Path(self.output).name + ".moa-work"))


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    plan: MoaPlan
    validation: ValidationResult
    pushed_url: str | None = None


def convert(config: ConvertConfig) -> ConvertResult:
    """Run every stage; reuse the artifacts of finished stages in ``config.work``."""
    work = config.work
    if not config.resume and work.exists():
        logger.info("--no-resume: removing the artifacts in %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    resolved = resolve_model(config.model, config.resolve)
    check_output(Path(config.output).expanduser().resolve(), resolved.path, config.overwrite)  # fail before the search
    folder = read_model_folder(resolved.path)  # an architecture or attention the export cannot take fails now
    model, tokenizer = load_dense(resolved.path, config.device, config.dtype)
    lengths = tuple(sorted(config.profile_lengths))
    calibration = CalibrationConfig(
        source=config.calibration, lengths=(*lengths, config.validation_length), items_per_length=config.num_samples
    )
    items = by_length(build_calibration(model, tokenizer, calibration, work / "calibration"))
    profile_config = ProfileConfig(
        lengths=lengths,
        block_size=config.block_size,
        model_name=_model_name(resolved),
        temperature=config.temperature,
        importance=config.importance,
        sink=config.sink,
        min_span=config.min_span,
    )
    profile_model(model, items, profile_config, work / "profile")
    candidates = optimize_stage(config, work)
    validation = validate_stage(model, candidates, items.get(config.validation_length, []), config, work)
    plan = final_plan(candidates[validation.best], config, resolved, calibration, validation)
    plan.save(work / "plan.json")
    output = write_moa_folder(folder, plan, config.output, overwrite=config.overwrite)
    card = CardConfig(
        repo_id=config.push.repo_id if config.push else None,
        base_card=resolved.path / "README.md" if (resolved.path / "README.md").exists() else None,
        command=config.command,
    )
    write_card(output, card)
    url = None
    if config.push:  # a failure here leaves `output` complete; the error says how to retry (moa-hub push)
        pushed = push_folder(output, config.push)
        url = pushed.pr_url or pushed.repo_url
    return ConvertResult(output=output, plan=plan, validation=validation, pushed_url=url)


def load_dense(path: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":  # shard over every visible GPU when the model needs it (accelerate's device_map)
        device = "auto" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def optimize_stage(config: ConvertConfig, work: Path) -> list[MoaPlan]:
    path = work / "pareto.json"
    newest = max((p.stat().st_mtime for p in (work / "profile").glob("profile_*.safetensors")), default=0.0)
    if path.exists() and path.stat().st_mtime < newest:  # e.g. the profile gained measured importance
        logger.info("optimize: the profile is newer than %s; searching again", path)
        path.unlink()
        (work / "validation.json").unlink(missing_ok=True)
    if not path.exists():
        opt = OptimizeConfig(
            density=config.density,
            extend_length=config.validation_length,
            sink=config.sink,
            min_span=config.min_span,
            block_size=config.block_size,
        )
        save_pareto(path, optimize_plans(work / "profile", opt), opt)
    else:
        logger.info("optimize: reusing %s", path)
    return [MoaPlan(alpha=p.alpha, beta=p.beta, sink=p.sink, min_span=p.min_span) for p in load_pareto(path)]


def validate_stage(model, candidates: list[MoaPlan], items, config: ConvertConfig, work: Path) -> ValidationResult:
    path = work / "validation.json"
    if path.exists():
        logger.info("validate: reusing %s", path)
        return ValidationResult.load(path)
    if not items:
        raise MoaHubError(f"no held-out calibration items at the validation length {config.validation_length}")
    result = validate_plans(model, candidates, items, config.validation_length)
    result.save(path)
    return result


def final_plan(
    plan: MoaPlan, config: ConvertConfig, resolved: ResolvedModel, calibration: CalibrationConfig, validation
) -> MoaPlan:
    lengths = sorted({*config.profile_lengths, config.validation_length})
    summary = {
        "length": validation.length,
        "held-out items": validation.num_items,
        "answer loss (MoA)": round(validation.losses[validation.best], 4),
        "answer loss (dense)": round(validation.dense_loss, 4),
        "Pareto plans compared": len(validation.losses),
    }
    provenance = Provenance(
        **resolved.provenance(),
        moa_hub_version=__version__,
        calibration={"source": calibration.source, "items_per_length": calibration.items_per_length},
        profile_lengths=list(config.profile_lengths),
        density_bounds={n: config.density for n in lengths},
        extra={
            "profile": {"importance": config.importance, "temperature": config.temperature},
            "validation": summary,
            "command": config.command,
        },
    )
    return replace(plan, provenance=provenance).with_density(lengths)


def _model_name(resolved: ResolvedModel) -> str:
    return f"{resolved.repo_id}@{resolved.revision_sha}" if resolved.repo_id else str(resolved.path)

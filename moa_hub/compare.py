"""``moa-hub eval``: score a converted model against its dense base and a uniform plan of equal density."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from . import evaluate
from .apply import moa_twin, set_plan
from .errors import ModelError
from .model_folder import SUPPORTED_ARCHITECTURES, read_config
from .plan import MoaPlan, uniform_like

logger = logging.getLogger(__name__)

TASKS = ("retrieval", "passkey", "ppl")
EFFECTIVE_THRESHOLD = 0.9  # effective context length: longest evaluated length with retrieval >= this
METHODS = ("moa", "dense", "uniform")


@dataclass(frozen=True)
class EvalConfig:
    """What ``moa-hub eval`` runs. ``items_per_depth`` items at each needle decile per length."""

    model: Path
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    tasks: tuple[str, ...] = TASKS
    compare: tuple[str, ...] = ("dense", "uniform")
    items_per_depth: int = 1
    ppl_windows: int = 2
    device: str = "cpu"
    output: Path | None = None  # eval.json (default: MODEL/eval.json)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS] + [m for m in self.compare if m not in METHODS]
        if bad:
            raise ValueError(f"unknown task/method {bad}: tasks are {TASKS}, --compare takes {METHODS[1:]}")


@dataclass
class EvalReport:
    """scores[method][task][length] = accuracy (retrieval, passkey) or perplexity (ppl)."""

    lengths: list[int]
    density: dict[int, float]
    scores: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    effective_length: dict[str, int] = field(default_factory=dict)  # method -> tokens (0: none)

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return Path(path)


def load_converted(folder: Path, device: str):
    """The dense base model (from the converted folder's unchanged weights) and the folder's plan."""
    config = read_config(Path(folder))
    if "moa" not in config:
        raise ModelError(f"{folder} has no 'moa' block in config.json: pass a folder written by moa-hub convert/export")
    arch = next((a for a in SUPPORTED_ARCHITECTURES.values() if a.model_type == config.get("model_type")), None)
    if arch is None:
        raise ModelError(f"{folder}: model_type {config.get('model_type')!r} is not a MoA type moa-hub knows")
    base_config_cls = getattr(transformers, arch.config_class.removeprefix("Moa"))
    base_fields = {k: v for k, v in config.items() if k not in ("moa", "auto_map", "model_type", "architectures")}
    dense_cls = getattr(transformers, arch.base_architecture)
    dense = dense_cls.from_pretrained(folder, config=base_config_cls(**base_fields), device_map=device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # config is moa_*
    return dense, tokenizer, MoaPlan.from_dict(config["moa"])


def run_eval(config: EvalConfig) -> EvalReport:
    dense, tokenizer, plan = load_converted(config.model, config.device)
    twin = moa_twin(dense, plan)
    report = EvalReport(lengths=list(config.lengths), density={n: plan.kv_density(n) for n in config.lengths})
    for method in ("moa", *config.compare):
        report.scores[method] = {task: {} for task in config.tasks}
        for length in config.lengths:
            if method == "uniform":
                set_plan(twin, uniform_like(plan, length))
            elif method == "moa":
                set_plan(twin, plan)
            model = dense if method == "dense" else twin
            for task, score in _score(model, tokenizer, length, config).items():
                report.scores[method][task][length] = score
    if "retrieval" in config.tasks:
        report.effective_length = {m: effective_length(report.scores[m]["retrieval"]) for m in report.scores}
    out = config.output or Path(config.model) / "eval.json"
    report.save(out)
    logger.info("evaluation written to %s", out)
    return report


def effective_length(accuracy: dict[int, float], threshold: float = EFFECTIVE_THRESHOLD) -> int:
    """The longest evaluated length up to which retrieval stays >= ``threshold`` at every evaluated length
    (0 when the shortest one already falls below)."""
    best = 0
    for length in sorted(accuracy):
        if accuracy[length] < threshold:
            break
        best = length
    return best


def _score(model, tokenizer, length: int, config: EvalConfig) -> dict[str, float]:
    scores = {}
    with torch.inference_mode():
        if "retrieval" in config.tasks:
            kw = dict(items_per_depth=config.items_per_depth)
            scores["retrieval"] = evaluate.score_retrieval(model, tokenizer, [length], **kw)[0].accuracy
        if "passkey" in config.tasks:
            kw = dict(items_per_depth=config.items_per_depth)
            scores["passkey"] = evaluate.score_passkey(model, tokenizer, [length], **kw)[0].accuracy
        if "ppl" in config.tasks:
            scores["ppl"] = evaluate.perplexity(model, tokenizer, [length], windows=config.ppl_windows)[0].perplexity
    return scores


def report_rows(report: EvalReport) -> list[list[str]]:
    """Table rows: task, length, density, then one column per method."""
    methods = list(report.scores)
    rows = [["task", "length", "MoA density", *methods]]
    tasks = list(next(iter(report.scores.values())))
    for task in tasks:
        for n in report.lengths:
            cells = [f"{report.scores[m][task][n]:.3f}" for m in methods]
            rows.append([task, str(n), f"{report.density[n]:.3f}", *cells])
    if report.effective_length:
        cells = [str(report.effective_length[m]) for m in methods]
        rows.append([f"effective length (retrieval >= {EFFECTIVE_THRESHOLD})", "-", "-", *cells])
    return rows


def card_entries(report: EvalReport) -> dict[str, str]:
    """The card's evaluation table: one line per task and length, methods side by side."""
    rows = report_rows(report)
    header = " / ".join(rows[0][3:])
    return {
        (f"{task} @ {n} tokens ({header})" if n != "-" else f"{task} ({header})"): " / ".join(cells)
        for task, n, _, *cells in rows[1:]
    }

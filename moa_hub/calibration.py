"""Calibration data: long-dependency prompts with answers written by the dense model itself.

``--calibration`` takes ``builtin`` (offline: key-value retrieval, multi-document questions and summaries over
Python standard-library text, see :mod:`moa_hub.tasks`), a local file (``.jsonl``/``.json`` with a ``prompt``
and optional ``answer`` field per line; ``.parquet``/``.arrow`` through the ``datasets`` extra) or a Hub dataset id
(``datasets`` extra). Prompts without an answer get one by greedy generation with the model (model-aligned
supervision). Items are bucketed by target length; the loss is cross-entropy on the answer tokens only.
The processed set is cached as jsonl in the work folder and reused when the same configuration asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tasks
from .errors import CalibrationError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
BUILTIN_TASKS = ("kv_retrieval", "multi_document", "summary")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass(frozen=True)
class CalibrationConfig:
    """What to build. ``lengths`` are the profile lengths plus the extend length (token buckets)."""

    source: str = "builtin"
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    items_per_length: int = 4
    tasks: tuple[str, ...] = BUILTIN_TASKS
    max_answer_tokens: int = 48
    seed: int = 0
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) <= self.max_answer_tokens + 32:
            raise CalibrationError(
                f"calibration lengths {self.lengths} must be non-empty and each > max_answer_tokens + 32 "
                f"({self.max_answer_tokens + 32}): pass longer --lengths"
            )
        if self.items_per_length < 1:
            raise CalibrationError(f"items_per_length must be >= 1, got {self.items_per_length}")
        unknown = [t for t in self.tasks if t not in tasks.GENERATORS]
        if unknown:
            raise CalibrationError(f"unknown calibration tasks {unknown}: choose from {sorted(tasks.GENERATORS)}")


@dataclass(frozen=True)
class CalibrationItem:
    """One sequence: ``input_ids = prompt + answer``; the loss covers ``input_ids[answer_start:]`` only."""

    input_ids: list[int]
    answer_start: int
    task: str
    length: int  # the length bucket (target), >= len(input_ids)


def build_calibration(model, tokenizer, config: CalibrationConfig, work_dir: Path) -> list[CalibrationItem]:
    """The calibration set for ``model``, from the cache in ``work_dir`` when it matches ``config``."""
    path = cache_path(work_dir, config, tokenizer, model)
    if path.exists():
        logger.info("calibration: reusing %s", path)
        return load_items(path)
    prompts = (
        _builtin_prompts(tokenizer, config) if config.source == "builtin" else _external_prompts(tokenizer, config)
    )
    items = _answer_prompts(model, tokenizer, prompts, config)
    save_items(path, items)
    logger.info("calibration: %d items in %d length buckets written to %s", len(items), len(config.lengths), path)
    return items


def cache_path(work_dir: Path, config: CalibrationConfig, tokenizer, model) -> Path:
    """``work_dir/calibration-<hash>.jsonl``; the hash covers the config, the model and the tokenizer."""
    key = {
        "format": CACHE_FORMAT,
        "config": asdict(config),
        "model": getattr(getattr(model, "config", None), "_name_or_path", ""),
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(work_dir) / f"calibration-{digest}.jsonl"


def save_items(path: Path, items: list[CalibrationItem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for item in items:
            f.write(json.dumps(asdict(item)) + "\n")
    tmp.replace(path)


def load_items(path: Path) -> list[CalibrationItem]:
    try:
        return [CalibrationItem(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError) as err:
        raise CalibrationError(f"calibration cache {path} is unreadable ({err}): delete it and run again") from err


def by_length(items: list[CalibrationItem]) -> dict[int, list[CalibrationItem]]:
    """Items grouped by their length bucket, buckets in increasing order."""
    groups: dict[int, list[CalibrationItem]] = {}
    for item in sorted(items, key=lambda it: it.length):
        groups.setdefault(item.length, []).append(item)
    return groups


def answer_labels(item: CalibrationItem) -> torch.Tensor:
    """Labels for a causal LM loss: the token ids on the answer, -100 (ignored) on the prompt."""
    labels = torch.tensor(item.input_ids, dtype=torch.long)
    labels[: item.answer_start] = -100
    return labels


def answer_loss(logits: torch.Tensor, item: CalibrationItem) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens. ``logits``: [L, V] (or [1, L, V]) for ``item.input_ids``."""
    logits = logits.reshape(-1, logits.shape[-1])  # [L, V]
    labels = answer_labels(item).to(logits.device)
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    answer: list[int] | None
    task: str
    length: int


def _builtin_prompts(tokenizer, config: CalibrationConfig) -> list[_Prompt]:
    prompts = []
    for length in sorted(config.lengths):
        for i in range(config.items_per_length):
            task = config.tasks[i % len(config.tasks)]
            sample = tasks.GENERATORS[task](tokenizer, length - config.max_answer_tokens, config.seed * 10_000 + i)
            enc = tasks.encode(tokenizer, tasks.TaskSample(**{**asdict(sample), "answer": None}))
            prompts.append(_Prompt(enc.input_ids, None, task, length))
    return prompts


def _external_prompts(tokenizer, config: CalibrationConfig) -> list[_Prompt]:
    buckets: dict[int, list[_Prompt]] = {n: [] for n in sorted(config.lengths)}
    for record in _records(config):
        if config.prompt_field not in record:
            raise CalibrationError(
                f"calibration record has no field {config.prompt_field!r} (fields: {sorted(record)}): "
                "pass --prompt-field"
            )
        ids = list(tokenizer(str(record[config.prompt_field]), add_special_tokens=True)["input_ids"])
        answer = record.get(config.answer_field)
        answer_ids = list(tokenizer(str(answer), add_special_tokens=False)["input_ids"]) if answer else None
        budget = max(config.lengths) - (len(answer_ids) if answer_ids else config.max_answer_tokens)
        ids = _truncate_middle(ids, budget)
        total = len(ids) + (len(answer_ids) if answer_ids else config.max_answer_tokens)
        length = min((n for n in buckets if n >= total), default=max(buckets))
        if len(buckets[length]) < config.items_per_length:
            buckets[length].append(_Prompt(ids, answer_ids, "external", length))
        if all(len(b) >= config.items_per_length for b in buckets.values()):
            break
    for n, bucket in buckets.items():
        if not bucket:
            logger.warning("calibration: no record of %s fits the %d-token bucket", config.source, n)
    return [p for bucket in buckets.values() for p in bucket]


def _truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the start and the end (where the question usually is) when a prompt is too long."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def _records(config: CalibrationConfig):
    path = Path(config.source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        yield from _jsonl_records(path)
        return
    if path.suffix in FILE_SUFFIXES and not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist: pass an existing file, builtin or a Hub id")
    yield from _dataset_records(config, path)


def _jsonl_records(path: Path):
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{number} is not valid JSON ({err}): fix that line") from err


def _dataset_records(config: CalibrationConfig, path: Path):
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"calibration source {config.source!r} needs the datasets library: pip install 'moa-hub[datasets]' "
            "(or use --calibration builtin, or a .jsonl file)"
        ) from err
    if path.suffix == ".parquet":
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.suffix == ".arrow":
        data = datasets.Dataset.from_file(str(path))
    else:
        data = datasets.load_dataset(config.source, split=config.split)
    yield from data


# ---------------------------------------------------------------- answers by the model itself


@torch.inference_mode()
def _answer_prompts(model, tokenizer, prompts: list[_Prompt], config: CalibrationConfig) -> list[CalibrationItem]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    items = []
    for prompt in tqdm(prompts, desc="calibration answers", unit="prompt"):
        answer = prompt.answer
        if answer is None:
            ids = torch.tensor([prompt.ids], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=config.max_answer_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            )
            answer = _until_eos(out[0, len(prompt.ids) :].tolist(), eos)
        seq = prompt.ids + answer
        items.append(CalibrationItem(seq, len(prompt.ids), prompt.task, max(prompt.length, len(seq))))
    return items


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """Generated tokens up to and including the first eos (at least one token)."""
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens or ([eos] if eos is not None else [])

"""Profile stage: block-summed attention influence per (layer, kv head) at each profile length.

For every length N, each calibration item (length <= N) runs forward and backward through the dense
model with the ``moa_profile_v1`` attention function; its backward adds the block-summed influence
of each layer to an ``InfluenceStore``. Items are spread over ranks (data parallel), the sums are
all-reduced, and rank 0 writes ``profile_<N>.safetensors``:

    influence  float32 [num_layers, num_kv_heads, nb, nb], nb = ceil(N / block_size)
    metadata   length, block_size, num_items, model   (strings)

A finished file is reused (resume); a ``.partial`` file is written every ``save_every`` items per
rank, so an interruption loses at most one round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ProfileError
from .profile_runtime import Ranks, profiling_mode
from .remote import remote_module

logger = logging.getLogger(__name__)


@dataclass
class CalibrationItem:
    """One calibration prompt: the loss is the cross-entropy on tokens ``answer_start`` .. end."""

    input_ids: list[int]
    answer_start: int


IMPORTANCE = ("measured", "gradient")


@dataclass
class ProfileConfig:
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    block_size: int = 64
    model_name: str = ""  # written into the metadata (name@revision); defaults to model.name_or_path
    save_every: int = 8  # items per rank between partial saves
    gradient_checkpointing: bool = True  # recompute decoder layers in backward (needed for long N)
    backend: str = "auto"  # influence kernel: auto (triton on CUDA) | torch | triton
    deterministic: bool = True  # SDPA recompute path (not the fused Triton backward, deterministic anyway)
    temperature: float = 1.0  # profiling loss: cross-entropy of logits / temperature on the answer tokens
    importance: str = "measured"  # gradient: the first-order profile | measured: scaled per head (sensitivity.py)
    sink: int = 64  # the measured rule (importance=measured): sink + a window of min_span - sink tokens
    min_span: int = 128

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ProfileError(f"block_size={self.block_size} must be a power of two >= 16 (e.g. 64)")
        if not self.lengths or min(self.lengths) < 2:
            raise ProfileError(f"profile lengths {self.lengths} must be non-empty and >= 2 (e.g. 2048 4096 8192)")
        if self.save_every < 1:
            raise ProfileError(f"save_every={self.save_every} must be >= 1")
        if self.backend not in ("auto", "torch", "triton"):
            raise ProfileError(f"backend={self.backend!r} must be one of auto, torch, triton")
        if self.importance not in IMPORTANCE:
            raise ProfileError(f"importance={self.importance!r} must be one of {', '.join(IMPORTANCE)}")
        if not 0 <= self.sink < self.min_span:
            raise ProfileError(f"need 0 <= sink < min_span, got sink={self.sink}, min_span={self.min_span}")
        if not self.temperature > 0:
            raise ProfileError(f"temperature={self.temperature} must be > 0 (1 = the plain answer loss)")


def profile_path(work_dir: Path, length: int) -> Path:
    return Path(work_dir) / f"profile_{length}.safetensors"


def partial_path(work_dir: Path, length: int) -> Path:
    return Path(work_dir) / f"profile_{length}.partial.safetensors"


def profile_model(
    model: torch.nn.Module, items_by_length: dict[int, list[Any]], config: ProfileConfig, work_dir: Path
) -> dict[int, Path]:
    """Profile every length in ``config.lengths``; lengths whose file exists are skipped. Returns the files."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ranks = Ranks.current()
    paths: dict[int, Path] = {}
    todo = [n for n in config.lengths if not _reuse(profile_path(work_dir, n), config)]
    for length in config.lengths:
        paths[length] = profile_path(work_dir, length)
    if todo:
        key = remote_module("moa_influence").register_profiled_attention()
        with profiling_mode(model, key, config.gradient_checkpointing):
            for length in todo:
                _profile_length(model, _items(items_by_length, length), length, config, work_dir, ranks)
    if config.importance == "measured":
        for length in config.lengths:
            if read_metadata(paths[length]).get("importance") != "measured":
                _measure_length(model, _items(items_by_length, length), length, config, paths[length], ranks)
    return paths


def _items(items_by_length: dict[int, list[Any]], length: int) -> list[CalibrationItem]:
    items = [_as_item(it, length) for it in items_by_length.get(length, [])]
    if not items:
        raise ProfileError(f"no calibration items for profile length {length}: build calibration for it")
    return items


def _measure_length(model, items, length: int, config: ProfileConfig, path: Path, ranks: Ranks) -> None:
    """Measure each kv head made local and rewrite ``path`` with the calibrated influence (sensitivity.py)."""
    from .sensitivity import calibrate_influence, measure_head_sensitivity

    delta, dense_loss = measure_head_sensitivity(
        model, items, config.sink, config.min_span, desc=f"measure heads @ {length}", ranks=ranks
    )
    gradient, meta = load_profile(path)  # E (= -loss of masking)
    calibrated = calibrate_influence(-gradient.numpy(), delta, length, config.block_size, config.sink, config.min_span)
    logger.info("profile length %d: measured head sensitivity, max %.4f (dense answer loss %.4f)",
                length, float(delta.max()), dense_loss)  # fmt: skip
    if ranks.rank == 0:
        tensors = {
            "influence": -torch.from_numpy(calibrated),
            "gradient_influence": gradient,
            "measured_loss": torch.from_numpy(delta.astype("float32")),
        }
        meta = {**meta, "importance": "measured", "measured_sink": str(config.sink)}
        meta.update(measured_min_span=str(config.min_span), dense_answer_loss=f"{dense_loss:.6g}")
        _write(path, tensors, meta)
    ranks.barrier()


def _reuse(path: Path, config: ProfileConfig) -> bool:
    if not path.exists():
        return False
    meta = read_metadata(path)
    if int(meta.get("block_size", -1)) != config.block_size:
        raise ProfileError(
            f"{path} was profiled with block_size={meta.get('block_size')}, not {config.block_size}: delete it to re-profile"
        )
    if float(meta.get("temperature", "1.0")) != config.temperature:
        raise ProfileError(
            f"{path} was profiled with temperature={meta.get('temperature', '1.0')}, not {config.temperature}: "
            "delete it to re-profile"
        )
    measured = meta.get("importance") == "measured"
    same_rule = (meta.get("measured_sink"), meta.get("measured_min_span")) == (str(config.sink), str(config.min_span))
    if measured and (config.importance != "measured" or not same_rule):
        raise ProfileError(
            f"{path} holds measured importance (sink {meta.get('measured_sink')}, min_span "
            f"{meta.get('measured_min_span')}); this run asks importance={config.importance!r} with sink "
            f"{config.sink}, min_span {config.min_span}: delete it to re-profile"
        )
    logger.info("profile length %s: reusing %s", meta.get("length"), path)
    return True


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_profile(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The influence tensor [L, Hkv, nb, nb] and metadata of one profile file."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("influence"), dict(f.metadata() or {})


def _as_item(item: Any, length: int) -> CalibrationItem:
    get = item.get if isinstance(item, dict) else lambda name: getattr(item, name, None)
    ids, start = get("input_ids"), get("answer_start")
    if ids is None or start is None:
        raise ProfileError(f"calibration item {item!r:.80} lacks input_ids/answer_start: rebuild the calibration")
    ids = [int(t) for t in ids]
    if len(ids) > length:
        raise ProfileError(f"calibration item of {len(ids)} tokens is longer than profile length {length}")
    if not 1 <= int(start) < len(ids):
        raise ProfileError(f"answer_start={start} must lie in [1, {len(ids) - 1}] for an item of {len(ids)} tokens")
    return CalibrationItem(ids, int(start))


def _profile_length(model, items, length, config, work_dir, ranks) -> Path:
    text_config = model.config.get_text_config()
    nb = math.ceil(length / config.block_size)
    shape = (text_config.num_hidden_layers, text_config.num_key_value_heads, nb, nb)
    total, done = _load_partial(partial_path(work_dir, length), shape, len(items), config)
    resumed_at = done
    _synchronize(model)
    started = time.perf_counter()
    round_size = ranks.world * config.save_every
    store = remote_module("moa_influence").InfluenceStore(config.block_size, config.backend, config.deterministic)
    for start in range(done, len(items), round_size):
        stop = min(start + round_size, len(items))
        store.reset()
        for index in range(start + ranks.rank, stop, ranks.world):
            _backward_one(model, items[index], store, config.temperature)
        round_sum = _stack(store, shape).to(ranks.device)
        ranks.all_reduce(round_sum)
        total += round_sum.cpu()
        done = stop
        logger.info("profile length %d: %d / %d items", length, done, len(items))
        if ranks.rank == 0 and done < len(items):
            _save(partial_path(work_dir, length), total, length, config, model, done, len(items))
        ranks.barrier()
    if ranks.rank == 0:
        _save(profile_path(work_dir, length), total, length, config, model, len(items), len(items))
        partial_path(work_dir, length).unlink(missing_ok=True)
    ranks.barrier()
    _synchronize(model)
    _log_length_time(length, len(items) - resumed_at, time.perf_counter() - started, ranks)
    return profile_path(work_dir, length)


def _synchronize(model) -> None:
    """Wait for the work queued on every GPU that holds part of ``model`` (nothing to wait for on the CPU)."""
    for device in {p.device for p in model.parameters() if p.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def _log_length_time(length: int, num_items: int, seconds: float, ranks: Ranks) -> None:
    """Rank 0: wall seconds of one length, from before its first item to its file written and every rank done."""
    if ranks.rank != 0:
        return
    per_item = f" ({seconds / num_items:.3f} s / item)" if num_items else ""
    logger.info("profile length %d: %d items in %.3f s%s", length, num_items, seconds, per_item)


def _backward_one(model, item: CalibrationItem, store, temperature: float = 1.0) -> None:
    """Forward + backward of one item; the loss is the mean cross-entropy of logits / temperature on the answer."""
    embed = model.get_input_embeddings()
    ids = torch.tensor([item.input_ids], device=embed.weight.device)
    embeds = embed(ids).detach().requires_grad_(True)  # gradients w.r.t. activations only
    num_answer = len(item.input_ids) - item.answer_start
    # keep logits only for positions answer_start - 1 .. end (no [L, vocab] logits at long N)
    kwargs = {remote_module("moa_influence").STORE_KWARG: store}
    logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=num_answer + 1, **kwargs).logits
    targets = ids[0, item.answer_start :].to(logits.device)
    loss = F.cross_entropy(logits[0, :-1].float() / temperature, targets)
    loss.backward()


def _stack(store, shape: tuple[int, ...]) -> torch.Tensor:
    num_layers, _, nb, _ = shape
    missing = [i for i in range(num_layers) if i not in store.sums]
    if store.sums and missing:
        raise ProfileError(f"no influence recorded for layers {missing}: the model's attention is not {shape!r}-shaped")
    out = torch.zeros(shape, dtype=torch.float32)
    for layer, blocks in store.sums.items():
        width = blocks.shape[-1]
        out[layer, :, :width, :width] = blocks.float().cpu()
    return out


def _load_partial(path: Path, shape, num_items: int, config: ProfileConfig) -> tuple[torch.Tensor, int]:
    if not path.exists():
        return torch.zeros(shape, dtype=torch.float32), 0
    total, meta = load_profile(path)
    same = tuple(total.shape) == shape and int(meta["num_items"]) == num_items
    same = same and float(meta.get("temperature", "1.0")) == config.temperature
    if not same or int(meta["block_size"]) != config.block_size:
        logger.warning("ignoring %s: it was made for other calibration or settings", path)
        return torch.zeros(shape, dtype=torch.float32), 0
    logger.info("resuming %s after %s items", path, meta["items_done"])
    return total, int(meta["items_done"])


def _save(path: Path, total: torch.Tensor, length: int, config, model, done: int, num_items: int) -> None:
    meta = {
        "length": str(length),
        "block_size": str(config.block_size),
        "num_items": str(num_items),
        "items_done": str(done),
        "model": config.model_name or str(getattr(model, "name_or_path", "") or "unknown"),
        "format": "moa-hub-profile-v1",
        "temperature": str(config.temperature),
        "importance": "gradient",
    }
    _write(path, {"influence": total}, meta)


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def read_items_jsonl(path: Path) -> dict[int, list[CalibrationItem]]:
    """Calibration items from JSONL, one ``{"length": N, "input_ids": [...], "answer_start": k}`` per line."""
    items: dict[int, list[CalibrationItem]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ProfileError(f"cannot read calibration file {path}: {err}; run `moa-hub calibrate` first") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            length = int(record["length"])
        except (ValueError, KeyError) as err:
            raise ProfileError(
                f"{path}:{number} is not a calibration item with a 'length' ({err}): rebuild it"
            ) from err
        items.setdefault(length, []).append(_as_item(record, length))
    return items


def load_model_for_profiling(model_id: str, revision: str | None = None):
    """The dense model in bf16 on GPU (one per rank in data parallel, else ``device_map="auto"``), fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    ranks = Ranks.current()
    if torch.cuda.is_available():
        device_map = {"": ranks.device} if ranks.world > 1 else "auto"
        dtype = torch.bfloat16
    else:
        device_map, dtype = None, torch.float32
    logger.info("loading %s (device_map=%s, dtype=%s)", model_id, device_map, dtype)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_id, revision=revision, dtype=dtype, device_map=device_map, attn_implementation="sdpa"
    )
    logger.info("loaded %s in %.2f s (rank %d of %d)", model_id, time.perf_counter() - started, ranks.rank, ranks.world)
    return model

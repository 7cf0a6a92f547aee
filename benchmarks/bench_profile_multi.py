"""Data-parallel and device_map profiling against one GPU: same influence, time per item.

A Llama-3-8B-shaped model with random bf16 weights (each parameter drawn from its own seed, made from its
name, directly on the device it lives on: every stage builds the same model) profiles the same random
items (``importance="gradient"``) in these stages, each its own process:

  single      one process on cuda:0
  dp2         ``accelerate launch --multi_gpu --num_processes 2`` (one rank per GPU, cuda:LOCAL_RANK, NCCL);
              the ranks check that their weights are identical (checksums all-gathered)
  cli_dp2     the real command end to end: the model saved with ``save_pretrained`` (then reloaded once with
              ``from_pretrained`` for its checksums) and the items written as JSONL, then ``python -m moa_hub.cli
              profile <folder> --importance gradient --num-gpus 2`` (it re-executes itself under ``accelerate launch``;
              each rank loads the folder with ``load_model_for_profiling``). Its times are the per-length lines the
              library logs (``profile length N: K items in S s``; rank 0, CUDA-synchronised); the command profiles the
              warm-up length first, so no timed length pays for compilation; process start and loading are recorded
              apart (``cli_wall_s``, ``cli_load_s``). Code: ``profile_multi_cli.py``
  device_map  one process, the model sharded over both GPUs by transformers' own device_map="auto"
              computation and dispatched with accelerate hooks (as ``from_pretrained(device_map="auto")`` does)
  repeat      the single stage again: how far two runs of the same profile are from each other (0: the profile's
              attention backward is deterministic)

Each stage warms up (a short item: Triton compile), then times ``profile_model`` per length (CUDA-synchronised
wall time of the whole call; per item = wall / items). The driver then compares each stage's
``influence`` with the single run's (relative Frobenius error) and the time per item (e.g. dp2 / single), prints
a table and writes ``<out>/profile_multi.json``. Every stage writes ``<out>/<stage>.json`` after each length
and logs to ``<out>/<stage>.log``, so a time-out keeps what was measured; ``--deadline-s`` skips what would
not finish in time (and records it as skipped).

    PYTHONPATH=. python benchmarks/bench_profile_multi.py --out $OUT            # 2 GPUs: 8k and 32k, 4 items each
    PYTHONPATH=. python benchmarks/bench_profile_multi.py --tiny --out /tmp/pm  # CPU (gloo): tiny model, smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

T_START = time.time()  # the deadline counts from here (before the slow imports of torch and transformers)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_profile import LLAMA3_8B, TINY, environment  # noqa: E402
from profile_multi_cli import CliTimes, cli_command, run_streaming, write_items_jsonl  # noqa: E402

from moa_hub.profile import CalibrationItem, ProfileConfig, load_profile, profile_model, profile_path  # noqa: E402
from moa_hub.profile_runtime import Ranks  # noqa: E402

STAGES = ("single", "dp2", "cli_dp2", "device_map", "repeat")
DP_STAGES = ("dp2", "cli_dp2")  # data parallel over --nproc GPUs: the time target applies
MODEL_NAME = "random-llama-3-8b-shape"
REL_ERR_MAX = 1e-3  # the issue: influence equal to the single-GPU run's
DP_RATIO_MAX = 0.6  # the issue: time per item on 2 GPUs (dp2, cli_dp2) <= 0.6 x single
INIT_STD = 0.02  # transformers' initializer_range for Llama
# NVLink multicast stays off (the lent multi-GPU machines ask for it; harmless elsewhere)
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------------------------- model, items


def model_shape(tiny: bool) -> dict:
    return {**TINY, "num_hidden_layers": 4} if tiny else dict(LLAMA3_8B)


def param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int):
    """Deterministic value of one parameter: a function of (seed, name, device type) only.

    Matrices: N(0, 0.02) from a generator on ``device`` seeded from the name (the same on any GPU of one
    type; CPU and CUDA generators differ). Vectors: ones for norms, zeros for anything else (biases)."""
    if len(shape) == 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(param_seed(seed, name))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)


def empty_model(shape: dict, dtype: torch.dtype):
    """The model with its parameters on the meta device (buffers, e.g. rotary inv_freq, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa")  # as bench_profile.py
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model


def _device_of(name: str, device_map: dict, default) -> torch.device:
    best, where = -1, default
    for prefix, device in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, where = len(prefix), device
    return torch.device(where) if not isinstance(where, int) else torch.device("cuda", where)


def materialise(model, device_map: dict, default, seed: int) -> None:
    """Give every parameter its deterministic value on its device; move buffers to their module's device."""
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = init_value(name, tuple(param.shape), param.dtype, _device_of(name, device_map, default), seed)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = buf.to(_device_of(name, device_map, default))
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"parameters left on the meta device (tied?): {meta[:5]}")


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    model = empty_model(shape, dtype)
    materialise(model, {"": device}, device, seed)
    return model.eval()


def auto_device_map(model, cpu: bool) -> tuple[dict, str]:
    """transformers' device_map="auto" computation (get_balanced_memory + infer_auto_device_map) on the meta
    model. On the CPU test two fake GPUs of 60% of the model each make it split, and every shard is put on the CPU."""
    num_layers = model.config.num_hidden_layers
    try:
        from transformers.integrations.accelerate import _get_device_map

        if cpu:
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            device_map = _get_device_map(model, "auto", {0: int(size * 0.6), 1: int(size * 0.6), "cpu": 0}, None)
        else:
            device_map = _get_device_map(model, "auto", None, None)
        device_map = dict(device_map)
        if len(set(device_map.values())) < 2:
            raise RuntimeError(f"device_map='auto' did not split the model: {device_map}")
        source = "transformers _get_device_map('auto')"
    except Exception as err:  # keep the stage useful: the two halves by hand
        print(f"auto device map failed ({err!r}); splitting the layers in halves by hand", flush=True)
        half = num_layers // 2
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
        device_map.update({f"model.layers.{i}": 0 if i < half else 1 for i in range(num_layers)})
        device_map.update({"model.norm": 1, "lm_head": 1})
        source = "by hand (halves)"
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    source += f", modules per device {counts}"
    if cpu:
        return {k: "cpu" for k in device_map}, source + ", then every shard put on the CPU"
    return device_map, source


def build_sharded_model(shape: dict, dtype: torch.dtype, seed: int, cpu: bool):
    """Weights materialised straight onto the devices of an 'auto' device map, then accelerate's dispatch_model
    (what from_pretrained(device_map="auto") calls for a map of several devices); hf_device_map is set."""
    from accelerate import dispatch_model

    model = empty_model(shape, dtype)
    device_map, source = auto_device_map(model, cpu)
    default = next(iter(device_map.values()))
    materialise(model, device_map, default, seed)
    skip = getattr(model, "_skip_keys_device_placement", None)
    # force_hooks: on the CPU test every shard is on one device, and the hooks must still run
    model = dispatch_model(model, device_map=device_map, skip_keys=skip, force_hooks=True)
    model.hf_device_map = dict(device_map)
    return model.eval(), device_map, source


def checksums(model) -> dict[str, list[float]]:
    """Per parameter: float64 sum, float64 sum of |x|, and its first 4 values."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            head = flat[:4].double().cpu().tolist()
            stats = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).cpu().tolist()
            out[name] = stats + head
    return out


def make_items(length: int, count: int, answer: int, vocab: int, seed: int) -> list[CalibrationItem]:
    """Random tokens; one CPU generator per length, so a stage that skips a length sees the same items."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    answer = min(answer, length // 2)
    return [
        CalibrationItem(torch.randint(0, vocab, (length,), generator=gen).tolist(), answer_start=length - answer)
        for _ in range(count)
    ]


# ----------------------------------------------------------------------------------------------- worker


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _parse_estimates(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    return {int(k): float(v) for k, v in (part.split(":") for part in text.split(",") if part)}


@dataclass
class StageRun:
    """One process of a stage (one rank of it under accelerate launch) and the record it writes: rank 0 writes it
    to ``--json`` after every step, so a time-out keeps what was measured."""

    args: argparse.Namespace
    ranks: Ranks
    cpu: bool
    local_rank: int
    device: torch.device  # this rank's device
    dtype: torch.dtype
    shape: dict
    tag: str  # the prefix of every log line: the stage, and the rank when there are several
    record: dict

    @property
    def lead(self) -> bool:
        return self.ranks.rank == 0

    def save(self) -> None:
        if self.lead:
            _write_json(Path(self.args.json), self.record)

    def say(self, message: str) -> None:
        print(f"[{self.tag}] {message}", flush=True)


def start_stage(args) -> StageRun:
    """Bind this rank's GPU, join the process group (under accelerate launch) and open the stage's record."""
    stage = args.worker
    cpu = args.cpu or args.tiny
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not cpu:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu (or --tiny)")
        torch.cuda.set_device(local_rank)  # before the process group: NCCL binds each rank to cuda:LOCAL_RANK
    ranks = Ranks.current()  # joins the process group under accelerate launch
    tag = f"{stage} rank {ranks.rank}" if ranks.world > 1 else stage
    dtype = torch.float32 if cpu else getattr(torch, args.dtype)
    record: dict = {
        "stage": stage,
        "status": "running",
        "dtype": str(dtype).removeprefix("torch."),
        "world": ranks.world,
        "pid": os.getpid(),
        "lengths": {},
        "argv": sys.argv[1:],
    }
    device = torch.device("cpu") if cpu else torch.device("cuda", local_rank)
    return StageRun(args, ranks, cpu, local_rank, device, dtype, model_shape(args.tiny), tag, record)


def record_environment(run: StageRun) -> None:
    """Software and devices, and the process group this rank reduces in (its backend, device, NCCL version)."""
    record, ranks = run.record, run.ranks
    record["env"] = environment(run.device)
    record["local_rank"] = run.local_rank
    record["rank_device"] = str(run.device)
    record["reduce_device"] = str(ranks.device)
    record["backend"] = dist.get_backend() if dist.is_initialized() else None
    if not run.cpu:
        record["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        record["nccl"] = str(torch.cuda.nccl.version()) if ranks.world > 1 else None
        if ranks.world > 1 and ranks.device != run.device:
            raise RuntimeError(f"rank {ranks.rank} reduces on {ranks.device}, not its own {run.device}")


def build_for_stage(run: StageRun) -> tuple[torch.nn.Module, list[torch.device]]:
    """The stage's model (sharded by device_map="auto" for the device_map stage, else whole on this rank's device)
    and the devices its parameters are on; records how long the build took and where the weights went."""
    start = time.perf_counter()
    if run.args.worker == "device_map":
        if run.ranks.world != 1:
            raise RuntimeError("the device_map stage runs as one process")
        model, device_map, source = build_sharded_model(run.shape, run.dtype, run.args.seed, run.cpu)
        devices = sorted({p.device for p in model.parameters()}, key=str)
        record_device_map(run.record, model, device_map, source)
    else:
        model = build_model(run.shape, run.dtype, run.device, run.args.seed)
        devices = [run.device]
    _sync(devices)
    run.record["build_s"] = time.perf_counter() - start
    run.record["param_devices"] = [str(d) for d in devices]
    run.record["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    return model, devices


def record_device_map(record: dict, model, device_map: dict, source: str) -> None:
    record["hf_device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
    record["device_map_source"] = source
    per_device: dict[str, int] = {}
    for v in device_map.values():
        per_device[str(v)] = per_device.get(str(v), 0) + 1
    record["modules_per_device"] = per_device
    record["modules_with_accelerate_hooks"] = sum(hasattr(m, "_hf_hook") for m in model.modules())


def check_weights_across_ranks(run: StageRun, sums: dict[str, list[float]]) -> None:
    """Every rank must hold the same model: all-gather the checksums and record whether they agree."""
    mine = torch.tensor([v for name in sorted(sums) for v in sums[name]], dtype=torch.float64)
    mine = mine.to(run.ranks.device)
    gathered = [torch.zeros_like(mine) for _ in range(run.ranks.world)]
    dist.all_gather(gathered, mine)
    run.record["weights_identical_across_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
    run.record["weights_max_abs_diff_across_ranks"] = max(float((g - gathered[0]).abs().max()) for g in gathered)


def profile_timed(
    run: StageRun, model, devices: list[torch.device], length: int, items: list[CalibrationItem], work: Path
) -> tuple[float, Path]:
    """``profile_model`` on one length, every rank starting together: synchronised wall seconds, profile file."""
    config = ProfileConfig(
        lengths=(length,),
        block_size=run.args.block_size,
        model_name=MODEL_NAME,
        importance="gradient",
    )
    _sync(devices)
    run.ranks.barrier()
    _sync(devices)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    path = profile_model(model, {length: items}, config, work)[length]
    _sync(devices)
    return time.perf_counter() - t0, path


def warm_up(run: StageRun, model, devices: list[torch.device]) -> None:
    """Triton compile, cuBLAS handles: one short item per rank, not timed."""
    warm = run.args.warmup_len
    items = make_items(warm, run.ranks.world, 16, run.shape["vocab_size"], run.args.seed + 1)
    seconds, _ = profile_timed(run, model, devices, warm, items, Path(run.args.work) / "warmup")
    run.record["warmup_s"] = seconds
    run.say(f"warm-up {seconds:.1f} s")
    run.save()


def deadline_skips(run: StageRun, length: int, estimates: dict[int, float]) -> bool:
    """Whether this length would end after ``--stop-at`` (rank 0's estimate, the same decision on every rank)."""
    skip = 0.0
    if run.args.stop_at and run.lead:
        need = estimates.get(length, 0.0)
        if time.time() + need > run.args.stop_at:
            skip = 1.0
    flag = torch.tensor([skip], device=run.ranks.device)
    run.ranks.all_reduce(flag)  # the same decision on every rank
    return float(flag) > 0


def time_length(run: StageRun, model, devices: list[torch.device], length: int, estimates: dict[int, float]) -> None:
    """Profile ``--items`` items of one length and record the time, or why there is none (skipped, error)."""
    args = run.args
    row: dict = {"items": args.items}
    run.record["lengths"][str(length)] = row
    if deadline_skips(run, length, estimates):
        row.update(status="skipped", reason=f"deadline: needs ~{estimates.get(length, 0):.0f} s")
        run.say(f"{length}: skipped (deadline)")
        run.save()
        return
    items = make_items(length, args.items, args.answer, run.shape["vocab_size"], args.seed)
    row["status"] = "running"  # what a time-out leaves
    run.save()
    try:
        seconds, path = profile_timed(run, model, devices, length, items, Path(args.work))
    except Exception as err:
        row.update(status="error", error=repr(err)[:500], traceback=traceback.format_exc()[-2000:])
        run.say(f"{length}: {err!r}")
        if not run.cpu:
            torch.cuda.empty_cache()
        run.save()
        if run.ranks.world > 1:
            raise  # the other ranks wait in a collective: end the stage
        return
    record_timing(run, row, seconds, path, devices)
    run.say(f"{length}: {seconds:.2f} s for {args.items} items ({seconds / args.items:.3f} s/item)")
    run.save()


def record_timing(run: StageRun, row: dict, seconds: float, path: Path, devices: list[torch.device]) -> None:
    """One length's times (every rank's, gathered), peak memory and, on rank 0, a first look at the influence."""
    args, ranks = run.args, run.ranks
    times = torch.tensor([seconds], dtype=torch.float64, device=ranks.device)
    per_rank = [torch.zeros_like(times) for _ in range(ranks.world)]
    if ranks.world > 1:
        dist.all_gather(per_rank, times)
    else:
        per_rank = [times]
    row.update(
        status="done",
        seconds=seconds,
        seconds_per_item=seconds / args.items,
        seconds_per_rank=[float(t) for t in per_rank],
        items_per_rank=[len(range(r, args.items, ranks.world)) for r in range(ranks.world)],
        peak_gib={str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in devices if d.type == "cuda"},
        profile=str(path),
    )
    if run.lead:
        describe_profile(row, path)


def describe_profile(row: dict, path: Path) -> None:
    """A first look at one profile file: the influence's shape, norm, finiteness and item count."""
    influence, meta = load_profile(path)
    row["influence_shape"] = list(influence.shape)
    row["influence_norm"] = float(influence.double().norm())
    row["influence_finite"] = bool(torch.isfinite(influence).all())
    row["num_items_meta"] = meta.get("num_items")


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the results are written; an unclean exit changes nothing
            pass


# ----------------------------------------------------------------------------------------------- cli_dp2

CLI_TIME_NOTE = (
    "seconds_per_item: per length, the wall seconds that rank 0 of `moa-hub profile --num-gpus N` logs (from before "
    "the length's first item to its file written and every rank past the last barrier, CUDA-synchronised) / items. "
    "The command profiles the warm-up length first in the same run (Triton compile; warmup_s), so no timed length "
    "includes compilation. Not included: process start, accelerate launch, imports, model loading (cli_load_s, per "
    "rank); cli_wall_s is the whole command."
)


def _free_memory(run: StageRun) -> None:
    import gc

    gc.collect()
    if not run.cpu:
        torch.cuda.empty_cache()


def save_stage_model(run: StageRun, folder: Path) -> dict[str, list[float]]:
    """The model of the single stage (same seeds, dtype and device), saved with ``save_pretrained``; its checksums."""
    start = time.perf_counter()
    model = build_model(run.shape, run.dtype, run.device, run.args.seed)
    _sync([run.device])
    run.record["build_s"] = time.perf_counter() - start
    run.record["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    built = checksums(model)
    start = time.perf_counter()
    model.save_pretrained(folder)
    run.record["save_s"] = time.perf_counter() - start
    run.record["saved_files"] = sorted(p.name for p in folder.iterdir())
    del model
    _free_memory(run)
    return built


def reload_checksums(run: StageRun, folder: Path) -> dict[str, list[float]]:
    """Checksums of the weights ``from_pretrained`` gives back, loaded as ``load_model_for_profiling`` loads them on a
    data-parallel rank: its dtype (bf16 on CUDA, fp32 on the CPU), the whole model on this process's device."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    device_map = None if run.cpu else {"": run.device}
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=run.dtype, device_map=device_map, attn_implementation="sdpa"
    )
    sums = checksums(model)
    run.record["reload_s"] = time.perf_counter() - start
    del model
    _free_memory(run)
    return sums


def lengths_in_time(run: StageRun, estimates: dict[int, float]) -> list[int]:
    """The lengths whose estimated times, one after the other, end before ``--stop-at``; the rest recorded skipped.
    The command's start and loading come first: guessed as one reload of the folder plus 30 s."""
    args, kept = run.args, []
    need = run.record.get("reload_s", 0.0) + 30.0 if estimates else 0.0
    for length in args.lengths:
        need += estimates.get(length, 0.0)
        if args.stop_at and time.time() + need > args.stop_at:
            reason = f"deadline: needs ~{need:.0f} s with the lengths before it"
            run.record["lengths"][str(length)] = {"items": args.items, "status": "skipped", "reason": reason}
        else:
            kept.append(length)
            run.record["lengths"][str(length)] = {"items": args.items, "status": "running"}  # what a cut leaves
    return kept


def record_cli_length(run: StageRun, length: int, times: CliTimes, profiles: Path) -> None:
    """One time line of the command: the warm-up, or a timed length (its file is written when rank 0 logs)."""
    num_items, seconds = times.lengths[length]
    row = run.record["lengths"].get(str(length))
    if length == run.args.warmup_len:
        run.record["warmup_s"] = seconds
    elif row is not None:
        path = profile_path(profiles, length)
        row.update(status="done", items=num_items, seconds=seconds, seconds_per_item=seconds / num_items)
        row.update(
            profile=str(path), items_per_rank=[len(range(r, num_items, run.args.nproc)) for r in range(run.args.nproc)]
        )
        describe_profile(row, path)
    run.save()


def cli_stage(run: StageRun) -> None:
    """Save the model and the items, profile them with ``moa-hub profile --num-gpus N``, read its times back."""
    args, work = run.args, Path(run.args.work)
    if not run.cpu and run.dtype != torch.bfloat16:
        raise SystemExit("cli_dp2: the command loads the model in bf16 on CUDA; run it with --dtype bfloat16")
    if args.warmup_len in args.lengths:
        raise SystemExit(f"cli_dp2: --warmup-len {args.warmup_len} is one of --lengths; choose another")
    folder = work / "model"
    built = save_stage_model(run, folder)
    run.record["checksums"] = reload_checksums(run, folder)
    run.record["weights_reloaded_equal_built"] = run.record["checksums"] == built
    run.say(f"saved in {run.record['save_s']:.1f} s, reloaded in {run.record['reload_s']:.1f} s")
    run.save()
    vocab = run.shape["vocab_size"]
    items = {args.warmup_len: make_items(args.warmup_len, args.nproc, 16, vocab, args.seed + 1)}  # as warm_up
    lengths = lengths_in_time(run, _parse_estimates(args.estimates))
    items.update({n: make_items(n, args.items, args.answer, vocab, args.seed) for n in lengths})
    write_items_jsonl(work / "calibration.jsonl", items)
    profiles = work / "profiles"
    cmd = cli_command(folder, work / "calibration.jsonl", profiles, items, args.block_size, args.nproc)
    run.record.update(cli_command=cmd, cli_num_gpus=args.nproc, time_note=CLI_TIME_NOTE)
    run.save()
    times = CliTimes()

    def on_line(line: str) -> None:
        length = times.read(line)
        if length is not None:
            record_cli_length(run, length, times, profiles)

    start = time.perf_counter()
    try:
        rc = run_streaming(cmd, stage_env(args), "[cli] ", on_line)
    finally:
        run.record.update(cli_wall_s=time.perf_counter() - start, cli_load_s=dict(sorted(times.load_s.items())))
    run.record["cli_rc"] = rc
    if rc != 0:
        raise RuntimeError(f"moa-hub profile exited with {rc} (its output is in this stage's log)")


def profile_in_process(run: StageRun) -> None:
    """Build the model, check it, warm up, then time ``profile_model`` on each length."""
    model, devices = build_for_stage(run)
    sums = checksums(model)
    run.record["checksums"] = sums
    if run.ranks.world > 1:
        check_weights_across_ranks(run, sums)
    run.say(f"built in {run.record['build_s']:.1f} s on {run.record['param_devices']}")
    run.save()
    warm_up(run, model, devices)
    estimates = _parse_estimates(run.args.estimates)
    for length in run.args.lengths:
        time_length(run, model, devices, length, estimates)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def worker(args) -> None:
    """One stage in this process (cli_dp2: its driver, around the command)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("moa_hub").setLevel(logging.INFO)
    run = start_stage(args)
    try:
        record_environment(run)
        run.save()
        if args.worker == "cli_dp2":
            signal.signal(signal.SIGTERM, _interrupt)  # a time-out: record what the command got through
            cli_stage(run)
        else:
            profile_in_process(run)
        run.record["status"] = "done"
        run.save()
    except BaseException as err:
        run.record["status"] = "error"
        run.record["error"] = repr(err)[:500]
        run.record["traceback"] = traceback.format_exc()[-3000:]
        run.save()
        raise
    finally:
        if run.record["status"] == "done":
            leave_process_group()


# ----------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_command(stage: str, args, stage_lengths: list[int], estimates: dict[int, float], stop_at: float):
    script = str(Path(__file__).resolve())
    flags = ["--worker", stage, "--work", str(args.work / stage), "--json", str(args.out / f"{stage}.json")]
    flags += ["--lengths", *map(str, stage_lengths), "--items", str(args.items), "--answer", str(args.answer)]
    flags += ["--warmup-len", str(args.warmup_len), "--block-size", str(args.block_size), "--seed", str(args.seed)]
    flags += ["--stop-at", f"{stop_at:.3f}", "--dtype", args.dtype, "--nproc", str(args.nproc)]
    if estimates:
        flags += ["--estimates", ",".join(f"{n}:{s:.1f}" for n, s in estimates.items())]
    if args.tiny:
        flags.append("--tiny")
    if args.cpu:
        flags.append("--cpu")
    if stage != "dp2":  # cli_dp2 too: its command launches its own ranks
        return [sys.executable, script, *flags]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.nproc)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    return [*launch, script, *flags]


def stage_env(args) -> dict[str, str]:
    env = {**os.environ, **NCCL_SAFE_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu or args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # every rank on the CPU (gloo), as tests/test_profile.py
        env["OMP_NUM_THREADS"] = "1"
    return env


_CHILD: list[subprocess.Popen] = []


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # its own process group (same session): a time-out ends the launcher and all its ranks
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=os.setpgrp)
        _CHILD.append(proc)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        finally:
            _CHILD.remove(proc)
            _kill_group(proc)  # stray ranks of a launcher that already returned
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.perf_counter() - start, "timeout_s": timeout}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def _checksum_diff(a: dict, b: dict) -> dict:
    if not a or not b:
        return {"compared": False}
    if sorted(a) != sorted(b):
        return {"compared": True, "equal": False, "reason": "different parameter names"}
    worst = 0.0
    exact = True
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            exact &= x == y
            worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
    return {"compared": True, "exact": exact, "max_rel_diff": worst, "equal": worst < 1e-9}


def compare(report: dict, args) -> dict:
    """Influence of each stage vs single (rel Frobenius error), time per item vs single, weights vs single."""
    single = report["stages"].get("single", {}).get("result") or {}
    out: dict = {}
    for stage in STAGES[1:]:
        result = report["stages"].get(stage, {}).get("result") or {}
        entry: dict = {"weights_vs_single": _checksum_diff(result.get("checksums"), single.get("checksums"))}
        for length in args.lengths:
            key = str(length)
            mine, ref = result.get("lengths", {}).get(key, {}), single.get("lengths", {}).get(key, {})
            row: dict = {}
            if mine.get("status") == "done" and ref.get("status") == "done":
                got, got_meta = load_profile(Path(mine["profile"]))
                want, want_meta = load_profile(Path(ref["profile"]))
                if got.shape != want.shape:
                    row["error"] = f"shape {list(got.shape)} vs {list(want.shape)}"
                else:
                    row["rel_err"] = _rel_err(got, want)
                    row["max_abs_diff"] = float((got.double() - want.double()).abs().max())
                    row["single_norm"] = float(want.double().norm())
                    row["same_num_items"] = got_meta.get("num_items") == want_meta.get("num_items")
                row["time_ratio"] = mine["seconds_per_item"] / ref["seconds_per_item"]
                ok = row.get("rel_err", math.inf) < REL_ERR_MAX and entry["weights_vs_single"].get("equal", False)
                if stage in DP_STAGES:
                    ok = ok and row["time_ratio"] <= DP_RATIO_MAX
                row["meets_issue"] = bool(ok)
            row["status"] = f"{stage}: {mine.get('status', 'missing')}, single: {ref.get('status', 'missing')}"
            entry[key] = row
        out[stage] = entry
    return out


def summary_table(report: dict, args) -> str:
    lines = [
        "| stage | length | items | s / item | x single | influence rel err vs single | weights == single | peak GiB "
        "| meets issue | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in STAGES:
        info = report["stages"].get(stage)
        if info is None:
            continue
        result = info.get("result") or {}
        comp = report.get("compare", {}).get(stage, {})
        weights = comp.get("weights_vs_single", {})
        same = "-" if stage == "single" else (str(weights.get("equal")) if weights.get("compared") else "?")
        if stage == "dp2" and "weights_identical_across_ranks" in result:
            same += f" (ranks equal: {result['weights_identical_across_ranks']})"
        if stage == "cli_dp2" and "weights_reloaded_equal_built" in result:
            same += f" (as reloaded; built: {result['weights_reloaded_equal_built']})"
        lengths = result.get("lengths") or {}
        if not lengths:
            why = info.get("status", "?")
            if result.get("error"):
                why += ": " + result["error"][:80]
            lines.append(f"| {stage} | - | - | - | - | - | {same} | - | - | {why} |")
            continue
        for length in args.lengths:
            row = lengths.get(str(length))
            if row is None:
                continue
            c = comp.get(str(length), {})
            per = f"{row['seconds_per_item']:.3f}" if "seconds_per_item" in row else "-"
            ratio = f"{c['time_ratio']:.3f}" if "time_ratio" in c else "-"
            err = f"{c['rel_err']:.2e}" if "rel_err" in c else "-"
            peak = ", ".join(f"{v:.1f}" for v in row.get("peak_gib", {}).values()) or "-"
            status = row.get("status", "?") + (": " + row["error"][:60] if row.get("error") else "")
            if row.get("status") == "running":
                status = f"cut off ({info.get('status')})"
            verdict = {True: "yes", False: "NO"}.get(c.get("meets_issue"), "-")
            lines.append(
                f"| {stage} | {length} | {row.get('items')} | {per} | {ratio} | {err} | {same} | {peak} "
                f"| {verdict} | {status} |"
            )
    return "\n".join(lines)


def driver(args) -> None:
    t0 = T_START
    stop_at = t0 + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="moa_profile_multi_"))
    args.work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    report: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "issue_targets": {
            "rel_err_max": REL_ERR_MAX,
            "dp2_time_ratio_max": DP_RATIO_MAX,
            "time_ratio_stages": list(DP_STAGES),
            "weights": "equal to single",
        },
        "stages": {},
        "compare": {},
    }
    json_path = args.out / "profile_multi.json"
    env = stage_env(args)

    def finish() -> None:
        try:
            report["compare"] = compare(report, args)
        except Exception as err:  # noqa: BLE001 - keep the stage results
            report["compare_error"] = repr(err)
        report["total_s"] = time.time() - t0
        _write_json(json_path, report)

    def on_term(signum, frame):  # the outer time limit: keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    print(f"work dir {args.work}; deadline {args.deadline_s:.0f} s; stages {stages}", flush=True)
    current = None
    try:
        for stage in stages:
            current = stage
            left = stop_at - time.time() - args.reserve_s
            if left < args.min_stage_s:
                report["stages"][stage] = {"status": "skipped", "reason": f"deadline: {left:.0f} s left"}
                print(f"== {stage}: skipped ({left:.0f} s left)", flush=True)
                finish()
                continue
            stage_lengths = args.dm_lengths if stage == "device_map" and args.dm_lengths else args.lengths
            estimates = {}
            single = report["stages"].get("single", {}).get("result") or {}
            for n in stage_lengths:
                row = single.get("lengths", {}).get(str(n), {})
                if "seconds_per_item" in row:
                    share = 1.0 / args.nproc if stage in DP_STAGES else 1.0
                    estimates[n] = row["seconds_per_item"] * args.items * share * 1.3 + 3.0
            shutil.rmtree(args.work / stage, ignore_errors=True)
            (args.work / stage).mkdir(parents=True)
            (args.out / f"{stage}.json").unlink(missing_ok=True)
            cmd = stage_command(stage, args, stage_lengths, estimates, stop_at - args.reserve_s)
            print(f"== {stage}: up to {left:.0f} s (log {args.out / (stage + '.log')})", flush=True)
            info = run_stage(cmd, env, args.out / f"{stage}.log", left)
            stage_json = args.out / f"{stage}.json"
            info["result"] = _read_json(stage_json)
            info["status"] = "timed out" if info["timed_out"] else ("done" if info["rc"] == 0 else f"rc {info['rc']}")
            report["stages"][stage] = info
            print(f"== {stage}: {info['status']} in {info['wall_s']:.1f} s", flush=True)
            if info["rc"] != 0 or info["timed_out"]:
                tail = (args.out / f"{stage}.log").read_text(errors="replace").splitlines()[-25:]
                print("\n".join("   " + line[:300] for line in tail), flush=True)
            finish()
    except KeyboardInterrupt as err:
        for proc in list(_CHILD):
            _kill_group(proc)
        report["interrupted"] = repr(err)
        stage_json = args.out / f"{current}.json"
        if current is not None and current not in report["stages"]:
            report["stages"][current] = {"status": "interrupted", "result": _read_json(stage_json)}
        print(f"interrupted: {err!r}", flush=True)
    finally:
        finish()
        print(f"\nwrote {json_path} ({report['total_s']:.0f} s in all)")
        for stage in STAGES[1:]:
            result = (report["stages"].get(stage) or {}).get("result") or {}
            if stage == "device_map" and result.get("modules_per_device"):
                print(
                    f"device_map: {result.get('device_map_source')}; modules per device {result['modules_per_device']}"
                )
            if stage == "dp2" and result:
                print(
                    f"dp2: world {result.get('world')}, backend {result.get('backend')}, reduce device of rank 0 "
                    f"{result.get('reduce_device')}, ranks' weights identical: {result.get('weights_identical_across_ranks')}"
                )
            if stage == "cli_dp2" and result.get("cli_wall_s") is not None:
                print(
                    f"cli_dp2: `moa-hub profile --num-gpus {result.get('cli_num_gpus')}` ran {result['cli_wall_s']:.1f} s "
                    f"in all (model load per rank {result.get('cli_load_s')} s, warm-up length {result.get('warmup_s')} s); "
                    f"saved in {result.get('save_s', 0):.1f} s. {result.get('time_note')}"
                )
        print(summary_table(report, args), flush=True)
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_profile_multi"), help="folder for the JSON and logs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the profile files (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the profile files")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 8192 32768 (--tiny: 256 512)")
    parser.add_argument("--dm-lengths", type=int, nargs="+", default=None, help="device_map stage (default: --lengths)")
    parser.add_argument("--items", type=int, default=None, help="items per length, every stage (default 4; --tiny 2)")
    parser.add_argument("--answer", type=int, default=None, help="answer tokens per item (default 256; --tiny 32)")
    parser.add_argument("--warmup-len", type=int, default=None, help="warm-up item length (default 256; --tiny 64)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16",
        help="weights and activations on the GPU (float32: the run-to-run noise of the bf16 backward drops out)",
    )  # fmt: skip
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel ranks of the dp2 stage")
    parser.add_argument("--deadline-s", type=float, default=250.0, help="the whole run ends within this (seconds)")
    parser.add_argument("--reserve-s", type=float, default=12.0, help="kept back for the comparison at the end")
    parser.add_argument("--min-stage-s", type=float, default=None, help="a stage with less time left is skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny model, every stage on the CPU (gloo)")
    parser.add_argument("--cpu", action="store_true", help="every stage on the CPU (gloo)")
    parser.add_argument("--worker", choices=STAGES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--estimates", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "lengths": [256, 512] if tiny else [8192, 32768],
        "items": 2 if tiny else 4,
        "answer": 32 if tiny else 256,
        "warmup_len": 64 if tiny else 256,
        "min_stage_s": 5.0 if tiny else 30.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker is None:
        args.out = args.out.resolve()
        if args.work is not None:
            args.work = args.work.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()

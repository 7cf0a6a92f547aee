"""The ``cli_dp2`` stage of ``bench_profile_multi.py``: the real ``moa-hub profile`` command, end to end.

The stage (``cli_stage``) saves its model as a folder (``save_pretrained``) and its items as the JSONL that
``read_items_jsonl`` reads, runs ``python -m moa_hub.cli profile ... --num-gpus N`` (which re-executes itself under
``accelerate launch``), streams the command's output into the stage's log and reads the times back from the lines
the library logs: ``profile length N: K items in S s (P s / item)`` (rank 0, per length) and ``loaded ... in S s
(rank r of w)``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from profile_multi_model import build_model, checksums, make_items
from profile_multi_stage import StageRun, describe_profile, parse_estimates, stage_env, sync_devices

from moa_hub.profile import profile_path

LENGTH_LINE = re.compile(r"profile length (\d+): (\d+) items in (\d+(?:\.\d+)?) s")
LOAD_LINE = re.compile(r"loaded .* in (\d+(?:\.\d+)?) s \(rank (\d+) of (\d+)\)")


def write_items_jsonl(path: Path, items_by_length: dict[int, list]) -> int:
    """One ``{"length": N, "input_ids": [...], "answer_start": k}`` per line; returns the number of lines."""
    lines = [
        json.dumps({"length": length, "input_ids": item.input_ids, "answer_start": item.answer_start})
        for length, items in items_by_length.items()
        for item in items
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def cli_command(
    model_dir: Path, calibration: Path, work_dir: Path, lengths: Iterable[int], block_size: int, num_gpus: int
) -> list[str]:
    """``moa-hub profile`` as a module call (the console script need not be on PATH), gradient importance."""
    return [
        sys.executable, "-m", "moa_hub.cli", "profile", str(model_dir),
        "--calibration", str(calibration), "--work-dir", str(work_dir),
        "--profile-lengths", ",".join(str(n) for n in lengths), "--block-size", str(block_size),
        "--importance", "gradient", "--num-gpus", str(num_gpus),
    ]  # fmt: skip


@dataclass
class CliTimes:
    """What the command's log says: per length (items, wall seconds) and per rank the model load seconds."""

    lengths: dict[int, tuple[int, float]] = field(default_factory=dict)
    load_s: dict[int, float] = field(default_factory=dict)

    def read(self, line: str) -> int | None:
        """Take one log line; returns the length whose time it reports, if it is such a line."""
        if found := LENGTH_LINE.search(line):
            length = int(found.group(1))
            self.lengths[length] = (int(found.group(2)), float(found.group(3)))
            return length
        if found := LOAD_LINE.search(line):
            self.load_s[int(found.group(2))] = float(found.group(1))
        return None


def run_streaming(cmd: list[str], env: dict, prefix: str, on_line: Callable[[str], None]) -> int:
    """Run ``cmd`` (same process group: a driver's time-out ends it too), echo each output line with ``prefix``
    and hand it to ``on_line``; returns the exit code. An exception here (e.g. SIGTERM) ends the command."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            print(f"{prefix}{line}", end="", flush=True)
            on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


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
    sync_devices([run.device])
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
    lengths = lengths_in_time(run, parse_estimates(args.estimates))
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

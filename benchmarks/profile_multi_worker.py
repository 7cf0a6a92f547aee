"""The worker of ``bench_profile_multi.py``: one stage in this process (``--worker <stage>``, one rank of it under
accelerate launch). The in-process stages build the model, check it, warm up and time ``profile_model`` per length;
cli_dp2 runs the real command around it (``profile_multi_cli.py``).
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from profile_multi_cli import cli_stage
from profile_multi_model import build_model, build_sharded_model, checksums, make_items
from profile_multi_stage import (
    StageRun,
    describe_profile,
    leave_process_group,
    parse_estimates,
    record_environment,
    start_stage,
    sync_devices,
)

from moa_hub.profile import CalibrationItem, ProfileConfig, profile_model

MODEL_NAME = "random-llama-3-8b-shape"


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
    sync_devices(devices)
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
    sync_devices(devices)
    run.ranks.barrier()
    sync_devices(devices)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    path = profile_model(model, {length: items}, config, work)[length]
    sync_devices(devices)
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
    estimates = parse_estimates(run.args.estimates)
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

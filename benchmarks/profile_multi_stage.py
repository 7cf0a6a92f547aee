"""One process of a ``bench_profile_multi.py`` stage: its record (``StageRun``), how it starts and ends, and the
environment every stage process (and the command of cli_dp2) runs with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from bench_profile import environment
from profile_multi_model import model_shape

from moa_hub.profile import load_profile
from moa_hub.profile_runtime import Ranks

ROOT = Path(__file__).resolve().parent.parent  # the repository: on every stage's PYTHONPATH
# NVLink multicast stays off (the lent multi-GPU machines ask for it; harmless elsewhere)
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def stage_env(args) -> dict[str, str]:
    env = {**os.environ, **NCCL_SAFE_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu or args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # every rank on the CPU (gloo), as tests/test_profile.py
        env["OMP_NUM_THREADS"] = "1"
    return env


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def sync_devices(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def parse_estimates(text: str | None) -> dict[int, float]:
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
            write_json(Path(self.args.json), self.record)

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

"""`moa-hub profile`: block-summed attention influence per (layer, kv head) at each profile length."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from ..errors import ProfileError

HELP = """Profile the attention influence of a causal LM on calibration items (one file per length).

Examples:

  moa-hub profile ./llama --calibration work/calibration.jsonl --work-dir work

  moa-hub profile ./llama --calibration work/calibration.jsonl --work-dir work --profile-lengths 2048,4096 --num-gpus 4

  accelerate launch --multi_gpu --num_processes 4 -m moa_hub.cli profile ./llama --calibration c.jsonl --work-dir work

Finished lengths (work/profile_<N>.safetensors) are reused; an interrupted length resumes from its .partial file.

--importance measured (default) adds one forward per kv head per item per length: each kv head in turn is
restricted to sink + (min_span - sink) recent tokens, every other head dense, and the measured answer-loss change
rescales that head's gradient influence (its shape over blocks is kept). gradient keeps the first-order profile,
which mis-ranks heads whose attention sits on one far token when the model answers confidently.
"""


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as err:
        raise ProfileError(f"--profile-lengths {text!r} must be comma-separated integers, e.g. 2048,4096,8192") from err


def _relaunch(num_gpus: int) -> None:
    """Re-run this command under `accelerate launch` with one process per GPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus)]
    os.execv(sys.executable, [*cmd, "-m", "moa_hub.cli", *sys.argv[1:]])


def register(app: typer.Typer) -> None:
    @app.command("profile", help=HELP)
    def profile(
        model: str = typer.Argument(..., help="Model folder or Hub id."),
        calibration: Path = typer.Option(..., help="JSONL of items: {length, input_ids, answer_start} per line."),
        work_dir: Path = typer.Option(Path("moa-work"), help="Folder for profile_<N>.safetensors."),
        profile_lengths: str = typer.Option("2048,4096,8192", help="Comma-separated profile lengths."),
        block_size: int = typer.Option(64, help="Influence block size (tokens)."),
        revision: str = typer.Option(None, help="Model revision (branch, tag or commit)."),
        num_gpus: int = typer.Option(1, help="Data-parallel processes (one per GPU), via accelerate launch."),
        save_every: int = typer.Option(8, help="Items per rank between partial saves."),
        importance: str = typer.Option(
            "measured", help="measured: scale each kv head by its measured loss when made local; gradient: first-order."
        ),
        temperature: float = typer.Option(1.0, help="Profiling loss: cross-entropy of logits / temperature."),
        sink: int = typer.Option(64, help="Sink of the measured rule (importance=measured)."),
        min_span: int = typer.Option(128, help="Span of the measured rule (importance=measured)."),
    ) -> None:
        from ..profile import ProfileConfig, load_model_for_profiling, profile_model, read_items_jsonl

        if num_gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            _relaunch(num_gpus)
        config = ProfileConfig(
            lengths=_lengths(profile_lengths),
            block_size=block_size,
            save_every=save_every,
            importance=importance,
            temperature=temperature,
            sink=sink,
            min_span=min_span,
            model_name=f"{model}@{revision}" if revision else model,
        )
        items = read_items_jsonl(calibration)
        paths = profile_model(load_model_for_profiling(model, revision), items, config, work_dir)
        for length, path in sorted(paths.items()):
            typer.echo(f"{length}\t{path}")

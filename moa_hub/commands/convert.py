"""``moa-hub convert``: the whole plan search, export and (optionally) push."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

CONVERT_HELP = """Find a MoA plan for a model and write (and optionally push) the converted model.

Stages: resolve, calibrate, profile, optimize, validate, export, push. Each stage's artifact is kept in
the work folder (OUTPUT.moa-work by default); a re-run skips finished stages.

Examples:

  moa-hub convert meta-llama/Llama-3.1-8B-Instruct --output llama-moa --density 0.5

  moa-hub convert ./my-model --output my-moa --profile-lengths 1k,2k --extend-length 3072 --device cpu

  moa-hub convert Qwen/Qwen2.5-7B-Instruct --output qwen-moa --push --repo-id you/qwen2.5-7b-moa
"""


def convert(
    model: str = typer.Argument(..., help="Hub id (org/name) or local model folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the converted model to."),
    density: float = typer.Option(0.5, help="KV density bound at every profile length and the extend length."),
    profile_lengths: str = typer.Option("2k,4k,8k", "--profile-lengths", help="Lengths to profile at, e.g. 2k,4k,8k."),
    extend_length: int = typer.Option(None, "--extend-length", help="Unseen validation length (default 1.5x max)."),
    calibration: str = typer.Option("builtin", help="builtin, a Hub dataset id, or a jsonl/parquet/arrow path."),
    num_samples: int = typer.Option(4, "--num-samples", help="Calibration items per length."),
    block_size: int = typer.Option(64, "--block-size", help="Block size of the influence profile."),
    importance: str = typer.Option(
        "measured", help="Head importance: measured (each kv head's loss made local, measured) or gradient."
    ),
    temperature: float = typer.Option(1.0, help="Profiling loss: cross-entropy of logits / temperature."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16 or fp32."),
    revision: str = typer.Option(None, help="Base model revision (branch, tag or commit)."),
    work_dir: Path = typer.Option(None, "--work-dir", help="Where stage artifacts live (default OUTPUT.moa-work)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Reuse finished stages in the work folder (--no-resume starts over)."
    ),
    push: bool = typer.Option(False, "--push", help="Push the result to the Hub (needs --repo-id)."),
    repo_id: str = typer.Option(None, "--repo-id", help="Target repo for --push."),
    private: bool = typer.Option(False, "--private", help="Create the pushed repo as private."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Push as a pull request."),
    token: str = typer.Option(
        None, "--token", help="Hub token (default: HF_TOKEN or the saved login).", show_default=False
    ),
) -> None:
    from ..errors import MoaHubError
    from ..pipeline import ConvertConfig
    from ..pipeline import convert as run_convert
    from ..push import PushConfig
    from ..resolve import ResolveConfig
    from ..summary import print_summary
    from .options import parse_lengths

    if push and not repo_id:
        raise MoaHubError("--push needs --repo-id (e.g. --repo-id you/model-moa)")
    config = ConvertConfig(
        model=model, output=output, density=density, profile_lengths=parse_lengths(profile_lengths, "--profile-lengths"),
        extend_length=extend_length, calibration=calibration, num_samples=num_samples, block_size=block_size,
        importance=importance, temperature=temperature,
        device=device, dtype=dtype, work_dir=work_dir, overwrite=overwrite, resume=resume,
        resolve=ResolveConfig(revision=revision, token=token or None),
        push=PushConfig(repo_id=repo_id, private=private, create_pr=create_pr, token=token or None) if push else None,
        command=shlex.join(["moa-hub", *(a for a in sys.argv[1:] if a != token)]),
    )  # fmt: skip
    print_summary(run_convert(config))


def register(app: typer.Typer) -> None:
    app.command(help=CONVERT_HELP)(convert)

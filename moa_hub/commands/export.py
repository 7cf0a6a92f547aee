"""``moa-hub export`` and ``moa-hub inspect``."""

from __future__ import annotations

from pathlib import Path

import typer

EXPORT_HELP = """Write a MoA model folder from a base model folder and a plan.

The folder loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
PLAN is a moa plan (moa_plan.json, or a config.json with a "moa" block) or a research-code
file {"alphas", "betas"} with one value per query head (mapped to kv heads).

Examples:

  moa-hub export ./Llama-3.2-1B-Instruct --plan plan.json --output ./llama-moa

  moa-hub export ./Qwen2.5-7B --plan thu_alpha_beta.json --sink 64 --min-span 128 --output out --overwrite
"""

INSPECT_HELP = """Print the plan of an exported MoA folder (or of a plan file): sink, min_span,
KV density at a few lengths, and per-layer spans (mean / min / max over kv heads).

Example:

  moa-hub inspect ./llama-moa
"""


def register(app: typer.Typer) -> None:
    app.command("export", help=EXPORT_HELP)(export_command)
    app.command("inspect", help=INSPECT_HELP)(inspect_command)


def export_command(
    model: str = typer.Argument(
        ..., help="Base model folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)."
    ),
    plan: Path = typer.Option(..., "--plan", help="Plan JSON file."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    sink: int | None = typer.Option(None, "--sink", help="Sink tokens for a research-code plan (default 64)."),
    min_span: int | None = typer.Option(
        None, "--min-span", help="Minimum span for a research-code plan (default 128)."
    ),
) -> None:
    from ..export import ExportConfig, export

    path = export(
        ExportConfig(model=model, plan=plan, output=output, overwrite=overwrite, sink=sink, min_span=min_span)
    )
    typer.echo(f"Wrote {path}")


def inspect_command(
    folder: Path = typer.Argument(..., help="Exported MoA folder, or a moa plan JSON file."),
) -> None:
    from ..plan_report import inspect_folder

    typer.echo(inspect_folder(folder))

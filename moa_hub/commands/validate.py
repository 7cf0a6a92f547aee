"""``moa-hub validate``: score Pareto plans at an unseen longer length, with the remote code users run."""

from __future__ import annotations

from pathlib import Path

import typer

VALIDATE_HELP = """Score every plan of a Pareto front (moa-hub optimize) at an unseen, longer length.

The loss is the answer-only cross-entropy on held-out calibration items of that length, run through the
MoA remote code; the lowest loss wins. Writes validation.json (losses, densities, dense loss, best index).

Example:

  moa-hub validate ./llama --pareto work/pareto.json --calibration work/calibration/calibration-ab12.jsonl --length 12288
"""


def validate(
    model: Path = typer.Argument(..., exists=True, file_okay=False, help="The dense base model folder."),
    pareto: Path = typer.Option(
        ..., "--pareto", exists=True, dir_okay=False, help="pareto.json from moa-hub optimize."
    ),
    calibration: Path = typer.Option(..., "--calibration", exists=True, dir_okay=False, help="Calibration jsonl."),
    length: int = typer.Option(..., "--length", help="Validation length: items of this length bucket are used."),
    output: Path = typer.Option(Path("validation.json"), "--output", "-o", help="Where to write the result."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16 or fp32."),
) -> None:
    from ..calibration import by_length, load_items
    from ..errors import MoaHubError
    from ..pareto import load_pareto
    from ..pipeline import load_dense
    from ..plan import MoaPlan
    from ..validate import validate_plans

    items = by_length(load_items(calibration)).get(length)
    if not items:
        raise MoaHubError(f"{calibration} has no items of length {length}: pass one of its lengths to --length")
    candidates = [MoaPlan(alpha=p.alpha, beta=p.beta, sink=p.sink, min_span=p.min_span) for p in load_pareto(pareto)]
    dense, _ = load_dense(model, device, dtype)
    result = validate_plans(dense, candidates, items, length)
    result.save(output)
    for index, (loss, density) in enumerate(zip(result.losses, result.densities, strict=True)):
        mark = "  <- best" if index == result.best else ""
        typer.echo(f"plan {index + 1}: density {density:.3f} loss {loss:.4f}{mark}")
    typer.echo(f"dense loss {result.dense_loss:.4f}; written to {output}")


def register(app: typer.Typer) -> None:
    app.command(help=VALIDATE_HELP)(validate)

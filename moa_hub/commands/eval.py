"""``moa-hub eval``: MoA vs dense vs a uniform window of the same density."""

from __future__ import annotations

from pathlib import Path

import typer

EVAL_HELP = """Evaluate a converted MoA model against its dense base and a uniform (StreamingLLM-style) plan.

Tasks: retrieval (key-value lines, needle at each decile), passkey, ppl (held-out text). Writes
MODEL/eval.json and refreshes the model card's evaluation table.

Examples:

  moa-hub eval llama-moa --lengths 1k,2k,4k

  moa-hub eval demo-moa --tasks retrieval --compare dense,uniform --items-per-depth 2
"""


def eval_command(
    model: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder written by moa-hub convert/export."),
    lengths: str = typer.Option("1k,2k,4k", "--lengths", help="Input lengths to score at, e.g. 1k,2k,4k."),
    tasks: str = typer.Option("retrieval,passkey,ppl", help="Comma-separated: retrieval, passkey, ppl."),
    compare: str = typer.Option("dense,uniform", help="Baselines: dense, uniform (comma-separated, or '')."),
    items_per_depth: int = typer.Option(1, "--items-per-depth", help="Items per needle decile and length."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    card: bool = typer.Option(True, help="Refresh the model card with the results."),
) -> None:
    from ..card import CardConfig, write_card
    from ..compare import EvalConfig, card_entries, report_rows, run_eval
    from .options import parse_lengths

    config = EvalConfig(
        model=model,
        lengths=parse_lengths(lengths, "--lengths"),
        tasks=tuple(t for t in tasks.split(",") if t),
        compare=tuple(c for c in compare.split(",") if c),
        items_per_depth=items_per_depth,
        device=device,
    )
    report = run_eval(config)
    rows = report_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    if card:
        write_card(model, CardConfig(evaluation=card_entries(report)))


def register(app: typer.Typer) -> None:
    app.command("eval", help=EVAL_HELP)(eval_command)

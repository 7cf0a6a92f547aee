"""The table printed at the end of a conversion."""

from __future__ import annotations

import typer


def print_summary(result) -> None:
    plan, validation = result.plan, result.validation
    typer.echo(f"\nMoA plan written to {result.output}")
    typer.echo(f"{'length':>8} | {'KV density':>10}")
    for n in sorted(plan.density):
        typer.echo(f"{n:>8} | {plan.density[n]:>10.3f}")
    best = validation.losses[validation.best]
    typer.echo(
        f"validation at {validation.length} tokens ({validation.num_items} items): "
        f"MoA loss {best:.4f} vs dense {validation.dense_loss:.4f} "
        f"(plan {validation.best + 1} of {len(validation.losses)} on the Pareto front)"
    )
    if result.pushed_url:
        typer.echo(f"pushed: {result.pushed_url}")

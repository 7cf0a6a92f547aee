"""``moa-hub optimize``: the Pareto front of plans from a folder of influence profiles."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ..optimize import OptimizeConfig, optimize_plans
from ..pareto import save_pareto
from ..search_space import DEFAULT_BETAS, SearchSpace

logger = logging.getLogger(__name__)


def optimize_command(
    profile_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of *.safetensors profiles."),
    density: float = typer.Option(
        ..., "--density", help="KV-density bound at every profile length and the extend length."
    ),
    extend_length: int | None = typer.Option(None, "--extend-length", help="Longer, unprofiled length to bound too."),
    output: Path = typer.Option(Path("pareto.json"), "--output", "-o", help="Where to write the Pareto front (JSON)."),
    sink: int = typer.Option(64, "--sink", help="Tokens always visible at the start."),
    min_span: int = typer.Option(128, "--min-span", help="Smallest span of any head (> sink)."),
    betas: str = typer.Option(
        ",".join(map(str, DEFAULT_BETAS)), "--betas", help="Comma-separated beta grid in [0, 1]."
    ),
    alpha_points: int = typer.Option(16, "--alpha-points", help="Linear alpha grid points per side of 0."),
    weight_steps: int = typer.Option(2, "--weight-steps", help="Divisions of the simplex of length weights."),
    time_limit: float = typer.Option(120.0, "--time-limit", help="Seconds per MILP solve."),
    mip_gap: float = typer.Option(
        OptimizeConfig.mip_rel_gap, "--mip-gap", help="Relative optimality gap of each MILP."
    ),
) -> None:
    """Search one elastic rule per kv head: least profiled loss with KV density <= --density.

    Examples:

      moa-hub optimize work/profile --density 0.5 --extend-length 12288 --output pareto.json

      moa-hub optimize work/profile --density 0.3 --min-span 256 --weight-steps 3
    """
    space = SearchSpace(betas=tuple(float(b) for b in betas.split(",") if b.strip()), alpha_points=alpha_points)
    config = OptimizeConfig(
        density=density,
        extend_length=extend_length,
        sink=sink,
        min_span=min_span,
        search_space=space,
        weight_steps=weight_steps,
        time_limit_s=time_limit,
        mip_rel_gap=mip_gap,
    )
    plans = optimize_plans(profile_dir, config)
    save_pareto(output, plans, config)
    for k, plan in enumerate(plans):
        dens = ", ".join(f"{n}: {d:.3f}" for n, d in plan.density.items())
        loss = ", ".join(f"{n}: {v:.4g}" for n, v in plan.loss.items())
        typer.echo(f"plan {k}: density {{{dens}}} loss {{{loss}}}")
    typer.echo(f"wrote {len(plans)} plans to {output}")


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize_command)

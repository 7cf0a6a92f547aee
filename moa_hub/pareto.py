"""Candidate plans of the plan search (a Pareto front over the profile lengths) and their JSON file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OptimizeError

FORMAT_VERSION = 1


@dataclass
class ParetoPlan:
    """One rule per kv head, with what it costs.

    ``density``: the contract's KV density at each bounded length (profile lengths + extend length).
    ``loss``: summed profiled loss over heads at each profile length (lower is better).
    ``weights``: the weight over profile lengths whose MILP produced this plan.
    """

    alpha: np.ndarray  # [L, Hkv] float64
    beta: np.ndarray  # [L, Hkv] float64
    sink: int
    min_span: int
    density: dict[int, float]
    loss: dict[int, float]
    weights: dict[int, float]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha.tolist(),
            "beta": self.beta.tolist(),
            "sink": self.sink,
            "min_span": self.min_span,
            "density": {str(n): d for n, d in self.density.items()},
            "loss": {str(n): v for n, v in self.loss.items()},
            "weights": {str(n): w for n, w in self.weights.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> ParetoPlan:
        return cls(
            alpha=np.asarray(data["alpha"], dtype=np.float64),
            beta=np.asarray(data["beta"], dtype=np.float64),
            sink=int(data["sink"]),
            min_span=int(data["min_span"]),
            density={int(n): float(d) for n, d in data["density"].items()},
            loss={int(n): float(v) for n, v in data["loss"].items()},
            weights={int(n): float(w) for n, w in data["weights"].items()},
        )


def _dominates(a: ParetoPlan, b: ParetoPlan) -> bool:
    """a is no worse than b at every profile length and better at one."""
    return all(a.loss[n] <= b.loss[n] for n in b.loss) and any(a.loss[n] < b.loss[n] for n in b.loss)


def pareto_filter(plans: list[ParetoPlan]) -> list[ParetoPlan]:
    """Keep plans no other plan dominates; of plans with equal losses (or the same rules), the first."""
    front: list[ParetoPlan] = []
    for plan in plans:
        same = any(
            p.loss == plan.loss or (np.array_equal(p.alpha, plan.alpha) and np.array_equal(p.beta, plan.beta))
            for p in front
        )
        if same or any(_dominates(p, plan) for p in plans):
            continue
        front.append(plan)
    return front


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def save_pareto(path: str | Path, plans: list[ParetoPlan], config=None) -> Path:
    """Write the front as JSON, with the config that produced it (``config``: any dataclass)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format_version": FORMAT_VERSION, "config": _jsonable(config), "plans": [p.to_dict() for p in plans]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # the artifact exists only when complete (resume = file exists)
    return path


def load_pareto(path: str | Path) -> list[ParetoPlan]:
    """Read a front written by save_pareto."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OptimizeError(f"cannot read the Pareto front {path}: {err}; re-run `moa-hub optimize`") from err
    if data.get("format_version") != FORMAT_VERSION:
        raise OptimizeError(
            f"{path} has format_version {data.get('format_version')}, expected {FORMAT_VERSION}: re-run `moa-hub optimize`"
        )
    return [ParetoPlan.from_dict(p) for p in data["plans"]]

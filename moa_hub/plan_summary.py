"""Numbers a person reads about a plan (``config.json["moa"]``), computed with the contract's own functions."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError
from .remote import remote_module


@dataclass(frozen=True)
class PlanSummary:
    """A read-only view of the plan dict: sink, min_span, alpha/beta [L][H], density {N: d}, provenance."""

    sink: int
    min_span: int
    alpha: list[list[float]]
    beta: list[list[float]]
    density: dict[int, float]
    provenance: dict

    @classmethod
    def from_plan(cls, plan: dict) -> PlanSummary:
        try:
            alpha, beta = plan["alpha"], plan["beta"]
            summary = cls(
                sink=int(plan["sink"]),
                min_span=int(plan["min_span"]),
                alpha=[list(map(float, row)) for row in alpha],
                beta=[list(map(float, row)) for row in beta],
                density={int(n): float(d) for n, d in (plan.get("density") or {}).items()},
                provenance=dict(plan.get("provenance") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"config.json 'moa' block is malformed ({err!r}): re-export the model.") from None
        if [len(r) for r in summary.alpha] != [len(r) for r in summary.beta] or not summary.alpha:
            raise PlanError("config.json 'moa' alpha and beta must both be [layers][kv heads]: re-export the model.")
        return summary

    @property
    def num_layers(self) -> int:
        return len(self.alpha)

    @property
    def num_kv_heads(self) -> int:
        return len(self.alpha[0])

    @property
    def lengths(self) -> list[int]:
        """The lengths the plan was budgeted at (or a default ladder when it records none)."""
        return sorted(self.density) or [1024, 4096, 16384]

    def span_grid(self, n: int) -> list[list[int]]:
        span_at = remote_module("moa_spans").span_at
        return [
            [span_at(n, a, b, self.sink, self.min_span) for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(self.alpha, self.beta, strict=True)
        ]

    def density_at(self, n: int) -> float:
        return remote_module("moa_spans").kv_density(self.alpha, self.beta, n, self.sink, self.min_span)

    def density_budgets(self) -> dict[int, float]:
        """The optimizer's density bound per length (provenance.density_bounds), if recorded."""
        bounds = self.provenance.get("density_bounds") or {}
        return {int(n): float(d) for n, d in sorted(bounds.items(), key=lambda kv: int(kv[0]))}

    def curve_lengths(self) -> list[int]:
        top = max(self.lengths[-1] * 2, 4 * self.min_span)
        n, out = max(self.min_span // 2, 16), []
        while n <= top:
            out.append(n)
            n *= 2
        return out

    def density_rows(self) -> list[dict]:
        """One row per planned length: the budget (if any) and the density the plan reaches."""
        budgets = self.density_budgets()
        return [{"length": n, "budget": budgets.get(n), "density": self.density_at(n)} for n in self.lengths]

    def layer_rows(self) -> list[dict]:
        """Per layer at the longest planned length: min / mean / max span and the number of dense heads."""
        n = self.lengths[-1]
        rows = []
        for layer, spans in enumerate(self.span_grid(n)):
            rows.append(
                {
                    "layer": layer,
                    "min": min(spans),
                    "mean": round(sum(spans) / len(spans)),
                    "max": max(spans),
                    "dense": sum(s == n for s in spans),
                }
            )
        return rows

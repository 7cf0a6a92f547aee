"""Numbers a person reads about a plan (``config.json["moa"]``), computed with the contract's own functions."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import MoaPlan


@dataclass(frozen=True)
class PlanSummary:
    """A read-only view of a validated plan (``config.json["moa"]``) for the card and its pictures."""

    plan: MoaPlan

    @classmethod
    def from_plan(cls, plan: dict) -> PlanSummary:
        return cls(MoaPlan.from_dict(plan))

    @property
    def sink(self) -> int:
        return self.plan.sink

    @property
    def min_span(self) -> int:
        return self.plan.min_span

    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.plan.num_kv_heads

    @property
    def provenance(self) -> dict:
        return self.plan.provenance.to_dict() if self.plan.provenance else {}

    @property
    def lengths(self) -> list[int]:
        """The lengths the plan was budgeted at (or a default ladder when it records none)."""
        return sorted(self.plan.density) or [1024, 4096, 16384]

    def span_grid(self, n: int) -> list[list[int]]:
        return self.plan.spans_at(n).tolist()

    def density_at(self, n: int) -> float:
        return self.plan.kv_density(n)

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

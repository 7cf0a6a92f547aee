"""One rule per head under token budgets: a multiple-choice knapsack, solved exactly with HiGHS.

Variables are the candidate (head, rule) pairs ``v``; ``x_v`` binary, one per head, and
``sum_v x_v * spans[v, k] <= budget[k]`` for every bounded length k. Before the MILP:

1. the LP relaxation gives a lower bound LB and duals (it has at most K fractional heads);
2. rounding each fractional head to its cheapest rule no larger (at every length) than its LP mix
   gives a feasible plan, improved by a local search into the incumbent UB;
3. reduced-cost fixing: a variable whose reduced cost exceeds UB - LB is in no solution better than
   the incumbent, so it is dropped. The MILP over what is left returns the same optimum, much faster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix, csr_matrix

from .errors import OptimizeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidates:
    """Candidate variables: head of each, its cost and its spans at the K bounded lengths."""

    head: np.ndarray  # [V] int
    cost: np.ndarray  # [V] float64, >= 0
    spans: np.ndarray  # [V, K] int64
    heads: int

    def matrices(self) -> tuple[csr_matrix, csr_matrix]:
        """Assignment rows [H, V] and span rows [K, V]."""
        num_vars = len(self.head)
        assign = coo_matrix((np.ones(num_vars), (self.head, np.arange(num_vars))), shape=(self.heads, num_vars))
        return assign.tocsr(), csr_matrix(self.spans.T.astype(np.float64))

    def subset(self, keep: np.ndarray) -> Candidates:
        return Candidates(self.head[keep], self.cost[keep], self.spans[keep], self.heads)


def _lp_bound(cand: Candidates, budget: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """LP relaxation: (x [V], LB, reduced costs [V] >= 0). x <= 1 is implied by the assignment rows."""
    assign, span_rows = cand.matrices()
    res = linprog(
        cand.cost, A_ub=span_rows, b_ub=budget, A_eq=assign, b_eq=np.ones(cand.heads), bounds=(0, None), method="highs"
    )
    if res.status != 0:
        raise OptimizeError(f"the LP relaxation failed ({res.message}); raise --density")
    reduced = cand.cost - assign.T @ res.eqlin.marginals - span_rows.T @ res.ineqlin.marginals
    return res.x, float(res.fun), reduced


def _round_down(cand: Candidates, x: np.ndarray) -> np.ndarray:
    """Feasible 0/1 choice [V]: each head takes its cheapest candidate no larger than its LP mix."""
    mix = np.zeros((cand.heads, cand.spans.shape[1]))
    np.add.at(mix, cand.head, x[:, None] * cand.spans)  # [H, K] spans the LP pays per head
    fits = (cand.spans <= mix[cand.head] + 1e-6).all(axis=1)
    masked = np.where(fits, cand.cost, np.inf)
    order = np.lexsort((masked, cand.head))  # by head, then cost
    first = np.r_[True, cand.head[order][1:] != cand.head[order][:-1]]
    choice = np.zeros(len(x), dtype=bool)
    choice[order[first]] = True
    if not np.isfinite(masked[choice]).all():
        raise OptimizeError("internal error: a head has no candidate below its LP mix (smallest rule missing)")
    return choice


def _improve(cand: Candidates, choice: np.ndarray, budget: np.ndarray, passes: int = 2) -> np.ndarray:
    """Local search on a feasible choice [V] bool: each head in turn moves to its cheapest candidate
    that fits in the budget left over (heads in order of what they could gain)."""
    choice = choice.copy()
    residual = budget - cand.spans[choice].sum(axis=0)  # [K]
    by_head = np.split(
        np.argsort(cand.head, kind="stable"), np.cumsum(np.bincount(cand.head, minlength=cand.heads))[:-1]
    )
    current = np.empty(cand.heads, dtype=np.int64)
    current[cand.head[choice]] = np.flatnonzero(choice)
    for _ in range(passes):
        gain = cand.cost[current] - np.array([cand.cost[v].min() for v in by_head])
        moved = False
        for h in np.argsort(-gain):
            options, now = by_head[h], current[h]
            fits = (cand.spans[options] <= residual + cand.spans[now]).all(axis=1)
            best = options[fits][np.argmin(cand.cost[options[fits]])]
            if cand.cost[best] < cand.cost[now]:
                residual += cand.spans[now] - cand.spans[best]
                choice[now], choice[best], current[h], moved = False, True, best, True
        if not moved:
            break
    return choice


def solve_assignment(cand: Candidates, budget: np.ndarray, time_limit_s: float, mip_rel_gap: float) -> np.ndarray:
    """Indices into the candidates of the chosen variable of each head, [H] (exact up to mip_rel_gap)."""
    start = time.perf_counter()
    x_lp, lower, reduced = _lp_bound(cand, budget)
    incumbent = _improve(cand, _round_down(cand, x_lp), budget)
    upper = float(cand.cost[incumbent].sum())
    slack = (upper - lower) + 1e-9 * max(1.0, abs(upper))
    keep = (reduced <= slack) | incumbent
    if upper - lower <= mip_rel_gap * abs(upper) + 1e-12:
        chosen = np.flatnonzero(incumbent)
    else:
        chosen = np.flatnonzero(keep)[_milp(cand.subset(keep), budget, time_limit_s, mip_rel_gap)]
        if cand.cost[chosen].sum() > upper:
            chosen = np.flatnonzero(incumbent)
    logger.debug(
        "assignment: %d -> %d vars, LB %.6g, rounded %.6g, final %.6g, %.2fs",
        len(cand.head),
        int(keep.sum()),
        lower,
        upper,
        cand.cost[chosen].sum(),
        time.perf_counter() - start,
    )
    return chosen[np.argsort(cand.head[chosen])]


def _milp(cand: Candidates, budget: np.ndarray, time_limit_s: float, mip_rel_gap: float) -> np.ndarray:
    assign, span_rows = cand.matrices()
    constraints = [LinearConstraint(assign, 1, 1), LinearConstraint(span_rows, -np.inf, budget)]
    options = {"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap, "presolve": True}
    res = milp(cand.cost, integrality=np.ones(len(cand.head)), bounds=(0, 1), constraints=constraints, options=options)
    if res.x is None:
        raise OptimizeError(f"the MILP found no plan ({res.message}); raise --density or --time-limit")
    if not res.success:
        logger.warning("MILP stopped early (%s): using the best plan found", res.message)
    return np.flatnonzero(res.x > 0.5)

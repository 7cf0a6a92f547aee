"""Plan search: one elastic rule per kv head, minimum profiled loss under a KV-density budget.

For every weight vector over the profile lengths we solve one mixed-integer program with
scipy's HiGHS ``milp`` (open source, no licence)::

    min  sum_h sum_r x[h, r] * sum_N w_N * loss[h, r, N] / scale_N
    s.t. sum_r x[h, r] = 1                                   for every kv head h
         sum_{h, r} x[h, r] * S_r(N) <= floor(bound * H * N)  for N in profile lengths + extend length
         x binary

(the density rows are written in whole tokens, so a solution that HiGHS accepts never exceeds the
bound by a rounding error). Rules that are dominated for a head (no cheaper and no smaller at every
length) are pruned before the solve, and ``assignment.solve_assignment`` shrinks the MILP further with
an LP bound and reduced-cost fixing. The solutions form a Pareto front over the profile lengths.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .assignment import Candidates, solve_assignment
from .errors import OptimizeError
from .influence import InfluenceProfile, as_profiles
from .pareto import ParetoPlan, pareto_filter
from .remote import remote_module
from .search_space import RuleSet, SearchSpace, build_rules, masked_fraction, rule_losses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything the plan search needs besides the profiles."""

    density: float  # bound on the plan's KV density at every profile length and the extend length
    extend_length: int | None = None  # an unprofiled, longer length the density is bounded at too
    sink: int = 64
    min_span: int = 128
    search_space: SearchSpace = field(default_factory=SearchSpace)
    weight_steps: int = 2  # weight vectors: simplex lattice over the profile lengths (+ uniform)
    block_size: int = 64  # only for in-memory arrays; files carry their own
    time_limit_s: float = 120.0  # per MILP
    mip_rel_gap: float = 5e-3  # relative to the loss the budget adds over every head's best rule
    extrapolate: bool = True  # also minimise the loss at extend_length, scaled from the longest profile

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise OptimizeError(f"density bound must be in (0, 1], got {self.density}: pass e.g. --density 0.5")
        if self.extend_length is not None and self.extend_length < 1:
            raise OptimizeError(f"extend_length must be a positive length, got {self.extend_length}")
        if self.weight_steps < 1:
            raise OptimizeError(f"weight_steps must be >= 1, got {self.weight_steps}")


@dataclass(frozen=True)
class LossTable:
    """The optimizer's input, per head h and rule r: loss[N] [H, R], rule densities, the shape."""

    rules: RuleSet
    loss: dict[int, np.ndarray]  # profile length -> [H, R]
    density_lengths: list[int]  # profile lengths + extend length
    num_layers: int
    num_kv_heads: int


def build_loss_table(profiles: dict[int, InfluenceProfile], config: OptimizeConfig) -> LossTable:
    """Rules of the search space and the loss of each rule for each head at each profile length."""
    lengths = sorted(profiles)
    density_lengths = sorted(set(lengths) | ({config.extend_length} if config.extend_length else set()))
    rules = build_rules(config.search_space, density_lengths, config.sink, config.min_span)
    loss = {}
    for n in lengths:
        fraction = masked_fraction(rules, n, profiles[n].block_size)  # once per rule and length
        loss[n] = rule_losses(profiles[n].influence, fraction)
    if config.extrapolate and config.extend_length and config.extend_length > lengths[-1]:
        loss[config.extend_length] = extrapolated_losses(profiles[lengths[-1]], rules, config.extend_length)
    layers, groups = profiles[lengths[0]].influence.shape[:2]
    logger.info("search space: %d distinct rules, %d heads, lengths %s", len(rules), layers * groups, density_lengths)
    return LossTable(rules, loss, density_lengths, layers, groups)


def extrapolated_losses(profile: InfluenceProfile, rules: RuleSet, length: int) -> np.ndarray:
    """Loss [H, R] of each rule at an unprofiled ``length`` > ``profile.length``, assuming each head's
    influence keeps its shape over *relative* position: rule (alpha, beta) at ``length`` costs what
    (alpha * c, beta), c = profile.length / length, costs at the profiled length (the same share of
    every query's context masked, up to the absolute sink and min_span)."""
    scale = profile.length / length
    scaled = RuleSet(rules.alpha * scale, rules.beta, rules.sink, rules.min_span, spans={})
    fraction = masked_fraction(scaled, profile.length, profile.block_size)
    return rule_losses(profile.influence, fraction)


def smallest_density(rules: RuleSet, lengths: list[int]) -> tuple[float, int]:
    """Density of the all-smallest-span plan at its binding length (the largest over lengths)."""
    by_length = {n: float(rules.spans[n].min()) / n for n in lengths}
    binding = max(by_length, key=by_length.get)
    return by_length[binding], binding


def check_feasible(table: LossTable, bound: float) -> None:
    heads = table.num_layers * table.num_kv_heads
    for n in table.density_lengths:
        if int(table.rules.spans[n].min()) * heads > _token_budget(bound, heads, n):
            least, binding = smallest_density(table.rules, table.density_lengths)
            suggest = math.ceil(round(least * 1e4, 6)) / 1e4
            raise OptimizeError(
                f"density bound {bound} is infeasible: the smallest feasible plan density is {least:.4f} "
                f"(every head at the smallest span, {table.rules.min_span} tokens, binding at length {binding}); "
                f"rerun with --density {suggest} or higher, or lower --min-span"
            )


def _token_budget(bound: float, heads: int, length: int) -> int:
    return math.floor(bound * heads * length + 1e-9)


def weight_vectors(lengths: list[int], steps: int) -> list[dict[int, float]]:
    """Simplex lattice over the profile lengths with `steps` divisions, plus the uniform vector."""
    grid = [c for c in itertools.product(range(steps + 1), repeat=len(lengths)) if sum(c) == steps]
    vectors = [tuple(k / steps for k in c) for c in sorted(grid, reverse=True)]
    uniform = tuple(1.0 / len(lengths) for _ in lengths)
    if not any(np.allclose(v, uniform) for v in vectors):
        vectors.append(uniform)
    return [dict(zip(lengths, v, strict=True)) for v in vectors]


def _objective(table: LossTable, weights: dict[int, float]) -> np.ndarray:
    """Weighted, per-length normalised loss [H, R]; each length is scaled by its largest head losses."""
    total = np.zeros_like(next(iter(table.loss.values())))
    for n, w in weights.items():
        scale = float(np.abs(table.loss[n]).max(axis=1).sum()) or 1.0
        total += (w / scale) * table.loss[n]
    return total


def prune_dominated(objective: np.ndarray, spans: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Mask [H, R] of the rules worth keeping per head.

    Rule r is dropped for head h if some rule r' has span <= at every density length and objective
    <= (strictly better somewhere, ties broken by index); some optimum always survives.
    spans: [R, K] spans at the density lengths.
    """
    rules = spans.shape[0]
    no_larger = (spans[:, None, :] <= spans[None, :, :]).all(-1)  # [r', r]
    smaller = (spans[:, None, :] < spans[None, :, :]).any(-1)
    earlier = np.arange(rules)[:, None] < np.arange(rules)[None, :]
    keep = np.empty(objective.shape, dtype=bool)
    for start in range(0, objective.shape[0], chunk):
        obj = objective[start : start + chunk]  # [h, R]
        cheaper = obj[:, :, None] < obj[:, None, :]  # [h, r', r]
        tie = (obj[:, :, None] == obj[:, None, :]) & (smaller | earlier)
        keep[start : start + chunk] = ~(no_larger & (cheaper | tie)).any(axis=1)
    return keep


def solve_weighted(table: LossTable, weights: dict[int, float], config: OptimizeConfig) -> np.ndarray:
    """One MILP: the rule index chosen for each head, [H]."""
    objective = _objective(table, weights)  # [H, R]
    heads = objective.shape[0]
    spans = np.stack([table.rules.spans[n] for n in table.density_lengths], axis=1)  # [R, K]
    head_of, rule_of = np.nonzero(prune_dominated(objective, spans))  # candidate variables
    cost = objective[head_of, rule_of] - objective.min(axis=1)[head_of]  # shift: every head's best is 0
    cand = Candidates(head=head_of, cost=cost, spans=spans[rule_of], heads=heads)
    budget = np.array([_token_budget(config.density, heads, n) for n in table.density_lengths], dtype=np.float64)
    start = time.perf_counter()
    chosen = solve_assignment(cand, budget, config.time_limit_s, config.mip_rel_gap)
    logger.debug("weights %s: %d candidates, %.2fs", weights, len(cand.head), time.perf_counter() - start)
    return rule_of[chosen]


def plan_from_choice(table: LossTable, choice: np.ndarray, weights: dict[int, float]) -> ParetoPlan:
    """A ParetoPlan from the rule chosen for each head; densities from the contract's kv_density."""
    spans = remote_module("moa_spans")
    rules, shape = table.rules, (table.num_layers, table.num_kv_heads)
    alpha, beta = rules.alpha[choice].reshape(shape), rules.beta[choice].reshape(shape)
    heads = np.arange(len(choice))
    return ParetoPlan(
        alpha=alpha.copy(),
        beta=beta.copy(),
        sink=rules.sink,
        min_span=rules.min_span,
        density={n: spans.kv_density(alpha, beta, n, rules.sink, rules.min_span) for n in table.density_lengths},
        loss={n: float(table.loss[n][heads, choice].sum()) for n in sorted(table.loss)},
        weights=dict(weights),
    )


def optimize_plans(
    profiles: dict[int, InfluenceProfile | np.ndarray] | str | Path, config: OptimizeConfig
) -> list[ParetoPlan]:
    """The Pareto front: distinct plans, none dominated in loss per profile length, in weight-vector order.

    ``profiles``: a folder of profile files, or ``{length: influence [L, Hkv, nb, nb]}``.
    Raises OptimizeError naming the smallest feasible density when the bound cannot be met.
    """
    table = build_loss_table(as_profiles(profiles, config.block_size), config)
    check_feasible(table, config.density)
    plans = []
    for weights in weight_vectors(sorted(table.loss), config.weight_steps):
        choice = solve_weighted(table, weights, config)
        plans.append(plan_from_choice(table, choice, weights))
    front = pareto_filter(plans)
    for plan in front:
        if any(d > config.density + 1e-12 for d in plan.density.values()):
            raise OptimizeError(f"internal error: plan density {plan.density} exceeds the bound {config.density}")
    logger.info("Pareto front: %d plans from %d weight vectors", len(front), len(plans))
    return front

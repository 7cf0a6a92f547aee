"""Plan search: masked fractions vs the contract, exact optimum vs brute force, bounds, errors, files, CLI."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from moa_hub.assignment import Candidates, solve_assignment
from moa_hub.errors import OptimizeError
from moa_hub.influence import InfluenceProfile, load_profiles, save_profile
from moa_hub.optimize import OptimizeConfig, _objective, build_loss_table, optimize_plans, weight_vectors
from moa_hub.pareto import load_pareto, save_pareto
from moa_hub.remote import remote_module
from moa_hub.search_space import SearchSpace, block_pairs, build_rules, masked_fraction, rule_losses

os.environ["HF_TOKEN"] = ""
SPANS = remote_module("moa_spans")
SINK, MIN_SPAN, BLOCK = 4, 12, 8
SMALL_SPACE = SearchSpace(betas=(0.0, 0.5, 1.0), alphas=(-20, 0, 16, 40))


def random_influence(rng, layers, groups, length, block):
    """Causal block influence, mostly positive, some negative entries."""
    nb = -(-length // block)
    out = rng.gamma(0.6, 1.0, size=(layers, groups, nb, nb)) - 0.1
    return (out * np.tril(np.ones((nb, nb)))).astype(np.float32)


def config(density, **kw):
    base = dict(extend_length=90, sink=SINK, min_span=MIN_SPAN, search_space=SMALL_SPACE, block_size=BLOCK)
    return OptimizeConfig(density=density, mip_rel_gap=0.0, **{**base, **kw})


@pytest.mark.parametrize("length,block,sink,min_span", [(233, 16, 8, 24), (100, 7, 3, 10), (37, 64, 0, 5)])
def test_masked_fraction_matches_contract_mask(length, block, sink, min_span):
    rules = build_rules(SearchSpace(alpha_points=3), [length, length + 29], sink, min_span)
    fraction = masked_fraction(rules, length, block, chunk=5)
    nb, pad = -(-length // block), -length % block
    rows, cols = block_pairs(nb)
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]

    def per_block(m):  # [N, N] -> [nb, nb] sums
        return torch.nn.functional.pad(m.double(), (0, pad, 0, pad)).reshape(nb, block, nb, block).sum((1, 3))

    for r in range(len(rules)):
        visible = SPANS.visible_mask(pos, pos, rules.alpha[r], rules.beta[r], sink, min_span)
        expected = (per_block(causal & ~visible) / per_block(causal))[rows, cols].numpy()
        np.testing.assert_allclose(fraction[r], expected, rtol=0, atol=1e-12)


def test_rules_are_distinct_and_include_extremes():
    rules = build_rules(SearchSpace(), [300, 611], SINK, MIN_SPAN)
    table = np.stack(
        [
            SPANS.span_at(torch.arange(1, 612), a, b, SINK, MIN_SPAN).numpy()
            for a, b in zip(rules.alpha, rules.beta, strict=True)
        ]
    )
    assert len(np.unique(table, axis=0)) == len(rules)
    assert rules.spans[611].min() == MIN_SPAN and rules.spans[611].max() == 611


def brute_force(table, weights, bound):
    """Best objective over every assignment of rules to heads that meets the bound everywhere."""
    objective = _objective(table, weights)  # [H, R]
    heads, count = objective.shape
    best = np.inf
    for choice in itertools.product(range(count), repeat=heads):
        idx = np.array(choice)
        if all(table.rules.spans[n][idx].sum() <= bound * heads * n + 1e-9 for n in table.density_lengths):
            best = min(best, objective[np.arange(heads), idx].sum())
    return best


def test_optimum_matches_brute_force_and_bounds_hold():
    rng = np.random.default_rng(7)
    lengths = (40, 67)
    profiles = {n: random_influence(rng, 2, 2, n, BLOCK) for n in lengths}
    bound = 0.45
    cfg = config(bound)
    table = build_loss_table({n: InfluenceProfile(n, BLOCK, a) for n, a in profiles.items()}, cfg)
    assert 4 <= len(table.rules) <= 12
    plans = optimize_plans(profiles, cfg)
    assert plans
    for plan in plans:
        alpha, beta = plan.alpha.ravel(), plan.beta.ravel()
        choice = np.array(
            [
                np.flatnonzero((table.rules.alpha == a) & (table.rules.beta == b))[0]
                for a, b in zip(alpha, beta, strict=True)
            ]
        )
        got = _objective(table, plan.weights)[np.arange(4), choice].sum()
        assert got == pytest.approx(brute_force(table, plan.weights, bound), rel=1e-9, abs=1e-12)
        for n in (*lengths, 90):
            assert plan.density[n] == pytest.approx(SPANS.kv_density(plan.alpha, plan.beta, n, SINK, MIN_SPAN))
            assert plan.density[n] <= bound
        assert set(plan.loss) == {*lengths, 90}  # profile lengths + the extrapolated extend length


@pytest.mark.parametrize("seed", range(8))
def test_assignment_solver_matches_brute_force(seed):
    """Random multiple-choice knapsacks with two budgets: LP bound + fixing + MILP is exact."""
    rng = np.random.default_rng(seed)
    heads, per_head = 5, 6
    spans = rng.integers(1, 40, size=(heads * per_head, 2))
    spans[::per_head] = 1  # every head has a tiny option: always feasible
    cost = rng.uniform(0, 1, heads * per_head) * spans.sum(1) ** -0.5  # smaller spans cost more, mostly
    head = np.repeat(np.arange(heads), per_head)
    budget = spans.reshape(heads, per_head, 2).mean(axis=(0, 1)) * heads * rng.uniform(0.4, 0.9)
    chosen = solve_assignment(Candidates(head, cost, spans, heads), budget, time_limit_s=30, mip_rel_gap=0.0)
    assert (head[chosen] == np.arange(heads)).all() and (spans[chosen].sum(0) <= budget).all()
    best = min(
        cost[list(pick)].sum()
        for pick in itertools.product(*(range(h * per_head, (h + 1) * per_head) for h in range(heads)))
        if (spans[list(pick)].sum(0) <= budget).all()
    )
    assert cost[chosen].sum() == pytest.approx(best, rel=1e-9)


def test_retrieval_head_gets_the_long_span():
    """Head 2 has all its mass far from the diagonal; the budget affords one long head: it is head 2."""
    length, nb = 96, 12
    influence = np.zeros((1, 4, nb, nb), dtype=np.float32)
    rng = np.random.default_rng(3)
    for g in range(4):
        influence[0, g] = np.diag(rng.uniform(1.0, 2.0, nb))  # local mass only
    influence[0, 2, nb - 1, 2:6] = 50.0  # far keys of the last queries
    space = SearchSpace(betas=(0.0,), alphas=(16, 96))
    cfg = OptimizeConfig(
        density=(3 * 16 + 96) / (4 * 96) + 1e-6,
        sink=SINK,
        min_span=16,
        search_space=space,
        block_size=8,
        mip_rel_gap=0.0,
    )
    (plan,) = optimize_plans({length: influence}, cfg)
    spans = SPANS.span_at(96, torch.from_numpy(plan.alpha[0]), torch.from_numpy(plan.beta[0]), SINK, 16)
    assert spans.tolist() == [16, 16, 96, 16]


def test_infeasible_budget_names_smallest_density():
    rng = np.random.default_rng(1)
    profiles = {n: random_influence(rng, 1, 2, n, BLOCK) for n in (40, 67)}
    with pytest.raises(OptimizeError) as err:
        optimize_plans(profiles, config(0.2))
    smallest = MIN_SPAN / 40  # all heads at min_span, binding at the shortest length
    assert f"{smallest:.4f}" in str(err.value) and "--density 0.3" in str(err.value) and "length 40" in str(err.value)
    assert optimize_plans(profiles, config(smallest))  # exactly the smallest density is feasible


def test_pareto_front_distinct_and_non_dominated():
    rng = np.random.default_rng(11)
    lengths = (33, 64, 97)
    profiles = {n: random_influence(rng, 3, 2, n, BLOCK) for n in lengths}
    plans = optimize_plans(profiles, config(0.5, extend_length=130, weight_steps=3))
    assert len(weight_vectors(list(lengths), 3)) == 10  # lattice already holds the uniform vector
    assert len(plans) >= 2
    keys = {(p.alpha.tobytes(), p.beta.tobytes()) for p in plans}
    assert len(keys) == len(plans)
    for a, b in itertools.permutations(plans, 2):
        assert not (all(a.loss[n] <= b.loss[n] for n in lengths) and any(a.loss[n] < b.loss[n] for n in lengths))
    assert all(d <= 0.5 for p in plans for d in p.density.values())


def test_files_round_trip_and_tensor_input(tmp_path):
    rng = np.random.default_rng(5)
    lengths = (40, 67)
    arrays = {n: random_influence(rng, 2, 1, n, BLOCK) for n in lengths}
    for n, a in arrays.items():
        save_profile(tmp_path / f"influence_{n}.safetensors", InfluenceProfile(n, BLOCK, a, num_items=3))
    loaded = load_profiles(tmp_path)
    assert sorted(loaded) == list(lengths) and loaded[67].num_items == 3 and loaded[40].block_size == BLOCK
    np.testing.assert_array_equal(loaded[67].influence, arrays[67])
    from_files = optimize_plans(str(tmp_path), config(0.5))
    from_tensors = optimize_plans({n: torch.from_numpy(a) for n, a in arrays.items()}, config(0.5))
    assert [p.loss for p in from_files] == [p.loss for p in from_tensors]
    path = save_pareto(tmp_path / "out" / "pareto.json", from_files, config(0.5))
    back = load_pareto(path)
    for p, q in zip(from_files, back, strict=True):
        np.testing.assert_array_equal(p.alpha, q.alpha)
        np.testing.assert_array_equal(p.beta, q.beta)
        assert (p.density, p.loss, p.weights, p.sink, p.min_span) == (q.density, q.loss, q.weights, q.sink, q.min_span)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(OptimizeError, match=r"expected \[layers, kv_heads, 5, 5\]"):
        optimize_plans({40: np.ones((1, 2, 4, 4), dtype=np.float32)}, config(0.5))
    with pytest.raises(OptimizeError, match="no \\*.safetensors"):
        optimize_plans(str(tmp_path), config(0.5))
    with pytest.raises(OptimizeError, match="density bound must be in"):
        config(1.5)


def test_rule_losses_is_blockwise_weighted_sum():
    rng = np.random.default_rng(2)
    influence = random_influence(rng, 2, 3, 50, BLOCK)
    rules = build_rules(SMALL_SPACE, [50], SINK, MIN_SPAN)
    fraction = masked_fraction(rules, 50, BLOCK)
    losses = rule_losses(influence, fraction)
    rows, cols = block_pairs(7)
    expected = np.einsum("lgt,rt->lgr", influence[:, :, rows, cols].astype(np.float64), fraction).reshape(6, -1)
    np.testing.assert_allclose(losses, expected, rtol=1e-12)


def test_cli_writes_front(tmp_path):
    from moa_hub.commands import optimize as command

    rng = np.random.default_rng(9)
    for n in (40, 67):
        save_profile(tmp_path / f"p{n}.safetensors", InfluenceProfile(n, BLOCK, random_influence(rng, 2, 2, n, BLOCK)))
    app = typer.Typer()
    command.register(app)
    app.command("noop")(lambda: None)  # keep `optimize` a sub-command
    out = tmp_path / "pareto.json"
    args = ["optimize", str(tmp_path), "--density", "0.5", "--extend-length", "90", "--output", str(out)]
    args += ["--sink", str(SINK), "--min-span", str(MIN_SPAN), "--betas", "0,0.5,1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plans = load_pareto(out)
    assert plans and all(d <= 0.5 for p in plans for d in p.density.values()) and "wrote" in result.output

"""The typed plan: validation, JSON round trip, spans via the contract, uniform baselines, imports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moa_hub.errors import PlanError
from moa_hub.plan import MoaPlan, Provenance, uniform_like, uniform_plan
from moa_hub.plan_import import detect_format, from_thu_nics, load_plan
from moa_hub.remote import remote_module

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the main checkout; a worktree sits one level deeper.
SHARED_PLANS = next(
    (
        p
        for p in (REPO_ROOT.parent / "shared/data/moa-plans", REPO_ROOT.parents[1] / "shared/data/moa-plans")
        if p.is_dir()
    ),
    None,
)


def random_plan(num_layers=3, num_kv_heads=5, seed=0, **kwargs) -> MoaPlan:
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randint(-2000, 3000, (num_layers, num_kv_heads), generator=gen).double() + 0.25
    beta = torch.rand(num_layers, num_kv_heads, generator=gen, dtype=torch.float64)
    return MoaPlan(alpha=alpha.tolist(), beta=beta.tolist(), **kwargs)


def test_defaults_and_shape():
    plan = random_plan()
    assert (plan.sink, plan.min_span, plan.format_version) == (64, 128, 1)
    assert (plan.num_layers, plan.num_kv_heads) == (3, 5)
    plan.check_fits(3, 5)
    with pytest.raises(PlanError, match=r"3 layers x 5 kv heads .*\(3 layers .* x 4 kv heads"):
        plan.check_fits(3, 4)
    with pytest.raises(PlanError, match="num_hidden_layers"):
        plan.check_fits(4, 5)


def test_accepts_arrays_and_tensors():
    plan = random_plan()
    from_np = MoaPlan(alpha=np.array(plan.alpha), beta=np.array(plan.beta))
    from_torch = MoaPlan(alpha=plan.alpha_tensor(), beta=plan.beta_tensor())
    assert from_np == plan == from_torch


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alpha": [[1.0, 2.0], [3.0]]}, "ragged"),
        ({"alpha": [[1.0, float("nan")], [3.0, 4.0]]}, r"alpha\[0\]\[1\] is nan"),
        ({"beta": [[0.5, 0.5], [float("inf"), 0.5]]}, r"beta\[1\]\[0\] is inf"),
        ({"beta": [[0.5, -0.1], [0.5, 0.5]]}, r"beta\[0\]\[1\] = -0.1 is outside \[0, 1\]"),
        ({"beta": [[0.5, 1.5], [0.5, 0.5]]}, r"beta\[0\]\[1\] = 1.5"),
        ({"beta": [[0.5, 0.5]]}, r"alpha is 2x2 but moa.beta is 1x2"),
        ({"alpha": []}, "non-empty"),
        ({"alpha": [[1.0, "x"], [3.0, 4.0]]}, r"alpha\[0\]\[1\] must be a number"),
        ({"min_span": 64}, r"min_span=64 <= sink=64"),
        ({"sink": 200, "min_span": 150}, r"min_span=150 <= sink=200"),
        ({"sink": -1}, "sink must be >= 0"),
        ({"sink": 1.5}, "integer"),
        ({"format_version": 2}, "format_version 2"),
        ({"density": {"1000": 1.5}}, r"density\[1000\] = 1.5"),
        ({"density": {"-3": 0.5}}, "positive integer"),
    ],
)
def test_validation_names_the_bad_value(change, message):
    fields = {"alpha": [[100.0, -50.0], [7.0, 3000.0]], "beta": [[0.5, 0.25], [1.0, 0.0]], **change}
    with pytest.raises(PlanError, match=message):
        MoaPlan(**fields)


def test_zero_sink_is_valid():
    MoaPlan(alpha=[[10.0]], beta=[[0.3]], sink=0, min_span=1)


def test_spans_use_the_contract():
    spans = remote_module("moa_spans")
    plan = random_plan(num_layers=4, num_kv_heads=3, seed=1, sink=16, min_span=48)
    for n in (1, 47, 48, 333, 4099, 65537):
        got = plan.spans_at(n)
        assert got.shape == (4, 3) and got.dtype == np.int64
        for layer in range(4):
            for head in range(3):
                want = spans.span_at(n, plan.alpha[layer][head], plan.beta[layer][head], 16, 48)
                assert got[layer, head] == want == plan.span(layer, head, n)
                assert want == min(n, max(48, math.floor(plan.alpha[layer][head] + plan.beta[layer][head] * n)))
        assert plan.kv_density(n) == pytest.approx(got.mean() / n, rel=1e-12)


def test_round_trip(tmp_path):
    provenance = Provenance(
        base_model="org/base",
        base_revision="abc123",
        moa_hub_version="0.1.0",
        calibration={"dataset": "synthetic", "samples": 7},
        profile_lengths=(2048, 4096),
        density_bounds={4096: 0.5, 2048: 0.6},
        extra={"loss": 0.125},
    )
    plan = random_plan(sink=32, min_span=96, provenance=provenance).with_density([1000, 4096, 131072])
    data = plan.to_dict()
    assert set(data) == {"format_version", "sink", "min_span", "alpha", "beta", "density", "provenance"}
    assert list(data["density"]) == ["1000", "4096", "131072"]
    assert data["provenance"]["loss"] == 0.125
    assert MoaPlan.from_dict(json.loads(json.dumps(data))) == plan
    path = plan.save(tmp_path / "plan.json")
    assert MoaPlan.load(path) == plan
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "moa_llama", "moa": data}))
    assert MoaPlan.load(tmp_path / "config.json") == plan


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(PlanError, match="unknown keys \\['alphas'\\]"):
        MoaPlan.from_dict({"alpha": [[1.0]], "beta": [[0.5]], "alphas": []})
    with pytest.raises(PlanError, match="lacks \\['beta'\\]"):
        MoaPlan.from_dict({"alpha": [[1.0]]})


def test_stale_density_is_rejected():
    plan = random_plan().with_density([4096])
    data = plan.to_dict()
    data["density"]["4096"] = plan.density[4096] + 0.05
    with pytest.raises(PlanError, match=r"density\[4096\]"):
        MoaPlan.from_dict(data)


def test_uniform_plan_matches_target_density():
    target = random_plan(num_layers=5, num_kv_heads=2, seed=3)
    for length in (1000, 4096, 32771):
        baseline = uniform_like(target, length)
        assert baseline.kv_density(length) == pytest.approx(target.kv_density(length), abs=1 / length)
        spans = baseline.spans_at(length)
        assert (spans == spans[0, 0]).all()
    plan = uniform_plan(2, 3, density=0.25, length=8192, sink=8, min_span=64)
    assert plan.kv_density(8192) == 0.25 and plan.density == {8192: 0.25}
    assert (plan.spans_at(100000) == 2048).all() and (plan.spans_at(1000) == 1000).all()
    with pytest.raises(PlanError, match="span 10 < min_span 128"):
        uniform_plan(2, 3, density=0.01, length=1000)
    with pytest.raises(PlanError, match="density must be in"):
        uniform_plan(2, 3, density=1.5, length=1000)


def test_thu_nics_import_is_a_superset_per_group():
    gen = torch.Generator().manual_seed(5)
    alphas = (torch.randint(-1024, 2048, (3, 12), generator=gen).double()).tolist()
    betas = torch.rand(3, 12, generator=gen, dtype=torch.float64).tolist()
    alphas[1][4] = -1024.0  # a sentinel is just a number
    plan = from_thu_nics({"alphas": alphas, "betas": betas}, num_layers=3, num_kv_heads=4, sink=8, min_span=40)
    assert (plan.num_layers, plan.num_kv_heads, plan.sink, plan.min_span) == (3, 4, 8, 40)
    spans = remote_module("moa_spans")
    for layer in range(3):
        for g in range(4):
            group = range(3 * g, 3 * g + 3)
            assert plan.alpha[layer][g] == max(alphas[layer][h] for h in group)
            assert plan.beta[layer][g] == max(betas[layer][h] for h in group)
            for n in (41, 777, 9001):
                per_query = [spans.span_at(n, alphas[layer][h], betas[layer][h], 8, 40) for h in group]
                assert plan.span(layer, g, n) >= max(per_query)


def test_thu_nics_import_errors():
    data = {"alphas": [[0.0] * 6] * 2, "betas": [[0.5] * 6] * 2}
    with pytest.raises(PlanError, match="6 query heads, not a multiple of the model's 4 kv heads"):
        from_thu_nics(data, num_layers=2, num_kv_heads=4)
    with pytest.raises(PlanError, match="2 layers of alphas .* model has\n?.*3 layers"):
        from_thu_nics(data, num_layers=3, num_kv_heads=3)
    with pytest.raises(PlanError, match="unrecognised plan file"):
        detect_format({"spans": []})


def test_load_plan_detects_both_formats(tmp_path):
    plan = random_plan(num_layers=2, num_kv_heads=2, sink=4, min_span=16)
    plan.save(tmp_path / "design.json")
    (tmp_path / "thu.json").write_text(
        json.dumps({"alphas": [list(r) * 2 for r in plan.alpha], "betas": [list(r) * 2 for r in plan.beta]})
    )
    assert load_plan(tmp_path / "design.json", 2, 2) == plan
    imported = load_plan(tmp_path / "thu.json", 2, 2, sink=4, min_span=16)
    assert max(imported.alpha[0]) == max(plan.alpha[0]) and imported.sink == 4
    with pytest.raises(PlanError, match="sink=5 was given but the plan .* fixes sink=4"):
        load_plan(tmp_path / "design.json", 2, 2, sink=5)
    with pytest.raises(PlanError, match="does not fit"):
        load_plan(tmp_path / "design.json", 2, 3)
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.json", 2, 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json", 2, 2)


@pytest.mark.skipif(SHARED_PLANS is None, reason="shared plan files (../shared/data/moa-plans) not present")
@pytest.mark.parametrize(
    ("name", "num_layers", "num_kv_heads"),
    [
        ("llama-3.2-1b-instruct.moa_alpha_beta.json", 16, 8),
        ("llama-3.2-1b-instruct.streamingllm_alpha_beta.json", 16, 8),
        ("vicuna-7b-v1.5-16k.moa_alpha_beta.json", 32, 32),
    ],
)
def test_import_published_plans(name, num_layers, num_kv_heads):
    path = SHARED_PLANS / name
    raw = json.loads(path.read_text())
    plan = load_plan(path, num_layers, num_kv_heads)
    plan.check_fits(num_layers, num_kv_heads)
    group = len(raw["alphas"][0]) // num_kv_heads
    for layer in range(num_layers):
        for g in range(num_kv_heads):
            heads = slice(g * group, (g + 1) * group)
            assert plan.alpha[layer][g] == max(raw["alphas"][layer][heads])
            assert plan.beta[layer][g] == max(raw["betas"][layer][heads])
    for n in (4096, 16384):
        density = plan.kv_density(n)
        assert 0 < density <= 1
        spans = plan.spans_at(n)
        assert spans.min() >= plan.min_span and spans.max() <= n
    assert MoaPlan.from_dict(plan.to_dict()) == plan

"""Measured head sensitivity, the calibrated influence, tempered profiling and the extrapolated extend-length loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_profile import BLOCK, random_items, reference_influence, tiny_llama

from moa_hub.apply import moa_twin
from moa_hub.errors import ProfileError
from moa_hub.influence import InfluenceProfile
from moa_hub.optimize import OptimizeConfig, build_loss_table, extrapolated_losses, optimize_plans
from moa_hub.plan import MoaPlan
from moa_hub.profile import ProfileConfig, load_profile, profile_model
from moa_hub.remote import remote_module
from moa_hub.search_space import RuleSet, SearchSpace
from moa_hub.sensitivity import calibrate_influence, measure_head_sensitivity
from moa_hub.validate import answer_loss

SPANS = remote_module("moa_spans")
SINK, MIN_SPAN = 4, 12


def test_measured_sensitivity_is_the_loss_change_of_each_head_made_local():
    model = tiny_llama(dtype=torch.float32)
    items = random_items([45, 38, 29], seed=11)
    delta, dense = measure_head_sensitivity(model, items, SINK, MIN_SPAN)
    assert delta.shape == (2, 2)
    assert dense == pytest.approx(answer_loss(model, items), rel=1e-5)
    for layer in range(2):
        for group in range(2):  # independent path: an explicit plan, validate.answer_loss
            alpha = [[0.0, 0.0], [0.0, 0.0]]
            beta = [[1.0, 1.0], [1.0, 1.0]]
            alpha[layer][group], beta[layer][group] = float(MIN_SPAN), 0.0
            twin = moa_twin(model, MoaPlan(alpha=alpha, beta=beta, sink=SINK, min_span=MIN_SPAN))
            want = answer_loss(twin, items) - answer_loss(model, items)
            assert delta[layer, group] == pytest.approx(want, abs=1e-5)
    assert np.abs(delta).max() > 1e-4  # the window really masks something at these lengths
    short, _ = measure_head_sensitivity(model, random_items([MIN_SPAN, 9], seed=12), SINK, MIN_SPAN)
    np.testing.assert_allclose(short, 0.0, atol=1e-6)  # no item longer than the window: local == dense


def test_calibrated_influence_prices_the_measured_rule_at_the_measured_loss():
    rng = np.random.default_rng(5)
    length, nb = 70, -(-70 // BLOCK)
    gradient = (rng.normal(size=(2, 3, nb, nb)) * np.tril(np.ones((nb, nb)))).astype(np.float32)
    delta = np.array([[0.8, 0.01, -0.2], [0.0, 2.5, 0.3]])
    calibrated = calibrate_influence(gradient, delta, length, BLOCK, SINK, MIN_SPAN)
    assert calibrated.shape == gradient.shape and (calibrated >= 0).all()
    space = SearchSpace(betas=(0.0,), alphas=(MIN_SPAN, 24, 40, length))
    cfg = OptimizeConfig(density=1.0, sink=SINK, min_span=MIN_SPAN, search_space=space, block_size=BLOCK)
    table = build_loss_table({length: InfluenceProfile(length, BLOCK, calibrated)}, cfg)
    order = np.argsort(table.rules.spans[length])  # constant spans, smallest first
    loss = table.loss[length][:, order]  # [H, R]
    np.testing.assert_allclose(loss[:, 0], np.clip(delta.ravel(), 0, None), rtol=1e-5, atol=1e-7)
    assert (np.diff(loss, axis=1) <= 1e-7).all()  # a longer window never costs more
    np.testing.assert_allclose(loss[:, -1], 0.0, atol=1e-7)  # dense costs nothing


def test_measured_importance_profile_resumes_and_checks_its_settings(tmp_path, monkeypatch):
    model = tiny_llama(dtype=torch.float32)
    items = {40: random_items([40, 33], seed=13)}
    grad_cfg = ProfileConfig(lengths=(40,), block_size=BLOCK, importance="gradient", sink=SINK, min_span=MIN_SPAN)
    gradient, meta = load_profile(profile_model(model, items, grad_cfg, tmp_path / "g")[40])
    assert meta["importance"] == "gradient"
    cfg = ProfileConfig(lengths=(40,), block_size=BLOCK, importance="measured", sink=SINK, min_span=MIN_SPAN)
    path = profile_model(model, items, cfg, tmp_path / "m")[40]
    influence, meta = load_profile(path)
    assert meta["importance"] == "measured" and meta["measured_min_span"] == str(MIN_SPAN)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    torch.testing.assert_close(saved["gradient_influence"], gradient)
    delta, _ = measure_head_sensitivity(model, items[40], SINK, MIN_SPAN)
    torch.testing.assert_close(saved["measured_loss"], torch.from_numpy(delta).float(), rtol=1e-4, atol=1e-6)
    want = -calibrate_influence(-gradient.numpy(), delta, 40, BLOCK, SINK, MIN_SPAN)
    torch.testing.assert_close(influence, torch.from_numpy(want), rtol=1e-4, atol=1e-7)

    import moa_hub.sensitivity as sensitivity_mod

    monkeypatch.setattr(sensitivity_mod, "measure_head_sensitivity", lambda *a, **k: pytest.fail("re-measured"))
    profile_model(model, items, cfg, tmp_path / "m")  # resume: nothing recomputed
    with pytest.raises(ProfileError, match="measured importance"):
        profile_model(model, items, grad_cfg, tmp_path / "m")
    with pytest.raises(ProfileError, match="temperature"):
        profile_model(model, items, ProfileConfig(lengths=(40,), block_size=BLOCK, temperature=2.0), tmp_path / "m")
    with pytest.raises(ProfileError, match="importance"):
        ProfileConfig(importance="magic")


def test_tempered_profile_is_the_influence_of_the_tempered_loss(tmp_path, monkeypatch):
    model = tiny_llama()
    items = random_items([37, 50], seed=1)
    cfg = ProfileConfig(lengths=(50,), block_size=BLOCK, importance="gradient", temperature=3.0)
    got, meta = load_profile(profile_model(model, {50: items}, cfg, tmp_path)[50])
    assert meta["temperature"] == "3.0"
    lm_head = model.lm_head
    scaled = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=False, dtype=torch.float64)
    scaled.weight = torch.nn.Parameter(lm_head.weight.detach() / 3.0)  # logits / T
    monkeypatch.setattr(model, "lm_head", scaled)
    want = reference_influence(model, items, 50).float()
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    with pytest.raises(ProfileError, match="temperature"):
        ProfileConfig(temperature=0.0)


def test_extrapolated_loss_is_the_rule_scaled_to_the_profiled_length():
    rng = np.random.default_rng(9)
    length, nb = 64, 64 // BLOCK
    influence = (rng.gamma(0.5, 1.0, size=(1, 2, nb, nb)) * np.tril(np.ones((nb, nb)))).astype(np.float32)
    profile = InfluenceProfile(length, BLOCK, influence)
    rules = RuleSet(np.array([48.0, 0.0, -32.0]), np.array([0.0, 1.0, 0.5]), SINK, MIN_SPAN, spans={})
    got = extrapolated_losses(profile, rules, 128)  # [H, R]
    half = RuleSet(np.array([24.0, 0.0, -16.0]), rules.beta, SINK, MIN_SPAN, spans={})
    table = build_loss_table(
        {length: profile}, OptimizeConfig(density=1.0, sink=SINK, min_span=MIN_SPAN, search_space=SearchSpace(
            betas=(0.0, 0.5, 1.0), alphas=(-16, 0, 24)), block_size=BLOCK)
    )  # fmt: skip
    for r in range(3):
        k = np.flatnonzero((table.rules.alpha == half.alpha[r]) & (table.rules.beta == half.beta[r]))[0]
        np.testing.assert_allclose(got[:, r], table.loss[length][:, k], rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], 0.0, atol=1e-7)  # dense at every length costs nothing


def test_extend_length_loss_keeps_a_far_reaching_head_growing():
    """Head 1's mass is far from the diagonal. Without the extrapolated term, a fixed span as long as the
    profile length is free for it (dense there) and cheaper at the extend length; with it, head 1 grows."""
    length, nb = 64, 64 // BLOCK
    influence = np.zeros((1, 4, nb, nb), dtype=np.float32)
    for g in range(4):
        influence[0, g] = np.diag(np.full(nb, 0.1))
    influence[0, 1, 2:, 0] = 5.0  # queries 32-63 on keys 0-15
    space = SearchSpace(betas=(0.0, 1.0), alphas=(16, 64))
    kw = dict(density=0.5, extend_length=128, sink=SINK, min_span=16, search_space=space, block_size=BLOCK)
    spans = {}
    for extrapolate in (False, True):
        plans = optimize_plans({length: influence}, OptimizeConfig(extrapolate=extrapolate, mip_rel_gap=0.0, **kw))
        best = min(plans, key=lambda p: p.loss[length] + p.loss.get(128, 0.0))
        alpha, beta = torch.from_numpy(best.alpha[0]), torch.from_numpy(best.beta[0])
        spans[extrapolate] = SPANS.span_at(128, alpha, beta, SINK, 16).tolist()
    assert spans[False][1] == 64, spans
    assert spans[True][1] == 128, spans

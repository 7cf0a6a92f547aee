"""An exported folder loads through transformers' remote code, and only with trust_remote_code=True."""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, random_plan
from transformers import AutoConfig, AutoModelForCausalLM

from moa_hub.export import write_moa_folder
from moa_hub.model_folder import read_model_folder
from moa_hub.plan import MoaPlan


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def exported(request, tmp_path_factory):
    arch = request.param
    dense = build_dense(arch, 2, seed=21)
    base = tmp_path_factory.mktemp(f"{arch}-base")
    dense.save_pretrained(base)
    plan = random_plan(2, 2, seed=21)
    output = tmp_path_factory.mktemp(f"{arch}-moa") / "out"
    write_moa_folder(read_model_folder(base), MoaPlan.from_dict(plan), output)
    return dense, plan, output


def test_loading_without_trust_remote_code_fails_loudly(exported):
    _, _, output = exported
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(output, trust_remote_code=False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(output, trust_remote_code=False)


def test_loaded_model_runs_the_plan(exported):
    dense, plan, output = exported
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert type(model).__name__.startswith("Moa") and model.config.model_type.startswith("moa_")
    ids = torch.randint(0, 101, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loaded = model(ids).logits
        twin = build_moa(dense, plan)(ids, use_cache=False).logits
        dense_logits = dense(ids).logits
    torch.testing.assert_close(loaded, twin, rtol=1e-5, atol=1e-5)
    assert (loaded - dense_logits).abs().max() > 1e-3  # the plan is sparse, not silently dense
    out = model.generate(ids[:1], attention_mask=torch.ones(1, 29, dtype=torch.long), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 34)

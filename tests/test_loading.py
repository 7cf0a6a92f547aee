"""An exported folder loads through transformers' remote code, and only with trust_remote_code=True."""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, random_plan
from transformers import AutoConfig, AutoModelForCausalLM

from moa_hub.export import write_moa_folder
from moa_hub.model_folder import read_model_folder
from moa_hub.plan import MoaPlan


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
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


def test_loaded_repo_has_its_kernels_and_runs_them(exported, monkeypatch):
    """transformers copies only the files a repo's remote code imports by name: the Triton kernels must be among
    them, else a loaded model would fall back to the torch reference on the GPU. Under the interpreter (CPU), the
    loaded copy runs its own kernels (MOA_BACKEND=triton) and agrees with the torch path."""
    import importlib
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    _, _, output = exported
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    package = type(model).__module__.rpartition(".")[0]
    copied = {p.name for p in Path(sys.modules[package].__path__[0]).glob("*.py")}
    own = type(model).__module__.rpartition(".")[2] + ".py"
    shipped = {p.name for p in output.glob("*.py") if not p.name.startswith("modeling_moa_") or p.name == own}
    shipped -= {"moa_influence.py", "moa_influence_bwd.py"}  # the profiler's kernels: used by the converter only
    assert shipped <= copied, f"not copied by transformers: {sorted(shipped - copied)}"
    attention = importlib.import_module(f"{package}.moa_attention")
    assert attention._triton_kernels() is not None
    if not torch.cuda.is_available():
        assert importlib.import_module(f"{package}.moa_window").INTERPRETED  # conftest set TRITON_INTERPRET=1
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU host the kernels run on the GPU
    model = model.to(device)
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        monkeypatch.setenv("MOA_BACKEND", "torch")
        ref = model(ids).logits
        monkeypatch.setenv("MOA_BACKEND", "triton")
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

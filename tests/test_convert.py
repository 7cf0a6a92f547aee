"""`moa-hub convert` end to end on a tiny model on CPU: every stage, artifacts, resume, the output loads."""

from __future__ import annotations

import json

import pytest
import torch
from demo_helpers import tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from moa_hub import pipeline
from moa_hub.errors import ModelError
from moa_hub.pipeline import ConvertConfig, convert


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(base, tmp_path, **kw) -> ConvertConfig:
    return ConvertConfig(
        model=str(base), output=tmp_path / "out", density=0.6, profile_lengths=(256, 384), extend_length=512,
        num_samples=2, block_size=16, sink=8, min_span=32, device="cpu", dtype="fp32", **kw,
    )  # fmt: skip


def test_convert_runs_every_stage_and_resumes(base_folder, tmp_path, monkeypatch):
    config = _config(base_folder, tmp_path)
    result = convert(config)
    work = config.work
    for artifact in (
        "profile/profile_256.safetensors",
        "profile/profile_384.safetensors",
        "pareto.json",
        "validation.json",
        "plan.json",
    ):
        assert (work / artifact).exists(), artifact
    assert list((work / "calibration").glob("calibration-*.jsonl"))
    plan = result.plan
    for n in (256, 384, 512):
        assert plan.kv_density(n) <= 0.6 + 1e-9 and plan.density[n] == pytest.approx(plan.kv_density(n))
    moa = json.loads((result.output / "config.json").read_text())["moa"]
    assert moa["provenance"]["profile_lengths"] == [256, 384] and moa["provenance"]["validation"]["length"] == 512
    assert (result.output / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(result.output, trust_remote_code=True).eval()
    ids = torch.randint(3, 100, (1, 40))
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False).shape == (1, 44)

    # the validate stage alone, from the CLI, on the same artifacts: same losses
    from typer.testing import CliRunner

    from moa_hub.cli import _register_commands, app

    _register_commands()
    calibration_file = next((work / "calibration").glob("calibration-*.jsonl"))
    args = ["validate", str(base_folder), "--pareto", str(work / "pareto.json"), "--calibration", str(calibration_file),
            "--length", "512", "--output", str(tmp_path / "v.json"), "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "v.json").read_text())["losses"] == pytest.approx(result.validation.losses, rel=1e-5)

    # a re-run reuses every stage's artifact: nothing is profiled, optimized or validated again
    def fail(*args, **kwargs):
        raise AssertionError("stage recomputed on resume")

    monkeypatch.setattr(pipeline, "optimize_plans", fail)
    monkeypatch.setattr(pipeline, "validate_plans", fail)
    monkeypatch.setattr("moa_hub.profile._profile_length", fail)
    again = convert(_config(base_folder, tmp_path, overwrite=True))
    assert again.plan.to_dict() == plan.to_dict()


def test_infeasible_density_names_the_smallest_feasible_one(base_folder, tmp_path):
    from moa_hub.errors import OptimizeError

    config = _config(base_folder, tmp_path)
    with pytest.raises(OptimizeError, match=r"smallest feasible plan density is 0\.1250.*--density 0\.125"):
        convert(ConvertConfig(**{**config.__dict__, "density": 0.05}))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_model_the_export_cannot_take_fails_before_loading(base_folder, tmp_path, monkeypatch):
    """An architecture or attention the export refuses fails at once, not after calibration and profiling."""
    folder = tmp_path / "windowed"
    folder.mkdir()
    for path in base_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(pipeline, "load_dense", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ModelError, match="sliding window of 64 tokens"):
        convert(_config(folder, tmp_path))


def test_convert_takes_a_qwen3_model(tmp_path):
    """Qwen3: per-head query / key RMSNorms before RoPE, and a head_dim apart from hidden_size / heads. Every stage
    runs (profiling goes through Qwen3's own attention module), and the exported model computes what the MoA twin of
    the base model computes under the chosen plan."""
    from conftest import build_moa
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(5)
    config = Qwen3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    dense = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    base = tmp_path / "qwen3-base"
    dense.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = _config(base, tmp_path)
    result = convert(config)
    profile = load_file(str(config.work / "profile" / "profile_256.safetensors"))
    assert all(torch.isfinite(t).all() for t in profile.values())
    assert json.loads((result.output / "config.json").read_text())["model_type"] == "moa_qwen3"
    model = AutoModelForCausalLM.from_pretrained(result.output, trust_remote_code=True).eval()
    assert type(model).__name__ == "MoaQwen3ForCausalLM"
    twin = build_moa(dense, result.plan.to_dict())
    ids = torch.randint(3, len(tokenizer), (2, 300), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=1e-5, atol=1e-5)
    assert result.plan.kv_density(300) < 1.0  # a plan that drops tokens at this length: the spans bite

"""moa-hub export / inspect on tiny random Llama, Mistral, Qwen2 and Qwen3 checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from moa_hub.commands import export as export_commands
from moa_hub.errors import ExportError, ModelError, PlanError
from moa_hub.export import PLAN_FILE, ExportConfig, export
from moa_hub.model_folder import SUPPORTED_ARCHITECTURES
from moa_hub.plan import MoaPlan
from moa_hub.plan_report import inspect_folder, report_lengths
from moa_hub.remote import remote_files

# name -> (config class, model class, config kwargs); ragged head counts, one sharded checkpoint.
TINY = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3},
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        # full attention, as Mistral-7B from v0.2 on (MistralConfig's default is v0.1's 4096-token window)
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None},
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1},
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        # head_dim apart from hidden_size / heads, as Qwen3-4B; per-head q / k norms
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    ),
}
SHARDED = "qwen2"
CLASS_STEM = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(40)]])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> dict[str, Path]:
    import transformers

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("base")
    tokenizer = _tiny_tokenizer()
    folders = {}
    for name, (config_cls, model_cls, shape) in TINY.items():
        config = getattr(transformers, config_cls)(
            hidden_size=48, intermediate_size=96, vocab_size=64, max_position_embeddings=40000, **shape
        )
        model = getattr(transformers, model_cls)(config)
        folder = root / name
        model.save_pretrained(folder, max_shard_size="60KB" if name == SHARDED else "50GB")
        tokenizer.save_pretrained(folder)
        (folder / "LICENSE").write_text(f"licence of the tiny {name}\n")
        folders[name] = folder
    return folders


def random_plan(num_layers: int, num_kv_heads: int, seed: int = 0, **kwargs) -> MoaPlan:
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randint(-500, 3000, (num_layers, num_kv_heads), generator=gen).double()
    beta = torch.rand(num_layers, num_kv_heads, generator=gen, dtype=torch.float64)
    return MoaPlan(alpha=alpha.tolist(), beta=beta.tolist(), **kwargs).with_density([4096, 32768])


def plan_for(folder: Path, path: Path, seed: int = 0) -> Path:
    config = json.loads((folder / "config.json").read_text())
    random_plan(config["num_hidden_layers"], config["num_key_value_heads"], seed=seed).save(path)
    return path


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("name", list(TINY))
def test_export_writes_a_complete_folder(base_models, tmp_path, name):
    base = base_models[name]
    plan_path = plan_for(base, tmp_path / "plan.json", seed=len(name))
    out = export(ExportConfig(model=str(base), plan=plan_path, output=tmp_path / "out"))
    assert out == (tmp_path / "out").resolve()
    assert entries(tmp_path) == {"plan.json", "out"}  # no staging folder left behind

    base_config = json.loads((base / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    arch = SUPPORTED_ARCHITECTURES[base_config["architectures"][0]]
    model_class = f"Moa{CLASS_STEM[name]}ForCausalLM"
    assert config["model_type"] == f"moa_{name}"
    assert config["architectures"] == [model_class]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_moa.{model_class.replace('ForCausalLM', 'Config')}",
        "AutoModelForCausalLM": f"modeling_moa_{name}.{model_class}",
    }
    assert arch.model_class == model_class
    plan = MoaPlan.load(plan_path)
    assert config["moa"] == plan.to_dict()
    assert "quantization_config" not in config
    changed = {"model_type", "architectures", "auto_map", "moa"}
    assert {k: v for k, v in config.items() if k not in changed} == {
        k: v for k, v in base_config.items() if k not in changed
    }
    assert MoaPlan.load(out / PLAN_FILE) == plan == MoaPlan.load(out / "config.json")

    weights = sorted(p.name for p in base.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
    assert (len(weights) > 2) == (name == SHARDED)
    for weight in weights:
        src, dst = base / weight, out / weight
        assert src.stat().st_ino == dst.stat().st_ino or src.read_bytes() == dst.read_bytes()
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert (out / extra).read_bytes() == (base / extra).read_bytes()
    code = {p.name for p in remote_files()}
    assert {"moa_spans.py", "moa_reference.py"} <= code <= entries(out)
    for src in remote_files():
        assert (out / src.name).read_bytes() == src.read_bytes()


def test_overwrite_replaces_the_folder(base_models, tmp_path):
    base = base_models["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    plan_path = plan_for(base, tmp_path / "plan.json", seed=3)
    with pytest.raises(ExportError, match="not empty: pass --overwrite"):
        export(ExportConfig(model=str(base), plan=plan_path, output=out))
    assert entries(out) == {"stale.txt"}
    export(ExportConfig(model=str(base), plan=plan_path, output=out, overwrite=True))
    assert "stale.txt" not in entries(out) and (out / "config.json").is_file()
    assert entries(tmp_path) == {"plan.json", "out"}


def _unsupported(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _windowed(model_type: str, **window):
    """The llama folder relabelled as a base model whose layers attend through a sliding window."""

    def make(base: Path, tmp_path: Path) -> Path:
        folder = tmp_path / f"{model_type}-window"
        shutil.copytree(base, folder)
        config = json.loads((folder / "config.json").read_text())
        arch = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
        config.update(architectures=[arch], model_type=model_type, max_position_embeddings=32768, **window)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def _pickle_only(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(base / "config.json", folder / "config.json")
    torch.save({"w": torch.randn(3, 5)}, folder / "pytorch_model.bin")
    return folder


def _already_moa(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "moa"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="moa_llama", moa=random_plan(3, 3).to_dict())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _edit_plan(**changes):
    def write(path: Path) -> None:
        data = random_plan(3, 3, seed=9).to_dict()
        data.pop("density")
        for key, value in changes.items():
            if key in ("alpha", "beta"):
                data[key][1][2] = value
            else:
                data[key] = value
        path.write_text(json.dumps(data))

    return write


@pytest.mark.parametrize(
    ("model", "write_plan", "error", "message"),
    [
        (None, lambda p: random_plan(3, 2).save(p), PlanError, r"3 layers x 2 kv heads does not fit .*3 kv heads"),
        (None, _edit_plan(alpha=math.nan), PlanError, r"alpha\[1\]\[2\] is nan"),
        (None, _edit_plan(beta=-0.25), PlanError, r"beta\[1\]\[2\] = -0.25 is outside \[0, 1\]"),
        (None, _edit_plan(sink=128, min_span=128), PlanError, r"min_span=128 <= sink=128"),
        (_unsupported, None, ModelError, "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        (_pickle_only, None, ModelError, r"pytorch_model\.bin.*save_pretrained"),
        (_already_moa, None, ModelError, "already a MoA model"),
        (_windowed("mistral", sliding_window=4096), None, ModelError, r"sliding window of 4096 tokens.*null"),
        (
            _windowed("qwen2", sliding_window=2048, use_sliding_window=True, max_window_layers=1),
            None,
            ModelError,
            "sliding window of 2048 tokens",
        ),
        (
            _windowed("qwen3", sliding_window=1024, use_sliding_window=True, max_window_layers=0),
            None,
            ModelError,
            "sliding window of 1024 tokens",
        ),
    ],
)
def test_errors_write_nothing(base_models, tmp_path, model, write_plan, error, message):
    base = base_models["llama"]
    folder = model(base, tmp_path) if model else base
    plan_path = tmp_path / "plan.json"
    (write_plan or (lambda p: random_plan(3, 3).save(p)))(plan_path)
    before = entries(tmp_path)
    with pytest.raises(error, match=message):
        export(ExportConfig(model=str(folder), plan=plan_path, output=tmp_path / "out"))
    assert entries(tmp_path) == before


def test_refuses_to_write_into_the_model(base_models, tmp_path):
    base = base_models["mistral"]
    plan_path = plan_for(base, tmp_path / "plan.json")
    for output in (base, base.parent):
        with pytest.raises(ExportError, match="is \\(or contains\\) the model folder"):
            export(ExportConfig(model=str(base), plan=plan_path, output=output, overwrite=True))
    with pytest.raises(ModelError, match="not a local folder"):
        export(ExportConfig(model="org/not-downloaded", plan=plan_path, output=tmp_path / "out"))


def test_research_plan_is_mapped_to_kv_heads(base_models, tmp_path):
    base = base_models["llama"]  # 6 query heads, 3 kv heads
    gen = torch.Generator().manual_seed(11)
    alphas = torch.randint(-1024, 4096, (3, 6), generator=gen).double().tolist()
    betas = torch.rand(3, 6, generator=gen, dtype=torch.float64).tolist()
    (tmp_path / "thu.json").write_text(json.dumps({"alphas": alphas, "betas": betas}))
    out = export(
        ExportConfig(model=str(base), plan=tmp_path / "thu.json", output=tmp_path / "out", sink=16, min_span=48)
    )
    plan = MoaPlan.load(out / PLAN_FILE)
    assert (plan.sink, plan.min_span) == (16, 48)
    assert plan.alpha[2][1] == max(alphas[2][2:4]) and plan.beta[0][2] == max(betas[0][4:6])


def test_cli_export_and_inspect(base_models, tmp_path):
    app = typer.Typer()
    app.callback()(lambda: None)
    export_commands.register(app)
    runner = CliRunner()
    base = base_models["qwen2"]
    plan_path = plan_for(base, tmp_path / "plan.json", seed=4)
    out = tmp_path / "qwen-moa"
    result = runner.invoke(app, ["export", str(base), "--plan", str(plan_path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Wrote {out.resolve()}" in result.output
    result = runner.invoke(app, ["export", str(base), "--plan", str(plan_path), "--output", str(out)])
    assert isinstance(result.exception, ExportError)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 layers x 1 kv heads" in result.output and "sink 64 tokens, min_span 128 tokens" in result.output
    assert result.output == inspect_folder(out) + "\n"


def test_inspect_report_numbers(tmp_path):
    plan = random_plan(4, 3, seed=2, sink=32, min_span=100)
    plan.save(tmp_path / "plan.json")
    report = inspect_folder(tmp_path / "plan.json")
    for n in (1024, 4096, 131072):
        assert f"{n:>9,}  {plan.kv_density(n):>10.3f}" in report
    rows = [line.split() for line in report.splitlines() if line.split() and line.split()[0] in {"0", "1", "2", "3"}]
    assert len(rows) == 4
    for layer, row in enumerate(rows):
        spans = plan.spans_at(1024)[layer]
        assert [float(x) for x in row[1:4]] == [round(float(spans.mean())), spans.min(), spans.max()]
    assert report_lengths(40000) == [1024, 4096, 16384, 32768, 40000]
    assert report_lengths(131072)[-1] == 131072 and report_lengths(512) == [512]
    with pytest.raises(PlanError, match="holds no MoA plan"):
        inspect_folder(tmp_path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_while_writing_leaves_nothing_half_done(base_models, tmp_path, monkeypatch, overwrite):
    import moa_hub.export as export_module

    base = base_models["mistral"]
    plan_path = plan_for(base, tmp_path / "plan.json", seed=6)
    out = tmp_path / "out"
    if overwrite:
        export(ExportConfig(model=str(base), plan=plan_path, output=out))
    before = {p.name: p.read_bytes() for p in out.iterdir()} if overwrite else None
    vanished = tmp_path / "gone" / "moa_vanished.py"  # a remote file that disappears mid-copy
    monkeypatch.setattr(export_module, "remote_files", lambda: [*remote_files(), vanished])
    with pytest.raises(FileNotFoundError):
        export(ExportConfig(model=str(base), plan=plan_path, output=out, overwrite=overwrite))
    assert entries(tmp_path) == ({"plan.json", "out"} if overwrite else {"plan.json"})
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

"""resolve_model (Hub, cache, offline, errors) and the model card (YAML, plan numbers, pictures)."""

from __future__ import annotations

import sys

import pytest
import yaml
from hub_helpers import WRITE_TOKEN, exported_folder, fake_plan, seed_base, tiny_llama
from hub_server import FakeHub, validate_card_yaml

from moa_hub.card import CardConfig, write_card
from moa_hub.errors import HubError
from moa_hub.plan_summary import PlanSummary
from moa_hub.remote import remote_module
from moa_hub.resolve import ResolveConfig, resolve_model


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub(tokens={WRITE_TOKEN: "alice"}) as server:
        yield server


def test_resolve_pins_commit_filters_files_and_works_offline(hub, tmp_path, monkeypatch):
    sha = seed_base(hub, tiny_llama(tmp_path / "base"))
    cache = tmp_path / "cache"
    resolved = resolve_model("meta/tiny", ResolveConfig(cache_dir=cache, endpoint=hub.endpoint))
    assert resolved.revision_sha == sha and resolved.repo_id == "meta/tiny"
    names = {p.relative_to(resolved.path).as_posix() for p in resolved.path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert not any(n.startswith("original/") or n.endswith(".bin") for n in names)
    hub.add_files("meta/tiny", {"notes.txt": b"new commit"})  # main moves on; offline keeps the cached commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = resolve_model("meta/tiny", ResolveConfig(cache_dir=cache, endpoint=hub.endpoint))
    assert offline.revision_sha == sha and offline.path == resolved.path
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(offline.path).config.num_hidden_layers == 3
    with pytest.raises(HubError, match="not in the local cache"):
        resolve_model("meta/tiny", ResolveConfig(cache_dir=tmp_path / "cold", endpoint=hub.endpoint))


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("gated", "is gated: request access"), ("private", "private"), ("missing", "was not found")],
)
def test_resolve_errors_are_clear(hub, tmp_path, setup, expected):
    if setup == "gated":
        seed_base(hub, tiny_llama(tmp_path / "base"), repo_id="meta/tiny", gated=True)
    if setup == "private":
        hub.create_repo("alice/secret", private=True)
    repo = {"gated": "meta/tiny", "private": "alice/secret", "missing": "meta/nope"}[setup]
    with pytest.raises(HubError, match=expected) as info:
        resolve_model(repo, ResolveConfig(cache_dir=tmp_path / "c", endpoint=hub.endpoint, token=None))
    assert "hf auth login" in str(info.value) or setup == "missing"


def test_resolve_local_folder_and_bad_argument(tmp_path):
    folder = tiny_llama(tmp_path / "m")
    assert resolve_model(folder).revision_sha is None
    with pytest.raises(Exception, match="neither a folder nor a Hub model id"):
        resolve_model("not a model!")


def test_card_metadata_numbers_and_pictures(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    from hub_helpers import BASE_CARD

    (base / "README.md").write_text(BASE_CARD)
    plan = fake_plan(layers=3, heads=2, revision="a" * 40)
    folder = exported_folder(tmp_path / "out", plan)
    path = write_card(folder, CardConfig(repo_id="alice/tiny-moa", base_card=base / "README.md"))
    text = path.read_text()
    assert validate_card_yaml(text) == []
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert meta["base_model"] == "meta/tiny" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "llama3.1" and meta["language"] == ["en", "de"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"moa", "sparse-attention"} <= set(meta["tags"]) and not any(k.startswith("extra_gated") for k in meta)
    assert "trust_remote_code=True" in text and "revision=revision" in text and plan["provenance"]["command"] in text
    span_at = remote_module("moa_spans").span_at
    spans = [span_at(1024, a, plan["beta"][1][g], 16, 48) for g, a in enumerate(plan["alpha"][1])]
    assert f"| 1 | {min(spans)} | {round(sum(spans) / 2)} | {max(spans)} |" in text
    density = PlanSummary.from_plan(plan).density_at(1024)
    assert f"| 1024 | 0.450 | {density:.3f} |" in text
    for png in ("images/moa_spans.png", "images/moa_density.png"):
        assert f"]({png})" in text and (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_extra_missing(tmp_path, monkeypatch):
    folder = exported_folder(tmp_path / "out", fake_plan())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from moa_hub import plots

    with pytest.raises(ImportError, match=r"moa-hub\[plots\]"):
        plots.plot_spans(PlanSummary.from_plan(fake_plan()), tmp_path / "x.png")
    text = write_card(folder, CardConfig()).read_text()
    assert "![" not in text and not (folder / "images").exists()

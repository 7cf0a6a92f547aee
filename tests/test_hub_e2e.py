"""End to end through the fake Hub: export a tiny model, push, load in a fresh process with trust_remote_code.

Wired for the lead: it skips until ``moa_hub.export`` and the remote modeling files exist.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hub_helpers import ROOT, WRITE_TOKEN, fake_plan, hub_env, seed_base, tiny_llama
from hub_server import FakeHub

pytest.importorskip("moa_hub.export", reason="moa_hub.export not merged yet")
if not (ROOT / "modeling" / "modeling_moa_llama.py").exists():
    pytest.skip("modeling/modeling_moa_llama.py not merged yet", allow_module_level=True)

LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, revision=sys.argv[2])
ids = torch.tensor([json.loads(sys.argv[3])])
print(json.dumps(model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()))
"""


def test_export_push_load_generate(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from moa_hub.push import PushConfig, push_folder

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tokens={WRITE_TOKEN: "alice"}) as hub:
        base = tiny_llama(tmp_path / "base")
        sha = seed_base(hub, base)
        plan_path = tmp_path / "plan.json"
        plan_path.write_text(json.dumps(fake_plan(base="meta/tiny", revision=sha)))
        out = tmp_path / "out"
        env = hub_env(tmp_path, hub.endpoint)
        cmd = [sys.executable, "-m", "moa_hub.cli", "export", str(base), "--plan", str(plan_path), "--output", str(out)]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True)
        result = push_folder(
            out, PushConfig(repo_id="alice/tiny-moa", token=WRITE_TOKEN, endpoint=hub.endpoint, private=True)
        )
        prompt = torch.randint(3, 128, (37,)).tolist()
        args = [json.dumps(prompt)]
        local = subprocess.run(
            [sys.executable, "-c", LOAD, str(out), "main", *args], env=env, capture_output=True, text=True
        )
        remote_env = hub_env(tmp_path / "fresh", hub.endpoint, token=WRITE_TOKEN)
        remote = subprocess.run(
            [sys.executable, "-c", LOAD, "alice/tiny-moa", result.commit_sha, *args],
            env=remote_env,
            capture_output=True,
            text=True,
        )
        assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
        assert json.loads(remote.stdout.splitlines()[-1]) == json.loads(local.stdout.splitlines()[-1])
        anonymous = subprocess.run(
            [sys.executable, "-c", LOAD, "alice/tiny-moa", "main", *args],
            env=hub_env(tmp_path / "anon", hub.endpoint),
            capture_output=True,
            text=True,
        )
        assert anonymous.returncode != 0 and "private" in anonymous.stderr.lower() + anonymous.stdout.lower()


def test_convert_from_hub_push_and_load(tmp_path, monkeypatch):
    """`moa-hub convert HUB_ID --push`: resolve from the (fake) Hub, the whole search, push, load elsewhere."""
    from demo_helpers import tiny_llama as tiny_llama_with_vocab
    from demo_helpers import tiny_tokenizer
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tokens={WRITE_TOKEN: "alice"}) as hub:
        base = tmp_path / "base"
        tokenizer = tiny_tokenizer()
        tiny_llama_with_vocab(len(tokenizer), seed=5).save_pretrained(base)
        tokenizer.save_pretrained(base)
        sha = seed_base(hub, base)
        out = tmp_path / "out"
        env = {**hub_env(tmp_path, hub.endpoint), "HF_TOKEN": WRITE_TOKEN}
        cmd = [
            sys.executable, "-m", "moa_hub.cli", "convert", "meta/tiny", "--output", str(out), "--density", "0.6",
            "--profile-lengths", "256,384", "--extend-length", "512", "--num-samples", "2", "--block-size", "16",
            "--device", "cpu", "--dtype", "fp32", "--push", "--repo-id", "alice/tiny-moa-converted", "--private",
        ]  # fmt: skip
        run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        assert WRITE_TOKEN not in run.stdout + run.stderr
        moa = json.loads((out / "config.json").read_text())["moa"]
        assert moa["provenance"]["base_model"] == "meta/tiny" and moa["provenance"]["base_revision"] == sha
        prompt = [json.dumps(torch.randint(3, 300, (41,)).tolist())]
        local = subprocess.run(
            [sys.executable, "-c", LOAD, str(out), "main", *prompt], env=env, capture_output=True, text=True
        )
        remote_env = hub_env(tmp_path / "fresh", hub.endpoint, token=WRITE_TOKEN)
        remote = subprocess.run(
            [sys.executable, "-c", LOAD, "alice/tiny-moa-converted", "main", *prompt],
            env=remote_env, capture_output=True, text=True,
        )  # fmt: skip
        assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
        assert json.loads(remote.stdout.splitlines()[-1]) == json.loads(local.stdout.splitlines()[-1])

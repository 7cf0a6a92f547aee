"""Shared pieces of the Hub tests: a tiny exported folder, a seeded fake Hub, CLI runs in a fresh process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WRITE_TOKEN = "hf_fake_write_token_for_tests_0123456789"
BASE_CARD = """---
license: llama3.1
license_name: llama3.1
language:
- en
- de
extra_gated_prompt: Accept the license
extra_gated_fields:
  Name: text
tags:
- facebook
---
# Base model
"""


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _density(alpha, beta, n: int) -> float:
    from moa_hub.remote import remote_module

    return remote_module("moa_spans").kv_density(alpha, beta, n, 16, 48)


def fake_plan(
    layers: int = 3, heads: int = 2, seed: int = 1, base: str = "meta/tiny", revision: str | None = None
) -> dict:
    g = torch.Generator().manual_seed(seed)
    alpha = (torch.rand(layers, heads, generator=g) * 300 - 100).tolist()
    beta = (torch.rand(layers, heads, generator=g) * 0.6).tolist()
    return {
        "format_version": 1,
        "sink": 16,
        "min_span": 48,
        "alpha": alpha,
        "beta": beta,
        "density": {str(n): _density(alpha, beta, n) for n in (256, 1024)},
        "provenance": {
            "base_model": base,
            "base_revision": revision,
            "moa_hub_version": "0.1.0",
            "calibration": {"dataset": "synthetic", "samples": 8},
            "profile_lengths": [256, 512],
            "density_bounds": {"256": 0.7, "1024": 0.45},
            "command": f"moa-hub convert {base} --density 0.45",
        },
    }


def exported_folder(folder: Path, plan: dict) -> Path:
    """A folder shaped like an export: tiny weights + config.json with a `moa` block and auto_map."""
    tiny_llama(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="moa_llama",
        moa=plan,
        auto_map={
            "AutoConfig": "configuration_moa.MoaConfig",
            "AutoModelForCausalLM": "modeling_moa_llama.MoaLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "moa_plan.json").write_text(json.dumps(plan))
    return folder


def seed_base(hub, folder: Path, repo_id: str = "meta/tiny", gated: bool = False) -> str:
    """Put the tiny model (+ files resolve must skip) into the fake Hub; returns the commit sha."""
    hub.create_repo(repo_id, gated=gated)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["README.md"] = BASE_CARD.encode()
    files["original/consolidated.safetensors"] = b"x" * 64
    files["pytorch_model.bin"] = b"y" * 64
    return hub.add_files(repo_id, files)


def digest_tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hub_env(tmp_path: Path, endpoint: str, token: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_TOKEN=token,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env


CLI = "import sys; from moa_hub import cli; cli.COMMAND_MODULES[:] = ['hub']; cli.main(sys.argv[1:])"


def cli_process(args: list[str], env: dict) -> subprocess.Popen:
    # a shell's background job starts with SIGINT ignored; a child would inherit that, and Python then installs no
    # KeyboardInterrupt handler. A handled signal is reset to the default across exec, so hand the child that.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if ignored else None
    try:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        if ignored:
            signal.signal(signal.SIGINT, previous)


def run_cli(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = cli_process(args, env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

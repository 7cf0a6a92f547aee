"""Profile stage on a tiny random Llama: equals autograd's dL/dA formula, resumes, reduces across ranks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from moa_hub.errors import ProfileError
from moa_hub.profile import CalibrationItem, ProfileConfig, load_profile, partial_path, profile_model

REF_KEY = "moa_test_dense_ref"
BLOCK = 16


def tiny_llama(seed: int = 0, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def random_items(lengths: list[int], seed: int) -> list[CalibrationItem]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(0, 128, (n,), generator=gen).tolist()
        items.append(CalibrationItem(ids, answer_start=int(torch.randint(n // 2, n - 1, (1,), generator=gen))))
    return items


def dense_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Explicit softmax; keeps A and its gradient (the formula under test, straight from autograd)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    probs.retain_grad()
    kwargs["ref_probs"][module.layer_idx] = probs
    return (probs @ value).transpose(1, 2).contiguous(), None


def reference_influence(model, items, length: int) -> torch.Tensor:
    """sum over items, query heads of a group, blocks of E_ij = A_ij (G_ij - sum_k G_ik A_ik) / (1 - A_ij)."""
    AttentionInterface.register(REF_KEY, dense_reference)
    cfg = model.config
    nb = math.ceil(length / BLOCK)
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, nb, nb, dtype=torch.float64)
    model.set_attn_implementation(REF_KEY)
    for item in items:
        probs_by_layer: dict[int, torch.Tensor] = {}
        ids = torch.tensor([item.input_ids])
        logits = model(ids, ref_probs=probs_by_layer).logits
        torch.nn.functional.cross_entropy(logits[0, item.answer_start - 1 : -1], ids[0, item.answer_start :]).backward()
        n = ids.shape[1]
        for layer, probs in probs_by_layer.items():
            a, g = probs[0], probs.grad[0]  # [Hq, n, n]
            infl = a * (g - (g * a).sum(-1, keepdim=True)) / (1 - a).clamp_min(1e-6)
            infl = infl.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), 0.0)
            infl[:, 0] = 0.0  # query 0 sees one key: A = 1, 0 / 0
            pad = nb * BLOCK - n
            infl = torch.nn.functional.pad(infl, (0, pad, 0, pad)).reshape(
                cfg.num_key_value_heads, -1, nb, BLOCK, nb, BLOCK
            )
            total[layer] += infl.sum((1, 3, 5))
    model.set_attn_implementation("sdpa")
    return total


@pytest.mark.parametrize("checkpointing", [True, False])
def test_profile_matches_autograd_formula_float64(tmp_path, checkpointing):
    model = tiny_llama()
    items = random_items([37, 50], seed=1)
    config = ProfileConfig(
        lengths=(50,),
        block_size=BLOCK,
        model_name="tiny@test",
        gradient_checkpointing=checkpointing,
        importance="gradient",
    )
    path = profile_model(model, {50: items}, config, tmp_path)[50]
    got, meta = load_profile(path)
    want = reference_influence(model, items, 50)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 4, 4)
    assert meta == {
        "length": "50",
        "block_size": "16",
        "num_items": "2",
        "items_done": "2",
        "model": "tiny@test",
        "format": "moa-hub-profile-v1",
        "temperature": "1.0",
        "importance": "gradient",
    }
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-4, rel  # float32 storage of float64 sums
    assert torch.count_nonzero(got.triu(1)) == 0  # causal: no influence of later key blocks
    # the model is left as it was found
    assert model.config._attn_implementation == "sdpa" and not model.model.layers[0].training


def test_resume_skips_finished_lengths_and_continues_partial(tmp_path, monkeypatch, caplog):
    model = tiny_llama(dtype=torch.float32)
    items = {40: random_items([40, 33, 21], seed=2), 24: random_items([24, 19], seed=3)}
    config = ProfileConfig(lengths=(24, 40), block_size=BLOCK, save_every=1)
    fresh = profile_model(model, items, config, tmp_path / "fresh")

    import moa_hub.profile as profile_mod

    calls = []
    real = profile_mod._backward_one

    def interrupted(model, item, *args):
        if len(calls) == 3:  # length 24 done (2 items), then 1 item of length 40, then "killed"
            raise KeyboardInterrupt
        calls.append(len(item.input_ids))
        real(model, item, *args)

    monkeypatch.setattr(profile_mod, "_backward_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, items, config, tmp_path / "run")
    assert (tmp_path / "run" / "profile_24.safetensors").exists()
    assert load_profile(partial_path(tmp_path / "run", 40))[1]["items_done"] == "1"

    calls.clear()
    monkeypatch.setattr(profile_mod, "_backward_one", lambda *a: (calls.append(len(a[1].input_ids)), real(*a)))
    with caplog.at_level("INFO", logger="moa_hub.profile"):
        resumed = profile_model(model, items, config, tmp_path / "run")
    assert calls == [33, 21]  # neither length 24 nor the first item of 40 is recomputed
    assert "profile length 40: 2 items in " in caplog.text  # the time per item counts the items of this run
    assert not partial_path(tmp_path / "run", 40).exists()
    for n in (24, 40):
        torch.testing.assert_close(load_profile(resumed[n])[0], load_profile(fresh[n])[0], rtol=1e-5, atol=1e-6)


def test_bad_items_name_the_problem(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    with pytest.raises(ProfileError, match="longer than profile length"):
        profile_model(model, {16: random_items([20], seed=4)}, ProfileConfig(lengths=(16,), block_size=BLOCK), tmp_path)
    with pytest.raises(ProfileError, match="no calibration items"):
        profile_model(model, {}, ProfileConfig(lengths=(16,), block_size=BLOCK), tmp_path)
    with pytest.raises(ProfileError, match="block_size"):
        ProfileConfig(block_size=48)


def test_each_length_logs_its_wall_time(tmp_path, caplog):
    """One line per length (rank 0): wall seconds and seconds per item of the items this call profiled."""
    import logging
    import re

    model = tiny_llama(dtype=torch.float32)
    items = {24: random_items([24, 19, 21], seed=7), 40: random_items([40, 29], seed=8)}
    config = ProfileConfig(lengths=(24, 40), block_size=BLOCK, save_every=1, importance="gradient")
    with caplog.at_level(logging.INFO, logger="moa_hub.profile"):
        profile_model(model, items, config, tmp_path)
    pattern = r"profile length (\d+): (\d+) items in (\d+\.\d{3}) s \((\d+\.\d{3}) s / item\)"
    found = [re.fullmatch(pattern, r.getMessage()) for r in caplog.records if " items in " in r.getMessage()]
    assert [(m.group(1), m.group(2)) for m in found] == [("24", "3"), ("40", "2")], caplog.text
    for m in found:
        seconds, per_item = float(m.group(3)), float(m.group(4))
        assert seconds > 0 and abs(per_item - seconds / int(m.group(2))) < 1e-3


def _rank_worker(model_dir: str, work_dir: str, log_dir: str) -> None:
    """One data-parallel rank: load the model the way the CLI does (device_map="auto") and profile."""
    import os
    from pathlib import Path

    import moa_hub.profile as profile_mod

    real_save = profile_mod._save

    def logged_save(path, *args):
        Path(log_dir, f"save_rank{os.environ['RANK']}_{Path(path).name}").touch()
        real_save(path, *args)

    profile_mod._save = logged_save
    model = LlamaForCausalLM.from_pretrained(model_dir, device_map="auto", dtype=torch.float64)
    items = {40: random_items([40, 33, 21], seed=5)}
    profile_model(model, items, ProfileConfig(lengths=(40,), block_size=BLOCK, save_every=1), Path(work_dir))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_reduce_to_the_single_process_result(tmp_path):
    """`accelerate launch --cpu --num_processes 2` (gloo): sums all-reduced, rank 0 alone writes."""
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    items = {40: random_items([40, 33, 21], seed=5)}
    want = profile_model(model, items, ProfileConfig(lengths=(40,), block_size=BLOCK), tmp_path / "one")
    (tmp_path / "logs").mkdir()
    script = tmp_path / "rank.py"
    dirs = [str(tmp_path / name) for name in ("model", "two", "logs")]
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"from test_profile import _rank_worker\n_rank_worker(*{dirs!r})\n"
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # the torchrun launcher; without CUDA every rank runs on CPU with gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    launch += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
    ]
    env = {
        "HF_TOKEN": "",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": "",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got, meta = load_profile(tmp_path / "two" / "profile_40.safetensors")
    torch.testing.assert_close(got, load_profile(want[40])[0], rtol=1e-5, atol=1e-6)
    assert meta["num_items"] == "3"
    # 3 items over 2 ranks, one item per rank per round: one partial save after round 1, then the final file
    saves = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert saves == ["save_rank0_profile_40.partial.safetensors", "save_rank0_profile_40.safetensors"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["profile_40.safetensors"]


def test_cli_profiles_from_jsonl(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from moa_hub.commands import profile as profile_cmd

    tiny_llama(dtype=torch.float32).save_pretrained(tmp_path / "model")
    lines = [
        {"length": 32, "input_ids": it.input_ids, "answer_start": it.answer_start} for it in random_items([32, 25], 6)
    ]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    app = typer.Typer()
    profile_cmd.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `profile` a sub-command
    args = ["profile", str(tmp_path / "model"), "--calibration", str(tmp_path / "calib.jsonl")]
    args += ["--work-dir", str(tmp_path / "work"), "--profile-lengths", "32", "--block-size", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    influence, meta = load_profile(tmp_path / "work" / "profile_32.safetensors")
    assert influence.shape == (2, 2, 2, 2) and meta["num_items"] == "2" and meta["model"] == str(tmp_path / "model")

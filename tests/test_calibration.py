"""Calibration set: model-written answers, length buckets, on-disk cache, answer-only loss."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from demo_helpers import tiny_llama, tiny_tokenizer

from moa_hub import calibration
from moa_hub.calibration import CalibrationConfig, CalibrationItem, answer_labels, answer_loss, build_calibration
from moa_hub.errors import CalibrationError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=3)


CONFIG = CalibrationConfig(lengths=(173, 251), items_per_length=3, max_answer_tokens=5)


def test_builtin_buckets_and_model_answers(tok, model, tmp_path):
    items = build_calibration(model, tok, CONFIG, tmp_path)
    assert len(items) == 6
    assert sorted(calibration.by_length(items)) == [173, 251]
    assert {it.task for it in items} == set(calibration.BUILTIN_TASKS)
    for item in items:
        assert len(item.input_ids) <= item.length
        assert 0 < item.answer_start < len(item.input_ids) <= item.answer_start + 5
    item = items[0]  # the answer is the model's own greedy continuation
    prompt = torch.tensor([item.input_ids[: item.answer_start]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    n = len(item.input_ids) - item.answer_start
    assert out[0, item.answer_start : item.answer_start + n].tolist() == item.input_ids[item.answer_start :]


def test_cache_is_reused_and_keyed_by_config(tok, model, tmp_path, monkeypatch):
    first = build_calibration(model, tok, CONFIG, tmp_path)
    [cache] = tmp_path.glob("calibration-*.jsonl")
    assert len(cache.read_text().splitlines()) == len(first)

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(calibration, "_answer_prompts", no_generation)
    assert build_calibration(model, tok, CONFIG, tmp_path) == first
    other = CalibrationConfig(lengths=(173,), items_per_length=1, max_answer_tokens=5)
    assert calibration.cache_path(tmp_path, other, tok, model) != cache
    with pytest.raises(AssertionError, match="cache"):
        build_calibration(model, tok, other, tmp_path)


def test_answer_only_loss_mask(tok):
    torch.manual_seed(0)
    item = CalibrationItem(input_ids=torch.randint(3, len(tok), (37,)).tolist(), answer_start=29, task="t", length=64)
    labels = answer_labels(item)
    assert (labels[:29] == -100).all() and labels[29:].tolist() == item.input_ids[29:]
    logits = torch.randn(37, len(tok))
    expected = torch.nn.functional.cross_entropy(logits[28:36], torch.tensor(item.input_ids[29:]))
    torch.testing.assert_close(answer_loss(logits, item), expected)
    changed = logits.clone()
    changed[:28] = torch.randn(28, len(tok))  # prompt positions do not predict answer tokens
    torch.testing.assert_close(answer_loss(changed, item), expected)
    changed[30] += 5 * torch.randn(len(tok))
    assert not torch.allclose(answer_loss(changed, item), expected)


def test_jsonl_with_and_without_answers(tok, model, tmp_path):
    path = tmp_path / "calib.jsonl"
    records = [{"prompt": "def add(a, b):\n    return a + b\n" * 9, "answer": " add"}, {"prompt": "import os\n" * 30}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    config = CalibrationConfig(source=str(path), lengths=(173, 251), items_per_length=1, max_answer_tokens=4)
    items = build_calibration(model, tok, config, tmp_path / "work")
    assert len(items) == 2
    with_answer = next(
        it for it in items if it.input_ids[it.answer_start :] == tok(" add", add_special_tokens=False)["input_ids"]
    )
    assert with_answer.task == "external"
    assert all(len(it.input_ids) <= it.length for it in items)


def test_long_external_prompt_is_truncated_in_the_middle(tok, model, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "x = 1\n" * 400 + "QUESTION END", "answer": " yes"}))
    config = CalibrationConfig(source=str(path), lengths=(173,), items_per_length=1, max_answer_tokens=4)
    [item] = build_calibration(model, tok, config, tmp_path)
    assert len(item.input_ids) <= 173
    assert tok.decode(item.input_ids[: item.answer_start]).endswith("QUESTION END")


def test_errors_name_the_fix(tmp_path, tok, model):
    with pytest.raises(CalibrationError, match="does not exist"):
        build_calibration(model, tok, CalibrationConfig(source=str(tmp_path / "nope.jsonl")), tmp_path)
    with pytest.raises(CalibrationError, match="lengths"):
        CalibrationConfig(lengths=(40,))
    with pytest.raises(CalibrationError, match="unknown calibration tasks"):
        CalibrationConfig(tasks=("kv_retrieval", "poetry"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(CalibrationError, match="prompt-field"):
        build_calibration(model, tok, CalibrationConfig(source=str(bad), lengths=(173,)), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_dataset_without_extra_names_it(tok, model, tmp_path):
    with pytest.raises(ImportError, match=r"moa-hub\[datasets\]"):
        build_calibration(model, tok, CalibrationConfig(source="someone/long-prompts"), tmp_path)

"""Evaluation harness: mechanics on a tiny random model, and the shipped demo model really retrieves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from demo_helpers import tiny_llama, tiny_tokenizer

from moa_hub import evaluate

DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo" / "model"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=1)


@pytest.mark.parametrize(
    ("generated", "answer", "ok"),
    [
        (" 12345\n", " 12345", True),
        ("12345.", " 12345", True),
        (" 123456", " 12345", False),
        (" 1234", " 12345", False),
    ],
)
def test_answer_matches(generated, answer, ok):
    assert evaluate.answer_matches(generated, answer) is ok


def test_needle_tasks_mechanics(tok, model):
    depths = (0.1, 0.55, 0.9)
    [kv] = evaluate.score_retrieval(model, tok, [211], items_per_depth=2, depths=depths)
    assert (kv.task, kv.length, kv.items) == ("kv_retrieval", 211, 6)
    assert set(kv.accuracy_by_depth) == set(depths)
    assert 0.0 <= kv.accuracy <= 1.0
    pk = evaluate.score_passkey(model, tok, [187, 263], items_per_depth=1, depths=depths)
    assert [r.length for r in pk] == [187, 263] and all(r.items == 3 for r in pk)
    with pytest.raises(ValueError, match="task"):
        evaluate.score_needle_task(model, tok, "copying", [200])


def test_perplexity_mechanics(tok, model):
    [res] = evaluate.perplexity(model, tok, [97], windows=2)
    assert (res.length, res.windows, res.tokens) == (97, 2, 192)
    assert math.isclose(res.perplexity, math.exp(res.mean_nll))
    assert 1.0 < res.perplexity < 5 * len(tok)  # random init: about the vocabulary size


@pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="demo model not shipped")
def test_demo_model_retrieves_at_512():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype="float32").eval()
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
    [kv] = evaluate.score_retrieval(model, tok, [512], items_per_depth=1, depths=(0.1, 0.3, 0.5, 0.7, 0.9))
    assert kv.accuracy >= 0.8, kv
    [ppl] = evaluate.perplexity(model, tok, [512], windows=1)
    assert ppl.perplexity < 60, ppl  # a random model over 4096 tokens is in the thousands

"""Synthetic long-context tasks: lengths fit, needles land at their depth, same seed -> same text."""

from __future__ import annotations

import pytest
from demo_helpers import tiny_tokenizer

from moa_hub import tasks


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("length", [233, 517, 1031])
@pytest.mark.parametrize("task", ["kv_retrieval", "passkey", "copying"])
def test_length_fits_and_is_close(tok, task, length):
    enc = tasks.encode(tok, tasks.GENERATORS[task](tok, length, seed=7))
    assert enc.length <= length
    assert enc.length >= 0.8 * length
    assert enc.input_ids[0] == tok.bos_token_id
    assert 0 < enc.query_start < enc.answer_start < enc.length


def test_deterministic_and_seed_dependent(tok):
    a, b, c = (tasks.kv_retrieval(tok, 400, seed=s) for s in (3, 3, 4))
    assert a == b
    assert a.prompt != c.prompt


@pytest.mark.parametrize("depth", [0.05, 0.45, 0.95])
def test_kv_needle_at_depth_and_answer_in_context(tok, depth):
    sample = tasks.kv_retrieval(tok, 700, seed=11, depth=depth)
    key = sample.query.rsplit("line ", 1)[1].rstrip(":")
    lines = [line for line in sample.context.splitlines() if line.startswith("line ")]
    index = next(i for i, line in enumerate(lines) if line.startswith(f"line {key}:"))
    assert abs(index / len(lines) - depth) < 0.1
    assert lines[index] == f"line {key}:{sample.answer}"
    assert len({line.split(":")[0] for line in lines}) == len(lines)


def test_kv_several_questions_end_with_the_asked_one(tok):
    sample = tasks.kv_retrieval(tok, 900, seed=5, n_questions=4)
    assert sample.query.count("Question:") == 4
    assert sample.query.endswith(":") and sample.answer.strip().isdigit()


def test_passkey_and_copying_answers(tok):
    pk = tasks.passkey(tok, 600, seed=2, depth=0.5)
    assert f"The pass key is{pk.answer}." in pk.context
    cp = tasks.copying(tok, 300, seed=2)
    assert cp.context.endswith(cp.answer)


def test_prompts_without_reference_answer(tok):
    for gen in (tasks.multi_document, tasks.summary):
        sample = gen(tok, 800, seed=1)
        assert sample.answer is None
        assert 600 <= tasks.encode(tok, sample).length <= 800


def test_stdlib_split_is_disjoint_and_ordered():
    train, heldout = tasks.stdlib_files("train"), tasks.stdlib_files("heldout")
    assert heldout and len(train) > 5 * len(heldout)
    assert not set(train) & set(heldout)
    assert train == sorted(train)
    with pytest.raises(ValueError, match="split"):
        tasks.stdlib_files("dev")


def test_text_windows_exact_length(tok):
    windows = tasks.text_windows(tok, 129, count=3)
    assert [len(w) for w in windows] == [129, 129, 129]
    assert windows[0] != windows[1]

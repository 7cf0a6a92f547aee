"""Score a causal LM on long-context tasks: key-value retrieval and passkey (needle at each decile), perplexity.

Every function takes any Hugging Face causal LM and its tokenizer (dense, or MoA through its remote code) and
returns typed results. Retrieval is greedy generation: an item is correct when the generated text starts with
the expected answer (and the answer is not just the prefix of a longer word or number). Items use seeds at or
above ``EVAL_SEED_BASE``, which training never uses; perplexity uses the held-out standard-library files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import tasks

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 2_000_000_000
DECILES = tuple((i + 0.5) / 10 for i in range(10))


@dataclass(frozen=True)
class RetrievalResult:
    """Accuracy of one task at one length: overall and per needle depth."""

    task: str
    length: int
    accuracy: float
    items: int
    accuracy_by_depth: dict[float, float]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over ``windows`` held-out windows of ``length`` tokens (``tokens`` predictions)."""

    length: int
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int


def answer_matches(generated: str, answer: str) -> bool:
    """True when ``generated`` starts with ``answer`` (both stripped) and does not run on into more letters/digits."""
    text, expected = generated.strip(), answer.strip()
    if not text.startswith(expected):
        return False
    return len(text) == len(expected) or not text[len(expected)].isalnum()


@torch.inference_mode()
def generate_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt_ids``, decoded without special tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def score_needle_task(
    model,
    tokenizer,
    task: str,
    lengths: Sequence[int],
    items_per_depth: int = 2,
    depths: Sequence[float] = DECILES,
    seed_base: int = EVAL_SEED_BASE,
) -> list[RetrievalResult]:
    """Accuracy of ``task`` ("kv_retrieval" or "passkey") at each length, the needle placed at each depth."""
    if task not in ("kv_retrieval", "passkey"):
        raise ValueError(f"task must be 'kv_retrieval' or 'passkey', got {task!r}")
    generator = tasks.GENERATORS[task]
    results = []
    for length in lengths:
        hits: dict[float, list[bool]] = {d: [] for d in depths}
        jobs = [d for d in depths for _ in range(items_per_depth)]
        for number, depth in enumerate(tqdm(jobs, desc=f"{task} @ {length}", unit="item", leave=False)):
            sample = generator(tokenizer, length, seed_base + number, depth=depth)
            enc = tasks.encode(tokenizer, sample)
            n_answer = enc.length - enc.answer_start
            generated = generate_answer(model, tokenizer, enc.input_ids[: enc.answer_start], n_answer + 3)
            hits[depth].append(answer_matches(generated, sample.answer))
        by_depth = {d: sum(h) / len(h) for d, h in hits.items()}
        accuracy = sum(sum(h) for h in hits.values()) / len(jobs)
        results.append(RetrievalResult(task, length, accuracy, len(jobs), by_depth))
        logger.info("%s at %d tokens: accuracy %.3f over %d items", task, length, accuracy, len(jobs))
    return results


def score_retrieval(model, tokenizer, lengths: Sequence[int], **kwargs) -> list[RetrievalResult]:
    """Key-value retrieval accuracy per length (needle at each decile)."""
    return score_needle_task(model, tokenizer, "kv_retrieval", lengths, **kwargs)


def score_passkey(model, tokenizer, lengths: Sequence[int], **kwargs) -> list[RetrievalResult]:
    """Passkey accuracy per length (needle at each decile)."""
    return score_needle_task(model, tokenizer, "passkey", lengths, **kwargs)


@torch.inference_mode()
def perplexity(model, tokenizer, lengths: Sequence[int], windows: int = 4) -> list[PerplexityResult]:
    """Perplexity on held-out standard-library text, ``windows`` windows of each length, one forward each."""
    device = next(model.parameters()).device
    results = []
    for length in lengths:
        nll_sum, count = 0.0, 0
        for window in tasks.text_windows(tokenizer, length, windows, split="heldout"):
            ids = torch.tensor([window], device=device)  # ids: [1, L]
            logits = model(input_ids=ids).logits[0, :-1].float()  # [L - 1, V]
            nll_sum += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += length - 1
        mean = nll_sum / count
        results.append(PerplexityResult(length, math.exp(mean), mean, count, windows))
        logger.info("perplexity at %d tokens: %.3f", length, math.exp(mean))
    return results

"""Offline synthetic long-context tasks shared by training, calibration and evaluation.

Every generator takes a tokenizer (anything with ``__call__``/``encode`` like a Hugging Face tokenizer), a target
token length and a seed, and returns a :class:`TaskSample`: text whose encoding (special tokens included) is at
most ``length`` tokens and close to it. Same tokenizer, length and seed -> same sample.

Tasks:
- ``kv_retrieval``: LongEval-style lines ``key: value``; the question at the end asks one key's value; the asked
  line sits at a chosen depth (0.0 = start, 1.0 = end) of the list.
- ``passkey``: a 5-digit pass key hidden at a chosen depth in repetitive filler text.
- ``copying``: a run of pseudo-words that the answer repeats exactly.
- ``multi_document`` / ``summary``: prompts over Python standard-library sources without a reference answer
  (calibration lets the model write the answer).
- natural text: the Python standard library's own ``.py``/``.rst``/``.txt`` files, in a fixed order, split into
  train and held-out files by a hash of their relative path (``stdlib_files``, ``text_windows``).

This module imports only the standard library, so scripts can load it by path.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".py", ".rst", ".txt")
HELDOUT_MODULUS = 10  # a file is held out when crc32(relative path) % 10 == 0
MAX_FILE_BYTES = 400_000
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FILLER = (
    "The river runs past the old mill.",
    "Clouds drift over the quiet hills.",
    "A cat sleeps on the warm stone wall.",
    "The market opens early on Mondays.",
    "Leaves fall slowly in the autumn wind.",
    "The train leaves the station at noon.",
    "Children play in the park after school.",
    "The lamp on the desk is still on.",
)


@dataclass(frozen=True)
class TaskSample:
    """One prompt. ``prompt = context + query``; the model should continue it with ``answer``.

    ``answer`` is None for prompts that have no reference answer (calibration generates one).
    """

    task: str
    context: str
    query: str
    answer: str | None
    target_length: int
    depth: float | None = None

    @property
    def prompt(self) -> str:
        return self.context + self.query


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of ``prompt + answer``; ``answer_start`` indexes the first answer token (== len when no answer)."""

    input_ids: list[int]
    query_start: int
    answer_start: int
    task: str
    answer: str | None

    @property
    def length(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, sample: TaskSample) -> EncodedSample:
    """Encode pieces separately (context with special tokens, then query, then answer) and concatenate."""
    ids = list(tokenizer(sample.context, add_special_tokens=True)["input_ids"])
    query_start = len(ids)
    ids += _ids(tokenizer, sample.query)
    answer_start = len(ids)
    if sample.answer:
        ids += _ids(tokenizer, sample.answer)
    return EncodedSample(ids, query_start, answer_start, sample.task, sample.answer)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _special_overhead(tokenizer) -> int:
    return len(tokenizer("a", add_special_tokens=True)["input_ids"]) - len(_ids(tokenizer, "a"))


def _fill(tokenizer, make: Callable[[random.Random], str], budget: int, rng: random.Random) -> list[str]:
    """Draw items from ``make`` until their summed token counts would pass ``budget``."""
    items: list[str] = []
    used = 0
    while True:
        batch = [make(rng) for _ in range(64)]
        for item, n in zip(batch, _counts(tokenizer, batch), strict=True):
            if used + n > budget:
                return items
            items.append(item)
            used += n


def _fit(tokenizer, build: Callable[[list[str]], TaskSample], items: list[str], keep: int | None) -> TaskSample:
    """Drop items (never index ``keep``) until the encoded sample fits its target length."""
    while True:
        sample = build(items)
        if encode(tokenizer, sample).length <= sample.target_length or len(items) <= 1:
            return sample
        drop = len(items) - 1 if keep != len(items) - 1 else len(items) - 2
        items = items[:drop] + items[drop + 1 :]
        keep = keep if keep is None or keep < drop else keep - 1


def pseudo_word(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _depth_index(depth: float, count: int) -> int:
    return min(count - 1, max(0, int(depth * count)))


def kv_retrieval(tokenizer, length: int, seed: int, depth: float | None = None, n_questions: int = 1) -> TaskSample:
    """Key-value lines; the last question asks the key at ``depth`` (random when None).

    With ``n_questions > 1`` the query holds earlier question/answer pairs first (training signal).
    """
    rng = random.Random(f"kv-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    header = "Below is a list of records. Each line holds a key and its value.\n\n"
    # The key is restated after "Answer:", as in LongEval; "line " keeps the key's tokens equal in both places.
    question = "\nQuestion: what is the value in line {0}?\nAnswer: line {0}:"
    per_question = len(_ids(tokenizer, question.format("kuma-tevo") + " 12345\n"))
    n_questions = max(1, min(n_questions, length // (4 * per_question)))  # questions use at most 1/4
    budget = length - len(_ids(tokenizer, header)) - per_question * n_questions - _special_overhead(tokenizer) - 2

    def make_line(r: random.Random) -> str:
        return f"line {pseudo_word(r)}-{pseudo_word(r)}: {r.randint(10000, 99999)}\n"

    lines = _unique_keys(_fill(tokenizer, make_line, max(budget, 1), rng))
    if len(lines) < 2:
        raise ValueError(f"kv_retrieval length {length} is too short for two records: use a length >= 64")
    keys = [line[5:].split(": ")[0] for line in lines]
    target = _depth_index(depth, len(lines))
    others = [keys[i] for i in range(len(lines)) if i != target]
    asked = rng.sample(others, min(n_questions - 1, len(others))) + [keys[target]]

    def build(kept: list[str]) -> TaskSample:
        value = dict(line[5:].rstrip("\n").split(": ") for line in kept)
        shown = [k for k in asked if k in value]
        query = "".join(question.format(k) + f" {value[k]}\n" for k in shown[:-1]) + question.format(shown[-1])
        return TaskSample("kv_retrieval", header + "".join(kept), query, f" {value[shown[-1]]}", length, depth)

    return _fit(tokenizer, build, lines, target)


def _unique_keys(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for line in lines:
        key = line.split(": ")[0]
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out


def passkey(tokenizer, length: int, seed: int, depth: float | None = None) -> TaskSample:
    """A pass key sentence hidden at ``depth`` inside filler sentences."""
    rng = random.Random(f"passkey-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    key = rng.randint(10000, 99999)
    header = "A pass key is hidden in the text below. Remember it.\n\n"
    needle = f"The pass key is {key}. Keep {key} in mind. "
    query = "\n\nWhat is the pass key? The pass key is"
    fixed = len(_ids(tokenizer, header + needle + query + f" {key}"))
    filler = _fill(tokenizer, lambda r: r.choice(_FILLER) + " ", length - fixed - _special_overhead(tokenizer) - 2, rng)
    at = _depth_index(depth, len(filler) + 1)
    items = filler[:at] + [needle] + filler[at:]

    def build(kept: list[str]) -> TaskSample:
        return TaskSample("passkey", header + "".join(kept).rstrip(), query, f" {key}", length, depth)

    return _fit(tokenizer, build, items, at)


def copying(tokenizer, length: int, seed: int) -> TaskSample:
    """Pseudo-words that the answer repeats exactly (about half the tokens each)."""
    rng = random.Random(f"copy-{length}-{seed}")
    header = "Copy the following text exactly.\n\nText:"
    query = "\n\nCopy:"
    budget = (length - len(_ids(tokenizer, header + query)) - _special_overhead(tokenizer) - 2) // 2
    words = _fill(tokenizer, lambda r: " " + pseudo_word(r, r.randint(1, 3)), max(budget, 1), rng)

    def build(kept: list[str]) -> TaskSample:
        text = "".join(kept)
        return TaskSample("copying", header + text, query, text, length)

    return _fit(tokenizer, build, words, None)


# ---------------------------------------------------------------- natural text (Python standard library)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train", root: Path | None = None) -> list[Path]:
    """Text files of the standard library in sorted order; ``split`` is "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix not in TEXT_SUFFIXES or "site-packages" in rel or "dist-packages" in rel:
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        heldout = zlib.crc32(rel.encode()) % HELDOUT_MODULUS == 0
        if split == "all" or heldout == (split == "heldout"):
            files.append(path)
    return files


def stdlib_texts(split: str = "train", max_chars: int | None = None, root: Path | None = None) -> Iterator[str]:
    """File contents in order (undecodable bytes replaced), stopping after ``max_chars`` in total."""
    total = 0
    for path in stdlib_files(split, root):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def text_windows(
    tokenizer, length: int, count: int, split: str = "heldout", root: Path | None = None
) -> list[list[int]]:
    """``count`` windows of exactly ``length`` token ids, cut one after another from the split's files."""
    windows: list[list[int]] = []
    stream: list[int] = []
    for text in stdlib_texts(split, root=root):
        stream += _ids(tokenizer, text + "\n\n")
        while len(stream) >= length and len(windows) < count:
            windows.append(stream[:length])
            stream = stream[length:]
        if len(windows) == count:
            return windows
    raise ValueError(f"the {split!r} standard-library text has fewer than {count} windows of {length} tokens")


def _snippets(length_tokens: int, count: int, rng: random.Random, root: Path | None) -> list[str]:
    """``count`` excerpts of about ``4 * length_tokens`` characters, each from consecutive files at a random start."""
    files = stdlib_files("all", root)
    out = []
    for _ in range(count):
        index, text = rng.randrange(len(files)), ""
        while len(text) < 4 * length_tokens:
            text += files[index % len(files)].read_text(encoding="utf-8", errors="replace") + "\n"
            index += 1
        out.append(text[: 4 * length_tokens])
    return out


def multi_document(tokenizer, length: int, seed: int, root: Path | None = None) -> TaskSample:
    """Several source excerpts labelled Document 1..k; the question is about one of them (no reference answer)."""
    rng = random.Random(f"multidoc-{length}-{seed}")
    k = 4 if length < 2048 else 8
    docs = _snippets(length // k, k, rng, root)
    asked = rng.randrange(len(docs))
    query = f"\n\nQuestion: what does Document {asked + 1} do? Answer in two sentences.\nAnswer:"

    def build(kept: list[str]) -> TaskSample:
        body = "".join(f"Document {i + 1}:\n{d}\n\n" for i, d in enumerate(kept))
        return TaskSample("multi_document", body, query, None, length, asked / max(1, len(kept) - 1))

    return _fit_chars(tokenizer, build, docs)


def summary(tokenizer, length: int, seed: int, root: Path | None = None) -> TaskSample:
    """A long excerpt of standard-library source followed by a request to summarise it (no reference answer)."""
    rng = random.Random(f"summary-{length}-{seed}")
    docs = _snippets(length, 1, rng, root)
    query = "\n\nSummarize the text above in three sentences.\nSummary:"
    return _fit_chars(tokenizer, lambda kept: TaskSample("summary", "".join(kept), query, None, length), docs)


def _fit_chars(tokenizer, build: Callable[[list[str]], TaskSample], docs: list[str]) -> TaskSample:
    """Shorten every document by the same factor until the sample fits."""
    while True:
        sample = build(docs)
        n = encode(tokenizer, sample).length
        if n <= sample.target_length:
            return sample
        scale = 0.97 * sample.target_length / n
        docs = [d[: max(1, int(len(d) * scale))] for d in docs]


GENERATORS: dict[str, Callable[..., TaskSample]] = {
    "kv_retrieval": kv_retrieval,
    "passkey": passkey,
    "copying": copying,
    "multi_document": multi_document,
    "summary": summary,
}

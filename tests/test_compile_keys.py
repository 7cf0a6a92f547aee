"""A new prompt length or cache size compiles no Triton kernel again, but for the prefill's length.

Triton compiles a kernel once per specialization key, and the key holds, for every integer argument not marked
``do_not_specialize``, whether it is 1 and whether it is a multiple of 16. An argument that follows the input's size
(a length, a stride of a cache sized for the prompt) flips between those classes from one call to the next, and the
call that flips it pays a compile (1.2-2.8 s per kernel on the H200: ``benchmarks/compile_variants.py``).

The prefill's length stays specialized on purpose: at lengths that are multiples of 16 the kernel is 4-6% faster at
4k (``benchmarks/specialize_ab.py``), so each prefill config compiles twice at most.
"""

from __future__ import annotations

import pytest
import torch
from conftest import balanced_decode_for_rows, build_dense, build_moa, random_plan

from moa_hub.remote import remote_module

KERNEL_MODULES = ("moa_decode", "moa_decode_balanced", "moa_prefill", "moa_fused")
KEPT = {("moa_prefill._moa_prefill_fwd", "seq_len")}  # specialized on purpose (the module docstring)


def _kernels() -> dict:
    """The launched Triton kernels of the remote code: name -> JIT (or interpreted) function."""
    found = {}
    for module_name in KERNEL_MODULES:
        module = remote_module(module_name)
        for name, value in vars(module).items():
            if name.startswith("_moa_") or name.endswith("_kernel"):
                if hasattr(value, "run") and hasattr(value, "arg_names"):
                    found[f"{module_name}.{name}"] = value
    return found


def _unspecialized(fn) -> set:
    names = getattr(fn, "do_not_specialize", None)
    if names is None:  # the interpreter keeps the jit's keyword arguments
        names = getattr(fn, "kwargs", {}).get("do_not_specialize") or []
    return {fn.arg_names[n] if isinstance(n, int) else n for n in names}


def integer_key(fn, args) -> tuple:
    """The integer part of a launch's specialization key: each positional int argument's class (1, multiple of 16,
    other), except those the kernel does not specialize on."""
    skip = _unspecialized(fn)
    key = []
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, int) and not isinstance(value, bool) and name not in skip:
            key.append((name, "1" if value == 1 else "16k" if value % 16 == 0 else "other"))
    return tuple(key)


def _record(monkeypatch, kernels: dict) -> tuple[dict, dict]:
    """Wrap each kernel's run: every launch's integer key goes into keys[kernel name], but for the KEPT arguments,
    whose classes go into kept[(kernel name, argument)]."""
    keys: dict[str, set] = {}
    kept: dict[tuple, set] = {}
    for label, fn in kernels.items():

        def run(*args, _fn=fn, _run=fn.run, _label=label, **kwargs):
            key = []
            for name, cls in integer_key(_fn, args):
                if (_label, name) in KEPT:
                    kept.setdefault((_label, name), set()).add(cls)
                else:
                    key.append((name, cls))
            keys.setdefault(_label, set()).add(tuple(key))
            return _run(*args, **kwargs)

        monkeypatch.setattr(fn, "run", run, raising=False)
    return keys, kept


@pytest.mark.parametrize("rows", [1, 3], ids=["split kernel", "balanced kernel"])
def test_kernel_keys_do_not_follow_the_prompt_length(monkeypatch, rows):
    """generate() over prompts of 37, 48 and 53 tokens (caches of as many sizes) launches every kernel with the
    same integer key, but for the prefill's length (48 is a multiple of 16). Before the cache's slot count was a
    multiple of 16 and the sizes below were left unspecialized, the prefill's position stride, the rope's length,
    the cache strides of the decode kernels and their partials' row stride changed class between these calls."""
    monkeypatch.setenv("MOA_BACKEND", "triton")
    balanced_decode_for_rows(monkeypatch, rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense = build_dense("llama", 2, seed=6, hidden_size=128, num_attention_heads=8, intermediate_size=256)
    moa = build_moa(dense, random_plan(2, 2, seed=6)).to(device)
    kernels = _kernels()
    assert {"moa_prefill._moa_prefill_fwd", "moa_decode._moa_decode_split", "moa_fused._append_token_kernel",
            "moa_fused._rope_kernel", "moa_fused._write_chunk_kernel",
            "moa_decode_balanced._moa_decode_balanced"} <= set(kernels)  # fmt: skip
    keys, kept = _record(monkeypatch, kernels)
    kw = remote_module("moa_model").cache_argument(type(moa).forward)
    keys_per_call, used = [], []
    for length in (37, 48, 53):
        keys.clear()
        ids = torch.randint(3, 101, (rows, length), generator=torch.Generator().manual_seed(length)).to(device)
        cache = remote_module("moa_cache").MoaCache(moa.config)
        moa.generate(ids, max_new_tokens=3, do_sample=False, disable_compile=True, **{kw: cache})
        keys_per_call.append(dict(keys))
        layer = cache.layers[0]
        used.append((sum(layer.capacity) + 1, layer.keys.shape[1]))
    assert len({n for n, _ in used}) == 3, used  # three cache sizes
    assert all(slots % 16 == 0 and slots - 16 < n <= slots for n, slots in used), used
    decode_kernel = "moa_decode_balanced._moa_decode_balanced" if rows > 1 else "moa_decode._moa_decode_split"
    assert decode_kernel in keys_per_call[0] and "moa_fused._write_chunk_kernel" in keys_per_call[0]
    assert kept == {("moa_prefill._moa_prefill_fwd", "seq_len"): {"16k", "other"}}
    for label in keys_per_call[0]:
        seen = [keys.get(label) for keys in keys_per_call]
        assert all(s == seen[0] for s in seen), (label, _differing(seen))


def _differing(seen: list) -> list:
    """The (argument, class) pairs that are not in every call's keys."""
    pairs = [{pair for key in keys or () for pair in key} for keys in seen]
    common = set.intersection(*pairs)
    return [sorted(p - common) for p in pairs]


def _variants(fn) -> int:
    """Compiled kernels of a JIT function over every device (the first field of each device cache)."""
    count = 0
    for entry in getattr(fn, "device_caches", {}).values():
        count += len(entry[0] if isinstance(entry, tuple) else entry)
    return count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_new_prompt_lengths_compile_nothing(monkeypatch):
    """On the GPU, Triton's own kernel caches: after a first generate() call per batch size, calls with other
    prompt lengths (so other cache sizes) add no compiled kernel, but the first length that is a multiple of 16
    (96) adds the prefill's variant for it."""
    monkeypatch.setenv("MOA_BACKEND", "triton")
    dense = build_dense("llama", 2, seed=9, hidden_size=256, num_attention_heads=4, intermediate_size=256)
    moa = build_moa(dense, random_plan(2, 2, seed=9)).to("cuda")
    kernels = _kernels()
    for rows in (1, 3):
        for index, length in enumerate((70, 71, 77, 90, 96, 101, 112)):
            ids = torch.randint(3, 101, (rows, length), generator=torch.Generator().manual_seed(length)).cuda()
            before = {label: _variants(fn) for label, fn in kernels.items()}
            moa.generate(ids, max_new_tokens=6, do_sample=False)
            after = {label: _variants(fn) for label, fn in kernels.items()}
            grew = {label: after[label] - before[label] for label in kernels if after[label] != before[label]}
            if index == 0:
                assert grew or rows > 1, "the first call compiles"
            elif length == 96 and rows == 1:
                assert grew == {"moa_prefill._moa_prefill_fwd": 1}, grew
            else:
                assert not grew, (rows, length, grew)

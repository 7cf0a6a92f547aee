"""moa_generate / MoaDecodeLoop: the same tokens as generate(), static cache, no growth, CUDA-graph replays."""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, random_plan

from moa_hub.remote import remote_module


def _cache_kw(model) -> str:
    return remote_module("moa_model").cache_argument(type(model).forward)


def _padded_batch(seed: int, lengths=(31, 18, 25)):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 101, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("arch_kv", [("llama", 2), ("qwen2", 4)])
def test_moa_generate_equals_generate_on_a_padded_batch(arch_kv):
    arch, kv = arch_kv
    dense = build_dense(arch, kv, seed=31)
    moa = build_moa(dense, random_plan(2, kv, seed=31))
    ids, mask = _padded_batch(31)
    expected = moa.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    actual = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=14)
    assert torch.equal(actual, expected)


def test_eos_rows_stop_and_are_padded():
    dense = build_dense("llama", 2, seed=5)
    moa = build_moa(dense, random_plan(2, 2, seed=5))
    ids, mask = _padded_batch(5)
    free = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 emits this token at its 4th new position
    stopped = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    expected = moa.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0,
        min_new_tokens=0,
    )  # fmt: skip
    new = stopped[:, ids.shape[1] :]
    first_eos = int((new[0] == eos).nonzero()[0])
    assert first_eos <= 3
    assert torch.all(new[0, first_eos + 1 :] == 0)
    assert torch.equal(stopped[:, : expected.shape[1]], expected)  # generate() stops once every row is done


def test_loop_runs_in_pieces_and_keeps_the_cache_static():
    dense = build_dense("llama", 2, seed=8)
    moa = build_moa(dense, random_plan(2, 2, seed=8))
    ids, mask = _padded_batch(8)
    whole = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=9)
    cache_mod, loop_mod = remote_module("moa_cache"), remote_module("moa_generate")
    cache = cache_mod.MoaCache(moa.config, max_cache_len=ids.shape[1] + 9)
    with torch.inference_mode():
        logits = moa(ids, attention_mask=mask, use_cache=True, **{_cache_kw(moa): cache}).logits[:, -1]
    sizes = [layer.keys.shape for layer in cache.layers]
    loop = loop_mod.MoaDecodeLoop(moa, cache, max_steps=8)
    loop.prime(logits.argmax(-1), cache.layers[0].next_pos)
    pieces = torch.cat([loop.run(3), loop.run(5)], dim=1)
    assert torch.equal(pieces, whole[:, ids.shape[1] + 1 :])
    assert [layer.keys.shape for layer in cache.layers] == sizes  # never reallocated
    assert cache.get_seq_length() == ids.shape[1] + 8
    with pytest.raises(ValueError, match="max_steps=8"):
        loop.run(1)


def test_loop_refuses_a_cache_that_is_too_small_or_dynamic():
    dense = build_dense("llama", 2, seed=2)
    moa = build_moa(dense, random_plan(2, 2, seed=2))
    ids = torch.randint(3, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    cache_mod, loop_mod = remote_module("moa_cache"), remote_module("moa_generate")
    for cache, match in ((cache_mod.MoaCache(moa.config), "static MoaCache"),
                         (cache_mod.MoaCache(moa.config, max_cache_len=16), "max_cache_len >= 17")):  # fmt: skip
        with torch.inference_mode():
            moa(ids, use_cache=True, **{_cache_kw(moa): cache})
        with pytest.raises(ValueError, match=match):
            loop_mod.MoaDecodeLoop(moa, cache, max_steps=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_loop_equals_eager_generate(monkeypatch, backend):
    monkeypatch.setenv("MOA_BACKEND", backend)
    dense = build_dense("llama", 2, seed=3, hidden_size=128, num_attention_heads=8, intermediate_size=256)
    plan = dict(format_version=1, sink=8, min_span=16, alpha=[[20.0, 0.0], [40.0, 8.0]], beta=[[0.1, 0.5], [0.0, 0.3]])
    moa = build_moa(dense, plan).to("cuda")
    ids, mask = _padded_batch(3, lengths=(90, 61, 77))
    ids, mask = ids.cuda(), mask.cuda()
    expected = moa.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    actual = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=40)  # graph captured at step 2
    assert torch.equal(actual, expected)

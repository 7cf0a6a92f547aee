"""moa_generate / MoaDecodeLoop and generate()'s graphed decode steps: the same tokens as eager generate(), static
cache, no growth, CUDA-graph replays."""

from __future__ import annotations

import pytest
import torch
from conftest import balanced_decode_for_rows, build_dense, build_moa, random_plan

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
    expected = moa.generate(
        ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, disable_compile=True
    )  # eager steps, dynamic cache
    actual = moa.moa_generate(ids, attention_mask=mask, max_new_tokens=40)  # the model's first graph: at step 2
    assert torch.equal(actual, expected)
    step = moa.get_compiled_call()
    graphed = moa.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(graphed, expected)
    assert (step.steps, step.replays) == (39, 39)  # captured at step 1: the loop above warmed the model up
    assert step._state is None
    decode, balanced = remote_module("moa_decode"), remote_module("moa_decode_balanced")
    misses = decode._ITEMS.unstored + decode._WORK_LISTS.unstored + balanced._METAS.unstored
    for _ in range(2):  # sampling: the same draws from the same logits; each call captures its cache at step 1
        torch.manual_seed(7)
        sampled = moa.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, pad_token_id=0)
        torch.manual_seed(7)
        eager = moa.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=True, pad_token_id=0, disable_compile=True
        )  # fmt: skip
        assert torch.equal(sampled, eager)
    assert step.replays == 39 + 2 * 11
    cache = remote_module("moa_cache").MoaCache(moa.config, max_cache_len=ids.shape[1] + 40)
    for _ in range(2):  # a cache passed in keeps its graph: the second call replays from its first step
        cache.reset()
        again = moa.generate(
            ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, **{_cache_kw(moa): cache}
        )  # fmt: skip
        assert torch.equal(again, expected)
    assert step.replays == 39 + 2 * 11 + 39 + 39
    # beam search: transformers calls the model itself for its steps; they replay too, beams reordered in place
    beams = dict(max_new_tokens=20, min_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0)
    eager = moa.generate(ids, attention_mask=mask, disable_compile=True, **beams)
    steps, replays = step.steps, step.replays
    assert torch.equal(moa.generate(ids, attention_mask=mask, **beams), eager)
    assert (step.steps - steps, step.replays - replays) == (19, 19)
    assert step.warm_ups == 0
    # every capture after the first found the memos its kernels read (moa_prepare_decode): none rebuilt in a graph
    assert decode._ITEMS.unstored + decode._WORK_LISTS.unstored + balanced._METAS.unstored == misses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_new_batch_size_is_captured_at_its_first_step(monkeypatch):
    """After a model's first graph, a call with another batch size (another decode kernel: the balanced one, where
    the first call ran the split kernel) is captured at its first step with no eager step before it; kernels that
    never ran compile inside the capture. Its tokens equal eager generate()'s, computed afterwards."""
    monkeypatch.setenv("MOA_BACKEND", "triton")
    # head size 32 and groups of 3: shapes no other test compiles kernels for
    dense = build_dense("llama", 2, seed=21, hidden_size=192, num_attention_heads=6, intermediate_size=256)
    plan = dict(format_version=1, sink=8, min_span=16, alpha=[[24.0, 0.0], [40.0, 8.0]], beta=[[0.1, 0.5], [0.0, 0.3]])
    moa = build_moa(dense, plan).to("cuda")
    step = moa.get_compiled_call()
    one, one_mask = (t.cuda() for t in _padded_batch(21, lengths=(70,)))
    moa.generate(one, attention_mask=one_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (step.warm_ups, step.replays) == (1, 6)
    ids, mask = (t.cuda() for t in _padded_batch(22, lengths=(90, 61, 77)))
    graphed = moa.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert (step.warm_ups, step.replays) == (1, 6 + 11)
    steps = step.steps
    moa.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert (step.steps, step.replays, step._state) == (steps + 1, 6 + 11, None)  # one step: eager, nothing captured
    eager = moa.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         disable_compile=True)  # fmt: skip
    assert torch.equal(graphed, eager)
    looped = moa.moa_generate(  # its loop is captured at step 1 too
        ids, attention_mask=mask, max_new_tokens=12, eos_token_id=moa.generation_config.eos_token_id, pad_token_id=0
    )
    assert torch.equal(looped[:, : eager.shape[1]], eager)  # generate() stops once every row has ended
    # a static cache sized with max_cache_len is kept with its graph: the second call replays from its first step
    sized = dict(cache_implementation="static", max_cache_len=128, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(moa.generate(ids, attention_mask=mask, **sized), eager)
    steps, replays = step.steps, step.replays
    assert torch.equal(moa.generate(ids, attention_mask=mask, **sized), eager)
    assert (step.steps - steps, step.replays - replays) == (11, 11)


def _graphs_on_cpu(monkeypatch, moa):
    """Make generate() take its CUDA path on CPU: static cache, steps through GraphedDecodeStep (run eagerly)."""
    monkeypatch.setattr(type(moa), "_moa_graphs_wanted", lambda self, config: not config.disable_compile)
    step = moa.get_compiled_call()
    step.cuda_graph = False
    return step


@pytest.mark.parametrize(
    "options, graphed_steps",
    [(dict(do_sample=False), 8), (dict(do_sample=True, top_k=20, temperature=0.9), 8),
     (dict(do_sample=False, num_beams=3), 8), (dict(do_sample=True, num_beams=2, top_k=20), 8)],
    ids=["greedy", "sample", "beams", "beam-sample"],
)  # fmt: skip
def test_generate_decode_steps_go_through_the_graphed_step(monkeypatch, options, graphed_steps):
    dense = build_dense("llama", 2, seed=12)
    moa = build_moa(dense, random_plan(2, 2, seed=12))
    ids, mask = _padded_batch(12)
    step = _graphs_on_cpu(monkeypatch, moa)
    new = 9

    def run(**extra):
        torch.manual_seed(0)
        return moa.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
            return_dict_in_generate=True, **options, **extra,
        )  # fmt: skip

    eager = run(disable_compile=True)
    assert eager.past_key_values.layers[0].max_cache_len is None  # eager: the dynamic cache, as before
    assert step.steps == 0
    graphed = run()
    layer = graphed.past_key_values.layers[0]
    assert layer.max_cache_len == ids.shape[1] + new  # static: max_length - 1, plus one
    assert torch.equal(graphed.sequences, eager.sequences)
    assert step.steps == graphed_steps  # every decode step (new - 1); the prefill ran the plain forward
    assert step._state is None  # released when generate() returned


def test_generate_with_a_dynamic_cache_or_other_outputs_stays_eager(monkeypatch):
    dense = build_dense("qwen2", 4, seed=13)
    moa = build_moa(dense, random_plan(2, 4, seed=13))
    ids, mask = _padded_batch(13)
    step = _graphs_on_cpu(monkeypatch, moa)
    cache_mod = remote_module("moa_cache")
    reference = moa.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert step.steps == 5
    for extra in (
        {_cache_kw(moa): cache_mod.MoaCache(moa.config)},
        dict(cache_implementation="dynamic"),
        dict(output_hidden_states=True, return_dict_in_generate=True),
    ):
        out = moa.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **extra)
        assert torch.equal(getattr(out, "sequences", out), reference)
        if "output_hidden_states" in extra:  # per step: the embeddings and each layer's output
            assert [len(step) for step in out.hidden_states] == [moa.config.num_hidden_layers + 1] * 6
    assert step.steps == 5
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        moa.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="offloaded")


def test_graphed_step_follows_a_new_cache_and_reordered_rows(monkeypatch):
    """The step is keyed on the cache and its tensors: a second cache gets its own buffers, and an in-place
    reorder (beams) keeps the static cache's addresses."""
    dense = build_dense("llama", 2, seed=14)
    moa = build_moa(dense, random_plan(2, 2, seed=14))
    ids, mask = _padded_batch(14)
    cache_mod = remote_module("moa_cache")
    step = remote_module("moa_generate").GraphedDecodeStep(moa, cuda_graph=False)
    kw = _cache_kw(moa)
    caches = [cache_mod.MoaCache(moa.config, max_cache_len=ids.shape[1] + 4) for _ in range(3)]
    with torch.no_grad():
        for cache in caches:
            moa(ids, attention_mask=mask, use_cache=True, **{kw: cache})
        keys = caches[0].layers[1].keys
        order = torch.tensor([2, 0, 1])
        caches[0].reorder_cache(order)
        assert caches[0].layers[1].keys is keys and caches[0].layers[1].storage_version == 1
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        token = torch.tensor([[5], [6], [7]])
        got = step(input_ids=token[order], attention_mask=mask[order], **{kw: caches[0]}, logits_to_keep=1).logits
        other = step(input_ids=token, attention_mask=mask, **{kw: caches[1]}, logits_to_keep=1).logits
        plain = moa(input_ids=token, attention_mask=mask, **{kw: caches[2]}, logits_to_keep=1).logits
    assert step.steps == 2
    assert torch.allclose(got, plain[order], atol=1e-5)  # rows moved with their cache rows
    assert torch.allclose(other, plain, atol=1e-5)
    assert [cache.get_seq_length() for cache in caches] == [ids.shape[1] + 1] * 3


@pytest.mark.parametrize("rows", [1, 3], ids=["split kernel", "balanced kernel"])
def test_prepare_decode_fills_what_a_captured_first_step_reads(monkeypatch, rows):
    """``moa_prepare_decode`` fills the decode kernels' memos for a new cache, so that a capture of its first step
    finds them and records no op rebuilding them at every replay (a capture computes a missing memo inside the
    graph: counted as ``unstored``). Without it, the first step's memos are all missing: the test can fail."""
    monkeypatch.setenv("MOA_BACKEND", "triton")
    decode, balanced = remote_module("moa_decode"), remote_module("moa_decode_balanced")
    balanced_decode_for_rows(monkeypatch, rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense = build_dense("llama", 2, seed=4, hidden_size=128, num_attention_heads=8, intermediate_size=256)
    moa = build_moa(dense, random_plan(2, 2, seed=4)).to(device)
    ids = torch.randint(3, 101, (rows, 21), generator=torch.Generator().manual_seed(4)).to(device)
    kw = _cache_kw(moa)

    def first_step(prepare: bool):
        cache = remote_module("moa_cache").MoaCache(moa.config, max_cache_len=24)
        with torch.inference_mode():
            token = moa(ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            if prepare:
                moa.model.moa_prepare_decode(cache)
            misses = decode._ITEMS.unstored + decode._WORK_LISTS.unstored + balanced._METAS.unstored
            with monkeypatch.context() as patch:  # as inside a capture: a missing memo is computed and not kept
                patch.setattr(decode, "_capturing", lambda device: True)
                patch.setattr(balanced, "_capturing", lambda device: True)
                logits = moa(token, use_cache=True, **{kw: cache}).logits
            misses = decode._ITEMS.unstored + decode._WORK_LISTS.unstored + balanced._METAS.unstored - misses
        return logits, misses

    prepared, prepared_misses = first_step(prepare=True)
    plain, plain_misses = first_step(prepare=False)
    assert plain_misses == 2  # one per layer
    assert prepared_misses == 0
    assert torch.equal(prepared, plain)


def test_move_rows_equals_a_gather_and_moves_each_changed_row_once(monkeypatch):
    """Every row order of up to 4 rows (repeats, cycles, identity): the result of t.copy_(t[source]), the same
    storage, and one row copy per row that changes."""
    import itertools

    move_rows = remote_module("moa_cache").move_rows
    copied = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (copied.append(len(dst)), real_copy(dst, src)))
    for rows in range(1, 5):
        for source in itertools.product(range(rows), repeat=rows):
            tensors = [torch.randn(rows, 5, 3), torch.randint(-1, 99, (rows, 7), dtype=torch.int32), torch.arange(rows)]
            expected = [t[list(source)] for t in tensors]
            storage = [t.data_ptr() for t in tensors]
            copied.clear()
            move_rows(tensors, list(source))
            assert all(torch.equal(t, e) for t, e in zip(tensors, expected, strict=True)), source
            assert [t.data_ptr() for t in tensors] == storage
            changed = sum(src != row for row, src in enumerate(source))
            # 3 tensors, each changed row written once (the rows a cycle overwrites go aside by _foreach_mul)
            assert sum(copied) == 3 * changed, source
    with pytest.raises(IndexError, match=r"row indices \[0, 3\] out of range for 2 rows"):
        move_rows([torch.zeros(2, 3)], [0, 3])


def test_generate_continues_a_conversation_on_a_static_cache_it_was_given(monkeypatch):
    """Multi-turn: a static MoaCache passed in by the user holds turn 1; turn 2 prefills on it and decodes through the
    graphed step, with the same tokens as eager turns over a dynamic cache."""
    dense = build_dense("llama", 2, seed=15)
    moa = build_moa(dense, random_plan(2, 2, seed=15))
    step = _graphs_on_cpu(monkeypatch, moa)
    cache_mod = remote_module("moa_cache")
    gen = torch.Generator().manual_seed(15)
    turn1, reply = torch.randint(3, 101, (1, 21), generator=gen), torch.randint(3, 101, (1, 9), generator=gen)

    def conversation(cache, **extra):
        kw = {_cache_kw(moa): cache, "do_sample": False, "pad_token_id": 0, **extra}
        first = moa.generate(turn1, max_new_tokens=5, min_new_tokens=5, **kw)
        second = moa.generate(torch.cat([first, reply], dim=1), max_new_tokens=6, min_new_tokens=6, **kw)
        return second, cache.get_seq_length()

    eager = conversation(cache_mod.MoaCache(moa.config), disable_compile=True)
    assert step.steps == 0
    graphed = conversation(cache_mod.MoaCache(moa.config, max_cache_len=64))
    assert torch.equal(graphed[0], eager[0]) and graphed[1] == eager[1] == 21 + 5 + 9 + 5
    assert step.steps == 4 + 5


def test_a_static_cache_passed_in_keeps_its_buffers_across_calls(monkeypatch):
    """generate() on a user's static cache, reset() between prompts: one buffer set (on CUDA, one warm-up and one
    capture) serves every call; a batch of another size after reset() gets new storage and new buffers."""
    dense = build_dense("qwen2", 4, seed=16)
    moa = build_moa(dense, random_plan(2, 4, seed=16))
    step = _graphs_on_cpu(monkeypatch, moa)
    cache = remote_module("moa_cache").MoaCache(moa.config, max_cache_len=48)
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=7, min_new_tokens=7)
    for seed, lengths in ((1, (31, 18, 25)), (2, (30, 29, 12)), (3, (20, 33))):
        ids, mask = _padded_batch(seed, lengths)
        eager = moa.generate(ids, attention_mask=mask, disable_compile=True, **kw)
        cache.reset()
        graphed = moa.generate(ids, attention_mask=mask, **{_cache_kw(moa): cache}, **kw)
        assert torch.equal(graphed, eager)
    assert step.steps == 3 * 6
    assert step.states == 2  # the two 3-row prompts shared one; the 2-row prompt needed its own
    moa.to(torch.float64).to(torch.float32)  # every weight moves: the kept buffers (on CUDA, a graph) must go
    cache.reset()
    assert torch.equal(moa.generate(ids, attention_mask=mask, **{_cache_kw(moa): cache}, **kw), eager)
    assert step.states == 3
    del cache
    assert step._state is None  # freed with the cache


def test_static_cache_sized_with_max_cache_len_is_kept_across_calls(monkeypatch):
    """generate(cache_implementation="static", max_cache_len=N) (transformers' knob for one cache size across calls):
    the model keeps that cache and its buffers (on CUDA, its graph), reset and reused by every call of as many rows
    that fits in N; tokens equal eager generate(). Another row count gets a new cache; a call that makes its cache
    without the knob frees it."""
    dense = build_dense("llama", 2, seed=18)
    moa = build_moa(dense, random_plan(2, 2, seed=18))
    step = _graphs_on_cpu(monkeypatch, moa)
    kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=7)
    sized = dict(cache_implementation="static", max_cache_len=64)
    cases = [(*_padded_batch(seed, lengths), new)
             for seed, lengths, new in ((1, (31, 18, 25), 7), (2, (30, 29, 12), 9), (3, (20, 33), 7), (4, (40, 11), 7))]  # fmt: skip
    eager = [moa.generate(ids, attention_mask=mask, disable_compile=True, max_new_tokens=new, **kw)
             for ids, mask, new in cases]  # fmt: skip
    caches = []
    for (ids, mask, new), expected in zip(cases, eager, strict=True):
        assert torch.equal(moa.generate(ids, attention_mask=mask, max_new_tokens=new, **sized, **kw), expected)
        caches.append(moa.__dict__["_moa_kept_cache"])
    assert caches[0] is caches[1] and caches[2] is caches[3] and caches[1] is not caches[2]
    assert caches[0].layers[0].max_cache_len == 65
    assert step.states == 2  # one buffer set per kept cache
    long = moa.generate(ids, attention_mask=mask, max_new_tokens=30, cache_implementation="static", max_cache_len=80,
                        **kw)  # fmt: skip
    assert moa.__dict__["_moa_kept_cache"].layers[0].max_cache_len == 81  # a larger size asked for: a new cache
    assert torch.equal(long, moa.generate(ids, attention_mask=mask, max_new_tokens=30, disable_compile=True, **kw))
    assert "_moa_kept_cache" not in moa.__dict__  # the call above made its own cache without the knob: freed
    assert step._state is None


def test_generate_falls_back_to_a_dynamic_cache_when_a_static_one_would_not_fit(monkeypatch):
    dense = build_dense("llama", 2, seed=17)
    moa = build_moa(dense, random_plan(2, 2, seed=17))
    step = _graphs_on_cpu(monkeypatch, moa)
    ids, mask = _padded_batch(17)
    cache_mod = remote_module("moa_cache")
    static = cache_mod.MoaCache(moa.config, max_cache_len=ids.shape[1] + 5)  # what generate() makes for 5 tokens
    need = static.planned_nbytes(3, moa.config.hidden_size // moa.config.num_attention_heads, moa.dtype)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    monkeypatch.setattr(type(moa), "_moa_free_bytes", lambda self: int(need / 0.8) + 1)  # just fits
    roomy = moa.generate(ids, **kw)
    assert roomy.past_key_values.layers[0].max_cache_len == ids.shape[1] + 5
    with torch.no_grad():  # what planned_nbytes promised is what the cache allocated
        layers = roomy.past_key_values.layers
        assert need == sum(
            layer.keys.numel() * 2 * layer.keys.element_size() + layer.slot_pos.numel() * 4 for layer in layers
        )
    monkeypatch.setattr(type(moa), "_moa_free_bytes", lambda self: int(need / 0.8) - 1)
    with pytest.warns(RuntimeWarning, match="dynamic cache and eager decode steps"):
        tight = moa.generate(ids, **kw)
    assert tight.past_key_values.layers[0].max_cache_len is None
    assert torch.equal(tight.sequences, roomy.sequences)
    assert step.steps == 4  # only the static call went through the graphed step


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
def test_beams_and_return_sequences_prefill_each_prompt_once(monkeypatch, graphs):
    """generate() repeats every prompt num_beams / num_return_sequences times; the prefill runs each prompt once
    and repeats its cache rows and logits: the same sequences as prefilling every repeat."""
    dense = build_dense("llama", 2, seed=15)
    moa = build_moa(dense, random_plan(2, 2, seed=15))
    ids, mask = _padded_batch(15)
    if graphs:
        _graphs_on_cpu(monkeypatch, moa)
    widths = []
    moa.model.embed_tokens.register_forward_hook(lambda module, args, out: widths.append(tuple(args[0].shape)))
    once = type(moa)._moa_repeated_prompt_rows
    cases = [dict(num_beams=3, do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False),
             dict(do_sample=True, top_k=20, num_return_sequences=3),
             dict(num_beams=3, do_sample=False, prefill_chunk_size=8)]  # fmt: skip
    for options in cases:
        repeats = max(options.get("num_beams", 1), options.get("num_return_sequences", 1))
        outs = []
        for dedup in (True, False):
            monkeypatch.setattr(type(moa), "_moa_repeated_prompt_rows", once if dedup else lambda *args: None)
            widths.clear()
            torch.manual_seed(0)
            outs.append(moa.generate(
                ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
                return_dict_in_generate=True, output_scores=True, **options,
            ))  # fmt: skip
            chunks = [min(8, ids.shape[1] - start) for start in range(0, ids.shape[1], 8)]
            prefill = chunks if "prefill_chunk_size" in options else [ids.shape[1]]
            rows = 3 * (1 if dedup else repeats)
            assert widths[: len(prefill)] == [(rows, width) for width in prefill]
            assert widths[len(prefill) :] == [(3 * repeats, 1)] * 5  # then one-token steps over every repeat
        assert torch.equal(outs[0].sequences, outs[1].sequences), options
        assert torch.allclose(outs[0].scores[0], outs[1].scores[0], atol=1e-5)


def test_continuous_batching_and_assisted_decoding_are_refused_with_a_clear_error():
    """transformers' generate_batch runs a paged, dense cache: refused up front (it used to fail inside the
    batching loop, which logged the error and returned empty generations). Assisted decoding would crop the cache."""
    from transformers import GenerationConfig

    dense = build_dense("llama", 2, seed=16)
    moa = build_moa(dense, random_plan(2, 2, seed=16))
    ids = torch.tensor([[5, 6, 7, 5, 6, 7]])
    for extra in (dict(prompt_lookup_num_tokens=2), dict(assistant_model=dense)):
        with pytest.raises(NotImplementedError, match="assisted or prompt-lookup decoding .* cannot be cropped"):
            moa.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **extra)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="continuous batching .* Use generate\\(\\) on a padded batch"):
        moa.generate_batch([[5, 6, 7], [8, 9]], generation_config=config)

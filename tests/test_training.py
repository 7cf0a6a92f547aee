"""Training through MoA attention: exact gradients, and memory that does not grow with the square of the length."""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, dense_plan, random_plan

from moa_hub.remote import remote_module


def _case(seed: int, bsz=2, num_q=4, num_kv=2, length=150, head_dim=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, num_q, length, head_dim, generator=gen, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(bsz, num_kv, length, head_dim, generator=gen, dtype=dtype, requires_grad=True) for _ in "kv")
    pos = torch.arange(length).repeat(bsz, 1)
    pos[1] = torch.where(torch.arange(length) < 37, -1, torch.arange(length) - 37)  # left padding
    alpha = torch.tensor([12.0, -5.0], dtype=torch.float64)[:num_kv]
    beta = torch.tensor([0.2, 0.45], dtype=torch.float64)[:num_kv]
    grad_out = torch.randn(bsz, num_q, length, head_dim, generator=gen, dtype=dtype)
    return q, k, v, pos, alpha, beta, grad_out


def test_chunked_reference_gradients_equal_one_chunk_float64(monkeypatch):
    """With gradients, the reference recomputes each chunk of queries in the backward pass: same values and
    gradients (float64) as one unchunked computation of the contract's mask."""
    ref = remote_module("moa_reference")
    q, k, v, pos, alpha, beta, grad_out = _case(3)
    monkeypatch.setattr(ref, "GRAD_CHUNK_SCORES", 2 * 4 * 150 * 23)  # chunks of 23 queries: ragged last chunk
    out = ref.moa_attention_ref(q, k, v, pos, pos, alpha, beta, sink=4, min_span=10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    whole = ref._attend_chunk(
        q.reshape(2, 2, 2, 150, 8), k[:, :, None], v[:, :, None], pos, pos[:, None].expand(2, 2, 150),
        alpha.reshape(1, 2, 1, 1), beta.reshape(1, 2, 1, 1), 4, 10, 8**-0.5,
    ).reshape(2, 4, 150, 8)  # fmt: skip
    expected = torch.autograd.grad(whole, (q, k, v), grad_out)
    torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out[1, :, :37].abs().max() == 0 and grads[0][1, :, :37].abs().max() == 0  # padding queries


def test_autograd_keeps_no_score_matrix():
    """What autograd saves for the backward pass is O(length x head_dim), not O(length^2): the largest saved tensor
    is far below one [length, length] matrix (before, every chunk's probabilities were kept)."""
    ref = remote_module("moa_reference")
    q, k, v, pos, alpha, beta, _ = _case(4, length=512, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ref.moa_attention_ref(q, k, v, pos, pos, alpha, beta, sink=4, min_span=10)
    out.sum().backward()
    assert max(saved) <= 2 * 4 * 512 * 8 < 512 * 512


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gradients_of_a_dense_plan_equal_the_dense_model(arch):
    """A training step's gradients (loss on labels, every parameter) of a MoA model whose plan keeps every token equal
    the base model's, padding included."""
    dense = build_dense(arch, 2, seed=8).train()
    moa = build_moa(dense, dense_plan(2, 2)).train()
    ids = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (dense, moa):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_of_a_sparse_plan_do_not_depend_on_the_chunks(monkeypatch):
    """The same training step of a MoA model with a sparse plan, with chunks of 7 queries and with one chunk."""
    ref = remote_module("moa_reference")
    dense = build_dense("llama", 2, seed=9).double().train()
    moa = build_moa(dense, random_plan(2, 2, seed=9)).train()
    ids = torch.randint(3, 101, (2, 60), generator=torch.Generator().manual_seed(9))
    grads = []
    for scores in (2 * 4 * 60 * 7, 2**30):
        monkeypatch.setattr(ref, "GRAD_CHUNK_SCORES", scores)
        moa.zero_grad()
        moa(ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in moa.parameters()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flex_mask_is_the_contract():
    """The FlexAttention mask_mod, evaluated on every (row, query head, query, key), equals the contract's mask of
    the kv head its query head reads (padding rows see nothing), at lengths past the positions' window edges."""
    flex, spans = remote_module("moa_flex"), remote_module("moa_spans")
    length, num_q, group, sink, min_span = 300, 6, 3, 4, 10
    pos = torch.arange(length).repeat(2, 1)
    pos[1] = torch.where(torch.arange(length) < 50, -1, torch.arange(length) - 50)
    alpha = torch.tensor([20.0, -30.0], dtype=torch.float64)
    beta = torch.tensor([0.15, 0.6], dtype=torch.float64)
    visible = flex.mask_mod(pos, flex.window_edges(alpha, beta, sink, min_span, length), sink, group)
    b, h, q, kv = torch.meshgrid(*(torch.arange(n) for n in (2, num_q, length, length)), indexing="ij")
    got = visible(b, h, q, kv)
    qp = pos[:, None, :].expand(2, 2, length)
    want = spans.visible_mask(qp, pos[:, None, :], alpha.view(1, 2, 1, 1), beta.view(1, 2, 1, 1), sink, min_span)
    want = (want & (qp >= 0)[..., None]).repeat_interleave(group, dim=1)
    assert torch.equal(got, want)
    assert 0 < got.sum() < (length * (length + 1) // 2) * num_q * 2  # the windows cut keys


def test_gradients_on_the_cpu_use_the_reference(monkeypatch):
    """FlexAttention serves CUDA only: on the CPU, gradients go through the reference."""
    attention = remote_module("moa_attention")
    assert not remote_module("moa_flex").supported(torch.zeros(1, 1, 4, 16))
    monkeypatch.setattr(attention, "moa_flex_attention", lambda *a, **k: pytest.fail("flex on the CPU"))
    dense = build_dense("llama", 2, seed=10).train()
    moa = build_moa(dense, random_plan(2, 2, seed=10)).train()
    ids = torch.randint(3, 101, (1, 30), generator=torch.Generator().manual_seed(10))
    moa(ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in moa.parameters() if p.requires_grad)


def _to_cuda(*tensors, dtype):
    return [t.detach().to("cuda", dtype).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_flex_values_and_gradients_match_the_reference(dtype):
    """FlexAttention with the MoA block mask against the float64 reference: outputs and the gradients of q, k and v,
    at a ragged length (not a multiple of the 128-token blocks), GQA groups of 4, left padding, fresh inputs."""
    flex, ref = remote_module("moa_flex"), remote_module("moa_reference")
    length, num_q, num_kv, head_dim = 333, 8, 2, 64
    q, k, v, pos, _, _, grad_out = _case(11, num_q=num_q, num_kv=num_kv, length=length, head_dim=head_dim)
    pos[1] = torch.where(torch.arange(length) < 70, -1, torch.arange(length) - 70)
    alpha = torch.tensor([40.0, -30.0], dtype=torch.float64, device="cuda")
    beta = torch.tensor([0.1, 0.5], dtype=torch.float64, device="cuda")
    sink, min_span, scale = 16, 32, head_dim**-0.5
    q64, k64, v64 = _to_cuda(q, k, v, dtype=torch.float64)
    pos, grad_out = pos.cuda(), grad_out.cuda()
    want = ref.moa_attention_ref(q64, k64, v64, pos, pos, alpha, beta, sink, min_span, scale=scale)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out)
    qx, kx, vx = _to_cuda(q, k, v, dtype=dtype)
    got = flex.moa_flex_attention(qx, kx, vx, pos, alpha, beta, sink, min_span, scale)
    got_grads = torch.autograd.grad(got, (qx, kx, vx), grad_out.to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads), strict=True):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, (name, err)
    assert got[1, :, :70].abs().max() == 0 and got_grads[0][1, :, :70].abs().max() == 0  # padding queries


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_through_flex_matches_the_torch_backend(monkeypatch):
    """A training step of a MoA model on the GPU (float32): the Triton backend's prefill with gradients runs
    FlexAttention, and its loss and every parameter's gradient match the torch backend's."""
    attention = remote_module("moa_attention")
    calls = []
    original = attention.moa_flex_attention
    monkeypatch.setattr(attention, "moa_flex_attention", lambda *a: calls.append(1) or original(*a))
    dense = build_dense("qwen3", 2, seed=12, hidden_size=256, num_attention_heads=8, head_dim=64,
                        intermediate_size=512)  # fmt: skip
    plan = dict(
        format_version=1, sink=16, min_span=32, alpha=[[40.0, -20.0], [70.0, 10.0]], beta=[[0.1, 0.6], [0.0, 0.3]]
    )
    moa = build_moa(dense, plan).to("cuda").train()
    ids = torch.randint(3, 101, (2, 300), generator=torch.Generator().manual_seed(12)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOA_BACKEND", backend)
        moa.zero_grad()
        loss = moa(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in moa.parameters()])
    assert len(calls) == 2  # one prefill per layer, on the Triton backend only
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results["triton"][1], results["torch"][1], strict=True):
        assert ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item() < 1e-3


@pytest.mark.parametrize("block", [128, 16])
@pytest.mark.parametrize("start", [0, 300], ids=["from-0", "offset"])
def test_flex_block_tables_are_exact(monkeypatch, start, block):
    """The block mask built from each block's first and last position: a block pair is kept exactly when one of its
    pairs is visible, and marked full (no mask applied) only when all of its pairs are, against the contract's mask
    at every (row, head, query, key); ragged length, left padding, positions that start past 0, mixed heads."""
    flex, spans = remote_module("moa_flex"), remote_module("moa_spans")
    monkeypatch.setattr(flex, "BLOCK", block)  # small blocks: many more block edges meet the window edges
    length, sink, min_span = 700, 64, 128
    pos = torch.arange(length).repeat(3, 1) + start
    pos[1] = torch.where(torch.arange(length) < 200, -1, torch.arange(length) - 200 + start)
    pos[2] = torch.where(torch.arange(length) < 5, -1, torch.arange(length) - 5 + start)
    alpha = torch.tensor([100.0, -40.0, 0.0, 900.0], dtype=torch.float64)
    beta = torch.tensor([0.0, 0.5, 1.0, 0.1], dtype=torch.float64)
    edges = flex.window_edges(alpha, beta, sink, min_span, start + length)
    partial, full = flex.block_tables(pos, edges, sink)
    qp = pos[:, None, :].expand(3, 4, length)
    exact = spans.visible_mask(qp, pos[:, None, :], alpha.view(1, 4, 1, 1), beta.view(1, 4, 1, 1), sink, min_span)
    exact = exact & (qp >= 0)[..., None]
    blocks = -(-length // flex.BLOCK)
    padded = torch.zeros(3, 4, blocks * flex.BLOCK, blocks * flex.BLOCK, dtype=torch.bool)
    padded[..., :length, :length] = exact
    tiles = padded.view(3, 4, blocks, flex.BLOCK, blocks, flex.BLOCK)
    any_visible = tiles.any(5).any(3)
    in_range = torch.zeros_like(padded)
    in_range[..., :length, :length] = True
    all_visible = (tiles | ~in_range.view_as(tiles)).all(5).all(3) & any_visible
    assert torch.equal(partial | full, any_visible)
    assert not (full & ~all_visible).any()  # a full block holds only visible pairs
    assert full.any() and partial.any() and (~any_visible).any()  # every kind occurs here
    mask = flex.block_mask(pos, alpha, beta, sink, min_span, num_q_heads=8)  # groups of 2
    assert torch.equal(mask.to_dense().bool(), any_visible.repeat_interleave(2, dim=1))


def test_activation_checkpointing_of_the_layers_gives_the_same_gradients():
    """transformers' layer checkpointing (the layers recompute their forward in the backward pass) with MoA
    attention: the same gradients as without it."""
    dense = build_dense("llama", 2, seed=13).double().train()
    moa = build_moa(dense, random_plan(2, 2, seed=13)).train()
    ids = torch.randint(3, 101, (2, 50), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    grads = []
    for checkpointed in (False, True):
        if checkpointed:
            enable = getattr(moa, "activation_checkpointing_enable", None) or moa.gradient_checkpointing_enable
            enable()
            assert all(layer.gradient_checkpointing for layer in moa.model.layers)
        moa.zero_grad()
        moa(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in moa.parameters()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

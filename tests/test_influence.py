"""Block-summed influence kernels against autograd's dL/dA formula (float64), at ragged sizes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from moa_hub.remote import remote_module

infl = remote_module("moa_influence")


def random_attention_case(bsz, num_q, num_kv, seq_len, head_dim, dtype=torch.float64, seed=0):
    """q, k, v, the causal output O, a random upstream gradient dO, and the autograd reference E blocks."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, num_q, seq_len, head_dim, generator=gen, dtype=dtype)
    k, v = (torch.randn(bsz, num_kv, seq_len, head_dim, generator=gen, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(bsz, num_q, seq_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v, grad_out


def autograd_reference(q, k, v, grad_out, block_size):
    """E_ij = A_ij (dL/dA_ij - sum_k dL/dA_ik A_ik) / (1 - A_ij) with dL/dA from autograd, block-summed."""
    bsz, num_q, seq_len, head_dim = q.shape
    num_kv, group = k.shape[1], num_q // k.shape[1]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * head_dim**-0.5
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), -1).requires_grad_(True)
    out = probs @ v.repeat_interleave(group, 1)
    (grad_probs,) = torch.autograd.grad(out, probs, grad_out)
    e = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True)) / (1 - probs).clamp_min(infl.INFLUENCE_EPS)
    e = e.masked_fill(future, 0.0).detach()
    e[:, :, 0] = 0.0  # query 0 sees one key: A = 1, 0 / 0
    nb, pad = math.ceil(seq_len / block_size), -seq_len % block_size
    e = torch.nn.functional.pad(e, (0, pad, 0, pad)).reshape(bsz, num_kv, group, nb, block_size, nb, block_size)
    return out.detach(), e.sum((0, 2, 4, 6))


@pytest.mark.parametrize(("seq_len", "block_size", "q_chunk"), [(83, 16, 32), (64, 32, 64), (5, 16, 16)])
def test_torch_influence_equals_autograd_formula_float64(seq_len, block_size, q_chunk):
    q, k, v, grad_out = random_attention_case(2, 6, 2, seq_len, 8, seed=seq_len)
    out, want = autograd_reference(q, k, v, grad_out, block_size)
    got = infl.influence_blocks_torch(q, k, v, out, grad_out, block_size=block_size, q_chunk=q_chunk)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert (got - want).norm() / want.norm() < 1e-4
    assert torch.count_nonzero(got.triu(1)) == 0


def test_torch_influence_is_independent_of_chunking():
    q, k, v, grad_out = random_attention_case(1, 4, 4, 150, 8, dtype=torch.float32, seed=7)
    out, _ = autograd_reference(q.double(), k.double(), v.double(), grad_out.double(), 16)
    a = infl.influence_blocks_torch(q, k, v, out.float(), grad_out, block_size=16, q_chunk=16)
    b = infl.influence_blocks_torch(q, k, v, out.float(), grad_out, block_size=16, q_chunk=1024)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def rerun_under_interpreter(request) -> bool:
    """Without CUDA, run this test again in a process with TRITON_INTERPRET=1 (triton reads it at import).

    Returns True when it did (the caller returns), False when the kernels can run here."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    return True


def test_store_grows_to_longer_items_and_sums():
    store = infl.InfluenceStore(block_size=16)
    a, b = torch.randn(2, 2, 2), torch.randn(2, 3, 3)
    store.add(0, a)
    store.add(0, b)
    want = b.clone()
    want[:, :2, :2] += a
    torch.testing.assert_close(store.sums[0], want)


def _profiled_backward(q, k, v, grad_out, store):
    """Gradients of q, k, v and the store's block sums after one backward of the profiled attention."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = infl._ProfiledAttention.apply(*leaves, q.shape[-1] ** -0.5, store, 0)
    out.backward(grad_out)
    return [t.grad for t in leaves], store.sums[0]


@pytest.mark.parametrize("deterministic", [True, False])
def test_profiled_backward_runs_in_deterministic_mode_and_restores_it(monkeypatch, deterministic):
    seen = []
    real = infl._causal_attention

    def spy(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args)

    monkeypatch.setattr(infl, "_causal_attention", spy)
    q, k, v, grad_out = random_attention_case(1, 4, 2, 37, 8, dtype=torch.float32, seed=11)
    store = infl.InfluenceStore(block_size=16, backend="torch", deterministic=deterministic)
    before = torch.are_deterministic_algorithms_enabled()
    grads, _ = _profiled_backward(q, k, v, grad_out, store)
    assert seen == [False, deterministic]  # the forward, then the recompute in backward
    assert torch.are_deterministic_algorithms_enabled() == before
    # the gradients are SDPA's over K/V expanded per query head (the expand's backward sums the group)
    want = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    ref = torch.nn.functional.scaled_dot_product_attention(
        want[0], want[1].repeat_interleave(group, 1), want[2].repeat_interleave(group, 1), is_causal=True
    )
    ref.backward(grad_out)
    for got, leaf in zip(grads, want, strict=True):
        torch.testing.assert_close(got, leaf.grad)


def test_deterministic_mode_is_restored_after_an_error():
    torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match="boom"), infl.deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_profiled_backward_is_bitwise_repeatable_on_gpu(dtype):
    # long enough that SDPA's backward splits its work over many blocks (where its default order varies)
    q, k, v, grad_out = (t.to("cuda", dtype) for t in random_attention_case(1, 32, 8, 2048, 128, seed=13))
    runs = [_profiled_backward(q, k, v, grad_out, infl.InfluenceStore(64, "auto", True)) for _ in range(3)]
    for grads, sums in runs[1:]:
        for got, want in zip(grads, runs[0][0], strict=True):
            assert torch.equal(got, want)
        assert torch.equal(sums, runs[0][1])


# --- the fused backward (moa_influence_bwd): dq, dk, dv and the influence blocks from two Triton kernels

bwd = remote_module("moa_influence_bwd")
needs_triton = pytest.mark.skipif(bwd.triton is None, reason="triton not installed")


def causal_grads(q, k, v, grad_out):
    """Causal attention's output and dq, dk, dv from autograd in float64 (K/V expanded per query head)."""
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    key, value = (t.repeat_interleave(group, 1) for t in leaves[1:])
    out = torch.nn.functional.scaled_dot_product_attention(leaves[0], key, value, is_causal=True)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double().cpu()
    return ((got.double().cpu() - want).norm() / want.norm()).item()


FUSED_CASES = {  # bsz, query heads, kv heads, seq_len, block_size, dK/dV key_block, query_block
    "mha-L45-bs16": (1, 2, 2, 45, 16, 32, 16),
    "gqa2-L70-bs32": (1, 4, 2, 70, 32, 32, 32),
    "gqa4-L16-batch2": (2, 4, 1, 16, 16, 16, 16),
    "gqa4-L70-bs16": (1, 8, 2, 70, 16, 64, 16),
}


@needs_triton
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_backward_equals_autograd_and_torch_influence(request, case):
    if rerun_under_interpreter(request):
        return
    bsz, num_q, num_kv, seq_len, block_size, key_block, query_block = FUSED_CASES[case]
    q, k, v, grad_out = random_attention_case(bsz, num_q, num_kv, seq_len, 16, torch.float32, seed=seq_len + num_q)
    out, want = causal_grads(q, k, v, grad_out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.float().to(device) for t in (q, k, v, out, grad_out)]
    launch = bwd.BackwardLaunch(key_block=key_block, query_block=query_block)
    *grads, blocks = bwd.attention_backward_with_influence(*args, block_size, launch=launch)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        assert rel_err(got, ref) < 1e-5, name  # float32 inputs, fp32 (ieee) dots
    ref_blocks = infl.influence_blocks_torch(q.double(), k.double(), v.double(), out, grad_out.double(), block_size)
    assert blocks.dtype == torch.float32 and blocks.shape == ref_blocks.shape
    assert rel_err(blocks, ref_blocks) < 1e-5
    assert torch.count_nonzero(blocks.triu(1)) == 0


@needs_triton
def test_fused_backward_defaults_shrink_where_the_gpu_cannot_load_them(request, monkeypatch):
    """The default launch settings fall back to smaller tiles and fewer stages where the GPU has too little shared
    memory (Triton's OutOfResources; a stand-in kernel refuses here); gradients stay equal to autograd's."""
    if rerun_under_interpreter(request):
        return
    monkeypatch.setattr(remote_module("moa_window"), "_FITTED", {})
    real, refused = bwd._bwd_dkdv, []

    class SmallGpu:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["QUERY_BLOCK"] > 16 or kwargs["num_stages"] > 1:
                    refused.append((kwargs["KEY_BLOCK"], kwargs["QUERY_BLOCK"], kwargs["num_stages"]))
                    raise bwd.triton.runtime.errors.OutOfResources(120_000, 101_376, "shared memory")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(bwd, "_bwd_dkdv", SmallGpu())
    q, k, v, grad_out = random_attention_case(1, 4, 2, 70, 16, torch.float32, seed=5)
    out, want = causal_grads(q, k, v, grad_out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.float().to(device) for t in (q, k, v, out, grad_out)]
    with pytest.warns(RuntimeWarning, match=r"attention backward \(dK, dV\): launch config"):
        *grads, _ = bwd.attention_backward_with_influence(*args, 32)
    # (keys per program, query rows per step, stages): the defaults, narrower query steps, fewer keys, one stage
    assert refused == [(64, 64, 2), (64, 32, 2), (32, 32, 2), (32, 32, 1)]
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert rel_err(got, ref) < 1e-5, name


@needs_triton
def test_profiled_backward_takes_the_fused_kernel_without_recompute(request, monkeypatch):
    if rerun_under_interpreter(request):
        return
    fused_calls, attention_calls = [], []
    real_fused, real_attention = bwd.attention_backward_with_influence, infl._causal_attention

    def fused_spy(*args, **kwargs):
        fused_calls.append(torch.are_deterministic_algorithms_enabled())
        return real_fused(*args, **kwargs)

    def attention_spy(*args):
        attention_calls.append(args)
        return real_attention(*args)

    monkeypatch.setattr(bwd, "attention_backward_with_influence", fused_spy)
    monkeypatch.setattr(infl, "_causal_attention", attention_spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, grad_out = (t.to(device) for t in random_attention_case(1, 4, 2, 37, 16, torch.float32, seed=17))
    store = infl.InfluenceStore(block_size=16, backend="auto" if device == "cuda" else "triton")
    grads, sums = _profiled_backward(q, k, v, grad_out, store)
    assert fused_calls == [False] and len(attention_calls) == 1  # the forward only: no SDPA recompute
    out, want = causal_grads(q.cpu(), k.cpu(), v.cpu(), grad_out.cpu())
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert rel_err(got, ref) < 1e-5, name
    ref_blocks = infl.influence_blocks_torch(
        q.cpu().double(), k.cpu().double(), v.cpu().double(), out, grad_out.cpu().double(), 16
    )
    assert rel_err(sums, ref_blocks) < 1e-5


@needs_triton
def test_fused_backward_names_bad_sizes():
    q, k, v, grad_out = random_attention_case(1, 2, 1, 20, 24, torch.float32, seed=2)
    with pytest.raises(ValueError, match="head_dim=24"):
        bwd.attention_backward_with_influence(q, k, v, q, grad_out, 16)
    with pytest.raises(ValueError, match="block_size=48"):
        bwd.attention_backward_with_influence(
            q[..., :16], k[..., :16], v[..., :16], q[..., :16], grad_out[..., :16], 48
        )
    with pytest.raises(ValueError, match="query_block=64 must be <= key_block=32"):
        bwd.BackwardLaunch(key_block=32, query_block=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_backward_bf16_on_gpu_is_as_close_as_sdpa_and_repeatable():
    q, k, v, grad_out = random_attention_case(1, 8, 2, 1000, 128, torch.float32, seed=19)
    out, want = causal_grads(q, k, v, grad_out)
    args = [t.bfloat16().cuda() for t in (q, k, v, out, grad_out)]
    runs = [bwd.attention_backward_with_influence(*args, 64) for _ in range(2)]
    leaves = [t.detach().requires_grad_(True) for t in args[:3]]
    sdpa_out = infl._causal_attention(*leaves, 128**-0.5)
    sdpa_out.backward(args[4])
    ref_blocks = infl.influence_blocks_torch(*(t.double() for t in (q, k, v, out, grad_out)), 64)
    same_dtype_blocks = infl.influence_blocks_torch(*args, 64)
    for name, got, ref, leaf in zip(("dq", "dk", "dv"), runs[0][:3], want, leaves, strict=True):
        drift = rel_err(leaf.grad, ref)  # how far SDPA's own bf16 backward is from float64
        assert rel_err(got, ref) < max(2 * drift, 1e-2), name
    assert rel_err(runs[0][3], ref_blocks) < max(2 * rel_err(same_dtype_blocks, ref_blocks), 1e-2)
    for got, again in zip(runs[0], runs[1], strict=True):
        assert torch.equal(got, again)


def test_fused_backward_is_chosen_only_where_its_kernels_apply():
    from types import SimpleNamespace

    def query(dim, cuda=True, dtype=torch.bfloat16):
        return SimpleNamespace(shape=(1, 4, 8, dim), is_cuda=cuda, dtype=dtype)

    available = infl.triton is not None
    assert infl._use_triton("auto", query(128)) is available
    assert not infl._use_triton("auto", query(96))  # e.g. Phi-3: not a kernel tile; the torch path runs
    assert not infl._use_triton("auto", query(128, cuda=False))
    assert not infl._use_triton("auto", query(128, dtype=torch.float64))
    assert not infl._use_triton("torch", query(128))

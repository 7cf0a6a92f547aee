"""q/k/v and gate/up as one GEMM each on the fused path (modeling/moa_projections.py), on tiny models.

Joined vs separate projections on ragged batches (bit-equal on the CPU), the weights' memory unchanged by
joining, save_pretrained after a joined forward, weights replaced after joining (joined again before use),
and the cases where nothing may be joined (modules that are not plain Linears, hooks, gradients, shared memory).
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, interpret_triton_without_gpu, random_plan

from moa_hub.remote import remote_module

INTERPRET = interpret_triton_without_gpu()
pytest.importorskip("triton")
fused = remote_module("moa_fused")
cache_mod = remote_module("moa_cache")
model_mod = remote_module("moa_model")
proj = remote_module("moa_projections")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(INTERPRET and not fused.INTERPRETED, reason="triton imported before TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MOA_BACKEND", "triton")
    monkeypatch.setenv("MOA_FUSED", "1")


def tiny_moa(arch: str = "llama", biases: bool = False, seed: int = 1):
    """A MoA model with random weights and, with ``biases`` (always for Qwen2), random q/k/v (and MLP) biases."""
    overrides = dict(attention_bias=True, mlp_bias=True) if biases and arch == "llama" else {}
    dense = build_dense(arch, num_kv_heads=2, seed=seed, **overrides)
    moa = build_moa(dense, random_plan(dense.config.num_hidden_layers, 2, seed=seed + 1)).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in moa.named_parameters():
            if name.endswith(".bias"):  # transformers initialises biases to zero
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return moa


def groups(moa) -> list[tuple]:
    """Every q/k/v and gate/up group of the model."""
    out = []
    for layer in moa.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [(attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)]
    return out


def joined(moa) -> list[bool]:
    return [proj._operands(g) is not None for g in groups(moa)]


def storage_bytes(moa) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in moa.parameters()}.values())


def ragged_batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (2, 11), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def prefill_and_decode(moa, steps: int = 2) -> torch.Tensor:
    """Logits of the last position after a prefill of the ragged batch and after each greedy decode step."""
    ids, mask = ragged_batch()
    cache = cache_mod.MoaCache(moa.config, max_cache_len=24)
    with torch.no_grad():
        logits = [moa(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits.append(moa(nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    if INTERPRET:  # the CPU GEMM over the joined weights gives each output the same bits
        assert torch.equal(out, ref)
    elif out.dtype == torch.float16:  # a wider GEMM may round differently: a few units in the last place
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    else:  # cuBLAS may pick another kernel for the wider GEMM (tolerance of the fused-stack test)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def separate(monkeypatch) -> None:
    monkeypatch.setattr(model_mod, "joined_linear", lambda linears, x: None)


@pytest.mark.parametrize("arch,biases", [("llama", False), ("qwen2", True), ("llama", True), ("qwen3", False)])
def test_joined_projections_equal_the_separate_ones(monkeypatch, arch, biases):
    moa = tiny_moa(arch, biases)
    with monkeypatch.context() as patch:
        separate(patch)
        ref = prefill_and_decode(moa)
    assert not any(joined(moa))
    out = prefill_and_decode(moa)
    assert all(joined(moa))
    assert_same(out, ref)  # (test_fused_kernels runs MOA_FUSED=0 on joined weights against the fused path)


def test_a_long_prefill_runs_the_projections_apart(monkeypatch):
    """Above JOINED_MAX_TOKENS tokens (a prefill chunk) the separate GEMMs run; decode steps join."""
    moa = tiny_moa("qwen2")
    with monkeypatch.context() as patch:
        separate(patch)
        ref = prefill_and_decode(moa)
    monkeypatch.setattr(proj, "JOINED_MAX_TOKENS", 8)  # the prefill has 2 x 11 tokens, a decode step 2
    ids, mask = ragged_batch()
    with torch.no_grad():
        moa(ids, attention_mask=mask, use_cache=False)
    assert not any(joined(moa))
    out = prefill_and_decode(moa)
    assert all(joined(moa))
    assert_same(out, ref)


def test_joining_keeps_the_weights_memory_and_parameters():
    moa = tiny_moa("qwen2")
    params = dict(moa.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    before = storage_bytes(moa)
    prefill_and_decode(moa, steps=1)
    assert all(joined(moa))
    assert storage_bytes(moa) == before  # one copy: the old storages were freed
    after = dict(moa.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # same Parameter objects
    for name, value in values.items():
        assert torch.equal(after[name], value), name
    attn = moa.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.bias.untyped_storage().data_ptr() == attn.k_proj.bias.untyped_storage().data_ptr()


def test_save_pretrained_after_a_joined_forward_reloads(tmp_path):
    moa = tiny_moa("qwen2")
    ref = prefill_and_decode(moa)
    assert all(joined(moa))
    state = {name: t.clone() for name, t in moa.state_dict().items()}
    moa.save_pretrained(tmp_path)
    assert not any(joined(moa))  # split one group at a time before saving
    loaded = type(moa).from_pretrained(tmp_path).to(DEVICE).eval()
    assert loaded.state_dict().keys() == state.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert_same(prefill_and_decode(loaded), ref)
    assert all(joined(loaded))
    assert_same(prefill_and_decode(moa), ref)  # the saved model joins again on its next fused forward
    assert all(joined(moa))


# a dtype change the fused path runs in: float64 under the interpreter; float64 on the GPU runs the torch reference
OTHER_DTYPE = torch.float64 if INTERPRET else torch.float16


@pytest.mark.parametrize("change", ["to_other_dtype", "assign_state_dict", "new_parameter", "copy_in_place"])
def test_weights_replaced_after_joining_are_joined_again(monkeypatch, change):
    moa = tiny_moa("llama", biases=True)
    prefill_and_decode(moa, steps=1)
    attn = moa.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(7)
    new_k = torch.randn(attn.k_proj.weight.shape, generator=gen).to(DEVICE) * 0.1
    if change == "to_other_dtype":
        moa.to(OTHER_DTYPE)
        assert storage_bytes(moa) == sum(p.numel() * OTHER_DTYPE.itemsize for p in moa.parameters())  # no copy kept
    elif change == "assign_state_dict":
        state = {name: torch.randn(t.shape, generator=gen).to(DEVICE) * 0.1 for name, t in moa.state_dict().items()}
        moa.load_state_dict(state, assign=True)
        del state  # while it lives, joining would keep a second copy: the weights are then used apart
    elif change == "new_parameter":
        attn.k_proj.weight = torch.nn.Parameter(new_k.clone())
    else:
        with torch.no_grad():
            attn.k_proj.weight.copy_(new_k)  # writes the joined storage: still joined
    assert all(joined(moa)) == (change == "copy_in_place")
    out = prefill_and_decode(moa)
    assert all(joined(moa))
    assert out.dtype == (OTHER_DTYPE if change == "to_other_dtype" else torch.float32)
    separate(monkeypatch)
    proj.split_projections(moa)
    assert_same(out, prefill_and_decode(moa))


def test_nothing_is_joined_where_it_must_not_be(monkeypatch):
    """A subclass of Linear, a forward hook, an accelerate hook, memory another tensor holds, gradients."""
    moa = tiny_moa("llama")
    with monkeypatch.context() as patch:
        separate(patch)
        ref = prefill_and_decode(moa)
    layer0, layer1 = moa.model.layers[0], moa.model.layers[1]

    class OtherLinear(torch.nn.Linear):
        pass

    old = layer0.self_attn.k_proj
    layer0.self_attn.k_proj = OtherLinear(old.in_features, old.out_features, bias=False, device=DEVICE)
    layer0.self_attn.k_proj.load_state_dict(old.state_dict())
    calls = []
    layer0.mlp.up_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    layer1.self_attn.v_proj._hf_hook = object()
    alias = layer1.mlp.gate_proj.weight.detach()  # holds the storage: joining would keep two copies
    assert_same(prefill_and_decode(moa), ref)
    assert joined(moa) == [False, False, False, False]
    assert len(calls) == 3  # the hook saw the prefill and every decode step
    del layer1.self_attn.v_proj._hf_hook, alias
    prefill_and_decode(moa, steps=1)
    assert joined(moa) == [False, False, True, True]
    x = torch.randn(2, 3, moa.config.hidden_size, device=DEVICE)
    with torch.no_grad():  # k and v lie in layer 1's joined storage, which its q_proj holds too
        assert proj.joined_linear((layer0.self_attn.q_proj, *groups(moa)[2][1:]), x) is None
        assert proj.joined_linear(groups(moa)[2], x) is not None
    with torch.enable_grad():
        assert proj.joined_linear(groups(moa)[2], x) is None  # gradients of the Parameters would be lost


def test_a_sharing_twin_follows_the_joined_weights():
    """moa_twin shares the Parameter objects: after the MoA model joins them the dense model reads the same memory."""
    from moa_hub.apply import moa_twin
    from moa_hub.plan import MoaPlan

    dense = build_dense("llama", num_kv_heads=2, seed=5).to(DEVICE)
    ids, mask = ragged_batch()
    with torch.no_grad():
        before = dense(ids, attention_mask=mask).logits
    bytes_before = storage_bytes(dense)
    twin = moa_twin(dense, MoaPlan.from_dict(random_plan(2, 2, seed=6)))
    prefill_and_decode(twin, steps=1)
    assert all(joined(twin))
    assert storage_bytes(dense) == bytes_before == storage_bytes(twin)
    with torch.no_grad():
        assert torch.equal(dense(ids, attention_mask=mask).logits, before)


def test_weights_joined_in_inference_mode_still_train(monkeypatch):
    """Joining inside torch.inference_mode() makes normal tensors: the Parameters still work with autograd after."""
    moa = tiny_moa("qwen2")
    ids, mask = ragged_batch()
    with torch.inference_mode():
        moa(ids, attention_mask=mask, use_cache=False)
    assert all(joined(moa)) and not any(p.is_inference() for p in moa.parameters())
    monkeypatch.setenv("MOA_BACKEND", "torch")  # the reference attention has a backward
    moa(ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
    for q, k, v in groups(moa)[::2]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (q.weight, k.weight, v.bias))

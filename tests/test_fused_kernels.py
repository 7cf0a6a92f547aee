"""moa_fused kernels against the transformers ops they replace (CPU under TRITON_INTERPRET=1, GPU when present).

Each kernel is compared with the torch ops on fresh random inputs: RMSNorm (with and without the residual add),
RoPE on transposed projection views with GQA, SiLU x up, the one-token cache write (sink, ring wrap, padding),
and a whole MoA model run with the fused stack against the same model with ``MOA_FUSED=0``.
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
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not INTERPRET else [])
pytestmark = pytest.mark.skipif(INTERPRET and not fused.INTERPRETED, reason="triton imported before TRITON_INTERPRET")


def ulps_apart(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in units of the dtype's spacing at ref (0: bit-equal)."""
    spacing = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    return float(((out.float() - ref.float()).abs() / spacing).max())


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=weight.dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        return norm(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [80, 128])
def test_rms_norm_matches_the_transformers_norm(dtype, cols):
    gen = torch.Generator(device=DEVICE).manual_seed(cols)
    x = torch.randn(3, 5, cols, device=DEVICE, generator=gen).to(dtype)
    res = torch.randn(3, 5, cols, device=DEVICE, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(cols, device=DEVICE, generator=gen)).to(dtype)
    out = fused.rms_norm(x, weight, 1e-5)
    ref = hf_rms_norm(x, weight, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # the sum of squares is added in another order (and rsqrt may differ in its last bits): in a half dtype one
    # ulp of difference is allowed, in float32 a few
    limit = 8.0 if dtype == torch.float32 else 1.0
    assert ulps_apart(out, ref) <= limit
    h, normed = fused.rms_norm(x, weight, 1e-5, residual=res)
    torch.testing.assert_close(h, res + x, rtol=0, atol=0)  # the add rounds like torch's
    assert ulps_apart(normed, hf_rms_norm(res + x, weight, 1e-5)) <= limit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 2), (7, 1)])
def test_rope_matches_apply_rotary_pos_emb_on_projection_views(dtype, heads):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hq, hkv = heads
    bsz, length, dim = 2, 3, 16
    gen = torch.Generator(device=DEVICE).manual_seed(hq * 10 + hkv)
    # as the attention makes them: [B, L, H * D] projections viewed as [B, H, L, D]
    q = torch.randn(bsz, length, hq * dim, device=DEVICE, generator=gen).to(dtype).view(bsz, length, hq, dim)
    k = torch.randn(bsz, length, hkv * dim, device=DEVICE, generator=gen).to(dtype).view(bsz, length, hkv, dim)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    angle = torch.randn(bsz, length, dim // 2, device=DEVICE, generator=gen) * 3
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    assert fused.rope_supported(q, k, cos)
    q_out, k_out = fused.rope(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)  # each product and the sum rounded as torch does
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["apart", "joined"])
def test_silu_mul_matches_the_llama_mlp_activation(dtype, layout):
    """Separate tensors, and the two halves of one joined gate/up projection [B, L, 2 * I] (row-strided views)."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    if layout == "joined":
        gate_up = torch.randn(2, 3, 74, device=DEVICE, generator=gen).to(dtype)
        gate, up = (gate_up * torch.tensor([4.0] * 37 + [1.0] * 37, device=DEVICE).to(dtype)).split(37, dim=-1)
        assert not gate.is_contiguous()
    else:
        gate = (torch.randn(5, 37, device=DEVICE, generator=gen) * 4).to(dtype)
        up = torch.randn(5, 37, device=DEVICE, generator=gen).to(dtype)
    ref = torch.nn.functional.silu(gate) * up
    out = fused.silu_mul(gate, up)
    assert out.shape == gate.shape and out.is_contiguous()
    assert ulps_apart(out, ref) <= (4.0 if dtype == torch.float32 else 1.0)  # exp may differ in its last bits
    up_before = up.clone()
    written = fused.silu_mul(gate, up, in_place=True)  # over gate (for joined: the first half of each row)
    assert written is gate and torch.equal(gate, out) and torch.equal(up, up_before)


def test_silu_mul_in_place_falls_back_when_gate_cannot_be_flattened_in_place():
    base = torch.randn(4, 6, 10, device=DEVICE)
    gate, up = base.transpose(0, 1), torch.randn(6, 4, 10, device=DEVICE)  # [6, 4, 10]: reshape(-1, 10) copies
    before = gate.clone()
    out = fused.silu_mul(gate, up, in_place=True)
    assert out is not gate and torch.equal(gate, before)
    torch.testing.assert_close(out, torch.nn.functional.silu(before) * up, rtol=1e-5, atol=1e-6)


def test_append_token_writes_what_the_torch_cache_write_writes():
    """Sink positions, ring slots before and after the ring wraps, and a padding row (position -1)."""
    alpha, beta, sink, min_span = [6.0, 3.0, 40.0], [0.0, 0.25, 0.0], 4, 8
    bsz, hkv, dim = 4, 3, 16
    for start in (2, 5, 30):  # first position written: inside the sink, just past it, after the ring wrapped
        layers = [cache_mod.MoaCacheLayer(alpha, beta, sink, min_span, max_cache_len=48) for _ in range(2)]
        gen = torch.Generator(device=DEVICE).manual_seed(start)
        prompt_k = torch.randn(bsz, hkv, start, dim, device=DEVICE, generator=gen)
        prompt_v = torch.randn_like(prompt_k)
        q_pos = torch.arange(start, device=DEVICE).expand(bsz, -1).clone()
        q_pos[3] = -1  # a row that is all padding so far
        for layer in layers:
            layer.write(prompt_k, prompt_v, q_pos)
        for step in range(12):  # decode steps, the ring wraps on the way
            key = torch.randn(bsz, hkv, 1, dim, device=DEVICE, generator=gen)
            value = torch.randn_like(key)
            pos = torch.full((bsz, 1), start + step, device=DEVICE)
            pos[3] = -1 if step < 3 else step - 3  # padding, then the row starts
            layers[0].write(key, value, pos)
            layers[1].write_token(key, value, pos[:, 0], fused.append_token)
            for name in ("keys", "values", "slot_pos", "next_pos"):  # the trash slot (last) holds any padding's K/V
                fused_t, torch_t = getattr(layers[1], name), getattr(layers[0], name)
                if name in ("keys", "values"):
                    fused_t, torch_t = fused_t[:, :-1], torch_t[:, :-1]
                torch.testing.assert_close(fused_t, torch_t, rtol=0, atol=0)
            assert layers[1].seq_len == layers[0].seq_len


@pytest.mark.parametrize("dim,dtype", [(16, torch.float32), (24, torch.float16)])
def test_write_chunk_writes_what_the_torch_cache_write_writes(dim, dtype):
    """Chunks written by ``moa_fused.write_chunk`` against the torch scatter, slot for slot: sink positions, a chunk
    longer than a head's ring (it wraps inside the chunk), chunks on an existing cache, left padding, a row that is
    all padding, key/value as transposed projection views, a head dim that is not a power of two, a dynamic cache
    that grows between chunks, and chunks of one token."""
    alpha, beta, sink, min_span = [6.0, 3.0, 40.0], [0.0, 0.25, 0.0], 4, 8
    bsz, hkv = 4, 3
    for max_len, chunks in ((64, (5, 30, 1, 9)), (None, (13, 2, 26, 1)), (64, (50,))):
        layers = [cache_mod.MoaCacheLayer(alpha, beta, sink, min_span, max_cache_len=max_len) for _ in range(2)]
        gen = torch.Generator(device=DEVICE).manual_seed(sum(chunks))
        start = torch.tensor([0, -3, -9, -1000], device=DEVICE)  # rows 1, 2 left-padded; row 3 padding throughout
        done = 0
        for length in chunks:
            proj = torch.randn(bsz, length, 2 * hkv, dim, device=DEVICE, generator=gen).to(dtype)
            key, value = proj[:, :, :hkv].transpose(1, 2), proj[:, :, hkv:].transpose(1, 2)  # [B, Hkv, L, D] views
            q_pos = start[:, None] + torch.arange(done, done + length, device=DEVICE)
            q_pos = torch.where(q_pos < 0, -1, q_pos)
            layers[0].write(key, value, q_pos)
            layers[1].write(key, value, q_pos, fused.write_chunk)
            done += length
            assert layers[1].capacity == layers[0].capacity and layers[1].seq_len == layers[0].seq_len
            for name in ("keys", "values", "slot_pos", "next_pos"):  # the torch path sends evicted tokens to trash
                fused_t, torch_t = getattr(layers[1], name), getattr(layers[0], name)
                if name in ("keys", "values"):
                    fused_t, torch_t = fused_t[:, :-1], torch_t[:, :-1]
                torch.testing.assert_close(fused_t, torch_t, rtol=0, atol=0)
        ring_full = layers[1].slot_pos[0] >= 0
        assert int(ring_full.sum()) == sum(layers[1].capacity), "every head's slots hold a token by the end"


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 2), ("mistral", 4), ("qwen3", 2)])
def test_fused_stack_equals_the_transformers_layers(monkeypatch, arch, kv):
    """Prefill and decode steps of a MoA model: fused kernels on vs MOA_FUSED=0, same logits and cache."""
    monkeypatch.setenv("MOA_BACKEND", "triton")
    dtype = torch.float32
    dense = build_dense(arch, num_kv_heads=kv, seed=1)
    moa = build_moa(dense, random_plan(dense.config.num_hidden_layers, kv, seed=2)).to(DEVICE, dtype)
    assert moa.model._fusable_stack()
    ids = torch.randint(3, dense.config.vocab_size, (2, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MOA_FUSED", flag)
        cache = cache_mod.MoaCache(moa.config, max_cache_len=16)
        with torch.inference_mode():
            logits = [moa(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
            nxt = logits[-1].argmax(-1, keepdim=True)
            for _ in range(3):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                logits.append(moa(nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1])
                nxt = logits[-1].argmax(-1, keepdim=True)
        mask = mask[:, :12]
        # without the trash slot, whose K/V is whichever padding token was written there last
        results[flag] = (torch.stack(logits), cache.layers[0].keys[:, :-1].clone(), cache.layers[-1].slot_pos.clone())
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["1"][1], results["0"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["1"][2], results["0"][2], rtol=0, atol=0)


def test_fused_stack_frees_each_mlp_activation_before_the_next_one(monkeypatch):
    """At a prefill chunk's size every [tokens, intermediate] tensor is GiBs: when the down projection runs, only the
    activation (written over the gate output) is alive, and no layer's MLP tensors live on into the next layer."""
    import weakref

    monkeypatch.setenv("MOA_BACKEND", "triton")
    dense = build_dense("llama", num_kv_heads=2, seed=1)
    moa = build_moa(dense, random_plan(dense.config.num_hidden_layers, 2, seed=2)).to(DEVICE, torch.float32)
    outputs: list = []  # weak references to every gate / up projection output
    live_at: dict[str, list[int]] = {"down": [], "gate": []}

    def live() -> int:
        return sum(ref() is not None for ref in outputs)

    for layer in moa.model.layers:  # hooks also keep the projections apart (a hooked Linear is never joined)
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: live_at["gate"].append(live()))
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: live_at["down"].append(live()))
    ids = torch.randint(3, dense.config.vocab_size, (2, 12), device=DEVICE)
    with torch.inference_mode():
        moa(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    layers = dense.config.num_hidden_layers
    assert live_at == {"down": [1] * layers, "gate": [0] * layers}


def test_fused_path_is_off_where_it_must_be(monkeypatch):
    """No fused kernels on the torch backend, with MOA_FUSED=0, or when a gradient is needed."""
    model_mod = remote_module("moa_model")
    x = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    monkeypatch.setenv("MOA_BACKEND", "torch")
    assert model_mod._fused_for(x.detach()) is None
    monkeypatch.setenv("MOA_BACKEND", "triton")
    assert model_mod._fused_for(x.detach()) is fused
    assert model_mod._fused_for(x) is None  # autograd would need a backward the kernels do not have
    with torch.no_grad():
        assert model_mod._fused_for(x) is fused
    monkeypatch.setenv("MOA_FUSED", "0")
    assert model_mod._fused_for(x.detach()) is None


def test_warps_are_powers_of_two_for_any_head_count(monkeypatch):
    """Qwen2.5-7B has 28 query heads: 28 x 128 values per token must still give a power-of-two warp count."""
    monkeypatch.setattr(fused, "INTERPRETED", False)
    for elements in (28 * 128, 3584, 7 * 128, 100, 4096, 10**6):
        warps = fused._warps(elements)
        assert 1 <= warps <= 16 and warps & (warps - 1) == 0, (elements, warps)

"""Hooks and devices on the Triton backend: accelerate's offload and dispatch, users' forward hooks.

The fused stack calls each layer's norms and MLP itself, past the layer's ``__call__``, so it would skip hooks: the
weights of an offloaded layer (on the meta device until accelerate's hook brings them), or a hook that reads or
steers a layer's output. A stack with such hooks runs the layers as transformers does.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from conftest import build_dense, build_moa, interpret_triton_without_gpu, random_plan

from moa_hub.remote import remote_module

INTERPRET = interpret_triton_without_gpu()
pytest.importorskip("triton")
accelerate = pytest.importorskip("accelerate")
fused = remote_module("moa_fused")
cache_mod = remote_module("moa_cache")
model_mod = remote_module("moa_model")
pytestmark = pytest.mark.skipif(INTERPRET and not fused.INTERPRETED, reason="triton imported before TRITON_INTERPRET")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch, request):
    if request.node.callspec.params.get("device") == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors on the Triton backend need TRITON_INTERPRET=1")
    monkeypatch.setenv("MOA_BACKEND", "triton")
    monkeypatch.setenv("MOA_FUSED", "1")


def tiny_moa(device: str, seed: int = 31):
    dense = build_dense("llama", 2, seed=seed)
    return build_moa(dense, random_plan(2, 2, seed=seed)).to(device)


def prefill_and_decode(moa, device: str, steps: int = 2) -> torch.Tensor:
    """Logits of a left-padded prefill (every position) and of greedy decode steps over a MoaCache."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 101, (2, 13), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = {model_mod.cache_argument(type(moa).forward): cache_mod.MoaCache(moa.config, max_cache_len=24)}
    with torch.no_grad():
        out = moa(ids, attention_mask=mask, use_cache=True, **cache).logits
        logits = [out[:, i] for i in range(out.shape[1])]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits.append(moa(nxt, attention_mask=mask, use_cache=True, **cache).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("device", DEVICES)
def test_an_offloaded_model_equals_the_model_in_memory(device):
    """device_map with a layer offloaded (to disk on the CPU, to host memory on the GPU): accelerate's hook brings
    its weights in at each call. The fused stack would read them on the meta device."""
    moa = tiny_moa(device)
    expected = prefill_and_decode(moa, device)
    offloaded = copy.deepcopy(moa).cpu()
    where = "disk" if device == "cpu" else "cpu"
    main = 0 if device == "cuda" else "cpu"
    device_map = {"model.embed_tokens": main, "model.rotary_emb": main, "model.layers.0": main,
                  "model.layers.1": where, "model.norm": main, "lm_head": main}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        offloaded = accelerate.dispatch_model(offloaded, device_map=device_map, main_device=main, offload_dir=folder)
        assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"
        actual = prefill_and_decode(offloaded, device)
        ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(7)).to(device)
        tokens = offloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, moa.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_hooks_on_layers_run(device):
    """A hook that records a layer's output and one that steers it (adds a vector) run on every forward, prefill and
    decode, and give the outputs of the torch backend with the same hooks."""
    moa = tiny_moa(device)
    seen = []
    steer = torch.randn(moa.config.hidden_size, generator=torch.Generator().manual_seed(6)).to(device)
    moa.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))

    def steering(module, args, out):
        return out + steer

    moa.model.layers[1].register_forward_hook(steering)
    actual = prefill_and_decode(moa, device)
    assert len(seen) == 3  # the prefill and two decode steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOA_BACKEND", "torch")
        expected = prefill_and_decode(moa, device)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    unsteered = tiny_moa(device)
    assert not torch.allclose(prefill_and_decode(unsteered, device), expected, atol=1e-2)  # the hook changed them

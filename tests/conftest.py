"""Shared fixtures: tiny random models of every supported architecture, MHA and GQA, and MoA plans."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_TOKEN", "")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MOA_BACKEND", "torch")
torch.set_num_threads(min(2, torch.get_num_threads()))

from moa_hub.remote import remote_module  # noqa: E402


def patch_interpreter_index() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 rejects."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "_moa_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._moa_index_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter_index()


def interpret_triton_without_gpu() -> bool:
    """Without CUDA, run Triton kernels on the CPU interpreter: TRITON_INTERPRET=1 (read when triton is first
    imported and at each launch, so call this before the kernel modules load) and the index patch. Returns whether
    the interpreter is on."""
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    patch_interpreter_index()
    return True


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "MoaLlamaConfig", "modeling_moa_llama", "MoaLlamaForCausalLM"),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        "MoaMistralConfig",
        "modeling_moa_mistral",
        "MoaMistralForCausalLM",
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "MoaQwen2Config", "modeling_moa_qwen2", "MoaQwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "MoaQwen3Config", "modeling_moa_qwen3", "MoaQwen3ForCausalLM"),
}
# Qwen3 sets head_dim apart from hidden_size / heads (Qwen3-4B: 2560 / 32 heads, head_dim 128): the tiny one does too
ARCH_DEFAULTS = {"qwen3": dict(head_dim=32)}


def tiny_config_kwargs(num_kv_heads: int = 2, num_layers: int = 2) -> dict:
    return dict(
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        intermediate_size=96,
        vocab_size=101,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_dense(arch: str, num_kv_heads: int = 2, seed: int = 0, **overrides):
    import transformers

    config_name, model_name = ARCHS[arch][:2]
    config = getattr(transformers, config_name)(
        **{**tiny_config_kwargs(num_kv_heads), **ARCH_DEFAULTS.get(arch, {}), **overrides}
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # per-head q / k norms (Qwen3) start at ones: give them weights a wrong use would show
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    return model


def build_moa(dense, plan: dict):
    """The MoA twin of a dense model: same weights, MoA attention with ``plan`` (the config 'moa' block)."""
    arch = next(a for a, names in ARCHS.items() if type(dense).__name__ == names[1])
    _, _, moa_config_name, module_name, moa_model_name = ARCHS[arch]
    config_cls = getattr(remote_module("configuration_moa"), moa_config_name)
    config = config_cls(**{**dense.config.to_dict(), "moa": plan})
    config.model_type = config_cls.model_type
    model = getattr(remote_module(module_name), moa_model_name)(config).eval()
    model.load_state_dict(dense.state_dict())
    return model.to(dense.dtype)


def random_plan(num_layers: int, num_kv_heads: int, seed: int, sink: int = 4, min_span: int = 8) -> dict:
    """A random plan with spans well below n for the tiny test lengths (so masks really bite)."""
    gen = torch.Generator().manual_seed(seed)
    alpha = (torch.rand(num_layers, num_kv_heads, generator=gen) * 24 - 8).round().tolist()
    beta = (torch.rand(num_layers, num_kv_heads, generator=gen) * 0.6).tolist()
    return dict(format_version=1, sink=sink, min_span=min_span, alpha=alpha, beta=beta)


def dense_plan(num_layers: int, num_kv_heads: int) -> dict:
    return dict(
        format_version=1,
        sink=4,
        min_span=8,
        alpha=[[0.0] * num_kv_heads] * num_layers,
        beta=[[1.0] * num_kv_heads] * num_layers,
    )


@pytest.fixture(
    params=[("llama", 2), ("llama", 4), ("mistral", 2), ("qwen2", 2), ("qwen3", 2)], ids=lambda p: f"{p[0]}-kv{p[1]}"
)
def arch_kv(request):
    """(architecture, kv heads): GQA (2 kv heads for 4 query heads) and MHA (4)."""
    return request.param


# the balanced decode kernel under the interpreter (the interpreter's own config is the split kernel's)
BALANCED_INTERPRETED = {"balanced": True, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "num_programs": 5,
                        "merge_splits": 4}  # fmt: skip


def balanced_decode_for_rows(monkeypatch, rows: int) -> None:
    """Under the interpreter, batches of more than one row decode through the balanced kernel (on a GPU its table
    picks the kernel)."""
    decode = remote_module("moa_decode")
    if decode.INTERPRETED and rows > 1:
        monkeypatch.setattr(decode, "_INTERPRETER_CONFIG", BALANCED_INTERPRETED)

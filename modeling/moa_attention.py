"""MoA attention: one entry point that routes prefill, chunked prefill and decode to a backend.

``MOA_BACKEND`` = ``auto`` (Triton on CUDA when available, else torch) | ``torch`` | ``triton``.
The torch path is the pure-torch reference (``moa_reference.py``); the Triton path uses the kernels
in ``moa_prefill.py`` / ``moa_decode.py``. Both follow the contract in ``moa_spans.py``.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

# The kernel modules are imported here, by name, for two reasons: transformers copies a repo's remote code
# by following its ``from .module import`` lines (a ``from . import module`` inside a function is not
# followed, and the kernels would be missing from a loaded repo), and each module imports triton in a
# try block, so a CPU-only install gets HAS_TRITON = False instead of an error.
from .moa_cache import MoaCacheLayer
from .moa_decode import HAS_TRITON as _DECODE_HAS_TRITON
from .moa_flex import moa_flex_attention
from .moa_flex import supported as _flex_supported
from .moa_fused import HAS_TRITON as _FUSED_HAS_TRITON
from .moa_prefill import HAS_TRITON as _PREFILL_HAS_TRITON
from .moa_reference import moa_attention_ref

BACKENDS = ("auto", "torch", "triton")


def _triton_kernels():
    """The Triton kernel modules, or None when triton (or a GPU / the interpreter) is not there."""
    if not (_PREFILL_HAS_TRITON and _DECODE_HAS_TRITON):
        return None
    from . import moa_decode, moa_prefill

    return moa_prefill, moa_decode


def fused_kernels(tensor: torch.Tensor):
    """``moa_fused`` when its kernels run for this tensor and ``MOA_FUSED`` is not 0, else None."""
    if not _FUSED_HAS_TRITON or os.environ.get("MOA_FUSED", "1").strip() == "0":
        return None
    from . import moa_fused

    return moa_fused if moa_fused.available(tensor) else None


def on_device(device: torch.device):
    """A context that makes ``device`` the current CUDA device when it is not (else does nothing). Triton launches
    on the current device, whatever the tensors' device: a model on cuda:1, or a layer that accelerate placed on
    another GPU, needs its kernels launched there."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def select_backend(device: torch.device) -> str:
    """Resolve MOA_BACKEND for tensors on ``device``: 'torch' or 'triton'."""
    choice = os.environ.get("MOA_BACKEND", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"MOA_BACKEND={choice!r} is not one of {BACKENDS}: unset it or pick one of those")
    if choice == "torch":
        return "torch"
    runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "triton":
        if _triton_kernels() is None or not runnable:
            raise RuntimeError(
                "MOA_BACKEND=triton needs triton and a CUDA device (or TRITON_INTERPRET=1): "
                "install triton, or set MOA_BACKEND=torch"
            )
        return "triton"
    if device.type != "cuda":
        return "torch"
    if _triton_kernels() is None:
        _warn_once(
            "MoA runs its pure-torch reference on CUDA because triton is not installed (slow: it builds full "
            "masks). Install triton (pip install triton) for the kernels, or set MOA_BACKEND=torch to silence this."
        )
        return "torch"
    return "triton"


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_RULES: dict = {}


def _rules(alpha: list[float], beta: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha/beta of one layer as device tensors, made once (no host-to-device copy per step: graph-safe)."""
    key = (device, tuple(alpha), tuple(beta))
    if key not in _RULES:
        if len(_RULES) > 4096:  # plans switched many times (validation): start over
            _RULES.clear()
        _RULES[key] = (
            torch.tensor(alpha, dtype=torch.float64, device=device),
            torch.tensor(beta, dtype=torch.float64, device=device),
        )
    return _RULES[key]


def moa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    layer: MoaCacheLayer | None,
    alpha: list[float],
    beta: list[float],
    sink: int,
    min_span: int,
    scale: float,
) -> torch.Tensor:
    """MoA attention of a chunk, reading and then updating ``layer`` (the layer's cache) if given.

    query: [B, Hq, L, D]; key/value: [B, Hkv, L, D] after RoPE; q_pos: [B, L] position ids, -1 = padding.
    Returns [B, Hq, L, D] (zeros for padding queries).
    """
    backend = select_backend(query.device)
    if backend == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        backend = _backend_with_gradients(query)
    a, b = _rules(alpha, beta, query.device)
    if layer is not None and layer.is_initialized and layer.seq_len > 0 and query.shape[2] == 1:
        fused = fused_kernels(query) if backend == "triton" else None
        if fused is not None:
            layer.write_token(key, value, q_pos[:, 0], fused.append_token)  # one launch
        else:
            layer.write(key, value, q_pos)  # a single token never evicts a key of its own window
        return _decode(query, layer, q_pos[:, 0], a, b, sink, min_span, scale, backend)
    if layer is not None and layer.is_initialized and layer.seq_len > 0:
        out = _chunk_over_cache(query, key, value, q_pos, layer, a, b, sink, min_span, scale, backend)
    else:
        out = _prefill(query, key, value, q_pos, a, b, sink, min_span, scale, backend)
    if layer is not None:
        fused = fused_kernels(key) if backend == "triton" else None
        layer.write(key, value, q_pos, fused.write_chunk if fused is not None else None)
    return out


def _backend_with_gradients(query: torch.Tensor) -> str:
    """The Triton kernels have no backward: a prefill with gradients runs FlexAttention where it can (moa_flex.py),
    anything else the pure-torch reference."""
    if _flex_supported(query):
        return "flex"
    _warn_once(
        "MoA attention runs its pure-torch reference while gradients are needed (training, fine-tuning): the Triton "
        "kernels have no backward, and FlexAttention does not serve this case (it needs CUDA, torch >= 2.5, a head "
        "size of 16-256 that is a power of two, and MOA_FLEX not 0). The reference is exact and recomputes each chunk "
        "of queries in the backward pass (memory linear in the length), but it computes every query-key score. Run "
        "inference under torch.no_grad() / inference_mode() to get the kernels."
    )
    return "torch"


def prepare_decode(layer: MoaCacheLayer, num_q_heads: int, alpha: list[float], beta: list[float], sink: int,
                   min_span: int) -> None:  # fmt: skip
    """Fill the memos that the next one-token ``moa_attention`` over ``layer`` reads on the Triton backend
    (``moa_decode.prepare_decode``), so that a CUDA-graph capture of that step can be the first call."""
    if not layer.is_initialized or select_backend(layer.keys.device) != "triton":
        return
    a, b = _rules(alpha, beta, layer.keys.device)
    cache = (layer.keys, layer.values, layer.slot_pos, layer.head_offset, layer.head_capacity)
    host = (layer.head_offsets(), layer.capacity, alpha, beta)  # the tables are built on the host: one upload each
    decode = _triton_kernels()[1]
    decode.prepare_decode(layer.keys.shape[0], num_q_heads, layer.keys.dtype, cache, a, b, sink, min_span, host)


def _prefill(query, key, value, q_pos, a, b, sink, min_span, scale, backend):
    if backend == "flex":
        return moa_flex_attention(query, key, value, q_pos, a, b, sink, min_span, scale)
    if backend == "triton":
        return _triton_kernels()[0].moa_prefill(query, key, value, q_pos, a, b, sink, min_span, scale=scale)
    return moa_attention_ref(query, key, value, q_pos, q_pos, a, b, sink, min_span, scale=scale)


def _chunk_over_cache(query, key, value, q_pos, layer, a, b, sink, min_span, scale, backend):
    if backend == "triton":
        prefill = _triton_kernels()[0]
        return prefill.moa_prefill_with_cache(
            query, key, value, q_pos, layer.keys, layer.values, layer.slot_pos,
            layer.head_offset, layer.head_capacity, a, b, sink, min_span, scale=scale, cache_len=layer.next_pos,
            cache_tokens=layer.seq_len,
        )  # fmt: skip
    old_k, old_v, old_pos = layer.padded_heads()  # [B, Hkv, Cmax, D], [B, Hkv, Cmax]
    num_heads = key.shape[1]
    new_pos = q_pos[:, None, :].expand(-1, num_heads, -1)
    keys = torch.cat([old_k, key.to(old_k.dtype)], dim=2)
    values = torch.cat([old_v, value.to(old_v.dtype)], dim=2)
    k_pos = torch.cat([old_pos.to(torch.int64), new_pos], dim=2)
    return moa_attention_ref(query, keys, values, q_pos, k_pos, a, b, sink, min_span, scale=scale)


def _decode(query, layer, q_pos, a, b, sink, min_span, scale, backend):
    if backend == "triton":
        decode = _triton_kernels()[1]
        return decode.moa_decode(
            query, layer.keys, layer.values, layer.slot_pos, layer.head_offset,
            layer.head_capacity, q_pos, a, b, sink, min_span, scale=scale,
        )  # fmt: skip
    keys, values, k_pos = layer.padded_heads()
    return moa_attention_ref(query, keys, values, q_pos[:, None], k_pos, a, b, sink, min_span, scale=scale)

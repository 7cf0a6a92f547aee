"""Projections that read the same input as one GEMM: q/k/v of the attention, gate/up of the MLP.

At a large decode batch a projection with few output features (k_proj, v_proj of a GQA model) is far from
the bandwidth roofline on its own; one GEMM over the weights side by side is what vLLM runs
(QKVParallelLinear, MergedColumnParallelLinear). The model keeps one copy of the weights: the first
joined call moves the weights (and biases) of a group into one tensor and re-points the existing
Parameters at its rows (``param.data = joined[rows]``), so the old storages are freed and every
Parameter object, name and state-dict key stays as it was.

Each call checks, by address, that the weights still lie back to back in one storage; weights replaced
since (``model.to(dtype)``, ``load_state_dict(assign=True)``, a new ``.weight``) are joined again before
use. An in-place ``copy_`` into a weight writes the joined storage and needs nothing. No tensor is held
here: the joined weight is rebuilt as a view of the Parameters' own storage at each call.

Only plain ``torch.nn.Linear`` modules without hooks are joined, and only where no gradient is needed;
otherwise the caller runs the separate projections. ``split_projections`` gives every Parameter its own
storage again, group by group (``save_pretrained`` calls it, so saved tensors never share memory).
"""

from __future__ import annotations

import collections
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
_global_hooks = vars(torch.nn.modules.module)  # hooks registered for every module (register_module_forward_hook)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # attributes joined, per module that has them
# Above this many tokens per call (a prefill chunk) the projections run apart: their GEMMs are compute-bound there,
# so one GEMM gains nothing, and its [tokens, sum N] output would keep q, k and v (gate and up) alive together.
JOINED_MAX_TOKENS = 2048


def joined_linear(linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``tuple(m(x) for m in linears)`` computed as one GEMM (outputs are views of one [..., sum N] tensor).

    Joins the weights on first use; None (run the modules instead) where they cannot be joined, or for more than
    ``JOINED_MAX_TOKENS`` tokens.
    """
    if x.shape[:-1].numel() > JOINED_MAX_TOKENS or not all(_plain(m) for m in linears):
        return None
    if torch.is_grad_enabled() and any(m.weight.requires_grad for m in linears):
        return None  # autograd would need gradients of the Parameters, not of the joined view
    operands = _operands(linears)
    if operands is None and _join(linears):
        operands = _operands(linears)
    if operands is None:
        return None
    out = F.linear(x, *operands)  # [..., sum N]
    return out.split([m.weight.shape[0] for m in linears], dim=-1)


def split_projections(model: nn.Module) -> None:
    """Give each joined weight and bias its own storage again (one group at a time: peak memory ~one group)."""
    for module in model.modules():
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, nn.Linear) for m in linears):
                continue
            for params in ([m.weight for m in linears], [m.bias for m in linears]):
                if all(p is not None for p in params) and _joined(params) is not None:
                    with torch.inference_mode(params[0].is_inference()), torch.no_grad():
                        _repoint(params, [p.detach().clone(memory_format=torch.contiguous_format) for p in params])


class SplitBeforeSaving:
    """Mixin for a PreTrainedModel: ``save_pretrained`` splits joined weights first (one saved tensor per storage;
    transformers would otherwise clone every joined weight at once). The next fused forward joins them again."""

    def save_pretrained(self, *args, **kwargs):
        split_projections(self)
        return super().save_pretrained(*args, **kwargs)


def any_hooked(modules) -> bool:
    """Whether calling any of ``modules`` runs hooks that code reaching past its ``__call__`` would skip:
    accelerate's (device_map offload moves weights in, and dispatch across GPUs moves inputs, in a hook), or
    forward hooks of its own or of every module. Three dict lookups a module."""
    if _global_hooks.get("_global_forward_hooks") or _global_hooks.get("_global_forward_pre_hooks"):
        return True
    for module in modules:
        attrs = module.__dict__
        if "_hf_hook" in attrs or attrs["_forward_hooks"] or attrs["_forward_pre_hooks"]:
            return True
    return False


def _plain(module: nn.Module) -> bool:
    """An exact ``nn.Linear`` with a plain Parameter (no DTensor, no quantized tensor) that no hook wraps (a joined
    GEMM would skip the hooks)."""
    return type(module) is nn.Linear and type(module.weight) is nn.Parameter and not any_hooked((module,))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one [sum rows, ...] tensor when they lie back to back, contiguous, in one storage, else None."""
    first = tensors[0]
    tail, ptr, step = first.shape[1:], first.data_ptr(), first.element_size() * first.shape[1:].numel()
    rows = 0
    for t in tensors:
        if (
            t.data_ptr() != ptr + rows * step or t.shape[1:] != tail or t.dtype != first.dtype
            or t.device != first.device or not t.is_contiguous()
        ):  # fmt: skip
            return None
        rows += t.shape[0]
    strides = (tail.numel(), 1) if len(tail) == 1 else (1,)
    try:  # refused unless the first tensor's storage really holds all rows (tensors merely adjacent in memory)
        return first.as_strided((rows, *tail), strides, first.storage_offset())
    except RuntimeError:
        return None


def _operands(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the group as views of joined storage, or None when it is not (or no longer) joined."""
    weight = _joined([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if weight is None:
        return None
    if all(b is None for b in biases):
        return weight, None
    bias = _joined(biases) if all(b is not None for b in biases) else None
    return None if bias is None else (weight, bias)


def _join(linears: tuple[nn.Linear, ...]) -> bool:
    """Move the weights (and biases) of ``linears`` into one tensor each, re-pointing the Parameters at its rows."""
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    params = weights + [b for b in biases if b is not None]
    first = weights[0]
    if (
        any(b is None for b in biases) != all(b is None for b in biases)
        or any(type(p) is not nn.Parameter for p in params)
        or any(p.dtype != first.dtype or p.device != first.device for p in params)
        or not first.is_floating_point() or first.is_meta or first.dim() != 2
        or any(w.shape[1:] != first.shape[1:] for w in weights)
        or _compiling_or_capturing(first)
    ):  # fmt: skip
        return False
    if not _sole_owners(params):
        logger.debug("not joining %s: another tensor shares their memory (joining would keep two copies)", linears)
        return False
    with torch.inference_mode(first.is_inference()), torch.no_grad():  # normal tensors for normal Parameters
        for group in (weights, [b for b in biases if b is not None]):
            if group:
                joined = torch.empty((sum(p.shape[0] for p in group), *group[0].shape[1:]), dtype=first.dtype,
                                     device=first.device)  # fmt: skip
                torch.cat([p.detach() for p in group], out=joined)
                _repoint(group, joined.split([p.shape[0] for p in group]))
    return True


def _repoint(params: list[torch.Tensor], new_data) -> None:
    """``param.data = new`` for each. On a side CUDA stream the old memory (freed here, allocated on another stream)
    is kept until that stream has read it: ``record_stream``."""
    for param, data in zip(params, new_data, strict=True):
        if param.is_cuda and torch.cuda.current_stream(param.device) != torch.cuda.default_stream(param.device):
            param.data.record_stream(torch.cuda.current_stream(param.device))
        param.data = data


def _sole_owners(params: list[torch.Tensor]) -> bool:
    """Whether no tensor outside ``params`` uses their storages (else moving them would not free the memory).

    A twin model holding the same Parameter objects is fine; one holding other tensors on the same memory is not.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # private API gone in some torch: assume sole ownership
        return True
    members = collections.Counter(p.untyped_storage().data_ptr() for p in params)
    for p in params:
        storage = p.untyped_storage()  # this Python object holds one more reference
        if use_count(storage._cdata) > members[storage.data_ptr()] + 1:
            return False
    return True


def _compiling_or_capturing(tensor: torch.Tensor) -> bool:
    """Inside torch.compile tracing or a CUDA-graph capture: no allocation or re-pointing then."""
    if getattr(torch.compiler, "is_compiling", lambda: False)():
        return True
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()

"""Runtime helpers of the profile stage: ranks (data parallel through accelerate) and the profiling mode."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ProfileError

logger = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in a data-parallel run (world 1 when not launched by accelerate/torchrun)."""

    rank: int
    world: int
    device: torch.device  # where the reduced tensors live (cuda for NCCL, cpu for gloo or one process)

    @classmethod
    def current(cls) -> Ranks:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            try:
                from accelerate import PartialState
            except ImportError as err:
                raise ProfileError(
                    "multi-process profiling needs accelerate: pip install 'moa-hub[multi-gpu]'"
                ) from err
            PartialState()  # joins the process group that `accelerate launch` set up
            # and leaves it at exit: a rank that exits with the group's threads alive can abort (gloo on the CPU:
            # "terminate called without an active exception", exit code -6, seen once in make test)
            atexit.register(_leave_process_group)
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1, torch.device("cpu"))
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _set_checkpointing(model, enable: bool) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


@contextlib.contextmanager
def profiling_mode(model, attn_key: str, checkpointing: bool) -> Iterator[None]:
    """Profile-ready model for the duration: attention ``attn_key``, frozen parameters, decoder layers
    checkpointed (only the layer objects are in training mode, so no dropout anywhere turns on).
    Everything is restored afterwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    old_impl = model.config._attn_implementation
    old_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    old_training = [m.training for m in layers]
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ProfileError(f"{type(model).__name__} does not support gradient checkpointing: pass checkpointing off")
    try:
        model.set_attn_implementation(attn_key)
        for p in model.parameters():
            p.requires_grad_(False)
        if checkpointing:
            _set_checkpointing(model, True)
            for m in layers:
                m.training = True  # the layer object only; its children stay in eval mode
        yield
    finally:
        if checkpointing:
            _set_checkpointing(model, False)
        for m, was in zip(layers, old_training, strict=True):
            m.training = was
        for name, p in model.named_parameters():
            p.requires_grad_(old_grad[name])
        model.set_attn_implementation(old_impl)

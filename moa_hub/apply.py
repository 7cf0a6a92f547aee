"""Turn a loaded dense model into its MoA twin (same Parameter objects), and switch plans in place.

The converter measures plans with the remote code users run: the twin is built from the same
``modeling_moa_*`` classes a converted repo ships.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelError
from .model_folder import SUPPORTED_ARCHITECTURES
from .plan import MoaPlan
from .remote import remote_module


def _architecture(model):
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"architecture {name!r} is not supported: use one of {sorted(SUPPORTED_ARCHITECTURES)}")
    return SUPPORTED_ARCHITECTURES[name]


def moa_twin(dense: torch.nn.Module, plan: MoaPlan) -> torch.nn.Module:
    """A MoA model that shares every Parameter with ``dense`` and runs ``plan`` (see ``sharing_twin``)."""
    arch = _architecture(dense)
    plan.check_fits(dense.config.num_hidden_layers, dense.config.num_key_value_heads)
    config_cls = getattr(remote_module("configuration_moa"), arch.config_class)
    config = config_cls(**{**dense.config.to_dict(), "moa": plan.to_dict()})
    config._attn_implementation = dense.config._attn_implementation
    model_cls = getattr(remote_module(Path(arch.modeling_file).stem), arch.model_class)
    return sharing_twin(model_cls, config, dense)


def sharing_twin(model_cls, config, source: torch.nn.Module) -> torch.nn.Module:
    """``model_cls(config)`` built on the meta device and given ``source``'s Parameter objects and buffers (no copy).

    Both models must name their parameters alike (a MoA model and its base architecture do, either way round).
    The twin holds the same Parameters, not new ones on the same memory: when a MoA model joins its q/k/v and
    gate/up weights into one storage (moa_projections.py), the other model follows, so one copy stays on the
    device. So ``requires_grad`` is shared too: the twin keeps the source's flags (freeze the source to freeze both).
    """
    with torch.device("meta"):
        twin = model_cls(config)
    state = source.state_dict(keep_vars=True)
    for name, param in twin.named_parameters():  # load_state_dict(assign=True) gives each its own flag: keep source's
        if name in state:
            param.requires_grad_(state[name].requires_grad)
    twin.load_state_dict(state, assign=True)
    for name, buffer in source.named_buffers():  # non-persistent buffers (RoPE frequencies) too
        module_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(module_name), attr, buffer)
    return twin.eval()


def set_plan(twin: torch.nn.Module, plan: MoaPlan) -> None:
    """Run ``plan`` from now on (the attention reads the plan from the config at every call)."""
    plan.check_fits(twin.config.num_hidden_layers, twin.config.num_key_value_heads)
    twin.config.moa = plan.to_dict()

"""Configs of MoA models: the base architecture's config plus the ``moa`` plan block.

``model_type`` is ``moa_<base>`` so that loading without ``trust_remote_code=True`` fails loudly
instead of silently running the dense model.
"""

from __future__ import annotations

import math

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

MOA_FORMAT_VERSION = 1


def check_moa_block(moa: dict, num_layers: int, num_kv_heads: int) -> None:
    """Validate the ``moa`` block against the model shape; raise ValueError naming the bad value."""
    missing = [k for k in ("sink", "min_span", "alpha", "beta") if k not in moa]
    if missing:
        raise ValueError(f"config 'moa' block lacks {missing}: re-export the model with moa-hub")
    if int(moa.get("format_version", MOA_FORMAT_VERSION)) > MOA_FORMAT_VERSION:
        raise ValueError(f"moa format_version {moa['format_version']} is newer than this code: update the repo code")
    if not 0 <= moa["sink"] < moa["min_span"]:
        raise ValueError(f"moa needs 0 <= sink < min_span, got sink={moa['sink']} min_span={moa['min_span']}")
    for name in ("alpha", "beta"):
        rows = moa[name]
        if len(rows) != num_layers or any(len(r) != num_kv_heads for r in rows):
            shape = (len(rows), sorted({len(r) for r in rows}))
            raise ValueError(f"moa {name} has shape {shape}, the model needs [{num_layers}][{num_kv_heads}]")
        if any(not math.isfinite(float(v)) for r in rows for v in r):
            raise ValueError(f"moa {name} holds a non-finite value")
    if any(not 0.0 <= float(v) <= 1.0 for r in moa["beta"] for v in r):
        raise ValueError("moa beta values must lie in [0, 1]")


def sliding_window_in(config: dict) -> tuple[int, str] | None:
    """The sliding window that limits some layers of a base config (a config.json dict) below its context, and the
    key that sets it; None where every layer attends to the whole causal prefix (the attention MoA replaces).

    Mistral: ``sliding_window`` on every layer (4096 in Mistral-7B-v0.1 and its fine-tunes; null from v0.2 on).
    Qwen2 and Qwen3: only with ``use_sliding_window``, on the layers ``layer_types`` (or ``max_window_layers``) marks.
    A window at least ``max_position_embeddings`` long limits nothing.
    """
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if window >= int(config.get("max_position_embeddings") or 0) > 0:
        return None
    if config.get("model_type", "").removeprefix("moa_") in ("qwen2", "qwen3"):
        if not config.get("use_sliding_window"):
            return None
        layer_types = config.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if layer_types is None and int(config.get("max_window_layers") or 0) >= int(config["num_hidden_layers"]):
            return None
        return window, "use_sliding_window with sliding_window"
    return window, "sliding_window"


def sliding_window_message(window: int, key: str) -> str:
    return (
        f"this model's layers attend through a sliding window of {window} tokens (config {key}), and MoA replaces "
        "full causal attention: its spans would reach tokens the model never attends to. Convert a full-attention "
        "model (Mistral-7B from v0.2 on has no window). If the model was in fact trained with full attention, set "
        '"sliding_window": null in its config.json'
    )


class MoaConfigMixin:
    """Adds the validated ``moa`` plan to a base config."""

    def validate_moa(self) -> None:
        if getattr(self, "moa", None) is None:
            raise ValueError(f"{type(self).__name__} needs a 'moa' plan block: export the model with moa-hub")
        check_moa_block(self.moa, self.num_hidden_layers, self.num_key_value_heads)
        window = sliding_window_in(self.to_dict())
        if window is not None:
            raise ValueError(sliding_window_message(*window))


class MoaLlamaConfig(MoaConfigMixin, LlamaConfig):
    model_type = "moa_llama"


class MoaMistralConfig(MoaConfigMixin, MistralConfig):
    model_type = "moa_mistral"


class MoaQwen2Config(MoaConfigMixin, Qwen2Config):
    model_type = "moa_qwen2"


class MoaQwen3Config(MoaConfigMixin, Qwen3Config):
    model_type = "moa_qwen3"

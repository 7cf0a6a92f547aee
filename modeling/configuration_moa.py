"""Configs of MoA models: the base architecture's config plus the ``moa`` plan block.

``model_type`` is ``moa_<base>`` so that loading without ``trust_remote_code=True`` fails loudly
instead of silently running the dense model.
"""

from __future__ import annotations

import math

from transformers import LlamaConfig, MistralConfig, Qwen2Config

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


class MoaConfigMixin:
    """Adds the validated ``moa`` plan to a base config."""

    def validate_moa(self) -> None:
        if getattr(self, "moa", None) is None:
            raise ValueError(f"{type(self).__name__} needs a 'moa' plan block: export the model with moa-hub")
        check_moa_block(self.moa, self.num_hidden_layers, self.num_key_value_heads)


class MoaLlamaConfig(MoaConfigMixin, LlamaConfig):
    model_type = "moa_llama"


class MoaMistralConfig(MoaConfigMixin, MistralConfig):
    model_type = "moa_mistral"


class MoaQwen2Config(MoaConfigMixin, Qwen2Config):
    model_type = "moa_qwen2"

"""MoA Qwen3: the transformers Qwen3 model with per-head elastic attention spans.

Only the attention computation, the cache and the position handling differ from the base model
(see moa_model.py); weights, names and everything else are Qwen3's, including the RMSNorm of each
head's query and key before RoPE (``q_norm``, ``k_norm``).
"""

from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3ForCausalLM,
    Qwen3Model,
    apply_rotary_pos_emb,
)

from .configuration_moa import MoaQwen3Config
from .moa_model import MoaAttentionMixin, MoaForCausalLMMixin, MoaModelMixin


class MoaQwen3Attention(MoaAttentionMixin, Qwen3Attention):
    apply_rotary_pos_emb = staticmethod(apply_rotary_pos_emb)
    standard_rope = True  # x * cos + rotate_half(x) * sin: moa_fused.rope computes the same
    head_norms = ("q_norm", "k_norm")


class MoaQwen3Model(MoaModelMixin, Qwen3Model):
    config_class = MoaQwen3Config
    moa_attention_class = MoaQwen3Attention

    def __init__(self, config: MoaQwen3Config):
        super().__init__(config)
        self._install_moa_attention(config)


class MoaQwen3ForCausalLM(MoaForCausalLMMixin, Qwen3ForCausalLM):
    config_class = MoaQwen3Config

    def __init__(self, config: MoaQwen3Config):
        super().__init__(config)
        self.model = MoaQwen3Model(config)  # the dense stack built by the parent is replaced
        self.post_init()


__all__ = ["MoaQwen3ForCausalLM", "MoaQwen3Model"]

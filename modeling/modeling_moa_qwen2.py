"""MoA Qwen2: the transformers Qwen2 model with per-head elastic attention spans.

Only the attention computation, the cache and the position handling differ from the base model
(see moa_model.py); weights, names and everything else are Qwen2's.
"""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2ForCausalLM,
    Qwen2Model,
    apply_rotary_pos_emb,
)

from .configuration_moa import MoaQwen2Config
from .moa_model import MoaAttentionMixin, MoaForCausalLMMixin, MoaModelMixin


class MoaQwen2Attention(MoaAttentionMixin, Qwen2Attention):
    apply_rotary_pos_emb = staticmethod(apply_rotary_pos_emb)
    standard_rope = True  # x * cos + rotate_half(x) * sin: moa_fused.rope computes the same


class MoaQwen2Model(MoaModelMixin, Qwen2Model):
    config_class = MoaQwen2Config
    moa_attention_class = MoaQwen2Attention

    def __init__(self, config: MoaQwen2Config):
        super().__init__(config)
        self._install_moa_attention(config)


class MoaQwen2ForCausalLM(MoaForCausalLMMixin, Qwen2ForCausalLM):
    config_class = MoaQwen2Config

    def __init__(self, config: MoaQwen2Config):
        super().__init__(config)
        self.model = MoaQwen2Model(config)  # the dense stack built by the parent is replaced
        self.post_init()


__all__ = ["MoaQwen2ForCausalLM", "MoaQwen2Model"]

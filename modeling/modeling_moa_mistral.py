"""MoA Mistral: the transformers Mistral model with per-head elastic attention spans.

Only the attention computation, the cache and the position handling differ from the base model
(see moa_model.py); weights, names and everything else are Mistral's.
"""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralForCausalLM,
    MistralModel,
    apply_rotary_pos_emb,
)

from .configuration_moa import MoaMistralConfig
from .moa_model import MoaAttentionMixin, MoaForCausalLMMixin, MoaModelMixin


class MoaMistralAttention(MoaAttentionMixin, MistralAttention):
    apply_rotary_pos_emb = staticmethod(apply_rotary_pos_emb)
    standard_rope = True  # x * cos + rotate_half(x) * sin: moa_fused.rope computes the same


class MoaMistralModel(MoaModelMixin, MistralModel):
    config_class = MoaMistralConfig
    moa_attention_class = MoaMistralAttention

    def __init__(self, config: MoaMistralConfig):
        super().__init__(config)
        self._install_moa_attention(config)


class MoaMistralForCausalLM(MoaForCausalLMMixin, MistralForCausalLM):
    config_class = MoaMistralConfig

    def __init__(self, config: MoaMistralConfig):
        super().__init__(config)
        self.model = MoaMistralModel(config)  # the dense stack built by the parent is replaced
        self.post_init()


__all__ = ["MoaMistralForCausalLM", "MoaMistralModel"]

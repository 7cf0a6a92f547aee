"""MoA Llama: the transformers Llama model with per-head elastic attention spans.

Only the attention computation, the cache and the position handling differ from the base model
(see moa_model.py); weights, names and everything else are Llama's.
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    apply_rotary_pos_emb,
)

from .configuration_moa import MoaLlamaConfig
from .moa_model import MoaAttentionMixin, MoaForCausalLMMixin, MoaModelMixin


class MoaLlamaAttention(MoaAttentionMixin, LlamaAttention):
    apply_rotary_pos_emb = staticmethod(apply_rotary_pos_emb)
    standard_rope = True  # x * cos + rotate_half(x) * sin: moa_fused.rope computes the same


class MoaLlamaModel(MoaModelMixin, LlamaModel):
    config_class = MoaLlamaConfig
    moa_attention_class = MoaLlamaAttention

    def __init__(self, config: MoaLlamaConfig):
        super().__init__(config)
        self._install_moa_attention(config)


class MoaLlamaForCausalLM(MoaForCausalLMMixin, LlamaForCausalLM):
    config_class = MoaLlamaConfig

    def __init__(self, config: MoaLlamaConfig):
        super().__init__(config)
        self.model = MoaLlamaModel(config)  # the dense stack built by the parent is replaced
        self.post_init()


__all__ = ["MoaLlamaForCausalLM", "MoaLlamaModel"]

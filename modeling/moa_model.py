"""What MoA changes in a decoder-only model, as mixins over the transformers classes.

- attention: same projections and RoPE, then ``moa_attention`` (per-head spans, ragged cache);
- model: positions from the 2D padding mask (left padding does not count), a ``MoaCache``;
- causal LM: ``generate()`` starts with a ``MoaCache``;
- on the fused path, q/k/v and gate/up each run as one GEMM over weights joined in place (moa_projections.py).
Everything else (weights, MLP, norms, heads, loss) is the base model's. Works with transformers
5.x both before and after ``past_key_values`` was renamed ``cache``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from .moa_attention import _warn_once, fused_kernels, moa_attention, on_device, prepare_decode, select_backend
from .moa_cache import MoaCache
from .moa_generate import GraphedDecodeStep, cache_in, greedy_generate
from .moa_projections import SplitBeforeSaving, any_hooked, joined_linear


@functools.cache
def cache_argument(forward) -> str:
    """Name of the cache argument of a transformers forward: 'cache' (>= 5.24) or 'past_key_values'."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _pick_cache(kwargs: dict):
    """Pop the cache from kwargs under either name."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _fused_for(tensor: torch.Tensor):
    """``moa_fused`` when the Triton backend runs this forward and no gradient is needed, else None."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return None
    if select_backend(tensor.device) != "triton":
        return None
    return fused_kernels(tensor)


class MoaAttentionMixin:
    """Replaces the attention computation of a base attention module; keeps its weights and RoPE."""

    apply_rotary_pos_emb = None  # set by each architecture file
    standard_rope = False  # True where apply_rotary_pos_emb is Llama's (then moa_fused.rope may replace it)
    head_norms = ()  # ("q_norm", "k_norm") where each head's query and key are RMS-normed before RoPE (Qwen3)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        with on_device(hidden_states.device):  # accelerate may have put this layer on another GPU
            return self._moa_forward(hidden_states, position_embeddings, **kwargs)

    def _moa_forward(self, hidden_states, position_embeddings, **kwargs):
        cache = _pick_cache(kwargs)
        moa_positions = kwargs.pop("moa_positions")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        joined = kwargs.pop("moa_joined_projections", False)  # set by _fused_stack
        query, key, value = self._project_qkv(hidden_states, joined)  # [B, L, Hq * D], [B, L, Hkv * D] x 2
        fused = _fused_for(query)
        query, key = self._norm_heads(query.view(hidden_shape), key.view(hidden_shape), fused)
        query = query.transpose(1, 2)  # [B, Hq, L, D]
        key = key.transpose(1, 2)  # [B, Hkv, L, D]
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if fused is not None and self.standard_rope and fused.rope_supported(query, key, cos):
            query, key = fused.rope(query, key, cos, sin)  # one launch for both
        else:
            query, key = type(self).apply_rotary_pos_emb(query, key, cos, sin)
        plan = self.config.moa
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        out = moa_attention(
            query, key, value, moa_positions, layer_cache,
            plan["alpha"][self.layer_idx], plan["beta"][self.layer_idx], plan["sink"], plan["min_span"], self.scaling,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()  # [B, L, Hq * D]
        return self.o_proj(out), None

    def _norm_heads(self, query, key, fused):
        """The architecture's per-head RMSNorm of query and key ([B, L, H, D]), if it has one: one Triton launch
        each on the fused path (the modules' own forward where they have hooks, or on the torch path)."""
        if not self.head_norms:
            return query, key
        norms = tuple(getattr(self, name) for name in self.head_norms)
        if fused is None or any_hooked(norms) or not all(hasattr(n, "variance_epsilon") for n in norms):
            return norms[0](query), norms[1](key)
        q_norm, k_norm = norms
        return (
            fused.rms_norm(query, q_norm.weight, q_norm.variance_epsilon),
            fused.rms_norm(key, k_norm.weight, k_norm.variance_epsilon),
        )

    def _project_qkv(self, hidden_states, joined: bool):
        """q, k, v projections; with ``joined``, one GEMM over the joined weights where possible (moa_projections)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        outputs = joined_linear(projections, hidden_states) if joined else None
        return outputs if outputs is not None else tuple(proj(hidden_states) for proj in projections)


def moa_positions(
    attention_mask, position_ids, cache, bsz: int, length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of the new tokens for RoPE, and the same with -1 at padding for MoA.

    attention_mask: [B, past + L] of 0/1 (left padding = 0) or None; position_ids: [B, L] or None.
    """
    valid = torch.ones(bsz, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("MoA models take a 2D padding mask [batch, length], not a 4D attention mask")
        valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    if position_ids is None:
        if attention_mask is not None:
            position_ids = attention_mask.to(device=device, dtype=torch.long).cumsum(-1)[:, -length:] - 1
        else:
            start = cache.layers[0].next_pos if cache is not None and cache.layers[0].is_initialized else 0
            position_ids = torch.arange(length, device=device)[None, :] + torch.as_tensor(start, device=device).view(
                -1, 1
            )
            position_ids = position_ids.expand(bsz, length)
    position_ids = position_ids.to(device).expand(bsz, length)
    q_pos = torch.where(valid, position_ids, torch.full_like(position_ids, -1))
    return position_ids.clamp(min=0), q_pos


def padding_first(q_pos: torch.Tensor, cache, given: bool) -> torch.Tensor | None:
    """Check a multi-token chunk's positions; return None, or the order [B, L] that moves each row's padding first.

    The kernels take a row's unpadded tokens at consecutive positions after its padding, and a cache that holds
    positions ``[0, next_pos)``. A chunk padded on the right (or with holes) is run in the order that puts its
    padding first, and its outputs are put back: the attention depends on positions only, so the rows' outputs
    are those of the left-padded chunk. Positions that skip or repeat, or that do not continue the cache, would
    give wrong outputs without an error, so they raise ``ValueError``. ``given``: the mask or the position ids came
    from the caller (else the positions continue the cache, unpadded, and nothing is checked). One host sync;
    nothing is checked inside a CUDA-graph capture or under ``torch.compile``.
    """
    if not given or q_pos.shape[-1] < 2 or torch.compiler.is_compiling():
        return None
    if q_pos.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    valid = q_pos >= 0
    shift = q_pos - (valid.cumsum(-1) - 1)  # a valid token's position minus the valid tokens before it in the row
    big = torch.iinfo(shift.dtype).max
    first, last = torch.where(valid, shift, big).amin(-1), torch.where(valid, shift, -big).amax(-1)
    some = valid.any(-1)
    start = _cached_positions(cache, q_pos.shape[0], q_pos.device)
    gaps = some & (first != last)
    off_start = some & (first != start) if start is not None else torch.zeros_like(some)
    flags = torch.stack([gaps.any(), off_start.any(), (valid[:, :-1] & ~valid[:, 1:]).any()]).tolist()
    if flags[0]:
        row = int(gaps.nonzero()[0, 0])
        shown = q_pos[row][valid[row]][:12].tolist()
        raise ValueError(
            f"MoA needs each row's tokens at consecutive positions (padding apart), but row {row} has positions "
            f"{shown}{' ...' if int(valid[row].sum()) > 12 else ''}. Packed sequences (positions that restart "
            "inside a row) are not supported: give each sequence its own row and pad it. Or leave position_ids=None: "
            "the model then numbers the tokens from attention_mask and the cache."
        )
    if flags[1]:
        row = int(off_start.nonzero()[0, 0])
        held, got = int(start[row]), int(first[row])
        raise ValueError(
            f"Row {row}'s cache holds positions 0..{held - 1}, so its new tokens must start at position {held}, "
            f"not {got}. Pass the attention_mask of the whole sequence (the cached tokens and the new ones, "
            f"[batch, {cache.get_seq_length()} + {q_pos.shape[-1]}]) or position_ids that continue the cache; "
            "or run without a cache (use_cache=False) to score a chunk at other positions."
        )
    if not flags[2]:
        return None
    return torch.argsort(valid.to(torch.int8), dim=-1, stable=True)  # padding (0) first, tokens in their order


def _cached_positions(cache, bsz: int, device) -> torch.Tensor | int | None:
    """The position each row's next token must have: the cache's ``next_pos``, 0 for an empty cache, None
    without a cache (a chunk scored alone may start anywhere)."""
    if cache is None:
        return None
    layer = cache.layers[0] if cache.layers else None
    if layer is None or not layer.is_initialized or layer.seq_len == 0:
        return 0
    if layer.next_pos.shape[0] != bsz:
        return None  # a batch of another size: the attention reports it
    return layer.next_pos.to(device)


def _take_tokens(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``tensor[b, order[b, i]]`` for every row b: tensor [B, L, ...], order [B, L]."""
    index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
    return tensor.gather(1, index)


class MoaModelMixin(SplitBeforeSaving):
    """The decoder stack with MoA attention in every layer and a MoaCache."""

    moa_attention_class = None  # set by each architecture file

    def _install_moa_attention(self, config) -> None:
        self.config.validate_moa()
        for idx, layer in enumerate(self.layers):
            layer.self_attn = self.moa_attention_class(config, idx)

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None, **kwargs
    ):
        inputs = input_ids if input_ids is not None else inputs_embeds
        with on_device(inputs.device) if inputs is not None else contextlib.nullcontext():
            return self._moa_forward(input_ids, attention_mask, position_ids, inputs_embeds, use_cache, **kwargs)

    def _moa_forward(self, input_ids, attention_mask, position_ids, inputs_embeds, use_cache, **kwargs):
        cache = _pick_cache(kwargs)
        for unsupported in ("output_attentions",):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"MoA models do not support {unsupported}=True")
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        kwargs.pop("return_dict", None)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, MoaCache):
            if cache.get_seq_length() > 0:
                raise TypeError(f"MoA models need a MoaCache, got a filled {type(cache).__name__}")
            cache = None  # an empty default cache from generate(): replaced by a MoaCache
        if use_cache and cache is None:
            cache = MoaCache(self.config)
        bsz, length = inputs_embeds.shape[:2]
        rope_ids, q_pos = moa_positions(attention_mask, position_ids, cache, bsz, length, inputs_embeds.device)
        given = attention_mask is not None or position_ids is not None
        order = padding_first(q_pos, cache if use_cache else None, given)
        if order is not None:  # padding on the right or inside rows: run the chunk with each row's padding first
            inputs_embeds, rope_ids, q_pos = (_take_tokens(t, order) for t in (inputs_embeds, rope_ids, q_pos))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=rope_ids)
        cache_kw = cache_argument(type(self.layers[0]).forward)
        layers = self.layers[: self.config.num_hidden_layers]
        fusable = (
            self._fusable_stack()
            and not output_hidden_states
            and not self._moa_needs_grad(inputs_embeds)
            and not self._moa_stack_hooked()
        )
        fused = _fused_for(inputs_embeds) if fusable else None
        all_hidden = None
        if fused is not None:
            attn_kwargs = dict(position_embeddings=position_embeddings, attention_mask=None, position_ids=rope_ids,
                               use_cache=use_cache, moa_positions=q_pos, moa_joined_projections=True,
                               **{cache_kw: cache}, **kwargs)  # fmt: skip
            hidden_states = _fused_stack(fused, layers, self.norm, inputs_embeds, attn_kwargs)
        else:
            hidden_states = inputs_embeds
            all_hidden = [] if output_hidden_states else None
            for layer in layers:
                if all_hidden is not None:
                    all_hidden.append(hidden_states)  # each layer's input, as transformers records them
                hidden_states = layer(
                    hidden_states, attention_mask=None, position_ids=rope_ids, position_embeddings=position_embeddings,
                    use_cache=use_cache, moa_positions=q_pos, **{cache_kw: cache}, **kwargs,
                )  # fmt: skip
            hidden_states = self.norm(hidden_states)
            if all_hidden is not None:
                all_hidden = (*all_hidden, hidden_states)  # the embeddings, every layer's output, the last one normed
        if order is not None:  # back to the caller's token order
            back = order.argsort(-1)
            hidden_states = _take_tokens(hidden_states, back)
            all_hidden = None if all_hidden is None else tuple(_take_tokens(h, back) for h in all_hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden, **{cache_kw: cache if use_cache else None}
        )

    def moa_prepare_decode(self, cache: MoaCache) -> None:
        """Fill the memos that the attention kernels of the next one-token step over ``cache`` read (work lists
        and head tables from the cache's head capacities): a CUDA-graph capture of that step then needs no eager
        warm-up step first. Kernels that have not run yet in this process compile during the capture."""
        plan = self.config.moa
        for idx in range(self.config.num_hidden_layers):
            prepare_decode(
                cache.layers[idx], self.config.num_attention_heads, plan["alpha"][idx], plan["beta"][idx],
                plan["sink"], plan["min_span"],
            )  # fmt: skip

    def _moa_needs_grad(self, inputs_embeds: torch.Tensor) -> bool:
        """Whether this forward must be differentiable: the fused kernels have no backward. Frozen embeddings with
        trainable layers (LoRA) give inputs that need no gradient, so the parameters are checked too."""
        if not torch.is_grad_enabled():
            return False
        return inputs_embeds.requires_grad or any(p.requires_grad for p in self.parameters())

    def _moa_stack_hooked(self) -> bool:
        """Whether a module whose call the fused stack skips (a layer, its norms and MLP, the final norm) has hooks:
        accelerate's offload or dispatch, or a user's forward hook. Those run the layers as transformers does."""
        skipped = [self.norm]
        for layer in self.layers._modules.values():  # _modules: nn.Module.__getattr__ would cost ~0.5 us a module
            children = layer._modules
            skipped += (layer, children["input_layernorm"], children["post_attention_layernorm"], children["mlp"])
        return any_hooked(skipped)

    def _fusable_stack(self) -> bool:
        """Whether every layer is a pre-norm Llama-type block (RMSNorm, SiLU gated MLP) that _fused_stack runs."""
        if getattr(self, "_moa_fusable", None) is None:
            norms = [self.norm] + [
                n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
            ]
            self._moa_fusable = (
                getattr(self.config, "hidden_act", None) == "silu"
                and all(type(layer).__name__ in _FUSABLE_LAYERS for layer in self.layers)
                and all(type(n).__name__ in _FUSABLE_NORMS and hasattr(n, "variance_epsilon") for n in norms)
                and all(all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) for layer in self.layers)
            )  # fmt: skip
        return self._moa_fusable


_FUSABLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _fused_stack(fused, layers, final_norm, hidden: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    """The decoder layers and the final norm with fused kernels: each residual add is done inside the next RMSNorm.

    Same computation as the transformers layers: h = x + attn(norm1(x)); x' = h + mlp(norm2(h)), with
    mlp(y) = down(silu(gate(y)) * up(y)); the output is norm(x_last).
    """
    first = layers[0].input_layernorm
    residual, normed = hidden, fused.rms_norm(hidden, first.weight, first.variance_epsilon)
    pending = None
    for layer in layers:
        if pending is not None:
            norm = layer.input_layernorm
            residual, normed = fused.rms_norm(pending, norm.weight, norm.variance_epsilon, residual=residual)
            pending = None
        attn, _ = layer.self_attn(normed, **attn_kwargs)
        norm = layer.post_attention_layernorm
        residual, normed = fused.rms_norm(attn, norm.weight, norm.variance_epsilon, residual=residual)
        del attn  # no tensor outlives its use here: a long prefill chunk's activations are GiBs each
        pending = _fused_mlp(fused, layer.mlp, normed)
    return fused.rms_norm(pending, final_norm.weight, final_norm.variance_epsilon, residual=residual)[1]


def _fused_mlp(fused, mlp, normed: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) holding at most two [tokens, intermediate] tensors (eager torch holds three):
    silu * up is written over the gate output, and gate / up are released before the down projection."""
    gate_up = joined_linear((mlp.gate_proj, mlp.up_proj), normed)  # one GEMM, two views of its output
    gate, up = gate_up if gate_up is not None else (mlp.gate_proj(normed), mlp.up_proj(normed))
    del gate_up
    act = fused.silu_mul(gate, up, in_place=True)
    del gate, up
    return mlp.down_proj(act)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# generate()'s per-row inputs of a prefill that _prefill knows to cut to one row per repeated prompt
_PER_ROW_INPUTS = ("attention_mask", "position_ids")


class MoaForCausalLMMixin(SplitBeforeSaving):
    """generate() with a MoaCache; on CUDA a static one and decode steps replayed from a CUDA graph.

    transformers' ``generate()`` asks the model for a cache (``_prepare_cache_for_generation``), whether to run its
    decode steps through a compiled forward (``_valid_auto_compile_criteria``) and for that forward
    (``get_compiled_call``). Here the cache is a MoaCache, static (sized for ``max_length``) when the steps will be
    graph-replayed, and the "compiled" forward is ``GraphedDecodeStep``, not ``torch.compile``. Graphs are used on
    one CUDA device unless ``generate(..., disable_compile=True)``; ``cache_implementation="dynamic"`` or a
    dynamic MoaCache passed in keeps eager steps (memory then follows the generation's length, not max_length).
    A static MoaCache passed in keeps its graph after the call, so calls that reuse it skip the capture. So does
    the cache of ``cache_implementation="static"`` with ``max_cache_len`` (transformers' knob for sizing a static
    cache once for repeated calls): the model keeps that cache and its graph, and ``reset()``s and reuses them
    while calls have as many rows and fit in it; a call that makes its cache without that knob frees them.
    """

    def generate(self, *args, **kwargs):
        with on_device(self.device):  # graphs and their streams belong to the current device
            return self._moa_generate_call(*args, **kwargs)

    def _moa_generate_call(self, *args, **kwargs):
        step = self.__dict__.get("_moa_graphed_step")
        if step is not None:
            step.release_if_weights_moved()  # a graph kept with a cache from an earlier call
        try:
            return super().generate(*args, **kwargs)
        finally:
            step = self.__dict__.get("_moa_graphed_step")
            if step is not None:
                step.release(unless_passed_in=True)

    def _moa_graphs_wanted(self, generation_config) -> bool:
        """Whether generate() replays its decode steps from CUDA graphs (one CUDA device, not disabled)."""
        if generation_config.disable_compile or self.device.type != "cuda":
            return False
        device_map = getattr(self, "hf_device_map", None) or {}
        return len({str(device) for device in device_map.values()}) <= 1  # a graph does not span devices

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
    ):
        name = cache_argument(type(self).forward)
        if model_kwargs.get(name) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
            )
        kind = generation_config.cache_implementation
        if kind not in (None, "static", "dynamic"):
            raise ValueError(
                f"cache_implementation={kind!r}: MoA models generate with their own MoaCache, whose memory is the sum "
                "of the heads' spans. Leave cache_implementation unset, or pick 'static' (sized for max_length) or "
                "'dynamic' (grows with the text)."
            )
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        sized_for = getattr(generation_config, "max_cache_len", None) if kind == "static" else None
        kept = self.__dict__.pop("_moa_kept_cache", None)  # freed here unless this call reuses it
        if sized_for is not None and kept is not None and self._moa_cache_reusable(kept, rows, max_cache_length + 1):
            kept.reset()  # same tensors: the graph captured on them replays from the first decode step
            model_kwargs[name] = self.__dict__["_moa_kept_cache"] = kept
            return
        del kept
        # max_cache_length is max_length - 1 (the last new token is never fed back); one slot more costs ~nothing
        static = MoaCache(self.config, max_cache_len=max(max_cache_length, sized_for or 0) + 1)
        if kind is None and self._moa_graphs_wanted(generation_config):
            if not self._static_cache_fits(static, rows):
                static = None  # a dynamic cache grows only as far as the text goes (and the steps run eagerly)
        elif kind != "static":
            static = None
        model_kwargs[name] = static if static is not None else MoaCache(self.config)
        if sized_for is not None:
            self.__dict__["_moa_kept_cache"] = static  # kept, with its graph, for the next call sized the same way
        else:
            model_kwargs[name].made_by_generate = True  # its graph is released when generate() returns

    def _moa_cache_reusable(self, cache: MoaCache, rows: int, length: int) -> bool:
        """Whether a kept static cache serves a call of ``rows`` rows up to ``length`` tokens on the model's device."""
        first = cache.layers[0]
        if first.max_cache_len < length:
            return False
        if not first.is_initialized:
            return True
        return first.keys.shape[0] == rows and first.keys.device == self.device and first.keys.dtype == self.dtype

    def _static_cache_fits(self, cache: MoaCache, rows: int) -> bool:
        """Whether a static cache for ``rows`` rows takes at most 80% of the device's free memory; else warn once."""
        free = self._moa_free_bytes()
        need = cache.planned_nbytes(rows, _head_dim(self.config), self.dtype)
        if free is None or need <= 0.8 * free:
            return True
        _warn_once(
            f"generate() would need {need / 2**30:.1f} GiB for a static MoA cache of {rows} rows x max_length "
            f"{cache.layers[0].max_cache_len - 1} tokens, more than 80% of the {free / 2**30:.1f} GiB free: it uses a "
            "dynamic cache and eager decode steps instead. Lower max_new_tokens / max_length to get CUDA-graph steps."
        )
        return False

    def _moa_free_bytes(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        cache = cache_in(model_kwargs)
        if not isinstance(cache, MoaCache):
            return False  # the forward replaces an empty foreign cache with a MoaCache, and never compiles
        return cache.layers[0].max_cache_len is not None and self._moa_graphs_wanted(generation_config)

    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
        """The prompt once per group of identical rows. generate() repeats every prompt ``num_beams`` (or
        ``num_return_sequences``) times before its prefill; here the first row of each group is prefilled and the
        cache rows and logits are repeated, so beams cost one prompt's prefill, not ``num_beams``."""
        repeats = self._moa_repeated_prompt_rows(input_ids, generation_config, model_kwargs)
        if repeats is None:
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        kwargs = {
            name: value[::repeats] if name in _PER_ROW_INPUTS and value is not None else value
            for name, value in model_kwargs.items()
        }
        outputs = super()._prefill(input_ids[::repeats], generation_config, kwargs, is_first_iteration)
        cache_in(model_kwargs).batch_repeat_interleave(repeats)
        outputs.logits = outputs.logits.repeat_interleave(repeats, dim=0)
        return outputs

    def _moa_repeated_prompt_rows(self, input_ids, generation_config, model_kwargs) -> int | None:
        """How many times generate() repeated each prompt row, when the prefill can run each prompt once: an empty
        MoaCache, only per-row inputs known to be cut, every group of rows equal, no other outputs asked for; else
        None (the prefill then runs every row)."""
        repeats = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        cache = cache_in(model_kwargs)
        if repeats == 1 or input_ids.dim() != 2 or input_ids.shape[0] % repeats or not isinstance(cache, MoaCache):
            return None
        if cache.get_seq_length():
            return None
        if generation_config.output_attentions or generation_config.output_hidden_states:
            return None
        rows = input_ids.shape[0]
        per_row = [input_ids]
        for name, value in model_kwargs.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                if name not in _PER_ROW_INPUTS:
                    return None  # an input this does not know how to split (inputs_embeds, ...)
                per_row.append(value)
        for tensor in per_row:
            groups = tensor.reshape(rows // repeats, repeats, -1)
            if not torch.equal(groups, groups[:, :1].expand_as(groups)):
                return None
        return repeats

    def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     **model_kwargs):  # fmt: skip
        """transformers' beam search calls the model itself, never a compiled forward: while it runs, the model's own
        calls go through the graphed step as the other decoding modes' steps do (its one-token steps over a static
        MoaCache replay; the prompt and anything else run the plain forward). Beams are reordered in place."""
        if self._valid_auto_compile_criteria(model_kwargs, generation_config):
            self.__dict__["_moa_step_route"] = self.get_compiled_call(generation_config.compile_config)
        try:
            return super()._beam_search(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, **model_kwargs
            )
        finally:
            self.__dict__.pop("_moa_step_route", None)

    def __call__(self, *args, **kwargs):
        route = self.__dict__.pop("_moa_step_route", None)
        if route is None:
            return super().__call__(*args, **kwargs)
        try:
            return route(*args, **kwargs)  # what the route does not replay calls the model again, unrouted
        finally:
            self.__dict__["_moa_step_route"] = route

    def _assisted_decoding(self, *args, **kwargs):
        """Assisted / prompt-lookup decoding needs a cache it can crop after rejected draft tokens."""
        raise NotImplementedError(
            "MoA models do not support assisted or prompt-lookup decoding (assistant_model / "
            "prompt_lookup_num_tokens): a MoA cache keeps only each head's span and overwrites older tokens as "
            "drafts are written, so it cannot be cropped back after rejected drafts. Use generate() without them "
            "(CUDA-graph decode steps on one GPU)."
        )

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (``generate_batch`` and servers built on it) is not supported: its paged
        cache and attention kernels are dense and know nothing of the heads' spans. Without this the forward would
        fail inside the batching loop, which logs it and returns empty results."""
        raise NotImplementedError(
            "MoA models do not support transformers' continuous batching (generate_batch, init_continuous_batching "
            "and servers built on them): its paged KV cache and attention kernels are dense and would not apply the "
            "MoA spans. Use generate() on a padded batch (CUDA-graph decode steps on one GPU), or "
            "model.moa_generate() for greedy throughput."
        )

    def get_compiled_call(self, compile_config=None):
        """The forward generate() uses for decode steps: ``GraphedDecodeStep`` (CUDA graphs, not torch.compile)."""
        step = self.__dict__.get("_moa_graphed_step")
        if step is None:
            step = GraphedDecodeStep(self)
            self.__dict__["_moa_graphed_step"] = step
        return step

    def moa_generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, **kwargs):
        """Greedy generation with a static MoaCache and a CUDA-graph decode loop (no host sync per token).

        Same tokens as ``generate(do_sample=False)``; kwargs: eos_token_id, pad_token_id, cuda_graph,
        max_cache_len. See moa_generate.py.
        """
        with on_device(self.device):
            return greedy_generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)

"""Greedy decoding with a static MoaCache and no host synchronisation per token.

``generate()`` of transformers checks its stopping criteria on the host after every token, which on a
fast GPU costs more than the model's step. ``MoaDecodeLoop`` keeps every per-token value on the device
(next token, positions, finished rows, the output buffer and its write index) so a step is a fixed
sequence of kernels: on CUDA it is captured once as a CUDA graph and replayed; on CPU it runs eagerly.

    loop = MoaDecodeLoop(model, cache, max_steps=256, eos_token_id=2, pad_token_id=0)
    loop.prime(next_tokens, next_positions)   # [B] each, from the prefill
    new_tokens = loop.run(256)                # [B, 256]

``MoaForCausalLMMixin.moa_generate`` wraps prefill + loop for users.
"""

from __future__ import annotations

import torch

from .moa_cache import MoaCache


def _forward_kwargs(model, cache: MoaCache) -> dict:
    from .moa_model import cache_argument

    return {cache_argument(type(model).forward): cache, "use_cache": True, "logits_to_keep": 1}


class MoaDecodeLoop:
    """Greedy decode steps over a static ``MoaCache`` (created with ``max_cache_len``), graph-replayed on CUDA."""

    def __init__(
        self,
        model,
        cache: MoaCache,
        max_steps: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        cuda_graph: bool | None = None,
    ):
        layer = cache.layers[0]
        if not layer.is_initialized or layer.max_cache_len is None:
            raise ValueError(
                "MoaDecodeLoop needs a static MoaCache that holds the prompt: create it with "
                "MoaCache(config, max_cache_len=prompt + new tokens) and run the prefill first"
            )
        room = layer.max_cache_len - layer.seq_len
        if max_steps > room:
            raise ValueError(
                f"max_steps={max_steps} needs {layer.seq_len + max_steps} cache positions but the cache holds "
                f"{layer.max_cache_len}: create the MoaCache with max_cache_len >= {layer.seq_len + max_steps}"
            )
        self.model, self.cache, self.max_steps = model, cache, max_steps
        device, bsz = layer.keys.device, layer.keys.shape[0]
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if eos and pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id to fill finished rows: pass pad_token_id")
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.pad = int(pad_token_id or 0)
        # the device-side state a replayed step reads and writes (fixed addresses)
        self.tokens = torch.zeros(bsz, 1, dtype=torch.long, device=device)  # the token fed next
        self.positions = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.out = torch.full((bsz, max_steps), self.pad, dtype=torch.long, device=device)
        self.index = torch.zeros(bsz, 1, dtype=torch.long, device=device)  # column of out written next
        self.steps_done = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._kwargs = _forward_kwargs(model, cache)

    def prime(self, next_tokens: torch.Tensor, next_positions: torch.Tensor) -> None:
        """Start from the prefill: next_tokens [B] (fed first, not emitted), next_positions [B] (their positions)."""
        self.tokens.copy_(next_tokens.view(-1, 1))
        self.positions.copy_(next_positions.view(-1, 1))
        if self.eos.numel():
            self.finished.copy_(torch.isin(next_tokens.view(-1), self.eos))

    def _step(self) -> None:
        # tokens/positions: [B, 1]; one forward with the cache, greedy pick, state advanced on the device
        logits = self.model(self.tokens, position_ids=self.positions, **self._kwargs).logits[:, -1]
        nxt = logits.argmax(dim=-1)  # [B]
        if self.eos.numel():
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
            self.finished |= torch.isin(nxt, self.eos)
        self.out.scatter_(1, self.index, nxt.view(-1, 1))
        self.index += 1
        self.tokens.copy_(nxt.view(-1, 1))
        self.positions += 1

    def _sync_host_lengths(self) -> None:
        # replays do not run the Python side of the cache: keep its host-side length right
        for layer in self.cache.layers:
            layer.seq_len = self._start_len + self.steps_done

    def run(self, steps: int) -> torch.Tensor:
        """Decode ``steps`` tokens; returns the tokens of this call, [B, steps] (pad after a row's eos)."""
        if self.steps_done + steps > self.max_steps:
            raise ValueError(f"{self.steps_done} + {steps} steps exceed max_steps={self.max_steps}: make a new loop")
        if self.steps_done == 0:
            self._start_len = self.cache.layers[0].seq_len
        first = self.steps_done
        with torch.inference_mode():
            for _ in range(steps):
                if not self.cuda_graph:
                    self._step()
                elif self.graph is None:
                    self._warm_up_and_capture()
                else:
                    self.graph.replay()
                self.steps_done += 1
                self._sync_host_lengths()
        return self.out[:, first : self.steps_done]

    def _warm_up_and_capture(self) -> None:
        """Run one real step eagerly (compiles kernels, fills memos), then capture the next one."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()  # this is the current step, for real
        torch.cuda.current_stream().wait_stream(stream)
        seq_len = self.cache.layers[0].seq_len
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()  # recorded only: nothing runs until replay
        for layer in self.cache.layers:
            layer.seq_len = seq_len


def greedy_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, eos_token_id=None,
                    pad_token_id=None, cuda_graph: bool | None = None, max_cache_len: int | None = None):  # fmt: skip
    """Prefill + ``MoaDecodeLoop``; returns [B, L + max_new_tokens] like ``generate()`` (greedy)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    length = input_ids.shape[1]
    cache = MoaCache(model.config, max_cache_len=max_cache_len or length + max_new_tokens)
    with torch.inference_mode():
        kwargs = _forward_kwargs(model, cache)
        logits = model(input_ids, attention_mask=attention_mask, **kwargs).logits[:, -1]
        first = logits.argmax(dim=-1)  # [B]
        if eos_token_id is not None and pad_token_id is None:
            pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        positions = cache.layers[0].next_pos.clone()  # padding does not count
        new = [first.view(-1, 1)]
        if max_new_tokens > 1:
            loop = MoaDecodeLoop(model, cache, max_new_tokens - 1, eos_token_id, pad_token_id, cuda_graph)
            loop.prime(first, positions)
            new.append(loop.run(max_new_tokens - 1))
    return torch.cat([input_ids, *new], dim=1)

"""Greedy decoding with a static MoaCache and no host synchronisation per token.

``generate()`` of transformers checks its stopping criteria on the host after every token, which on a
fast GPU costs more than the model's step. ``MoaDecodeLoop`` keeps every per-token value on the device
(next token, positions, finished rows, the output buffer and its write index) so a step is a fixed
sequence of kernels: on CUDA it is captured once as a CUDA graph and replayed; on CPU it runs eagerly.

    loop = MoaDecodeLoop(model, cache, max_steps=256, eos_token_id=2, pad_token_id=0)
    loop.prime(next_tokens, next_positions)   # [B] each, from the prefill
    new_tokens = loop.run(256)                # [B, 256]

``MoaForCausalLMMixin.moa_generate`` wraps prefill + loop for users.

``GraphedDecodeStep`` is what ``generate()`` itself calls for its decode steps on CUDA (transformers' hook for a
compiled forward): a one-token forward over a static MoaCache is captured once and replayed, so sampling, beams,
logits processors and stopping criteria keep working and only the model's forward stops paying Python and launches.
"""

from __future__ import annotations

import weakref

import torch

from .moa_cache import MoaCache


def cache_in(kwargs: dict):
    """The cache in forward / generate kwargs, under either name ('cache' from transformers 5.24 on)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


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
                if not self.cuda_graph or (self.graph is None and self.steps_done + 1 == self.max_steps):
                    self._step()  # on CPU; or the loop's last step, whose graph would never replay
                elif self.graph is None:
                    self._warm_up_and_capture()
                else:
                    self.graph.replay()
                self.steps_done += 1
                self._sync_host_lengths()
        return self.out[:, first : self.steps_done]

    def _warm_up_and_capture(self) -> None:
        """The model's first graph: run one real step eagerly (kernels compile, memos fill), then capture the next
        one. Later loops capture their first step at once, after the model fills the memos the kernels read."""
        if _warmed(self.model, self.cache):
            _prepare(self.model, self.cache)
            self.graph, _ = _capture(self._step, self.cache)
            self.graph.replay()  # this is the current step
            return
        _on_side_stream(self._step)  # this is the current step, for real
        _mark_warmed(self.model, self.cache)
        self.graph, _ = _capture(self._step, self.cache)


# model -> the devices on which its decode step ran eagerly once before a capture in this process (kernels compiled,
# lazy CUDA state such as cuBLAS handles set up): later captures of its steps there skip that eager step
_WARMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warmed(model, cache: MoaCache) -> bool:
    return cache.layers[0].keys.device in _WARMED.get(model, ())


def _mark_warmed(model, cache: MoaCache) -> None:
    _WARMED.setdefault(model, set()).add(cache.layers[0].keys.device)


def _prepare(model, cache: MoaCache) -> None:
    """Fill the memos the model's attention kernels read in a one-token step over ``cache`` (before a capture)."""
    prepare = getattr(getattr(model, "model", None), "moa_prepare_decode", None)
    if prepare is not None:
        prepare(cache)


def _on_side_stream(fn):
    """``fn()`` on a fresh side stream, ordered after and before the current stream (warm-up before a capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return result


def _capture(fn, cache: MoaCache):
    """(graph, fn's output) with ``fn`` recorded, not run; the layers' host-side lengths are left as they were."""
    lengths = [layer.seq_len for layer in cache.layers]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()  # recorded only: nothing runs until replay
    for layer, length in zip(cache.layers, lengths, strict=True):
        layer.seq_len = length
    return graph, output


# forward arguments a graph-replayed step understands; any other one given (not None / False, e.g.
# output_hidden_states=True) runs eagerly
_STEP_ARGUMENTS = frozenset(
    ("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
     "return_dict", "cache_position")
)  # fmt: skip


class GraphedDecodeStep:
    """The model's forward, with one-token steps over a static ``MoaCache`` replayed from a CUDA graph.

    ``generate()`` gets this from ``get_compiled_call`` for its decode loop. A call that is not such a step
    (a prefill chunk, a dynamic cache, gradients, other outputs asked for) runs the plain forward. The first
    step of the model's first graph runs eagerly through the fixed input buffers (kernels compile, lazy CUDA state
    is set up), the second is captured; later caches are captured at their first step, after the model fills the
    memos its kernels read (``moa_prepare_decode``, what an eager step would fill). Then each step copies token /
    position / padding into the buffers and replays. The graph follows the cache's
    tensors (``storage_version``); a new cache or a reallocated one is captured again, and only one graph is
    held, until the cache is freed or ``release()``. A cache that is ``reset()`` and used again keeps its graph:
    the decode kernels take lengths and positions from the device. With ``cuda_graph=False`` (CPU tests) every
    step runs eagerly through the same buffers.
    """

    def __init__(self, model, cuda_graph: bool | None = None):
        self.model = model
        self.cuda_graph = cuda_graph
        self.steps = 0  # one-token steps served through the buffers (eager or replayed)
        self.replays = 0  # of which graph replays (tests and benchmarks read both)
        self.states = 0  # buffer sets made (each graphed one is captured once)
        self.warm_ups = 0  # eager first steps before a capture (only the model's first graph, this or a loop's)
        self._state: dict | None = None

    def release(self, unless_passed_in: bool = False) -> None:
        """Drop the graph, its memory pool and the buffers; with ``unless_passed_in``, only when they belong to a
        cache that generate() made (a cache the user passed in keeps its graph for the next call on it: a new turn,
        or a new prompt after ``cache.reset()``; they go when that cache is freed)."""
        cache = self._state["cache"]() if self._state is not None else None
        if not unless_passed_in or cache is None or getattr(cache, "made_by_generate", False):
            self._state = None

    def release_if_weights_moved(self) -> None:
        """Drop a kept graph whose weights or buffers no longer live where it was captured (``model.to()``,
        ``save_pretrained`` splitting joined projections, weights reassigned): replaying it would read freed memory.
        generate() calls this first; weights cannot move during a call."""
        if self._state is not None and self._state["weights"] != self._weights():
            self._state = None

    def _weights(self) -> tuple:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def _cache_freed(self, ref) -> None:
        if self._state is not None and self._state["cache"] is ref:
            self._state = None

    def __call__(self, *args, **kwargs):
        key = None if args else self._step_key(kwargs)
        if key is None:
            return self.model(*args, **kwargs)
        state = self._state
        if state is None or state["key"] != key or state["cache"]() is None:
            state = self._state = self._new_state(key, kwargs)
        self._load_inputs(state, kwargs)
        cache = state["cache"]()
        self.steps += 1
        if not state["graphed"] or (state["graph"] is None and self._last_step(cache)):
            logits = self._forward(state)  # a graph captured now would never replay
        elif not state["warm"] and not _warmed(self.model, cache):
            logits = _on_side_stream(lambda: self._forward(state))  # for real: kernels compile, memos fill
            state["warm"] = True
            _mark_warmed(self.model, cache)
            self.warm_ups += 1
        else:
            if state["graph"] is None:
                if not state["warm"]:
                    _prepare(self.model, cache)  # what an eager step would fill: the graph holds no op for them
                state["graph"], state["logits"] = _capture(lambda: self._forward(state), cache)
            state["graph"].replay()
            for layer in cache.layers:
                layer.seq_len += 1  # a replay runs no Python: keep the host-side length right
            self.replays += 1
            logits = state["logits"]
        return state["output_class"](logits=logits.clone(), **{state["cache_field"]: cache})

    @staticmethod
    def _last_step(cache: MoaCache) -> bool:
        """Whether the cache has room for this step only: a cache generate() made holds max_length tokens (one slot
        more than it feeds), so this is its last decode step."""
        first = cache.layers[0]
        return first.max_cache_len - first.seq_len <= 2

    def _step_key(self, kwargs: dict):
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or torch.is_grad_enabled():
            return None
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        if any(
            name not in _STEP_ARGUMENTS and value is not None and value is not False for name, value in kwargs.items()
        ):
            return None
        cache = cache_in(kwargs)
        if not isinstance(cache, MoaCache):
            return None
        first = cache.layers[0]
        if not first.is_initialized or first.max_cache_len is None or first.seq_len == 0:
            return None
        if first.seq_len + 1 > first.max_cache_len:
            return None  # the plain forward raises the error that says how to size the cache
        mask, keep = kwargs.get("attention_mask"), kwargs.get("logits_to_keep", 0)
        if (mask is not None and mask.dim() != 2) or not isinstance(keep, int) or first.keys.device != ids.device:
            return None
        versions = tuple(layer.storage_version for layer in cache.layers)
        return id(cache), ids.shape[0], keep, versions

    def _new_state(self, key, kwargs: dict) -> dict:
        ids = kwargs["input_ids"]
        cache = cache_in(kwargs)
        graphed = ids.device.type == "cuda" if self.cuda_graph is None else self.cuda_graph
        self._state = None  # free the previous graph's pool before buffers of the new one are made
        self.states += 1
        return {
            "key": key,
            # the graph must not keep a cache alive; when the cache goes, its graph and buffers go too
            "cache": weakref.ref(cache, self._cache_freed),
            "graphed": graphed,
            "graph": None,
            "warm": False,
            "tokens": torch.zeros_like(ids),
            "positions": torch.zeros_like(ids),
            "valid": torch.ones_like(ids),
            "keep": key[2],
            "weights": self._weights(),
        }

    def _load_inputs(self, state: dict, kwargs: dict) -> None:
        from .moa_model import moa_positions

        ids = kwargs["input_ids"]
        cache = state["cache"]()
        rope_ids, q_pos = moa_positions(
            kwargs.get("attention_mask"), kwargs.get("position_ids"), cache, ids.shape[0], 1, ids.device
        )
        state["tokens"].copy_(ids)
        state["positions"].copy_(rope_ids)
        state["valid"].copy_(q_pos >= 0)

    def _forward(self, state: dict) -> torch.Tensor:
        cache = state["cache"]()
        kwargs = dict(_forward_kwargs(self.model, cache), logits_to_keep=state["keep"])
        out = self.model(
            state["tokens"], attention_mask=state["valid"], position_ids=state["positions"], return_dict=True, **kwargs
        )
        state["output_class"] = type(out)
        state["cache_field"] = next(name for name, value in out.items() if value is cache)
        return out.logits


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

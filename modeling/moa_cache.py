"""A KV cache whose memory is the sum of per-head spans.

Layout (docs/internals.md): per layer, ``keys``/``values`` ``[B, T, D]`` with every kv head's slots
side by side (head g owns ``[offset_g, offset_g + cap_g)``), one trash slot at the end, and T = C + 1
rounded up to a multiple of SLOT_ALIGN (the slots between stay empty); ``slot_pos`` ``[B, T]`` holds
the position id stored in each slot (-1 = empty). Inside a head,
sink positions ``p < sink`` sit at ``offset_g + p`` and the recent window is a ring of
``cap_g - sink`` slots. A write is one scatter with no host synchronisation.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .moa_spans import span_at

# Growth policy of a dynamic cache: a head that outgrows its ring gets room for the span at twice the
# length, but never more than 10% + GROWTH_SLACK slots over its span now (memory follows the spans).
GROWTH_SLACK = 32
# A layer's slot count is a multiple of this, so the row strides its kernels get (T and T * D) are always
# multiples of 16: Triton specializes integer arguments on divisibility by 16, and a stride that flipped with the
# cache's size gave every kernel reading the cache a second compile (1.2 s on the H200; compile_variants.py).
SLOT_ALIGN = 16


def aligned_slots(used: int) -> int:
    """A layer's slot count for ``used`` slots (the heads' capacities and the trash slot)."""
    return -(-used // SLOT_ALIGN) * SLOT_ALIGN


def slot_of(pos: torch.Tensor, offset: torch.Tensor, capacity: torch.Tensor, sink: int) -> torch.Tensor:
    """Slot index of position ``pos`` in a head with ``offset``/``capacity`` (tensors broadcast)."""
    ring = capacity - sink
    return offset + torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, ring))


def _small_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 device tensor from a short host list without a stream sync (pinned, non-blocking copy on CUDA)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_ROW_TENSORS = ("keys", "values", "slot_pos", "next_pos")


def move_rows(tensors: list[torch.Tensor], source: list[int], copy=None) -> None:
    """Row ``d`` of every tensor becomes its row ``source[d]``, all at once and in place (what
    ``t.copy_(t[source])`` gives), moving only the rows that change.

    Beam search reorders the cache after every step, mostly by copying a few beams over others, so copying the
    whole cache twice (gather, then copy back) would cost more than the step's attention. Copies run in waves: a
    wave writes rows that no pending copy still reads, every tensor's rows of a wave in one batched copy per dtype
    (``copy``, default ``torch._foreach_copy_``). When only cycles are left (beams that swap), one row of each
    cycle is first copied aside, all in one batched op per dtype.
    """
    pending = {row: src for row, src in enumerate(source) if row != src}
    if any(not 0 <= src < len(source) for src in pending.values()):
        raise IndexError(f"row indices {source} out of range for {len(source)} rows")
    dtypes: dict[torch.dtype, list[int]] = {}  # the tensors of each dtype (one batched op each)
    for i, t in enumerate(tensors):
        dtypes.setdefault(t.dtype, []).append(i)
    aside: dict[tuple[int, int], torch.Tensor] = {}  # (row, tensor) -> that row's old contents
    while pending:
        read = set(pending.values())
        wave = [(row, src) for row, src in pending.items() if row not in read]
        if not wave:  # only cycles are left (rows that swap): keep one row of each aside, then they unwind
            rows, seen = [], set()
            for start in pending:
                if start not in seen:
                    rows.append(start)
                    row = start
                    while row not in seen:
                        seen.add(row)
                        row = pending[row]
            for members in dtypes.values():
                keys = [(row, i) for i in members for row in rows]
                aside.update(zip(keys, torch._foreach_mul([tensors[i][row] for row, i in keys], 1), strict=True))
            pending = {row: ~src if src in rows else src for row, src in pending.items()}  # ~src: from aside
            continue
        for members in dtypes.values():
            dst = [tensors[i][row] for i in members for row, _ in wave]
            src = [tensors[i][s] if s >= 0 else aside[~s, i] for i in members for _, s in wave]
            (copy or torch._foreach_copy_)(dst, src)
        for row, _ in wave:
            del pending[row]


class MoaCacheLayer(CacheLayerMixin):
    """The ragged per-head cache of one decoder layer."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self, alpha: list[float], beta: list[float], sink: int, min_span: int, max_cache_len: int | None = None
    ):
        super().__init__()
        self.alpha = [float(a) for a in alpha]
        self.beta = [float(b) for b in beta]
        self.sink = int(sink)
        self.min_span = int(min_span)
        self.max_cache_len = max_cache_len
        self.capacity: list[int] = []  # host copy of cap_g
        self.fits_until = 0  # every head's capacity holds lengths up to this (host int)
        self.seq_len = 0  # tokens appended so far, padding included (host int)
        self.slot_pos: torch.Tensor | None = None
        self.storage_version = 0  # bumped whenever keys/values/slot_pos/next_pos become new tensors (graphs re-capture)

    # -- sizes --------------------------------------------------------------------------------
    def span(self, head: int, n: int) -> int:
        return span_at(n, self.alpha[head], self.beta[head], self.sink, self.min_span)

    def required_capacity(self, head: int, n: int) -> int:
        return max(self.sink + 1, self.span(head, n))

    def planned_capacity(self, head: int, n: int) -> int:
        """Slots to give head ``head`` when it must hold length ``n``."""
        if self.max_cache_len is not None:
            return self.required_capacity(head, max(n, self.max_cache_len))
        need = self.required_capacity(head, n)
        roomy = min(self.span(head, 2 * n), math.floor(1.1 * self.span(head, n)) + GROWTH_SLACK)
        return max(need, roomy)

    @property
    def num_heads(self) -> int:
        return len(self.alpha)

    # -- transformers Cache API -----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bsz, _, length, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        # sized for the first chunk at once (a static cache: for max_cache_len), so it is not regrown at once
        self._allocate(bsz, head_dim, [self.planned_capacity(g, max(length, 1)) for g in range(self.num_heads)])
        self.next_pos = torch.zeros(bsz, dtype=torch.int64, device=self.device)
        self.is_initialized = True

    def _needs_storage(self, key: torch.Tensor) -> bool:
        """Not allocated yet, or reset() and reused for a batch of another size (the old storage cannot hold it)."""
        return not self.is_initialized or (self.seq_len == 0 and key.shape[0] != self.keys.shape[0])

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("MoaCacheLayer is written by MoA attention (moa_attention.py), not by Cache.update")

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.slot_pos.fill_(-1)
            self.next_pos.zero_()
        self.seq_len = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if self._reorders_in_place(indices):  # a captured decode step stays valid through beam reordering
            move_rows(self.row_tensors(), indices.tolist())
            return
        indices = indices.to(self.device)
        for name in _ROW_TENSORS:
            setattr(self, name, getattr(self, name)[indices])  # a gather (index_select is slow for a few long rows)
        self.storage_version += 1

    def _reorders_in_place(self, indices: torch.Tensor) -> bool:
        """Whether selecting ``indices`` keeps this layer's tensors (a static cache, as many rows as before)."""
        return self.is_initialized and self.max_cache_len is not None and indices.shape[0] == self.keys.shape[0]

    def row_tensors(self) -> list[torch.Tensor]:
        """The tensors holding one row per sequence (batch dim first)."""
        return [getattr(self, name) for name in _ROW_TENSORS]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "slot_pos", "next_pos"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))
            self.storage_version += 1

    # -- storage --------------------------------------------------------------------------------
    def head_offsets(self) -> list[int]:
        """Host copy of each head's first slot (``head_offset``)."""
        return [sum(self.capacity[:g]) for g in range(len(self.capacity))]

    def _allocate(self, bsz: int, head_dim: int, capacity: list[int]) -> None:
        self.capacity = list(capacity)
        total = aligned_slots(sum(capacity) + 1)  # + trash slot (the last one)
        self.keys = torch.zeros(bsz, total, head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros_like(self.keys)
        self.slot_pos = torch.full((bsz, total), -1, dtype=torch.int32, device=self.device)
        self.head_offset = _small_tensor(self.head_offsets(), self.device)
        self.head_capacity = _small_tensor(capacity, self.device)
        self.trash_slot = total - 1
        self.fits_until = 0  # recomputed on the next reserve()
        self.storage_version += 1

    def _fits(self, n: int) -> bool:
        return all(cap >= self.required_capacity(g, n) for g, cap in enumerate(self.capacity))

    def _room_until(self) -> int:
        """The largest length (up to 2**40) every head's current capacity holds (spans grow with n)."""
        lo, hi = max(self.seq_len, 1), max(2 * self.seq_len, 2)
        while hi < 2**40 and self._fits(hi):
            lo, hi = hi, 2 * hi
        if self._fits(hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._fits(mid) else (lo, mid)
        return lo

    def reserve(self, n: int) -> None:
        """Make every head's ring large enough for length ``n`` (re-placing stored tokens if it grows)."""
        if n <= self.fits_until:  # the per-token fast path: one comparison, no loop over heads
            return
        if self._fits(n):
            self.fits_until = self._room_until()
            return
        if self.max_cache_len is not None and self.capacity[0] > 0:
            raise ValueError(
                f"MoA static cache holds at most {self.max_cache_len} tokens, asked for {n}: "
                "create it with a larger max_cache_len"
            )
        old = (self.keys, self.values, self.slot_pos, self.head_offset, self.head_capacity)
        new_caps = [max(cap, self.planned_capacity(g, n)) for g, cap in enumerate(self.capacity)]
        self._allocate(self.keys.shape[0], self.keys.shape[-1], new_caps)
        self._replace(*old)

    def _replace(self, keys, values, slot_pos, head_offset, head_capacity) -> None:
        """Copy live tokens of an old layout into the current one."""
        # old slots without the trash (padding slots are empty)
        slots = torch.arange(slot_pos.shape[1] - 1, device=self.device)
        head = torch.bucketize(slots, head_offset, right=True) - 1  # [C_old] head of each old slot
        pos = slot_pos[:, :-1].to(torch.int64)  # [B, C_old]
        live = pos >= 0
        new_slot = slot_of(pos.clamp(min=0), self.head_offset[head], self.head_capacity[head], self.sink)
        new_slot = torch.where(live, new_slot, torch.full_like(new_slot, self.trash_slot))
        self._scatter(new_slot, keys[:, :-1], values[:, :-1], torch.where(live, pos, -1))

    def _scatter(self, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        # slot, pos: [B, T]; keys/values: [B, T, D]
        index = slot.unsqueeze(-1).expand_as(keys)
        self.keys.scatter_(1, index, keys.to(self.dtype))
        self.values.scatter_(1, index, values.to(self.dtype))
        self.slot_pos.scatter_(1, slot, pos.to(torch.int32))
        self.slot_pos[:, self.trash_slot] = -1

    def write(self, key: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor, write_chunk=None) -> None:
        """Append a chunk. key/value: [B, Hkv, L, D]; q_pos: [B, L] position ids, -1 for padding.

        write_chunk: ``moa_fused.write_chunk`` (one launch that reads and writes only the tokens each head keeps),
        or None for the torch scatter, which sends evicted tokens and padding to the trash slot.
        """
        if self._needs_storage(key):
            self.lazy_initialization(key, value)
        self.seq_len += key.shape[2]
        self.reserve(self.seq_len)
        if write_chunk is not None:
            write_chunk(
                key, value, q_pos, self.keys, self.values, self.slot_pos, self.head_offset, self.head_capacity,
                self.sink,
            )  # fmt: skip
        else:
            self._scatter_chunk(key, value, q_pos)
        self.next_pos += (q_pos >= 0).sum(dim=-1)

    def _scatter_chunk(self, key: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor) -> None:
        """``write``'s torch path: one scatter of every token, evicted ones and padding to the trash slot."""
        bsz, num_heads, length, head_dim = key.shape
        pos = q_pos[:, None, :].expand(bsz, num_heads, length)  # [B, Hkv, L]
        last = pos.amax(dim=-1, keepdim=True)  # [B, Hkv, 1] newest position of each row
        ring = (self.head_capacity - self.sink).view(1, num_heads, 1)
        keep = (pos >= 0) & ((pos < self.sink) | (pos > last - ring))
        offset = self.head_offset.view(1, num_heads, 1)
        capacity = self.head_capacity.view(1, num_heads, 1)
        slot = slot_of(pos.clamp(min=0), offset, capacity, self.sink)
        slot = torch.where(keep, slot, torch.full_like(slot, self.trash_slot))
        self._scatter(
            slot.reshape(bsz, -1),
            key.reshape(bsz, num_heads * length, head_dim),
            value.reshape(bsz, num_heads * length, head_dim),
            torch.where(keep, pos, -1).reshape(bsz, -1),
        )

    def write_token(self, key: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor, append_token) -> None:
        """``write`` of one token per row (key/value [B, Hkv, 1, D], q_pos [B]) in one kernel launch.

        append_token: ``moa_fused.append_token``. A single token never evicts a key of its own window, so
        the slot is the position's (the trash slot for padding).
        """
        if self._needs_storage(key):
            self.lazy_initialization(key, value)
        self.seq_len += 1
        self.reserve(self.seq_len)
        append_token(
            key, value, q_pos, self.keys, self.values, self.slot_pos, self.head_offset, self.head_capacity,
            self.next_pos, self.sink, self.trash_slot,
        )  # fmt: skip

    def padded_heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's slots as a padded view: keys/values [B, Hkv, Cmax, D], positions [B, Hkv, Cmax]."""
        width = max(self.capacity)
        col = torch.arange(width, device=self.device)
        index = self.head_offset[:, None] + col  # [Hkv, Cmax]
        index = torch.where(col < self.head_capacity[:, None], index, self.trash_slot).reshape(-1)
        bsz, _, head_dim = self.keys.shape
        keys = self.keys.index_select(1, index).view(bsz, self.num_heads, width, head_dim)
        values = self.values.index_select(1, index).view(bsz, self.num_heads, width, head_dim)
        pos = self.slot_pos.index_select(1, index).view(bsz, self.num_heads, width)
        return keys, values, pos

    def nbytes(self) -> int:
        """Bytes of the K and V tensors (what the spans cost)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2


class MoaCache(Cache):
    """One MoaCacheLayer per decoder layer, built from the config's ``moa`` plan.

    ``max_cache_len`` makes it static: each head gets S(max_cache_len) slots up front and never grows.
    """

    def __init__(self, config, max_cache_len: int | None = None):
        plan = config.moa
        layers = [
            MoaCacheLayer(alpha, beta, plan["sink"], plan["min_span"], max_cache_len)
            for alpha, beta in zip(plan["alpha"], plan["beta"], strict=True)
        ]
        super().__init__(layers=layers)
        self.made_by_generate = False  # set by generate() for the cache it creates (its graph ends with the call)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def row_tensors(self) -> list[torch.Tensor]:
        """Every layer's tensors holding one row per sequence (batch dim first)."""
        return [t for layer in self.layers for t in layer.row_tensors()]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reorder after each step. A static cache's rows move in place, for all layers at once
        (a few batched copies of the rows that change; a captured decode step stays valid)."""
        if all(layer._reorders_in_place(beam_idx) for layer in self.layers):
            move_rows(self.row_tensors(), beam_idx.tolist())
        else:
            super().reorder_cache(beam_idx)

    def planned_nbytes(self, rows: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes this cache allocates for ``rows`` rows when it is first written (a static cache: all it will use):
        keys and values, plus the int32 position of every slot."""
        slots = sum(
            aligned_slots(sum(layer.planned_capacity(g, 1) for g in range(layer.num_heads)) + 1)
            for layer in self.layers
        )
        return rows * slots * (2 * head_dim * dtype.itemsize + 4)

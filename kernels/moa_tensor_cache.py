"""Memoise host-side work derived from small device tensors (plans, head capacities) without syncs.

Entries are keyed by the tensors' identity and dropped when a tensor is freed, so a new tensor that
reuses a freed one's address never sees stale results. In-place changes are caught by the version
counter (inference tensors have none: they are treated as immutable, as the cache never edits them).
"""

from __future__ import annotations

import weakref

import torch


def _version(tensor: torch.Tensor) -> int:
    return 0 if tensor.is_inference() else tensor._version


class TensorMemo:
    """``memo.get((t1, t2), extra, compute)``: compute() once per live (t1, t2, versions, extra)."""

    def __init__(self) -> None:
        self._entries: dict = {}
        self.unstored = 0  # misses computed with store=False (inside a CUDA-graph capture: the graph rebuilds them)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, compute, store: bool = True):
        """The memoised compute(); with store=False a missing entry is computed and not kept."""
        ids = tuple(id(t) for t in tensors)
        key = (ids, tuple(_version(t) for t in tensors), extra)
        if key not in self._entries:
            if not store:
                self.unstored += 1
                return compute()
            self._entries[key] = compute()
            for tensor in tensors:
                weakref.finalize(tensor, self._drop, id(tensor))
        return self._entries[key]

    def _drop(self, tensor_id: int) -> None:
        for key in [k for k in self._entries if tensor_id in k[0]]:
            del self._entries[key]

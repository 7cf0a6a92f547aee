"""The window edge of the contract for the kernels: a torch reference and its one Triton twin.

For a query at position ``i`` (``n = i + 1``) of a head with rule (alpha, beta), the first visible
window position is ``lo = i - W(n) + 1 = n - S(n) + sink`` (``moa_spans.window_at``); padding queries
(``i < 0``) get a huge edge so that only nothing is visible. ``window_lo`` computes it in torch from
``window_at``. ``window_edge`` is the same arithmetic inside a Triton kernel, so that a decode step or a
prefill launch needs no torch ops before it: float64 throughout, and the product ``beta * n`` and the sum
``alpha + beta * n`` each rounded on their own, exactly as torch does them (two separate kernels). A
fused multiply-add would round once and could move ``floor`` by one at an integer edge, so the compiled
kernel uses libdevice's explicitly rounded ``mul_rn`` / ``add_rn``, which the compiler never contracts.
tests/test_kernels.py checks ``window_edge`` equal to ``window_at`` on floor edges, min_span and sink edges.
"""

from __future__ import annotations

import os
import warnings

import torch

from .moa_spans import window_at

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice  # mul_rn / add_rn (used only when compiled)
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # CPU-only installs fall back to the torch reference
    triton = None
    tl = None
    libdevice = None
    HAS_TRITON = False

    class OutOfResources(Exception):  # never raised without Triton
        pass


BIG = 2**40  # "no window edge" for padding queries (positions are far below this)

# the interpreter is chosen when the kernels are defined (triton.jit reads TRITON_INTERPRET then)
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``: IEEE for 32/64-bit inputs (tf32 applies to fp32 only)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def smaller_config(config: dict) -> dict | None:
    """The next launch config to try when ``config`` needs more shared memory than the GPU has; None if none is left.

    Shrinks in the order that costs the least speed: pipeline stages down to 2, key tiles down to 32 slots (a
    balanced decode's segment cost doubled, so it stays the same number of slots), query tiles down to 32 rows,
    splits merged per step down to 4, one stage, then 16-wide tiles.
    """
    c = dict(config)
    stages, block_n, block_m = c.get("num_stages", 1), c.get("BLOCK_N", 16), c.get("BLOCK_M", 16)
    if stages > 2:
        c["num_stages"] = stages - 1
    elif block_n > 32 or (stages == 1 and block_n > 16):
        c["BLOCK_N"] = block_n // 2
        if "segment_cost" in c:
            c["segment_cost"] *= 2
    elif block_m > 32 or (stages == 1 and block_m > 16):
        c["BLOCK_M"] = block_m // 2
    elif c.get("merge_splits", 4) > 4:
        c["merge_splits"] //= 2
    elif stages > 1:
        c["num_stages"] = 1
    else:
        return None
    return c


_FITTED: dict = {}  # (what, table config, shape key) -> the config that launched on that device


def _fitted_key(config: dict, key: tuple, what: str) -> tuple:
    return what, tuple(sorted(config.items())), key


def fitted_config(config: dict, key: tuple, what: str) -> dict:
    """The config ``launch_fitting`` launches for a table ``config`` now: the one found to fit, else ``config``."""
    return _FITTED.get(_fitted_key(config, key, what), config)


def launch_fitting(launch, config: dict, key: tuple, what: str):
    """``launch(config)``; where Triton raises OutOfResources, the next ``smaller_config`` until one launches.

    The tables are tuned on an H200 (227 KB of shared memory per program); an A10G, L4, L40S or RTX 4090 has 99 KB,
    and a config with deep pipelines or wide tiles does not load there. The config that launched is kept per
    ``key`` (head size, group, dtype, device: what decides the shared memory), with one warning, when it is found. Triton
    raises the error when it loads the compiled kernel, before the launch queues any work, so a retry is safe.
    """
    memo = _fitted_key(config, key, what)
    current, error = _FITTED.get(memo, config), None
    while True:
        try:
            out = launch(current)
        except OutOfResources as err:
            error, smaller = err, smaller_config(current)
            if smaller is None:
                raise RuntimeError(
                    f"{what}: no launch config fits this GPU ({err}); run the torch path with MOA_BACKEND=torch"
                ) from err
            current = _FITTED[memo] = smaller
            continue
        if error is not None:
            warnings.warn(
                f"{what}: launch config {config} needs more than this GPU has ({error}); running {current} instead "
                "(slower than a config tuned for this GPU)",
                RuntimeWarning,
                stacklevel=3,
            )
        return out


def window_lo(q_pos: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, sink: int, min_span: int) -> torch.Tensor:
    """First visible window position per (row, kv head, query): ``i - W(i + 1) + 1``; huge for padding.

    q_pos: [B, L] int64 (or [B]); alpha/beta: [Hkv]. Returns [B, Hkv, L] (or [B, Hkv]) int64, on device,
    without host synchronisation. The torch reference of ``window_edge``.
    """
    pos = q_pos.unsqueeze(1)  # [B, 1, L]
    shape = (1, -1) + (1,) * (q_pos.dim() - 1)
    a = alpha.to(device=q_pos.device, dtype=torch.float64).reshape(shape)
    b = beta.to(device=q_pos.device, dtype=torch.float64).reshape(shape)
    n = pos.clamp(min=0) + 1
    return torch.where(pos >= 0, n - window_at(n, a, b, sink, min_span), BIG)  # i - W + 1 == n - W


if HAS_TRITON:
    _BIG_C = tl.constexpr(BIG)
    _ROUND_EACH = tl.constexpr(not INTERPRETED)  # the interpreter (numpy) never fuses: plain ops are exact there

    @triton.jit
    def window_edge(pos, alpha, beta, SINK: tl.constexpr, MIN_SPAN: tl.constexpr):
        """``window_lo`` in a kernel: pos int tensor (any shape), alpha/beta float64 scalars or broadcastable."""
        n = tl.maximum(pos.to(tl.int64), 0) + 1
        n_f = n.to(tl.float64)
        if _ROUND_EACH:
            raw = libdevice.add_rn(alpha, libdevice.mul_rn(beta, n_f))  # torch: beta * n, then alpha + (.)
        else:
            raw = alpha + beta * n_f
        span = tl.minimum(n_f, tl.maximum(tl.floor(raw), MIN_SPAN * 1.0))  # S(n), exact in float64
        return tl.where(pos >= 0, n - span.to(tl.int64) + SINK, _BIG_C)  # n - (S - sink)

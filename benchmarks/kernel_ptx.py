"""Compile the decode kernels for Hopper (sm_90) on any machine, GPU or not, and hash their PTX code.

    PYTHONPATH=. python benchmarks/kernel_ptx.py             # one line per kernel and config: md5 of the code, lines
    PYTHONPATH=. python benchmarks/kernel_ptx.py /tmp/ptx    # also write each kernel's PTX there

A refactor of kernel source that leaves these hashes unchanged compiles to the same code (the debug sections, which
carry source line numbers, are left out of the hash), so it needs no new timing on the GPU. Triton's bundled LLVM
makes the PTX; no CUDA device or driver is used. The argument types are those of a bf16 Llama-3-8B decode (32 query
heads, 8 kv heads); the configs are the d=128 table's entries of both kernels, with and without ``swap_ab``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moa_hub.remote import remote_module  # noqa: E402

POINTER_TYPES = {"Q": "*bf16", "CacheK": "*bf16", "CacheV": "*bf16", "Out": "*bf16", "PartO": "*fp32",
                 "PartLse": "*fp32", "SlotPos": "*i32", "Counter": "*i32"}  # fmt: skip
COMMON = dict(GROUP=4, BLOCK_G=16, MERGE_G=4, SINK=64, MIN_SPAN=128, HEAD_DIM=128, BLOCK_S=16, DOT_PRECISION="tf32")


def signature(fn, constexprs: dict) -> dict:
    """Triton types of fn's arguments: pointers by name (int64 for the tables), int64 strides, int32 counts."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = POINTER_TYPES.get(name, "*i64")
        elif name == "sm_scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith("stride") else "i32"
    return sig


def code_of(ptx: str) -> str:
    """The PTX without comments, source locations and debug sections (which move with source line numbers)."""
    code = re.split(r"\n\s*\.section\s+\.debug", ptx, maxsplit=1)[0]
    return "\n".join(ln for ln in code.splitlines() if not ln.strip().startswith((".loc", ".file", "//")))


def main() -> None:
    decode = remote_module("moa_decode")
    balanced = remote_module("moa_decode_balanced")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    cases = [
        (balanced._moa_decode_balanced, dict(BLOCK_N=32, BLOCK_H=8, SEG_COST=4, SWAP_AB=False), 2, 3),
        (balanced._moa_decode_balanced, dict(BLOCK_N=64, BLOCK_H=8, SEG_COST=3, SWAP_AB=True), 4, 3),
        (balanced._moa_decode_balanced, dict(BLOCK_N=64, BLOCK_H=8, SEG_COST=3, SWAP_AB=False), 4, 3),
        (decode._moa_decode_split, dict(BLOCK_N=64, FUSED_MERGE=True, SWAP_AB=False), 2, 3),
    ]
    for fn, extra, warps, stages in cases:
        constexprs = dict(COMMON, **extra)
        src = ASTSource(fn, signature(fn, constexprs), constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        code = code_of(kernel.asm["ptx"])
        name = f"{fn.__name__} {' '.join(f'{k}={v}' for k, v in extra.items())} warps={warps} stages={stages}"
        print(f"{hashlib.md5(code.encode()).hexdigest()[:12]}  {len(code.splitlines()):5d} lines  {name}", flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / (re.sub(r"[^A-Za-z0-9_=]+", "_", name) + ".ptx")).write_text(kernel.asm["ptx"])


if __name__ == "__main__":
    main()

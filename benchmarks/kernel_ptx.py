"""Compile the decode kernels for Hopper (sm_90) on any machine, GPU or not, and hash their PTX code.

    PYTHONPATH=. python benchmarks/kernel_ptx.py             # one line per kernel and config: md5 of the code, lines
    PYTHONPATH=. python benchmarks/kernel_ptx.py /tmp/ptx    # also write each kernel's PTX there
    PYTHONPATH=. python benchmarks/kernel_ptx.py --shared-memory   # every decode table config's shared memory at
                                            # d=64/128/256; exit 1 if one needs more than Hopper's 227 KB

A refactor of kernel source that leaves these hashes unchanged compiles to the same code (the debug sections, which
carry source line numbers, are left out of the hash), so it needs no new timing on the GPU. Triton's bundled LLVM
makes the PTX; no CUDA device or driver is used. The arguments are specialised as Triton's launcher does it (see
MULTIPLES_OF_16): on the H200 (2026-11-25) the hashes of the split and both balanced d=128 kernels equal those of the
kernels a launch compiled there. The code, and so the hashes, depend on the Triton version (the GPU image has 3.6;
a fresh install may get a newer one): compare hashes made with one version. The argument types are those of a bf16 Llama-3-8B decode (32 query
heads, 8 kv heads); the configs are the d=128 table's entries (``DECODE_CONFIGS``), and its 4-warp balanced entry
without ``swap_ab``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moa_hub.remote import remote_module  # noqa: E402

POINTER_TYPES = {"Q": "*bf16", "CacheK": "*bf16", "CacheV": "*bf16", "Out": "*bf16", "PartO": "*fp32",
                 "PartLse": "*fp32", "SlotPos": "*i32", "Counter": "*i32"}  # fmt: skip
HOPPER_SMEM = 232448  # bytes of shared memory one program may use on an H100 / H200 (227 KB)


# what Triton's launcher specialises in a bf16 Llama-3-8B decode on an H200 (read from its kernel cache, 2026-11-25):
# int32 integers; every pointer 16-byte aligned; these integers multiples of 16 (strides of 128-wide heads, 4 x 132
# programs, split lengths); the query positions' stride 1
MULTIPLES_OF_16 = {"stride_qb", "stride_qh", "stride_ckb", "stride_ckn", "stride_cvb", "stride_cvn", "stride_pb",
                   "stride_pw", "stride_pg", "stride_lb", "stride_ob", "stride_oh", "num_programs", "split_len"}  # fmt: skip
ONE = {"stride_qpos": 1}


def signature(fn, constexprs: dict) -> tuple[dict, dict]:
    """Triton types of fn's arguments (pointers by name, int64 for the tables; int32 integers) and the 16-divisibility
    attributes of the aligned pointers and of MULTIPLES_OF_16."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = POINTER_TYPES.get(name, "*i64")
        elif name == "sm_scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name] != "constexpr" and (name[0].isupper() or name in MULTIPLES_OF_16):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def code_of(ptx: str) -> str:
    """The PTX without comments, source locations and debug sections (which move with source line numbers), nor the
    labels only the debug sections use (``$L__tmpN:``, which move with how the source nests its jit helpers)."""
    code = re.split(r"\n\s*\.section\s+\.debug", ptx, maxsplit=1)[0]
    return "\n".join(
        ln for ln in code.splitlines()
        if not ln.strip().startswith((".loc", ".file", "//")) and not re.fullmatch(r"\$L__tmp\d+:", ln.strip())
    )  # fmt: skip


def compile_for_hopper(fn, constexprs: dict, num_warps: int, num_stages: int):
    """fn compiled for sm_90 (Triton's CompiledKernel: ``asm["ptx"]``, ``metadata.shared`` bytes), no GPU needed."""
    constexprs = {**{k: v for k, v in ONE.items() if k in fn.arg_names}, **constexprs}
    sig, attrs = signature(fn, constexprs)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def decode_kernel_of(config: dict, head_dim: int):
    """(kernel, constexprs) that a decode table config launches at this head size, with Llama-3-8B's group of 4 and
    8 kv heads in bf16 (``moa_decode.decode_constexprs``, which the launches use)."""
    decode = remote_module("moa_decode")
    constexprs = decode.decode_constexprs(config, 4, head_dim, 8, 64, 128, torch.bfloat16)
    if config.get("balanced"):
        return remote_module("moa_decode_balanced")._moa_decode_balanced, constexprs
    return decode._moa_decode_split, constexprs


def check_shared_memory() -> int:
    """Every decode table config at d=64, 128 and 256, compiled for sm_90: its shared memory, and 1 if one needs more
    than a Hopper GPU has (the table would then launch a smaller config than it says, with a warning, on the GPU)."""
    decode = remote_module("moa_decode")
    too_big = 0
    for head_dim in (64, 128, 256):
        for entry in decode.decode_table(head_dim):
            config = entry[2]
            fn, constexprs = decode_kernel_of(config, head_dim)
            kernel = compile_for_hopper(fn, constexprs, config["num_warps"], config["num_stages"])
            shared = kernel.metadata.shared
            too_big += shared > HOPPER_SMEM
            flag = "TOO BIG" if shared > HOPPER_SMEM else ("> 99 KB" if shared > 99 * 1024 else "")
            print(f"d={head_dim:3d} {shared:7d} B shared {flag:8s} {config}", flush=True)
    return int(too_big > 0)


def main() -> None:
    if sys.argv[1:] == ["--shared-memory"]:
        raise SystemExit(check_shared_memory())
    decode = remote_module("moa_decode")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    cases = []
    for entry in decode.DECODE_CONFIGS:
        fn, constexprs = decode_kernel_of(entry[2], 128)
        cases.append((fn, constexprs, entry[2]["num_warps"], entry[2]["num_stages"]))
    balanced4 = dict(decode.DECODE_CONFIGS[-1][2], swap_ab=False)  # the 4-warp entry without swap_ab, for comparison
    fn, constexprs = decode_kernel_of(balanced4, 128)
    cases.append((fn, constexprs, balanced4["num_warps"], balanced4["num_stages"]))
    for fn, constexprs, warps, stages in cases:
        extra = {k: v for k, v in constexprs.items() if k in ("BLOCK_N", "SEG_COST", "SWAP_AB", "FUSED_MERGE")}
        kernel = compile_for_hopper(fn, constexprs, warps, stages)
        code = code_of(kernel.asm["ptx"])
        name = f"{fn.__name__} {' '.join(f'{k}={v}' for k, v in extra.items())} warps={warps} stages={stages}"
        print(f"{hashlib.md5(code.encode()).hexdigest()[:12]}  {len(code.splitlines()):5d} lines  {name}", flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / (re.sub(r"[^A-Za-z0-9_=]+", "_", name) + ".ptx")).write_text(kernel.asm["ptx"])


if __name__ == "__main__":
    main()

"""Which Triton kernels compile again when generate() meets a new prompt length or batch size, and what it costs.

    PYTHONPATH=. python benchmarks/compile_variants.py --out $OUT            # the H200 run
    PYTHONPATH=. python benchmarks/compile_variants.py --smoke --out /tmp/cv  # CPU check of the script

Llama-3-8B shape (``--layers`` of its 32, random bf16 weights), the mixed 50% plan. Runs plain ``generate()`` calls
(greedy, 9 new tokens: a CUDA graph is captured) over a sequence of prompt lengths and batch sizes, and after each
call counts the compiled variants of every Triton kernel of the remote code (each JIT function's per-device kernel
cache). A new variant of a kernel already compiled is a recompile for a new specialization: Triton specializes
integer arguments on being 1 and on divisibility by 16, so a stride or a length that changes with the input gives
the kernel a new key. For each new variant the differing fields of its key against an older one are listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_e2e import DEV, SHAPES, build, code_of, log, plans, sync  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402

KERNEL_MODULES = ("moa_decode", "moa_decode_balanced", "moa_prefill", "moa_fused")
CALLS = [(4096, 1), (4096, 1), (4100, 1), (4111, 1), (4200, 1), (5000, 1), (3001, 1), (8192, 1), (4096, 2),
         (4100, 2), (4096, 16), (4103, 16)]  # fmt: skip
SMOKE_CALLS = [(200, 1), (201, 1), (207, 2)]


def jit_functions(moa) -> dict:
    """Every Triton JIT function (kernels and the functions they call) of the model's remote kernel modules."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    found = {}
    for name in KERNEL_MODULES:
        module = code_of(moa, name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and id(value) not in {id(v) for v in found.values()}:
                found[f"{name}.{attr}"] = value
    return found


def variants(fn) -> list[str]:
    """The keys of a JIT function's compiled kernels over every device (the first field of each device cache)."""
    keys = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        keys.extend(str(k) for k in cache)
    return keys


def key_diff(new: str, old: list[str]) -> str:
    """The fields of ``new`` that differ from the nearest older key (a key is a long repr of tuples)."""
    if not old:
        return "first compile"
    split = [s.strip() for s in new.replace("(", ",").replace(")", ",").split(",")]

    def diff(other: str) -> list[str]:
        fields = [s.strip() for s in other.replace("(", ",").replace(")", ",").split(",")]
        return [f"{i}: {a} -> {b}" for i, (a, b) in enumerate(zip(fields, split, strict=False)) if a != b]

    best = min((diff(k) for k in old), key=len)
    return "; ".join(best[:8]) + (f" (+{len(best) - 8} more)" if len(best) > 8 else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (a check of the script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name, calls = ("tiny", SMOKE_CALLS) if args.smoke else ("llama-3-8b", CALLS)
    SHAPES[name] = dict(SHAPES[name], num_hidden_layers=min(args.layers, SHAPES[name]["num_hidden_layers"]))
    dense = build(name)
    moa = moa_twin(dense, plans(dense, max(n for n, _ in calls) + 64)["moa-50"])
    del dense
    functions = jit_functions(moa)
    seen = {label: variants(fn) for label, fn in functions.items()}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length, bsz in calls:
        ids = torch.randint(3, min(1000, moa.config.vocab_size), (bsz, length), generator=gen).to(DEV)
        sync()
        start = time.perf_counter()
        moa.generate(ids, max_new_tokens=9, do_sample=False)
        sync()
        ms = (time.perf_counter() - start) * 1e3
        new = {}
        for label, fn in functions.items():
            now = variants(fn)
            added = [k for k in now if k not in seen[label]]
            if added:
                new[label] = [key_diff(k, seen[label]) for k in added]
            seen[label] = now
        rows.append(dict(prompt=length, rows=bsz, ms=round(ms, 1), new_variants=new))
        log(f"prompt {length} x {bsz}: {ms:.1f} ms, new variants: {sum(len(v) for v in new.values())}")
        for label, why in new.items():
            log(f"    {label}: {why}")
    result = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
        layers=SHAPES[name]["num_hidden_layers"], calls=rows,
        variants_total={label: len(variants(fn)) for label, fn in functions.items()},
    )  # fmt: skip
    (args.out / "compile_variants.json").write_text(json.dumps(result, indent=2))
    log("| prompt x rows | ms | new kernel variants |")
    for row in rows:
        log(f"| {row['prompt']} x {row['rows']} | {row['ms']} | {sum(len(v) for v in row['new_variants'].values())} |")


if __name__ == "__main__":
    main()

"""A/B of the attention kernels' integer specialization and of a prefill kernel version, in one process, alternating.

    PYTHONPATH=. python benchmarks/specialize_ab.py --out $OUT            # the H200 run
    PYTHONPATH=. python benchmarks/specialize_ab.py --before old.py --out $OUT   # also an older moa_prefill.py
    PYTHONPATH=. python benchmarks/specialize_ab.py --variant a=a.py --variant b=b.py --prefill-only --out $OUT
    PYTHONPATH=. python benchmarks/specialize_ab.py --smoke --out /tmp/s  # CPU check (interpreter)

Arms: "shipped" (the kernels as they are), "default" (the same kernels specialized on every integer argument,
Triton's default), "length not specialized" (the prefill specialized on neither its length nor the positions' row
stride), and with ``--before`` the ``moa_prefill`` of that file (prefill cases only); each ``--variant NAME=FILE`` is one
more such arm. Llama-3-8B attention shapes
(32 q heads, 8 kv heads, d=128, bf16), the mixed plans of bench_attention.py; prefill at lengths that are multiples
of 16 and at 4100, decode where the table picks the balanced kernel. Times: CUDA-graph replays, medians
(triton.testing.do_bench), 3 alternating rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import (  # noqa: E402
    CUDA,
    DEV,
    DTYPE,
    BenchConfig,
    bench,
    decode_cache,
    graphed,
    log,
    make_plan,
    prefill_inputs,
)
from moa_hub.remote import PACKAGE_NAME, remote_module  # noqa: E402

prefill = remote_module("moa_prefill")
decode = remote_module("moa_decode")
balanced = remote_module("moa_decode_balanced")


def specialized(fn, **options):
    """The same kernel under Triton's default specialization (every integer argument), or ``options``."""
    import triton

    return triton.jit(fn.fn, **options)


def module_from(path: Path, name: str = "before"):
    """A moa_prefill.py of another version, imported inside the remote package (its relative imports resolve)."""
    remote_module("moa_prefill")
    spec = importlib.util.spec_from_file_location(f"{PACKAGE_NAME}.moa_prefill_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--before", type=Path, help="an older moa_prefill.py, timed as the arm 'before'")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FILE: another moa_prefill.py, an arm")
    parser.add_argument("--prefill-only", action="store_true", help="no decode cases")
    parser.add_argument(
        "--lengths", default=None, help="prefill lengths, comma-separated (default 4096,4100,16384,32768)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig.smoke() if args.smoke else BenchConfig()
    arms = {
        "shipped": {},
        "default": {
            (prefill, "_moa_prefill_fwd"): specialized(prefill._moa_prefill_fwd),
            (balanced, "_moa_decode_balanced"): specialized(balanced._moa_decode_balanced),
        },
        "length not specialized": {
            (prefill, "_moa_prefill_fwd"): specialized(
                prefill._moa_prefill_fwd, do_not_specialize=["seq_len", "stride_pb"]
            ),
        },
    }
    modules = {"before": module_from(args.before)} if args.before else {}
    for spec in args.variant:
        name, _, path = spec.partition("=")
        modules[name] = module_from(Path(path), name.replace("-", "_"))
    arms.update({name: {} for name in modules})
    current = {"prefill": prefill}  # the prefill module the cases call: another file's in the arms of `modules`
    shipped = {key: getattr(*key) for patch in arms.values() for key in patch}
    cases = []
    lengths = (64, 70) if args.smoke else (4096, 4100, 16384, 32768)
    if args.lengths:
        lengths = tuple(int(n) for n in args.lengths.split(","))
    for n in lengths:
        for density in (0.5, 0.25):
            query, key, value, q_pos, rule = prefill_inputs(cfg, n, density)
            cases.append(
                (
                    f"prefill {n} @ {density:.0%}",
                    lambda q=query, k=key, v=value, p=q_pos, r=rule: current["prefill"].moa_prefill(q, k, v, p, *r),
                )
            )
    for n in (70,) if args.smoke else (4100,):  # two rows: their positions are copied into rows of a stride of 16k
        query, key, value, q_pos, rule = prefill_inputs(cfg, n, 0.5)
        query, key, value, q_pos = (t.expand(2, *t.shape[1:]).contiguous() for t in (query, key, value, q_pos))
        cases.append((f"prefill {n} x 2 @ 50%",
                      lambda q=query, k=key, v=value, p=q_pos, r=rule: current["prefill"].moa_prefill(q, k, v, p, *r)))  # fmt: skip
    for n, bsz in () if args.prefill_only else ((64, 2),) if args.smoke else ((8192, 16), (32768, 16), (8192, 64)):
        for density in (0.5, 0.25):
            alpha, beta = make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
            cache = decode_cache(bsz, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim)
            query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device=DEV, dtype=DTYPE)
            q_pos = torch.full((bsz,), n - 1, device=DEV, dtype=torch.int64)
            rule = (alpha.to(DEV), beta.to(DEV), cfg.sink, cfg.min_span)
            config = decode._table_config(bsz, cache[0], cfg.hkv)
            kernel = "balanced" if config.get("balanced") else "split"
            cases.append((f"decode {n} x {bsz} @ {density:.0%} ({kernel})",
                          lambda q=query, c=cache, p=q_pos, r=rule: decode.moa_decode(q, *c, p, *r)))  # fmt: skip
    times: dict[str, dict[str, list]] = {name: {arm: [] for arm in arms} for name, _ in cases}
    outputs: dict[str, dict] = {}
    for _ in range(1 if args.smoke else 3):
        for arm, patch in arms.items():
            for (module, name), fn in shipped.items():
                setattr(module, name, patch.get((module, name), fn))
            current["prefill"] = modules.get(arm, prefill)
            for name, fn in cases:
                if arm in modules and not name.startswith("prefill"):
                    continue
                outputs.setdefault(name, {})[arm] = fn()
                times[name][arm].append(bench(graphed(fn), rep_ms=50 if args.smoke else 200))
    for (module, name), fn in shipped.items():
        setattr(module, name, fn)
    rows = []
    for name, _ in cases:
        med = {arm: statistics.median(t) for arm, t in times[name].items() if t}
        same = all(torch.equal(outputs[name]["shipped"], out) for out in outputs[name].values())
        rows.append(dict(case=name, ms={arm: round(t, 5) for arm, t in med.items()},
                         over_shipped={arm: round(t / med["shipped"], 4) for arm, t in med.items()},
                         equal_outputs=same, all_ms={arm: [round(t, 5) for t in ts] for arm, ts in times[name].items()}))  # fmt: skip
    result = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__, rows=rows)
    (args.out / "specialize_ab.json").write_text(json.dumps(result, indent=2))
    log(
        "| case | "
        + " | ".join(f"{arm} ms" for arm in arms)
        + " | "
        + " | ".join(f"{arm} / shipped" for arm in arms if arm != "shipped")
        + " | outputs equal |"
    )
    for r in rows:
        cells = [str(r["ms"].get(arm, "")) for arm in arms] + [
            str(r["over_shipped"].get(arm, "")) for arm in arms if arm != "shipped"
        ]
        log(f"| {r['case']} | " + " | ".join(cells) + f" | {r['equal_outputs']} |")


if __name__ == "__main__":
    main()

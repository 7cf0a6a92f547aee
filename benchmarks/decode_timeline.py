"""Per-program timeline of the decode kernels on the GPU (one L2-flushed call, 5 repeats).

    PYTHONPATH=. python benchmarks/decode_timeline.py      # writes $OUT/timeline.json
    PYTHONPATH=. python benchmarks/decode_timeline.py '[[32768, 1, 0.5, {"BLOCK_N": 64, ...}]]'  # own cases

An instrumented copy of kernels/moa_decode_balanced.py or kernels/moa_decode.py (the split kernel; made by text
substitution, loaded into the remote package) stores per program: %globaltimer at its start, before its first segment
(query, window edge and tile loop), after its last segment's tile loop and at its end, its SM and its segment count.
Printed per case (CASES: the table's configs): the kernel span, the spread of start and end times, the prologue, loop and epilogue medians.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention as ba  # noqa: E402
from moa_hub.remote import remote_package  # noqa: E402

NOW = "tl.inline_asm_elementwise('mov.u64 $0, %globaltimer;', '=l', [], dtype=tl.int64, is_pure=False, pack=1)"
SMID = "tl.inline_asm_elementwise('mov.u32 $0, %smid;', '=r', [], dtype=tl.int32, is_pure=False, pack=1)"


def _stores(indent: str) -> str:
    fields = ("t_start", "t_first", "t_last", "t_end", "sm.to(tl.int64)", "nseg.to(tl.int64)")
    return "".join(f"{indent}tl.store(Timer + p * 6 + {i}, {x})\n" for i, x in enumerate(fields))


# (anchor, text put before it, text put after it) per kernel; each anchor must be found once in its module
EDITS = {
    "balanced": [
        (
            "        p = tl.program_id(0).to(tl.int64)\n",
            "",
            "        t_start = _now()\n        t_first = t_start\n        t_last = t_start\n        nseg = 0\n",
        ),
        (
            "                out, lse = _attend_segment(\n",
            "                t_first = tl.where(nseg == 0, _now(), t_first)\n",
            "",
        ),
        (
            "                # the programs holding this (row, head)",
            "                t_last = _now()\n                nseg += 1\n",
            "",
        ),
        ("            t = seg_end\n", "", f"        t_end = _now()\n        sm = {SMID}\n" + _stores("        ")),
    ],
    "split": [  # one item per program: p counts (item, row) programs
        (
            "        w = tl.program_id(0).to(tl.int64)\n",
            "",
            "        t_start = _now()\n        p = w + tl.program_id(1).to(tl.int64) * tl.num_programs(0)\n",
        ),
        ("        out, lse = _attend_segment(\n", "        t_first = _now()\n", ""),
        ("        if FUSED_MERGE:\n", "        t_last = _now()\n        nseg = t_first * 0 + 1\n", ""),
        (
            "\n    @triton.jit\n    def _moa_decode_merge(",
            f"        t_end = _now()\n        sm = {SMID}\n" + _stores("        "),
            "",
        ),
    ],
}
KERNELS = {  # kind: (module file, the kernel's argument line, the launch's argument line)
    "balanced": ("moa_decode_balanced", "PartO, PartLse, Counter, Out,\n", "part_o, part_lse, counters, out,\n"),
    "split": (
        "moa_decode",
        "Items, QPos, PartO, PartLse, Counter, Out,\n",
        "items, q_pos, part_o, part_lse, counters, out,\n",
    ),
}


def timed_module(kind: str = "balanced"):
    """The module of the balanced or split decode kernel, instrumented (a copy in a temporary folder, in the remote
    package). Its TIMER (int64 [programs * 6]) receives per program: %globaltimer at its start, before its first
    segment, after its last segment's tile loop and at its end, its SM and its segment count."""
    remote_package()
    name, arg_line, launch_line = KERNELS[kind]
    src = (Path(__file__).resolve().parents[1] / "kernels" / f"{name}.py").read_text()
    edits = [
        (arg_line, "", ""),
        (launch_line, "", ""),
        ("if HAS_TRITON:\n", "", f"\n    @triton.jit\n    def _now():\n        return {NOW}\n"),
    ]
    for anchor, before, after in edits + EDITS[kind]:
        if src.count(anchor) != 1:
            raise SystemExit(f"decode_timeline: the kernel changed, {anchor!r} is not found once: update the edits")
        src = src.replace(anchor, before + anchor + after)
    src = src.replace(arg_line, arg_line.replace("Out,\n", "Out, Timer,\n"))
    src = src.replace(launch_line, launch_line.replace("out,\n", "out, TIMER,\n"))
    launcher = "def launch_balanced(query," if kind == "balanced" else "def _launch_decode(query,"
    path = os.path.join(tempfile.mkdtemp(), f"{name}_timed.py")
    open(path, "w").write(src.replace(launcher, "TIMER = None\n\n\n" + launcher))
    spec = importlib.util.spec_from_file_location(f"moa_hub_remote.{name}_timed", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


CASES = [  # (context, rows, density, launch config): None is the DECODE_CONFIGS entry serving the shape
    (8192, 1, 0.5, None),
    (32768, 1, 0.5, None),
    (131072, 1, 0.25, None),
    (8192, 16, 0.25, None),
]


def program_stats(t: torch.Tensor) -> dict:
    """Span, start/end spread, prologue and epilogue of one call from the [programs, 6] timer rows (ns)."""
    t0 = t[:, 0].min()
    st, fi, la, en = (t[:, i] - t0 for i in range(4))
    dur = en - st
    return dict(
        span_us=float(en.max()) / 1e3,
        start_last_us=float(st.max()) / 1e3,
        first_loop_med_us=float((fi - st).median()) / 1e3,
        loop_med_us=float((la - fi).median()) / 1e3,
        epilogue_med_us=float((en - la).median()) / 1e3,
        epilogue_max_us=float((en - la).max()) / 1e3,
        last_end_epilogue_us=float((en - la)[en.argmax()]) / 1e3,
        dur_med_us=float(dur.median()) / 1e3,
        dur_min_us=float(dur.min()) / 1e3,
        dur_max_us=float(dur.max()) / 1e3,
        end_p10_us=float(en.quantile(0.1)) / 1e3,
        end_p50_us=float(en.quantile(0.5)) / 1e3,
        end_p90_us=float(en.quantile(0.9)) / 1e3,
        progs_per_sm_max=int(torch.bincount(t[:, 4].long()).max()),
        nseg_max=int(t[:, 5].max()),
        end_med_us_by_segments={int(k): float(en[t[:, 5] == k].median()) / 1e3 for k in t[:, 5].unique()},
        programs=int(t.shape[0]),
    )


def main() -> None:
    mods = {kind: timed_module(kind) for kind in ("balanced", "split")}
    cfg = ba.BenchConfig()
    out = {}
    cases = json.loads(sys.argv[1]) if len(sys.argv) > 1 else CASES  # [[n, rows, density, config or null], ...]
    for n, bsz, density, conf in cases:
        alpha, beta = ba.make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
        cache = ba.decode_cache(bsz, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim)
        conf = conf or ba.decode.decode_config(bsz, cache[0].shape[1] - 1, cfg.head_dim, cfg.hkv)
        kind = "balanced" if conf.get("balanced") else "split"
        mod = mods[kind]
        query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        q_pos = torch.full((bsz,), n - 1, device="cuda", dtype=torch.int64)
        mod.TIMER = torch.zeros(2**16 * 6, dtype=torch.int64, device="cuda")  # rows of programs that ran are set
        a_d, b_d = alpha.cuda(), beta.cuda()
        launch = mod.launch_balanced if kind == "balanced" else mod._launch_decode
        scale = cfg.head_dim**-0.5

        def fn(query=query, cache=cache, q_pos=q_pos, a_d=a_d, b_d=b_d, c=conf, launch=launch, scale=scale):
            return launch(query, cache, q_pos, a_d, b_d, scale, cfg.sink, cfg.min_span, c)  # both take the config 9th

        ref = ba.decode.moa_decode_ref(
            query.double(), cache[0].double(), cache[1].double(), *cache[2:], q_pos, a_d, b_d, cfg.sink, cfg.min_span
        )
        assert ba.rel(fn(), ref) < 1e-2
        programs = int((mod.TIMER.view(-1, 6)[:, 0] != 0).sum())
        g = ba.graphed(fn)
        scratch = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        stats = []
        for _rep in range(5):
            scratch.zero_()  # the L2 flushed, as in a one-call timing
            torch.cuda.synchronize()
            g()
            torch.cuda.synchronize()
            stats.append(program_stats(mod.TIMER.view(-1, 6)[:programs].cpu().double()))
        key = f"{kind} {n}x{bsz}@{density} " + json.dumps(conf)
        rows = mod.TIMER.view(-1, 6)[:programs].cpu().tolist()
        out[key] = dict(stats=stats, sample=rows[:: max(1, programs // 64)])
        print(key, json.dumps(stats[-1]), "graph-call ms", ba.bench(g, rep_ms=50), flush=True)
    json.dump(out, open(os.environ.get("OUT", "/tmp") + "/timeline.json", "w"))


if __name__ == "__main__":
    main()

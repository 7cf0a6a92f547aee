"""Per-program timeline of the balanced decode kernel on the GPU (one L2-flushed call, 5 repeats).

    PYTHONPATH=. python benchmarks/decode_timeline.py      # writes $OUT/timeline.json

An instrumented copy of kernels/moa_decode_balanced.py (made by text substitution, loaded into the remote package)
stores per program: %globaltimer at its start, before its first segment (query, window edge and tile loop), after
its last segment's tile loop and at its end, its SM and its segment count. Printed per shape: the kernel span, the spread of start and end times, the
prologue and epilogue medians.
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


def timed_module():
    """The balanced kernel's module, instrumented (a copy in a temporary folder, in the remote package)."""
    remote_package()
    src = (Path(__file__).resolve().parents[1] / "kernels" / "moa_decode_balanced.py").read_text()
    now = "tl.inline_asm_elementwise('mov.u64 $0, %globaltimer;', '=l', [], dtype=tl.int64, is_pure=False, pack=1)"
    smid = "tl.inline_asm_elementwise('mov.u32 $0, %smid;', '=r', [], dtype=tl.int32, is_pure=False, pack=1)"
    stores = "".join(f"        tl.store(Timer + p * 6 + {i}, {x})\n" for i, x in enumerate(
        ("t_start", "t_first", "t_last", "t_end", "sm.to(tl.int64)", "nseg.to(tl.int64)")))  # fmt: skip
    edits = [  # (anchor, text put before it, text put after it): each anchor must be found once
        ("PartO, PartLse, Counter, Out,\n", "", ""),
        ("        p = tl.program_id(0).to(tl.int64)\n", "",
         "        t_start = _now()\n        t_first = t_start\n        t_last = t_start\n        nseg = 0\n"),
        ("                out, lse = _attend_segment(\n", "                t_first = tl.where(nseg == 0, _now(), t_first)\n",
         ""),
        ("                # the programs holding this (row, head)", "                t_last = _now()\n                nseg += 1\n",
         ""),
        ("            t = seg_end\n", "", f"        t_end = _now()\n        sm = {smid}\n" + stores),
        ("if HAS_TRITON:\n", "", f"\n    @triton.jit\n    def _now():\n        return {now}\n"),
        ("part_o, part_lse, counters, out,\n", "", ""),
    ]  # fmt: skip
    for anchor, before, after in edits:
        if src.count(anchor) != 1:
            raise SystemExit(f"decode_timeline: the kernel changed, {anchor!r} is not found once: update the edits")
        src = src.replace(anchor, before + anchor + after)
    src = src.replace("PartO, PartLse, Counter, Out,\n", "PartO, PartLse, Counter, Out, Timer,\n")
    src = src.replace("part_o, part_lse, counters, out,\n", "part_o, part_lse, counters, out, TIMER,\n")
    path = os.path.join(tempfile.mkdtemp(), "moa_decode_balanced_timed.py")
    open(path, "w").write(src.replace("def launch_balanced(query,", "TIMER = None\n\n\ndef launch_balanced(query,"))
    spec = importlib.util.spec_from_file_location("moa_hub_remote.moa_decode_balanced_timed", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    mod = timed_module()
    cfg = ba.BenchConfig()
    out = {}
    for n, bsz, density, conf in [  # (warps, stages, programs per SM, segment cost)
        (8192, 16, 0.25, (2, 2, 4, 0)),
        (8192, 16, 0.25, (2, 2, 4, 1)),
        (8192, 64, 0.25, (2, 2, 4, 0)),
        (8192, 64, 0.25, (2, 2, 4, 2)),
        (8192, 16, 0.5, (2, 2, 4, 1)),
    ]:
        alpha, beta = ba.make_plan(n, density, cfg.sink, cfg.min_span, cfg.hkv)
        cache = ba.decode_cache(bsz, n, alpha, beta, cfg.sink, cfg.min_span, cfg.head_dim)
        query = torch.randn(bsz, cfg.hq, 1, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        q_pos = torch.full((bsz,), n - 1, device="cuda", dtype=torch.int64)
        w, s, pp, sc = conf
        c = dict(balanced=True, BLOCK_N=64, num_warps=w, num_stages=s, programs_per_sm=pp, merge_splits=16,
                 segment_cost=sc)  # fmt: skip
        programs = mod.balanced_programs(bsz, cache[0].shape[1] - 1, 132, pp, 64)
        mod.TIMER = torch.zeros(programs * 6, dtype=torch.int64, device="cuda")
        a_d, b_d = alpha.cuda(), beta.cuda()

        def fn(query=query, cache=cache, q_pos=q_pos, a_d=a_d, b_d=b_d, c=c):
            return mod.launch_balanced(query, cache, q_pos, a_d, b_d, cfg.head_dim**-0.5, cfg.sink, cfg.min_span, c)

        ref = ba.decode.moa_decode_ref(
            query.double(), cache[0].double(), cache[1].double(), *cache[2:], q_pos, a_d, b_d, cfg.sink, cfg.min_span
        )
        assert ba.rel(fn(), ref) < 1e-2
        g = ba.graphed(fn)
        scratch = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        stats = []
        for _rep in range(5):
            scratch.zero_()
            torch.cuda.synchronize()
            g()
            torch.cuda.synchronize()
            t = mod.TIMER.view(programs, 6).cpu().double()
            t0 = t[:, 0].min()
            st, fi, la, en = (t[:, i] - t0 for i in range(4))
            dur = en - st
            r = dict(
                span_us=float(en.max()) / 1e3,
                start_last_us=float(st.max()) / 1e3,
                first_loop_med_us=float((fi - st).median()) / 1e3,
                epilogue_med_us=float((en - la).median()) / 1e3,
                epilogue_max_us=float((en - la).max()) / 1e3,
                dur_med_us=float(dur.median()) / 1e3,
                dur_min_us=float(dur.min()) / 1e3,
                dur_max_us=float(dur.max()) / 1e3,
                end_p10_us=float(en.quantile(0.1)) / 1e3,
                end_p90_us=float(en.quantile(0.9)) / 1e3,
                progs_per_sm_max=int(torch.bincount(t[:, 4].long()).max()),
                nseg_max=int(t[:, 5].max()),
                end_med_us_by_segments={int(k): float(en[t[:, 5] == k].median()) / 1e3 for k in t[:, 5].unique()},
                programs=programs,
            )
            stats.append(r)
        key = f"{n}x{bsz}@{density} w{w}s{s}p{pp}c{sc}"
        out[key] = dict(stats=stats, sample=mod.TIMER.view(programs, 6).cpu().tolist()[:: max(1, programs // 64)])
        print(key, json.dumps(stats[-1]), "graph-call ms", ba.bench(g, rep_ms=50), flush=True)
    json.dump(out, open(os.environ.get("OUT", "/tmp") + "/timeline.json", "w"))


if __name__ == "__main__":
    main()

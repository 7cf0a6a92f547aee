"""Data-parallel and device_map profiling against one GPU: same influence, time per item.

A Llama-3-8B-shaped model with random bf16 weights (each parameter drawn from its own seed, made from its
name, directly on the device it lives on: every stage builds the same model) profiles the same random
items (``importance="gradient"``) in these stages, each its own process:

  single      one process on cuda:0
  dp2         ``accelerate launch --multi_gpu --num_processes 2`` (one rank per GPU, cuda:LOCAL_RANK, NCCL);
              the ranks check that their weights are identical (checksums all-gathered)
  cli_dp2     the real command end to end: the model saved with ``save_pretrained`` (then reloaded once with
              ``from_pretrained`` for its checksums) and the items written as JSONL, then ``python -m moa_hub.cli
              profile <folder> --importance gradient --num-gpus 2`` (it re-executes itself under ``accelerate launch``;
              each rank loads the folder with ``load_model_for_profiling``). Its times are the per-length lines the
              library logs (``profile length N: K items in S s``; rank 0, CUDA-synchronised); the command profiles the
              warm-up length first, so no timed length pays for compilation; process start and loading are recorded
              apart (``cli_wall_s``, ``cli_load_s``). Code: ``profile_multi_cli.py``
  device_map  one process, the model sharded over both GPUs by transformers' own device_map="auto"
              computation and dispatched with accelerate hooks (as ``from_pretrained(device_map="auto")`` does)
  repeat      the single stage again: how far two runs of the same profile are from each other (0: the profile's
              attention backward is deterministic)

Each stage warms up (a short item: Triton compile), then times ``profile_model`` per length (CUDA-synchronised
wall time of the whole call; per item = wall / items). The driver then compares each stage's
``influence`` with the single run's (relative Frobenius error) and the time per item (e.g. dp2 / single), prints
a table and writes ``<out>/profile_multi.json``. Every stage writes ``<out>/<stage>.json`` after each length
and logs to ``<out>/<stage>.log``, so a time-out keeps what was measured; ``--deadline-s`` skips what would
not finish in time (and records it as skipped).

    PYTHONPATH=. python benchmarks/bench_profile_multi.py --out $OUT            # 2 GPUs: 8k and 32k, 4 items each
    PYTHONPATH=. python benchmarks/bench_profile_multi.py --tiny --out /tmp/pm  # CPU (gloo): tiny model, smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()  # the deadline counts from here (before the slow imports of torch and transformers)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


# The code, one concern per file, imports flowing this way (the worker processes run this script too, so the
# sys.path above holds there as well):
#   profile_multi_model.py   the deterministic random model, its checksums, the items
#   profile_multi_stage.py   one stage process: its record (StageRun), start, environment, end
#   profile_multi_cli.py     the cli_dp2 stage: `moa-hub profile --num-gpus N` end to end
#   profile_multi_worker.py  the worker (--worker <stage>): the in-process stages, and the dispatch to cli_dp2
#   bench_profile_multi.py   (this file) arguments, the driver: one process per stage, comparison, table

import torch  # noqa: E402
from profile_multi_stage import stage_env, write_json  # noqa: E402
from profile_multi_worker import worker  # noqa: E402

from moa_hub.profile import load_profile  # noqa: E402

STAGES = ("single", "dp2", "cli_dp2", "device_map", "repeat")
DP_STAGES = ("dp2", "cli_dp2")  # data parallel over --nproc GPUs: the time target applies
REL_ERR_MAX = 1e-3  # the issue: influence equal to the single-GPU run's
DP_RATIO_MAX = 0.6  # the issue: time per item on 2 GPUs (dp2, cli_dp2) <= 0.6 x single


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_command(stage: str, args, stage_lengths: list[int], estimates: dict[int, float], stop_at: float):
    script = str(Path(__file__).resolve())
    flags = ["--worker", stage, "--work", str(args.work / stage), "--json", str(args.out / f"{stage}.json")]
    flags += ["--lengths", *map(str, stage_lengths), "--items", str(args.items), "--answer", str(args.answer)]
    flags += ["--warmup-len", str(args.warmup_len), "--block-size", str(args.block_size), "--seed", str(args.seed)]
    flags += ["--stop-at", f"{stop_at:.3f}", "--dtype", args.dtype, "--nproc", str(args.nproc)]
    if estimates:
        flags += ["--estimates", ",".join(f"{n}:{s:.1f}" for n, s in estimates.items())]
    if args.tiny:
        flags.append("--tiny")
    if args.cpu:
        flags.append("--cpu")
    if stage != "dp2":  # cli_dp2 too: its command launches its own ranks
        return [sys.executable, script, *flags]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.nproc)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    return [*launch, script, *flags]


_CHILD: list[subprocess.Popen] = []


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # its own process group (same session): a time-out ends the launcher and all its ranks
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=os.setpgrp)
        _CHILD.append(proc)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        finally:
            _CHILD.remove(proc)
            _kill_group(proc)  # stray ranks of a launcher that already returned
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.perf_counter() - start, "timeout_s": timeout}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def _checksum_diff(a: dict, b: dict) -> dict:
    if not a or not b:
        return {"compared": False}
    if sorted(a) != sorted(b):
        return {"compared": True, "equal": False, "reason": "different parameter names"}
    worst = 0.0
    exact = True
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            exact &= x == y
            worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
    return {"compared": True, "exact": exact, "max_rel_diff": worst, "equal": worst < 1e-9}


def compare(report: dict, args) -> dict:
    """Influence of each stage vs single (rel Frobenius error), time per item vs single, weights vs single."""
    single = report["stages"].get("single", {}).get("result") or {}
    out: dict = {}
    for stage in STAGES[1:]:
        result = report["stages"].get(stage, {}).get("result") or {}
        entry: dict = {"weights_vs_single": _checksum_diff(result.get("checksums"), single.get("checksums"))}
        for length in args.lengths:
            key = str(length)
            mine, ref = result.get("lengths", {}).get(key, {}), single.get("lengths", {}).get(key, {})
            row: dict = {}
            if mine.get("status") == "done" and ref.get("status") == "done":
                got, got_meta = load_profile(Path(mine["profile"]))
                want, want_meta = load_profile(Path(ref["profile"]))
                if got.shape != want.shape:
                    row["error"] = f"shape {list(got.shape)} vs {list(want.shape)}"
                else:
                    row["rel_err"] = _rel_err(got, want)
                    row["max_abs_diff"] = float((got.double() - want.double()).abs().max())
                    row["single_norm"] = float(want.double().norm())
                    row["same_num_items"] = got_meta.get("num_items") == want_meta.get("num_items")
                row["time_ratio"] = mine["seconds_per_item"] / ref["seconds_per_item"]
                ok = row.get("rel_err", math.inf) < REL_ERR_MAX and entry["weights_vs_single"].get("equal", False)
                if stage in DP_STAGES:
                    ok = ok and row["time_ratio"] <= DP_RATIO_MAX
                row["meets_issue"] = bool(ok)
            row["status"] = f"{stage}: {mine.get('status', 'missing')}, single: {ref.get('status', 'missing')}"
            entry[key] = row
        out[stage] = entry
    return out


def summary_table(report: dict, args) -> str:
    lines = [
        "| stage | length | items | s / item | x single | influence rel err vs single | weights == single | peak GiB "
        "| meets issue | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in STAGES:
        info = report["stages"].get(stage)
        if info is None:
            continue
        result = info.get("result") or {}
        comp = report.get("compare", {}).get(stage, {})
        weights = comp.get("weights_vs_single", {})
        same = "-" if stage == "single" else (str(weights.get("equal")) if weights.get("compared") else "?")
        if stage == "dp2" and "weights_identical_across_ranks" in result:
            same += f" (ranks equal: {result['weights_identical_across_ranks']})"
        if stage == "cli_dp2" and "weights_reloaded_equal_built" in result:
            same += f" (as reloaded; built: {result['weights_reloaded_equal_built']})"
        lengths = result.get("lengths") or {}
        if not lengths:
            why = info.get("status", "?")
            if result.get("error"):
                why += ": " + result["error"][:80]
            lines.append(f"| {stage} | - | - | - | - | - | {same} | - | - | {why} |")
            continue
        for length in args.lengths:
            row = lengths.get(str(length))
            if row is None:
                continue
            c = comp.get(str(length), {})
            per = f"{row['seconds_per_item']:.3f}" if "seconds_per_item" in row else "-"
            ratio = f"{c['time_ratio']:.3f}" if "time_ratio" in c else "-"
            err = f"{c['rel_err']:.2e}" if "rel_err" in c else "-"
            peak = ", ".join(f"{v:.1f}" for v in row.get("peak_gib", {}).values()) or "-"
            status = row.get("status", "?") + (": " + row["error"][:60] if row.get("error") else "")
            if row.get("status") == "running":
                status = f"cut off ({info.get('status')})"
            verdict = {True: "yes", False: "NO"}.get(c.get("meets_issue"), "-")
            lines.append(
                f"| {stage} | {length} | {row.get('items')} | {per} | {ratio} | {err} | {same} | {peak} "
                f"| {verdict} | {status} |"
            )
    return "\n".join(lines)


def driver(args) -> None:
    t0 = T_START
    stop_at = t0 + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="moa_profile_multi_"))
    args.work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    report: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "issue_targets": {
            "rel_err_max": REL_ERR_MAX,
            "dp2_time_ratio_max": DP_RATIO_MAX,
            "time_ratio_stages": list(DP_STAGES),
            "weights": "equal to single",
        },
        "stages": {},
        "compare": {},
    }
    json_path = args.out / "profile_multi.json"
    env = stage_env(args)

    def finish() -> None:
        try:
            report["compare"] = compare(report, args)
        except Exception as err:  # noqa: BLE001 - keep the stage results
            report["compare_error"] = repr(err)
        report["total_s"] = time.time() - t0
        write_json(json_path, report)

    def on_term(signum, frame):  # the outer time limit: keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    print(f"work dir {args.work}; deadline {args.deadline_s:.0f} s; stages {stages}", flush=True)
    current = None
    try:
        for stage in stages:
            current = stage
            left = stop_at - time.time() - args.reserve_s
            if left < args.min_stage_s:
                report["stages"][stage] = {"status": "skipped", "reason": f"deadline: {left:.0f} s left"}
                print(f"== {stage}: skipped ({left:.0f} s left)", flush=True)
                finish()
                continue
            stage_lengths = args.dm_lengths if stage == "device_map" and args.dm_lengths else args.lengths
            estimates = {}
            single = report["stages"].get("single", {}).get("result") or {}
            for n in stage_lengths:
                row = single.get("lengths", {}).get(str(n), {})
                if "seconds_per_item" in row:
                    share = 1.0 / args.nproc if stage in DP_STAGES else 1.0
                    estimates[n] = row["seconds_per_item"] * args.items * share * 1.3 + 3.0
            shutil.rmtree(args.work / stage, ignore_errors=True)
            (args.work / stage).mkdir(parents=True)
            (args.out / f"{stage}.json").unlink(missing_ok=True)
            cmd = stage_command(stage, args, stage_lengths, estimates, stop_at - args.reserve_s)
            print(f"== {stage}: up to {left:.0f} s (log {args.out / (stage + '.log')})", flush=True)
            info = run_stage(cmd, env, args.out / f"{stage}.log", left)
            stage_json = args.out / f"{stage}.json"
            info["result"] = _read_json(stage_json)
            info["status"] = "timed out" if info["timed_out"] else ("done" if info["rc"] == 0 else f"rc {info['rc']}")
            report["stages"][stage] = info
            print(f"== {stage}: {info['status']} in {info['wall_s']:.1f} s", flush=True)
            if info["rc"] != 0 or info["timed_out"]:
                tail = (args.out / f"{stage}.log").read_text(errors="replace").splitlines()[-25:]
                print("\n".join("   " + line[:300] for line in tail), flush=True)
            finish()
    except KeyboardInterrupt as err:
        for proc in list(_CHILD):
            _kill_group(proc)
        report["interrupted"] = repr(err)
        stage_json = args.out / f"{current}.json"
        if current is not None and current not in report["stages"]:
            report["stages"][current] = {"status": "interrupted", "result": _read_json(stage_json)}
        print(f"interrupted: {err!r}", flush=True)
    finally:
        finish()
        print(f"\nwrote {json_path} ({report['total_s']:.0f} s in all)")
        for stage in STAGES[1:]:
            result = (report["stages"].get(stage) or {}).get("result") or {}
            if stage == "device_map" and result.get("modules_per_device"):
                print(
                    f"device_map: {result.get('device_map_source')}; modules per device {result['modules_per_device']}"
                )
            if stage == "dp2" and result:
                print(
                    f"dp2: world {result.get('world')}, backend {result.get('backend')}, reduce device of rank 0 "
                    f"{result.get('reduce_device')}, ranks' weights identical: {result.get('weights_identical_across_ranks')}"
                )
            if stage == "cli_dp2" and result.get("cli_wall_s") is not None:
                print(
                    f"cli_dp2: `moa-hub profile --num-gpus {result.get('cli_num_gpus')}` ran {result['cli_wall_s']:.1f} s "
                    f"in all (model load per rank {result.get('cli_load_s')} s, warm-up length {result.get('warmup_s')} s); "
                    f"saved in {result.get('save_s', 0):.1f} s. {result.get('time_note')}"
                )
        print(summary_table(report, args), flush=True)
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_profile_multi"), help="folder for the JSON and logs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the profile files (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the profile files")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 8192 32768 (--tiny: 256 512)")
    parser.add_argument("--dm-lengths", type=int, nargs="+", default=None, help="device_map stage (default: --lengths)")
    parser.add_argument("--items", type=int, default=None, help="items per length, every stage (default 4; --tiny 2)")
    parser.add_argument("--answer", type=int, default=None, help="answer tokens per item (default 256; --tiny 32)")
    parser.add_argument("--warmup-len", type=int, default=None, help="warm-up item length (default 256; --tiny 64)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16",
        help="weights and activations on the GPU (float32: the run-to-run noise of the bf16 backward drops out)",
    )  # fmt: skip
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel ranks of the dp2 stage")
    parser.add_argument("--deadline-s", type=float, default=250.0, help="the whole run ends within this (seconds)")
    parser.add_argument("--reserve-s", type=float, default=12.0, help="kept back for the comparison at the end")
    parser.add_argument("--min-stage-s", type=float, default=None, help="a stage with less time left is skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny model, every stage on the CPU (gloo)")
    parser.add_argument("--cpu", action="store_true", help="every stage on the CPU (gloo)")
    parser.add_argument("--worker", choices=STAGES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--estimates", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "lengths": [256, 512] if tiny else [8192, 32768],
        "items": 2 if tiny else 4,
        "answer": 32 if tiny else 256,
        "warmup_len": 64 if tiny else 256,
        "min_stage_s": 5.0 if tiny else 30.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker is None:
        args.out = args.out.resolve()
        if args.work is not None:
            args.work = args.work.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()

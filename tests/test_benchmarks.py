"""The GPU benchmark scripts run end to end on a tiny model on the CPU (their --smoke modes), so a change to the
library cannot break them unnoticed between GPU sessions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def run_script(args: list[str], tmp_path: Path, backend: str = "auto", interpret: bool = True) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1" if interpret else "0", "MOA_BACKEND": backend,
           "OUT": str(tmp_path)}  # fmt: skip
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_bench_e2e_smoke_loads_a_converted_folder(tmp_path):
    """--from-folder: save, convert with the exporter, from_pretrained(trust_remote_code=True), decode through it."""
    out = tmp_path / "out"
    run_script(["benchmarks/bench_e2e.py", "--smoke", "--from-folder", str(tmp_path / "work"),
                "--methods", "hf-dynamic,moa-50", "--prefill-kernels", "--out", str(out)],
               tmp_path)  # fmt: skip
    result = json.loads((out / "e2e.json").read_text())
    assert result["meta"]["loaded"]["moa_class"].startswith("transformers_modules.")  # the folder's own code ran
    rows = result["decode"]
    assert {r["method"] for r in rows} == {"hf-dynamic", "moa-50"}
    assert all("error" not in r and r["tok_s"] > 0 for r in rows), rows
    prefill = result["prefill"]  # --smoke: one length, each method timed 3 times and profiled once more
    assert {r["method"] for r in prefill} == {"hf-dynamic", "moa-50", "moa-25"}
    assert all(len(r["all_s"]) == 3 and r["kernels_ms"] > 0 and r["top"] for r in prefill), prefill


def test_profile_step_smoke(tmp_path):
    run_script(["benchmarks/profile_step.py", "--cases", "96+32:2", "--steps", "2", "--fused", "1,0",
                "--out", str(tmp_path)], tmp_path)  # fmt: skip
    result = json.loads((tmp_path / "profile_step.json").read_text())
    assert [r["fused"] for r in result] == ["1", "0"] and all(r["step_ms_graph"] > 0 for r in result)


def test_bench_profile_multi_tiny_stages_agree(tmp_path):
    """The stages (one process, 2 gloo ranks through accelerate launch, `moa-hub profile --num-gpus 2` on the saved
    model and JSONL items, accelerate-dispatched device_map, the single run again) build the same weights and reach
    the same influence; every stage's JSON and the summary are written."""
    out = tmp_path / "out"
    run_script(["benchmarks/bench_profile_multi.py", "--tiny", "--lengths", "128", "192", "--out", str(out)], tmp_path)
    result = json.loads((out / "profile_multi.json").read_text())
    stages = ("single", "dp2", "cli_dp2", "device_map", "repeat")
    assert {s: result["stages"][s]["status"] for s in stages} == dict.fromkeys(stages, "done")
    dp2, sharded = result["stages"]["dp2"]["result"], result["stages"]["device_map"]["result"]
    assert dp2["world"] == 2 and dp2["weights_identical_across_ranks"] is True
    assert sharded["modules_with_accelerate_hooks"] > 0 and "model.layers.0" in sharded["hf_device_map"]
    cli = result["stages"]["cli_dp2"]["result"]
    assert cli["cli_rc"] == 0 and cli["weights_reloaded_equal_built"] is True and cli["warmup_s"] >= 0
    assert "--num-gpus" in cli["cli_command"] and set(cli["cli_load_s"]) == {"0", "1"}  # both ranks loaded the folder
    assert all(cli["lengths"][n]["items_per_rank"] == [1, 1] for n in ("128", "192"))
    for stage in stages[1:]:
        comp = result["compare"][stage]
        assert comp["weights_vs_single"]["equal"] is True
        for length in ("128", "192"):
            assert comp[length]["rel_err"] < 1e-5 and comp[length]["same_num_items"], comp
            assert comp[length]["time_ratio"] > 0
    assert all(result["compare"]["repeat"][n]["rel_err"] == 0.0 for n in ("128", "192"))  # the same run, again
    assert {p.name for p in out.iterdir()} == {
        "profile_multi.json",
        *(f"{s}.{ext}" for s in stages for ext in ("json", "log")),
    }


def test_attn_in_model_and_attn_power_smoke(tmp_path):
    """The two scripts that compare a step's attention calls alone, next to GEMMs and against a plain read (on the
    torch path here: the interpreted kernels would take minutes through a whole model)."""
    args = ["benchmarks/attn_in_model.py", "--case", "512+128:2", "--steps", "1", "--out", str(tmp_path)]
    run_script(args, tmp_path, backend="torch")
    result = json.loads((tmp_path / "attn_in_model.json").read_text())
    assert result["layers"] == 2 and result["variants"]["layers"]["ms_per_layer"] > 0
    run_script(["benchmarks/attn_power.py", "--rows", "2", "--n", "96", "--seconds", "0.01", "--rounds", "1",
                "--configs", '[{"swap_ab": true}]', "--out", str(tmp_path)], tmp_path, backend="torch")  # fmt: skip
    summary = json.loads((tmp_path / "attn_power.json").read_text())["summary_ms_per_layer"]
    assert summary['attention {"swap_ab": true} + GEMMs'] > 0 and summary["read in company"] is not None


def test_kernel_ptx_compiles_the_decode_kernels_for_hopper(tmp_path):
    """kernel_ptx.py compiles (no GPU needed) the d=128 decode entries for sm_90: the swapped 4-warp entry's dots are
    Hopper's wgmma and the others' are mma.sync, as docs/internals.md says."""
    run_script(["benchmarks/kernel_ptx.py", str(tmp_path)], tmp_path, interpret=False)
    ptx = {p.name: p.read_text() for p in tmp_path.glob("*.ptx")}
    assert len(ptx) == 5 and sum("SWAP_AB=True" in name for name in ptx) == 1, sorted(ptx)  # 4 entries + 1 unswapped
    for name, text in ptx.items():
        swapped = "SWAP_AB=True" in name
        assert ("wgmma.mma_async" in text) == swapped, name
        assert ("mma.sync" in text) != swapped, name


def test_decode_table_configs_fit_hopper_shared_memory(tmp_path):
    """Every decode table config at d=64, 128 and 256, compiled for sm_90 as a launch specialises it, fits in the 227 KB
    of shared memory an H100 / H200 program may use (a config over it would launch smaller than the table says)."""
    run_script(["benchmarks/kernel_ptx.py", "--shared-memory"], tmp_path, interpret=False)


def test_bench_generate_smoke(tmp_path):
    run_script(["benchmarks/bench_generate.py", "--smoke", "--out", str(tmp_path)], tmp_path, interpret=False)
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    methods = ["hf-dynamic", "moa-eager", "moa-graph", "moa-graph-reuse", "moa_generate"]
    assert [r["method"] for r in rows[:5]] == methods
    # a tiny model's per-token time is a difference of two ~equal call times: on a loaded CPU it rounds to 0 or below
    assert all("error" not in r and math.isfinite(r["ms_per_token"]) for r in rows), rows


def test_cache_write_smoke(tmp_path):
    """The script checks write_chunk against the torch scatter slot for slot before it times them."""
    run_script(["benchmarks/cache_write.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "cache_write.json").read_text())["rows"]
    assert [(r["rows"], r["density"]) for r in rows] == [(1, 0.5), (1, 0.25), (2, 0.5), (2, 0.25)]
    assert all(r["torch_ms"] > 0 and r["fused_ms"] > 0 for r in rows), rows


def test_prefill_write_ab_smoke(tmp_path):
    run_script(["benchmarks/prefill_write_ab.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "prefill_write_ab.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["moa-50", "moa-25"]
    assert all(len(r["all_s"]["scatter"]) == len(r["all_s"]["write_chunk"]) == 2 for r in rows), rows


def test_chunked_prefill_smoke(tmp_path):
    """The chunks' outputs over the cache equal one call's, for the kernel and for a --before arm (here the same file)."""
    run_script(["benchmarks/chunked_prefill.py", "--smoke", "--before", "kernels/moa_prefill.py", "--out", str(tmp_path)],
               tmp_path)  # fmt: skip
    rows = json.loads((tmp_path / "chunked_prefill.json").read_text())["rows"]
    assert [r["density"] for r in rows] == [0.5, 0.25]
    assert all(r["max_diff_now"] < 1e-4 and r["max_diff_before"] < 1e-4 for r in rows), rows


def test_chunked_prefill_model_smoke(tmp_path):
    run_script(["benchmarks/chunked_prefill_model.py", "--smoke", "--before", "kernels/moa_prefill.py", "--out",
                str(tmp_path)], tmp_path)  # fmt: skip
    rows = json.loads((tmp_path / "chunked_prefill_model.json").read_text())["rows"]
    assert len(rows) == 1 and {"one call", "chunked", "chunked, before"} == set(rows[0]["all_s"]), rows


def test_host_cost_smoke(tmp_path):
    run_script(["benchmarks/host_cost.py", "--smoke", "--out", str(tmp_path)], tmp_path, interpret=False)
    result = json.loads((tmp_path / "host_cost.json").read_text())
    assert [r["method"] for r in result["eager_steps"]] == ["hf-dense-dynamic", "moa-static"]
    assert len(result["graphed_phases_ms"]) == 6 and len(result["generate_calls_ms"]) == 6


def test_compile_variants_and_specialize_ab_smoke(tmp_path):
    run_script(["benchmarks/compile_variants.py", "--smoke", "--out", str(tmp_path)], tmp_path, interpret=False)
    calls = json.loads((tmp_path / "compile_variants.json").read_text())["calls"]
    assert [(c["prompt"], c["rows"]) for c in calls] == [(200, 1), (201, 1), (207, 2)]
    run_script(["benchmarks/specialize_ab.py", "--smoke", "--out", str(tmp_path)], tmp_path, backend="triton")
    rows = json.loads((tmp_path / "specialize_ab.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["equal_outputs"] for r in rows), rows
    # other prefill files as arms (here the shipped one twice: equal outputs), prefill cases only, chosen lengths
    kernel = "kernels/moa_prefill.py"
    args = ["--before", kernel, "--variant", f"copy={kernel}", "--prefill-only", "--lengths", "64"]
    run_script(["benchmarks/specialize_ab.py", "--smoke", *args, "--out", str(tmp_path)], tmp_path, backend="triton")
    rows = json.loads((tmp_path / "specialize_ab.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["prefill 64 @ 50%", "prefill 64 @ 25%", "prefill 70 x 2 @ 50%"], rows
    assert all({"before", "copy"} <= set(r["ms"]) and r["equal_outputs"] for r in rows), rows


def test_padding_cost_smoke(tmp_path):
    """Right-padded rows, reordered, give the left-padded rows' hidden states (the same tokens and positions)."""
    run_script(["benchmarks/padding_cost.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "padding_cost.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 3] and rows[1]["pad"] > 0
    assert rows[1]["right_vs_left_max_abs"] == 0.0
    assert all(r[f"{way} ms"] > 0 for r in rows for way in ("no mask", "mask of ones", "left padded", "right padded"))

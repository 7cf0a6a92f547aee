"""The GPU benchmark scripts run end to end on a tiny model on the CPU (their --smoke modes), so a change to the
library cannot break them unnoticed between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def run_script(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "MOA_BACKEND": "auto", "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_bench_e2e_smoke_loads_a_converted_folder(tmp_path):
    """--from-folder: save, convert with the exporter, from_pretrained(trust_remote_code=True), decode through it."""
    out = tmp_path / "out"
    run_script(["benchmarks/bench_e2e.py", "--smoke", "--from-folder", str(tmp_path / "work"),
                "--methods", "hf-dynamic,moa-50", "--memory", "", "--prefill-lengths", "", "--out", str(out)],
               tmp_path)  # fmt: skip
    result = json.loads((out / "e2e.json").read_text())
    assert result["meta"]["loaded"]["moa_class"].startswith("transformers_modules.")  # the folder's own code ran
    rows = result["decode"]
    assert {r["method"] for r in rows} == {"hf-dynamic", "moa-50"}
    assert all("error" not in r and r["tok_s"] > 0 for r in rows), rows


def test_profile_step_smoke(tmp_path):
    run_script(["benchmarks/profile_step.py", "--cases", "96+32:2", "--steps", "2", "--fused", "1,0",
                "--out", str(tmp_path)], tmp_path)  # fmt: skip
    result = json.loads((tmp_path / "profile_step.json").read_text())
    assert [r["fused"] for r in result] == ["1", "0"] and all(r["step_ms_graph"] > 0 for r in result)

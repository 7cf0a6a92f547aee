"""How the MoA decode step time depends on how long the GPU has run (power limit): runs of 4, 24, 96, 4, 24
steps back to back at 4k+1k x 372 rows (Llama-3-8B shape, MoA 50%, the twin), with nvidia-smi's clocks and power
sampled every 100 ms.

    PYTHONPATH=. python benchmarks/step_power.py            # writes $OUT/run_length.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_e2e as e2e  # noqa: E402
from benchmarks import profile_step as ps  # noqa: E402
from moa_hub.apply import moa_twin  # noqa: E402


def main() -> None:
    dense = e2e.build("llama-3-8b")
    moa = moa_twin(dense, e2e.plans(dense, 4096)["moa-50"])
    loop = ps.midpoint_loop(dense, moa, 4096, 1024, 372, 3 * (4 + 24 + 96 + 4 + 24))
    smi = subprocess.Popen(
        [
            "nvidia-smi",
            "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
            "--format=csv,noheader",
            "-lms",
            "100",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    res = {}
    for steps in (4, 24, 96, 4, 24):
        times = [t * 1e3 for t in e2e.time_steps(lambda: None, loop.run, steps, 3)[0]]
        res.setdefault(str(steps), []).append(times)
        print("steps", steps, [round(t, 2) for t in times], flush=True)
    smi.terminate()
    lines = smi.stdout.read().strip().splitlines()
    print("clocks during the runs (sm MHz, mem MHz, W, C):", lines[:: max(1, len(lines) // 12)])
    json.dump(dict(times=res, smi=lines), open(os.environ.get("OUT", "/tmp") + "/run_length.json", "w"))


if __name__ == "__main__":
    main()

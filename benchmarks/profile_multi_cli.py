"""The ``cli_dp2`` stage's side of ``bench_profile_multi.py``: the real ``moa-hub profile`` command, end to end.

The stage saves its model as a folder (``save_pretrained``) and its items as the JSONL that ``read_items_jsonl``
reads, runs ``python -m moa_hub.cli profile ... --num-gpus N`` (which re-executes itself under ``accelerate
launch``), streams the command's output into the stage's log and reads the times back from the lines the library
logs: ``profile length N: K items in S s (P s / item)`` (rank 0, per length) and ``loaded ... in S s (rank r of w)``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

LENGTH_LINE = re.compile(r"profile length (\d+): (\d+) items in (\d+(?:\.\d+)?) s")
LOAD_LINE = re.compile(r"loaded .* in (\d+(?:\.\d+)?) s \(rank (\d+) of (\d+)\)")


def write_items_jsonl(path: Path, items_by_length: dict[int, list]) -> int:
    """One ``{"length": N, "input_ids": [...], "answer_start": k}`` per line; returns the number of lines."""
    lines = [
        json.dumps({"length": length, "input_ids": item.input_ids, "answer_start": item.answer_start})
        for length, items in items_by_length.items()
        for item in items
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def cli_command(
    model_dir: Path, calibration: Path, work_dir: Path, lengths: Iterable[int], block_size: int, num_gpus: int
) -> list[str]:
    """``moa-hub profile`` as a module call (the console script need not be on PATH), gradient importance."""
    return [
        sys.executable, "-m", "moa_hub.cli", "profile", str(model_dir),
        "--calibration", str(calibration), "--work-dir", str(work_dir),
        "--profile-lengths", ",".join(str(n) for n in lengths), "--block-size", str(block_size),
        "--importance", "gradient", "--num-gpus", str(num_gpus),
    ]  # fmt: skip


@dataclass
class CliTimes:
    """What the command's log says: per length (items, wall seconds) and per rank the model load seconds."""

    lengths: dict[int, tuple[int, float]] = field(default_factory=dict)
    load_s: dict[int, float] = field(default_factory=dict)

    def read(self, line: str) -> int | None:
        """Take one log line; returns the length whose time it reports, if it is such a line."""
        if found := LENGTH_LINE.search(line):
            length = int(found.group(1))
            self.lengths[length] = (int(found.group(2)), float(found.group(3)))
            return length
        if found := LOAD_LINE.search(line):
            self.load_s[int(found.group(2))] = float(found.group(1))
        return None


def run_streaming(cmd: list[str], env: dict, prefix: str, on_line: Callable[[str], None]) -> int:
    """Run ``cmd`` (same process group: a driver's time-out ends it too), echo each output line with ``prefix``
    and hand it to ``on_line``; returns the exit code. An exception here (e.g. SIGTERM) ends the command."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            print(f"{prefix}{line}", end="", flush=True)
            on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

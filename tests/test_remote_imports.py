"""Remote code (modeling/, kernels/) is copied flat into converted repos: it may import only torch,
transformers, triton (inside ``try:``), the standard library and its siblings (relative imports)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from moa_hub.remote import remote_dirs

ALLOWED_PACKAGES = {"torch", "transformers", "__future__"}
GUARDED_PACKAGES = {"triton"}  # optional: only inside the body of a try block
REMOTE_FILES = sorted(p for d in remote_dirs() for p in d.glob("*.py"))
SIBLINGS = {p.stem for p in REMOTE_FILES}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _inside_try_body(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            return True
        child, parent = parent, parents.get(parent)
    return False


def _imported(node: ast.Import | ast.ImportFrom) -> list[tuple[int, str]]:
    """(relative level, module path) of every module an import statement names."""
    if isinstance(node, ast.Import):
        return [(0, alias.name) for alias in node.names]
    if node.module is not None:
        return [(node.level, node.module)]
    return [(node.level, alias.name) for alias in node.names]  # from . import sibling


def import_violations(source: str, siblings: set[str]) -> list[str]:
    """Every import in ``source`` that remote code may not make, as readable strings."""
    tree = ast.parse(source)
    parents = _parents(tree)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for level, module in _imported(node):
            top = module.split(".")[0]
            where = f"line {node.lineno}: {'.' * level}{module}"
            if level > 1 or (level == 1 and top not in siblings):
                problems.append(f"{where} (relative imports must name a sibling file)")
            elif level == 1:
                continue
            elif top in GUARDED_PACKAGES:
                if not _inside_try_body(node, parents):
                    problems.append(f"{where} (triton must be imported inside a try block)")
            elif top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
                problems.append(f"{where} (only torch, transformers, guarded triton, stdlib and siblings)")
    return problems


def test_remote_files_exist():
    names = {p.name for p in REMOTE_FILES}
    assert {"moa_spans.py", "moa_reference.py"} <= names


@pytest.mark.parametrize("path", REMOTE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_remote_file_imports(path: Path):
    assert import_violations(path.read_text(encoding="utf-8"), SIBLINGS) == []


def test_checker_flags_bad_imports():
    bad = """
import numpy as np
import triton
from moa_hub.plan import MoaPlan
from ..other import thing
from .not_a_sibling import x
import moa_hub
try:
    pass
except ImportError:
    import triton.language as tl
"""
    problems = import_violations(bad, {"moa_spans"})
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 11)]


def test_checker_accepts_good_imports():
    good = """
from __future__ import annotations
import math, os, typing, dataclasses, functools, warnings, logging
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from .moa_spans import span_at
from . import moa_spans
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
"""
    assert import_violations(good, {"moa_spans"}) == []


WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed here")
        return None

sys.meta_path.insert(0, NoTriton())
import torch
from moa_hub.remote import remote_files, remote_module

for path in remote_files():
    remote_module(path.stem)
decode = remote_module("moa_decode")
assert not decode.HAS_TRITON and not remote_module("moa_prefill").HAS_TRITON
keys = torch.randn(1, 2 * 20 + 1, 8)
slot_pos = torch.cat([torch.arange(20), torch.arange(20), torch.tensor([-1])]).to(torch.int32)[None]
out = decode.moa_decode(torch.randn(1, 4, 1, 8), keys, torch.randn_like(keys), slot_pos, torch.tensor([0, 20]),
                        torch.tensor([20, 20]), torch.tensor([19]), torch.tensor([8.0, 0.0]), torch.tensor([0.0, 1.0]),
                        2, 4)
assert out.shape == (1, 4, 1, 8) and torch.isfinite(out).all()
print("ok")
"""


def test_remote_code_imports_and_decodes_without_triton():
    """Installs without triton (CPU, macOS) import every remote module and run the torch path."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

"""Load the remote code (``modeling/`` + ``kernels/``) by path, as one flat package.

The remote-code files import their siblings relatively (``from .moa_cache import ...``).
In a converted repo they sit flat in one folder; here they live in two source folders.
A package whose ``__path__`` lists both folders resolves those relative imports the same way,
so the converter runs exactly the code users run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "moa_hub_remote"
_HERE = Path(__file__).resolve().parent


def remote_dirs() -> list[Path]:
    """The folders holding the remote code: installed package data, else the source tree."""
    for root in (_HERE / "_remote", _HERE.parent):
        dirs = [root / "modeling", root / "kernels"]
        if all(d.is_dir() for d in dirs):
            return dirs
    raise FileNotFoundError(f"moa-hub remote code not found next to {_HERE}: reinstall moa-hub")


def remote_files() -> list[Path]:
    """Every file that is copied flat into a converted repo."""
    return sorted(p for d in remote_dirs() for p in d.glob("*.py") if p.name != "__init__.py")


@cache
def remote_package() -> ModuleType:
    """The remote code as an importable package (created once per process)."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_loader(PACKAGE_NAME, loader=None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(d) for d in remote_dirs()]
    sys.modules[PACKAGE_NAME] = package
    return package


def remote_module(name: str) -> ModuleType:
    """Import one remote-code module by its bare name, e.g. ``remote_module("moa_spans")``."""
    remote_package()
    return importlib.import_module(f"{PACKAGE_NAME}.{name}")

"""Files shipped with moa-hub that are not Python modules (templates)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def templates_dir() -> Path:
    """``templates/``: installed package data, else the source tree."""
    for candidate in (_HERE / "_remote" / "templates", _HERE.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"moa-hub templates not found next to {_HERE}: reinstall moa-hub")


def template_path(name: str) -> Path:
    path = templates_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"template {name} missing from {path.parent}: reinstall moa-hub")
    return path

"""Option parsing shared by the commands."""

from __future__ import annotations

import typer


def parse_lengths(text: str, option: str) -> tuple[int, ...]:
    """'2k,4k,8192' or '2048 4096' -> (2048, 4096, 8192); a clear error names the bad item."""
    lengths = []
    for item in text.replace(",", " ").split():
        scale = 1024 if item.lower().endswith("k") else 1
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            message = f"{item!r} is not a length: use e.g. 2k,4k,8k or 2048,4096"
            raise typer.BadParameter(message, param_hint=option) from None
        if value <= 0:
            raise typer.BadParameter(f"{item!r} must be positive", param_hint=option)
        lengths.append(value)
    if not lengths:
        raise typer.BadParameter("give at least one length, e.g. 2k,4k,8k", param_hint=option)
    return tuple(lengths)

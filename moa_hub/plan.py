"""The MoA plan: one elastic span rule (alpha, beta) per (layer, kv head), plus sink and min_span.

The plan is the ``moa`` block of a converted repo's config.json (and its ``moa_plan.json``).
Spans and densities come from the contract functions in ``modeling/moa_spans.py``; nothing here
re-derives the formula.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PlanError
from .remote import remote_module

FORMAT_VERSION = 1
DEFAULT_SINK = 64
DEFAULT_MIN_SPAN = 128
# Stored densities are rounded by whoever wrote them; a larger gap means the plan was edited.
DENSITY_TOLERANCE = 1e-3

Matrix = tuple[tuple[float, ...], ...]


def _spans():
    return remote_module("moa_spans")


@dataclass(frozen=True)
class Provenance:
    """Where a plan comes from. Every field is optional; unknown keys are kept in ``extra``."""

    base_model: str | None = None
    base_revision: str | None = None
    moa_hub_version: str | None = None
    calibration: Any = None
    profile_lengths: tuple[int, ...] | None = None
    density_bounds: dict[int, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "moa_hub_version": self.moa_hub_version,
            "calibration": self.calibration,
            "profile_lengths": list(self.profile_lengths) if self.profile_lengths is not None else None,
            "density_bounds": _density_to_json(self.density_bounds) if self.density_bounds is not None else None,
        }
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        if not isinstance(data, Mapping):
            raise PlanError(f"moa.provenance must be an object, got {type(data).__name__}: fix or remove it")
        known = {"base_model", "base_revision", "moa_hub_version", "calibration", "profile_lengths", "density_bounds"}
        lengths = data.get("profile_lengths")
        bounds = data.get("density_bounds")
        return cls(
            base_model=data.get("base_model"),
            base_revision=data.get("base_revision"),
            moa_hub_version=data.get("moa_hub_version"),
            calibration=data.get("calibration"),
            profile_lengths=tuple(_length("provenance.profile_lengths", n) for n in lengths)
            if lengths is not None
            else None,
            density_bounds=_density_from_json(bounds, "provenance.density_bounds") if bounds is not None else None,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class MoaPlan:
    """A validated MoA plan. ``alpha``/``beta``: [num_layers][num_kv_heads] (any nested sequence or array).

    ``alpha`` is in tokens and may be negative; ``0 <= beta <= 1``; ``min_span > sink >= 0``.
    ``density`` maps a length N to the plan's KV density at N (checked against the rule).
    """

    alpha: Matrix
    beta: Matrix
    sink: int = DEFAULT_SINK
    min_span: int = DEFAULT_MIN_SPAN
    density: dict[int, float] = field(default_factory=dict)
    provenance: Provenance | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise PlanError(
                f"moa.format_version {self.format_version!r} is not supported (this moa-hub reads version "
                f"{FORMAT_VERSION}): upgrade moa-hub or re-export the plan"
            )
        sink = _integer("sink", self.sink)
        min_span = _integer("min_span", self.min_span)
        if sink < 0:
            raise PlanError(f"moa.sink must be >= 0, got {sink}: use 0 for no sink tokens (default {DEFAULT_SINK})")
        if min_span <= sink:
            raise PlanError(
                f"moa.min_span must be greater than moa.sink, got min_span={min_span} <= sink={sink}: "
                f"raise min_span (e.g. sink + 64) or lower sink"
            )
        alpha = _matrix("alpha", self.alpha)
        beta = _matrix("beta", self.beta)
        _check_same_shape(alpha, beta)
        _check_beta_range(beta)
        object.__setattr__(self, "sink", sink)
        object.__setattr__(self, "min_span", min_span)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "density", _density_from_json(self.density, "density"))
        self._check_density()

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.alpha)

    @property
    def num_kv_heads(self) -> int:
        return len(self.alpha[0])

    def check_fits(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise PlanError unless the plan has one rule per (layer, kv head) of the model."""
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise PlanError(
                f"plan shape {self.num_layers} layers x {self.num_kv_heads} kv heads does not fit the model "
                f"({num_layers} layers (num_hidden_layers) x {num_kv_heads} kv heads (num_key_value_heads)): "
                f"use a plan made for this model"
            )

    # -- the contract --------------------------------------------------------------------------
    def alpha_tensor(self) -> torch.Tensor:
        """alpha: [num_layers, num_kv_heads] float64."""
        return torch.tensor(self.alpha, dtype=torch.float64)

    def beta_tensor(self) -> torch.Tensor:
        """beta: [num_layers, num_kv_heads] float64."""
        return torch.tensor(self.beta, dtype=torch.float64)

    def span(self, layer: int, head: int, n: int) -> int:
        """Span S(n) of kv head ``head`` of layer ``layer`` at length ``n``."""
        return _spans().span_at(n, self.alpha[layer][head], self.beta[layer][head], self.sink, self.min_span)

    def spans_at(self, n: int) -> np.ndarray:
        """Spans of every head at length n: int64 [num_layers, num_kv_heads]."""
        n = _length("n", n)
        spans = _spans().span_at(torch.tensor(n), self.alpha_tensor(), self.beta_tensor(), self.sink, self.min_span)
        return spans.numpy()

    def kv_density(self, n: int) -> float:
        """KV density at length n: mean over (layer, kv head) of S(n) / n."""
        n = _length("n", n)
        return _spans().kv_density(self.alpha_tensor(), self.beta_tensor(), n, self.sink, self.min_span)

    def with_density(self, lengths: Sequence[int]) -> MoaPlan:
        """The same plan with ``density`` computed at ``lengths``."""
        return replace(self, density={_length("lengths", n): self.kv_density(n) for n in lengths})

    def _check_density(self) -> None:
        for n, stored in self.density.items():
            actual = self.kv_density(n)
            if abs(actual - stored) > DENSITY_TOLERANCE:
                raise PlanError(
                    f"moa.density[{n}] = {stored} but the plan's alpha/beta give {actual:.6f} at N={n}: "
                    f"remove the 'density' entry or recompute it (MoaPlan.with_density)"
                )

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The design's ``moa`` config block (JSON-ready: density keys are strings)."""
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "sink": self.sink,
            "min_span": self.min_span,
            "alpha": [list(row) for row in self.alpha],
            "beta": [list(row) for row in self.beta],
            "density": _density_to_json(self.density),
        }
        if self.provenance is not None:
            out["provenance"] = self.provenance.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoaPlan:
        """Read a ``moa`` block; unknown keys are an error (they are usually typos)."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a MoA plan must be a JSON object, got {type(data).__name__}")
        known = {"format_version", "sink", "min_span", "alpha", "beta", "density", "provenance"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown keys {unknown} in the moa plan: remove them (known keys: {sorted(known)})")
        missing = [k for k in ("alpha", "beta") if k not in data]
        if missing:
            raise PlanError(f"the moa plan lacks {missing}: a plan needs alpha and beta, [num_layers][num_kv_heads]")
        provenance = data.get("provenance")
        return cls(
            alpha=data["alpha"],
            beta=data["beta"],
            sink=data.get("sink", DEFAULT_SINK),
            min_span=data.get("min_span", DEFAULT_MIN_SPAN),
            density=data.get("density") or {},
            provenance=Provenance.from_dict(provenance) if provenance is not None else None,
            format_version=data.get("format_version", FORMAT_VERSION),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MoaPlan:
        """Load a design-format plan: a ``moa`` block, or a config.json holding one."""
        data = read_json(path)
        if isinstance(data, Mapping) and "moa" in data:
            data = data["moa"]
        return cls.from_dict(data)


def uniform_plan(
    num_layers: int,
    num_kv_heads: int,
    density: float,
    length: int,
    sink: int = DEFAULT_SINK,
    min_span: int = DEFAULT_MIN_SPAN,
) -> MoaPlan:
    """StreamingLLM-style baseline: sink + one fixed window, the same for every head.

    Every head gets the span round(density * length) (alpha = span, beta = 0), so the KV density at
    ``length`` equals ``density`` up to 1 / length.
    """
    length = _length("length", length)
    if not (isinstance(density, numbers.Real) and 0 < density <= 1):
        raise PlanError(f"uniform plan density must be in (0, 1], got {density!r}: pass e.g. 0.25")
    span = round(density * length)
    if span < min_span:
        raise PlanError(
            f"a uniform plan at density {density} and length {length} needs span {span} < min_span {min_span}: "
            f"raise the density or the length, or lower min_span"
        )
    alpha = [[float(span)] * num_kv_heads for _ in range(num_layers)]
    beta = [[0.0] * num_kv_heads for _ in range(num_layers)]
    return MoaPlan(alpha=alpha, beta=beta, sink=sink, min_span=min_span, density={length: span / length})


def uniform_like(plan: MoaPlan, length: int) -> MoaPlan:
    """The uniform baseline with the same KV density as ``plan`` at ``length``."""
    return uniform_plan(
        plan.num_layers, plan.num_kv_heads, plan.kv_density(length), length, sink=plan.sink, min_span=plan.min_span
    )


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} does not exist: check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PlanError(f"plan file {str(path)!r} is not valid JSON ({err}): fix the file") from err


# -- validation helpers ------------------------------------------------------------------------
def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlanError(f"moa.{name} must be an integer number of tokens, got {value!r}")
    return int(value)


def _length(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise PlanError(f"{name}: a length must be a positive integer, got {value!r}")
    return int(value)


def _matrix(name: str, value: Any) -> Matrix:
    """A rectangular [num_layers][num_kv_heads] matrix of finite floats."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise PlanError(f"moa.{name} must be a non-empty list of layers, got {_short(value)}")
    rows = []
    for layer, row in enumerate(value):
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) == 0:
            raise PlanError(f"moa.{name}[{layer}] must be a non-empty list (one value per kv head), got {_short(row)}")
        rows.append(tuple(_finite(f"{name}[{layer}][{head}]", x) for head, x in enumerate(row)))
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        counts = [len(r) for r in rows]
        raise PlanError(f"moa.{name} is ragged: layers have {counts} heads: every layer needs one value per kv head")
    return tuple(rows)


def _finite(name: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise PlanError(f"moa.{name} must be a number, got {x!r}")
    if not math.isfinite(x):
        raise PlanError(f"moa.{name} is {x}: plans need finite numbers; use a large finite value instead")
    return float(x)


def _check_same_shape(alpha: Matrix, beta: Matrix) -> None:
    shape_a, shape_b = (len(alpha), len(alpha[0])), (len(beta), len(beta[0]))
    if shape_a != shape_b:
        raise PlanError(
            f"moa.alpha is {shape_a[0]}x{shape_a[1]} but moa.beta is {shape_b[0]}x{shape_b[1]}: "
            f"both need [num_layers][num_kv_heads]"
        )


def _check_beta_range(beta: Matrix) -> None:
    for layer, row in enumerate(beta):
        for head, b in enumerate(row):
            if not 0.0 <= b <= 1.0:
                raise PlanError(
                    f"moa.beta[{layer}][{head}] = {b} is outside [0, 1]: the span may grow at most one token "
                    f"per token; clip it to [0, 1]"
                )


def _density_from_json(data: Any, name: str) -> dict[int, float]:
    if not isinstance(data, Mapping):
        raise PlanError(f"moa.{name} must be an object {{length: density}}, got {_short(data)}")
    out = {}
    for key, value in data.items():
        n = _length(f"moa.{name} key", key)
        d = _finite(f"{name}[{key}]", value)
        if not 0.0 <= d <= 1.0:
            raise PlanError(f"moa.{name}[{key}] = {d} is outside [0, 1]: a KV density is a fraction")
        out[n] = d
    return dict(sorted(out.items()))


def _density_to_json(density: Mapping[int, float]) -> dict[str, float]:
    return {str(n): d for n, d in sorted(density.items())}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

"""Read (and write) the profiling stage's output: block-summed attention influence per length.

One safetensors file per profile length N, tensor ``influence`` float32 ``[L, Hkv, nb, nb]`` with
``nb = ceil(N / block_size)``; entry ``[l, g, bi, bj]`` sums, over calibration items and over the
query heads of kv group g, the attention influence
``E_ij = A_ij (dL/dA_ij - sum_k dL/dA_ik A_ik) / (1 - A_ij)`` for queries i in block bi and keys j in
block bj. Metadata (strings): ``length``, ``block_size``, ``num_items``.

Masking (i, j) out (A_ij -> 0, the row renormalised) changes the loss by ``-E_ij`` to first order, so
``InfluenceProfile.influence`` holds ``-E``: the loss increase of masking, which the optimizer sums
over the entries a rule masks. Reading and writing files converts between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import OptimizeError

TENSOR_NAME = "influence"


@dataclass(frozen=True)
class InfluenceProfile:
    """Block-summed influence of one profile length."""

    length: int
    block_size: int
    influence: np.ndarray  # [L, Hkv, nb, nb] float32: loss increase of masking (= -E of the file)
    num_items: int | None = None

    def __post_init__(self) -> None:
        shape = self.influence.shape
        nb = math.ceil(self.length / self.block_size) if self.block_size > 0 else -1
        if len(shape) != 4 or shape[2] != nb or shape[3] != nb:
            raise OptimizeError(
                f"influence at length {self.length} has shape {tuple(shape)}, expected [layers, kv_heads, {nb}, {nb}] "
                f"for block_size {self.block_size}: re-run profiling or pass the right block size"
            )
        if not np.isfinite(self.influence).all():
            raise OptimizeError(f"influence at length {self.length} has NaN or inf entries: re-run profiling")


def save_profile(path: str | Path, profile: InfluenceProfile) -> Path:
    """Write one profile length as safetensors (the profiling stage's format)."""
    meta = {"length": str(profile.length), "block_size": str(profile.block_size)}
    if profile.num_items is not None:
        meta["num_items"] = str(profile.num_items)
    path = Path(path)
    stored = np.ascontiguousarray(-profile.influence, dtype=np.float32)  # files hold E = -(masking loss)
    save_file({TENSOR_NAME: stored}, str(path), metadata=meta)
    return path


def load_profile(path: str | Path) -> InfluenceProfile:
    """Read one profile file written by the profiling stage."""
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if TENSOR_NAME not in f.keys() or "length" not in meta or "block_size" not in meta:
            raise OptimizeError(
                f"{path} is not an influence profile (needs tensor '{TENSOR_NAME}' and metadata length, block_size): "
                "point at the profiling stage's output folder"
            )
        influence = -f.get_tensor(TENSOR_NAME)  # E -> loss increase of masking
    items = int(meta["num_items"]) if "num_items" in meta else None
    return InfluenceProfile(int(meta["length"]), int(meta["block_size"]), influence, items)


def load_profiles(folder: str | Path) -> dict[int, InfluenceProfile]:
    """Every ``*.safetensors`` profile in a folder, by length."""
    files = sorted(p for p in Path(folder).glob("*.safetensors") if ".partial" not in p.name)  # finished lengths
    if not files:
        raise OptimizeError(f"no *.safetensors profile files in {folder}: run `moa-hub profile` first")
    profiles: dict[int, InfluenceProfile] = {}
    for path in files:
        profile = load_profile(path)
        if profile.length in profiles:
            raise OptimizeError(f"two profiles for length {profile.length} in {folder}: keep one")
        profiles[profile.length] = profile
    return _check_shapes(profiles)


def as_profiles(
    profiles: dict[int, InfluenceProfile | np.ndarray] | str | Path, block_size: int
) -> dict[int, InfluenceProfile]:
    """Accept a folder, profiles, or in-memory ``{length: [L, Hkv, nb, nb]}`` arrays/tensors."""
    if isinstance(profiles, (str, Path)):
        return load_profiles(profiles)
    if not profiles:
        raise OptimizeError("no profiles given: pass at least one profile length")
    out = {}
    for length, value in profiles.items():
        if isinstance(value, InfluenceProfile):
            out[int(length)] = value
            continue
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[int(length)] = InfluenceProfile(int(length), block_size, array.astype(np.float32, copy=False))
    return _check_shapes(out)


def _check_shapes(profiles: dict[int, InfluenceProfile]) -> dict[int, InfluenceProfile]:
    heads = {n: p.influence.shape[:2] for n, p in profiles.items()}
    if len(set(heads.values())) > 1:
        raise OptimizeError(f"profiles disagree on [layers, kv_heads]: {heads}; profile one model at every length")
    return dict(sorted(profiles.items()))

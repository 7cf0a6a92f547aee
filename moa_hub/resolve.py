"""Resolve a model argument (Hub id or local folder) to a local folder at a pinned commit."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubError, ModelError
from .hub_errors import explain_hub_error

logger = logging.getLogger(__name__)

# What a conversion needs; never `original/` (duplicate consolidated weights) and never pickled weights.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
]
IGNORE_PATTERNS = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.msgpack", "*.h5"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$|^[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class ResolveConfig:
    """How to fetch a Hub model. ``offline=None`` follows ``HF_HUB_OFFLINE``; ``endpoint=None`` follows ``HF_ENDPOINT``."""

    revision: str | None = None
    token: str | None = field(default=None, repr=False)
    cache_dir: Path | None = None
    offline: bool | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder with the model; ``repo_id``/``revision_sha`` are set when it came from the Hub."""

    path: Path
    repo_id: str | None = None
    revision_sha: str | None = None

    def provenance(self) -> dict:
        """The fields the plan's provenance records about the base model."""
        return {"base_model": self.repo_id or str(self.path), "base_revision": self.revision_sha}


def is_offline(config: ResolveConfig) -> bool:
    if config.offline is not None:
        return config.offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(model: str | Path, config: ResolveConfig | None = None) -> ResolvedModel:
    """A local folder is used as is; a Hub id is downloaded (or read from the cache) at a pinned commit."""
    config = config or ResolveConfig()
    local = Path(model).expanduser()
    if local.is_dir():
        check_model_folder(local)
        return ResolvedModel(path=local.resolve())
    if not REPO_ID.match(str(model)):
        raise ModelError(f"{str(model)!r} is neither a folder nor a Hub model id (like 'meta-llama/Llama-3.1-8B').")
    path = _download(str(model), config)
    check_model_folder(path)
    # The snapshot folder is named by the commit it holds: the pinned revision, online or offline.
    resolved = ResolvedModel(path=path, repo_id=str(model), revision_sha=path.name)
    logger.info("Resolved %s at commit %s -> %s", model, resolved.revision_sha, path)
    return resolved


def _download(repo_id: str, config: ResolveConfig) -> Path:
    from huggingface_hub import snapshot_download

    offline = is_offline(config)
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=config.revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                token=config.token,
                cache_dir=config.cache_dir,
                local_files_only=offline,
                endpoint=config.endpoint,
            )
        )
    except Exception as err:  # noqa: BLE001 (every failure becomes one clear HubError)
        raise HubError(
            explain_hub_error(
                err, repo_id, action="download", offline=offline, token=config.token, endpoint=config.endpoint
            )
        ) from None


def check_model_folder(path: Path) -> None:
    """The folder has a config and safetensors weights (moa-hub never loads pickled weights)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: pass a Hugging Face model folder or Hub id.")
    if not any(path.glob("*.safetensors")):
        extra = " It has .bin weights only: convert them to safetensors first." if any(path.glob("*.bin")) else ""
        raise ModelError(f"{path} has no .safetensors weights.{extra}")

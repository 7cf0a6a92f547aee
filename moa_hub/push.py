"""Publish an exported folder to the Hub in one atomic commit.

Weights identical to the base model's (same sha256 at the pinned base revision) are copied server-side
(``CommitOperationCopy`` with ``src_repo_id``); everything else is uploaded. Files the destination already
holds with the same content are left out, so a re-run changes nothing. The local folder is never modified
except to add a missing model card, and every failure says how to retry with ``moa-hub push DIR``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .card import CardConfig, read_plan, write_card
from .errors import HubError
from .hub_errors import explain_hub_error, scrub

logger = logging.getLogger(__name__)

COPYABLE_SUFFIXES = (".safetensors",)
SKIPPED_PARTS = (".cache", ".git", "__pycache__")


@dataclass
class PushConfig:
    """Where and how to push. ``token=None`` uses HF_TOKEN / the saved login; ``endpoint=None`` uses HF_ENDPOINT."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # branch to push to (created from main when missing)
    create_pr: bool = False
    token: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    dry_run: bool = False
    copy_weights: bool = True
    commit_message: str = "Upload MoA model (moa-hub)"


@dataclass(frozen=True)
class PlannedFile:
    path_in_repo: str
    action: str  # "upload" | "copy" | "unchanged"
    size: int
    source: str | None = None  # "repo@revision" for copies


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    files: list[PlannedFile]
    commit_sha: str | None = None
    pr_url: str | None = None
    dry_run: bool = False


def retry_hint(folder: Path, config: PushConfig) -> str:
    flags = [f"--repo-id {config.repo_id}"]
    flags += ["--private"] if config.private else []
    flags += [f"--revision {config.revision}"] if config.revision else []
    flags += ["--create-pr"] if config.create_pr else []
    return f"The local folder {folder} is complete; retry with: moa-hub push {folder} {' '.join(flags)}"


def push_folder(folder: Path, config: PushConfig) -> PushResult:
    """Push ``folder`` (a moa-hub export) to ``config.repo_id``; with ``dry_run`` only plan the commit."""
    from huggingface_hub import HfApi

    folder = Path(folder).resolve()
    plan = read_plan(folder)  # fails early, before any network call, on a folder that is not an export
    if not (folder / "README.md").is_file():
        write_card(folder, CardConfig(repo_id=config.repo_id, revision=config.revision or "main"))
    api = HfApi(endpoint=config.endpoint, token=config.token)
    try:
        return _push(api, folder, plan, config)
    except HubError:
        raise
    except KeyboardInterrupt:
        raise HubError(
            f"Push to {config.repo_id} interrupted before its commit. {retry_hint(folder, config)}"
        ) from None
    except Exception as err:  # noqa: BLE001 (one clear message; the original goes to the debug log)
        logger.debug("push failed: %s", scrub(repr(err), config.token))
        message = explain_hub_error(err, config.repo_id, "push to", token=config.token, endpoint=api.endpoint)
        raise HubError(f"{message} {retry_hint(folder, config)}") from None


def _push(api, folder: Path, plan: dict, config: PushConfig) -> PushResult:
    exists = _repo_exists(api, config.repo_id)
    remote = _remote_files(api, config.repo_id, config.revision) if exists else {}
    files = plan_files(api, folder, plan, remote, config)
    repo_url = f"{api.endpoint}/{config.repo_id}"
    for item in files:
        logger.info(
            "%-9s %s (%d bytes)%s",
            item.action,
            item.path_in_repo,
            item.size,
            f" from {item.source}" if item.source else "",
        )
    if config.dry_run:
        return PushResult(repo_url=repo_url, files=files, dry_run=True)
    api.create_repo(config.repo_id, private=config.private, exist_ok=True, repo_type="model")
    if config.revision and config.revision != "main" and not config.create_pr:
        api.create_branch(config.repo_id, branch=config.revision, exist_ok=True)
    operations = _operations(folder, files, plan)
    if not operations:
        logger.info("%s already holds this folder: nothing to commit.", config.repo_id)
        return PushResult(repo_url=repo_url, files=files)
    info = api.create_commit(
        config.repo_id,
        operations,
        commit_message=config.commit_message,
        revision=config.revision,
        create_pr=config.create_pr,
    )
    logger.info("Pushed %d file(s) to %s in commit %s", len(operations), config.repo_id, info.oid)
    return PushResult(repo_url=repo_url, files=files, commit_sha=info.oid, pr_url=info.pr_url)


def _repo_exists(api, repo_id: str) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(repo_id)
    except RepositoryNotFoundError:
        return False
    return True


def _remote_files(api, repo_id: str, revision: str | None) -> dict:
    """path -> RepoFile on the destination branch (empty when the branch does not exist yet)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if hasattr(f, "size")}
    except RevisionNotFoundError:
        return {}


def local_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part in SKIPPED_PARTS for part in p.relative_to(folder).parts)
    )


def plan_files(api, folder: Path, plan: dict, remote: dict, config: PushConfig) -> list[PlannedFile]:
    """What the commit does with each local file: copy from the base repo, upload, or leave unchanged."""
    base = _base_weights(api, folder, plan) if config.copy_weights else {}
    source = "{base_model}@{base_revision}".format(**(plan.get("provenance") or {})) if base else None
    out = []
    for path in local_files(folder):
        rel, size = path.relative_to(folder).as_posix(), path.stat().st_size
        digest = _sha256(path) if (rel in base or rel in remote) and size > 0 else None
        if rel in remote and _same_content(remote[rel], path, digest):
            out.append(PlannedFile(rel, "unchanged", size))
        elif rel in base and base[rel] == digest:
            out.append(PlannedFile(rel, "copy", size, source))
        else:
            out.append(PlannedFile(rel, "upload", size))
    return out


def _base_weights(api, folder: Path, plan: dict) -> dict[str, str]:
    """path -> sha256 of the base repo's LFS weights at the pinned revision (empty when unknown or unreachable)."""
    provenance = plan.get("provenance") or {}
    base, revision = provenance.get("base_model"), provenance.get("base_revision")
    names = [p.name for p in folder.glob("*") if p.name.endswith(COPYABLE_SUFFIXES)]
    if not (base and revision and names) or Path(str(base)).exists():
        return {}
    try:
        infos = api.get_paths_info(base, names, revision=revision)
    except Exception as err:  # noqa: BLE001 (copying is an optimisation: fall back to uploading)
        logger.info("Weights will be uploaded: cannot read %s@%s (%s)", base, revision, type(err).__name__)
        return {}
    return {f.path: f.lfs.sha256 for f in infos if getattr(f, "lfs", None) is not None and getattr(f, "xet_hash", None)}


def _same_content(remote_file, path: Path, digest: str | None) -> bool:
    if remote_file.size != path.stat().st_size:
        return False
    if remote_file.lfs is not None:
        return digest is not None and remote_file.lfs.sha256 == digest
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == remote_file.blob_id


def _operations(folder: Path, files: list[PlannedFile], plan: dict) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy

    provenance = plan.get("provenance") or {}
    ops = []
    for item in files:
        if item.action == "copy":
            ops.append(
                CommitOperationCopy(
                    src_path_in_repo=item.path_in_repo,
                    path_in_repo=item.path_in_repo,
                    src_revision=provenance["base_revision"],
                    src_repo_id=provenance["base_model"],
                    src_repo_type="model",
                )
            )
        elif item.action == "upload":
            ops.append(
                CommitOperationAdd(path_in_repo=item.path_in_repo, path_or_fileobj=str(folder / item.path_in_repo))
            )
    return ops


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

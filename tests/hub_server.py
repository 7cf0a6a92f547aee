"""A small Hub-compatible HTTP server for tests (127.0.0.1, random free port).

It implements just what the real ``huggingface_hub`` 1.x client calls for create_repo, repo info,
tree / paths-info, preupload, the LFS batch API (basic transfer), cross-repo LFS duplication, NDJSON
commits (regular, LFS and copied files), card YAML validation, branches, PRs and resolve downloads.
It checks ``Authorization: Bearer``, keeps private and gated repos private, validates every commit
payload and records what it saw, so tests can assert on it. Fault injection: ``fail_commit`` answers a
commit with 500; ``hold_uploads`` makes LFS uploads block until released (to interrupt a push).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin")
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
PIPELINE_TAGS = {"text-generation", "text2text-generation", "feature-extraction"}


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    """One file in a commit: regular bytes, or an LFS pointer (content in the server's LFS store)."""

    size: int
    oid: str  # git blob id (regular) or sha256 (lfs)
    content: bytes | None = None
    lfs_sha256: str | None = None

    def tree_item(self, path: str) -> dict:
        item = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs_sha256:
            item["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": 134}
            item["xetHash"] = "xet" + self.lfs_sha256[:40]
        return item


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users allowed into a gated repo
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 present in this repo's LFS storage
    prs: int = 0


class FakeHub:
    """State + threaded server. Use as a context manager; ``endpoint`` is its base URL."""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens or {})  # token -> user
        self.orgs = dict(orgs or {})  # user -> organisations
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, auth header)
        self.commit_payloads: list[list[dict]] = []
        self.fail_commit = False
        self.hold_uploads = threading.Event()  # set = uploads proceed; clear = they block
        self.hold_uploads.set()
        self.upload_started = threading.Event()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.hold_uploads.set()
        self.server.shutdown()
        self.server.server_close()

    # ---- state helpers used by tests -------------------------------------------------------
    def new_sha(self) -> str:
        with self.lock:
            self._counter += 1
            return hashlib.sha1(f"commit-{self._counter}-{id(self)}".encode()).hexdigest()

    def create_repo(self, repo_id: str, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private=private, gated=gated)
            sha = self.new_sha()
            repo.commits[sha] = {}
            repo.branches["main"] = sha
            self.repos[repo_id] = repo
            return repo

    def add_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit files directly (to seed base models); returns the new commit sha."""
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches[branch]])
            for path, data in files.items():
                tree[path] = self._entry(repo, path, data)
            sha = self.new_sha()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            return sha

    def _entry(self, repo: Repo, path: str, data: bytes) -> Entry:
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            self.lfs_store[sha256] = data
            repo.lfs_objects.add(sha256)
            return Entry(len(data), git_blob_sha(f"lfs {sha256}".encode()), lfs_sha256=sha256)
        return Entry(len(data), git_blob_sha(data), content=data)

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        repo = self.repos[repo_id]
        return repo.commits[self.resolve_revision(repo, revision)]

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        entry = self.tree(repo_id, revision)[path]
        return entry.content if entry.lfs_sha256 is None else self.lfs_store[entry.lfs_sha256]

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ---- access control --------------------------------------------------------------------
    def user_of(self, auth: str | None) -> str | None:
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def can_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, set()))

    def readable_repo(self, repo_id: str, user: str | None, files: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.can_write(user, repo_id)):
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if files and repo.gated and user not in repo.granted and not self.can_write(user, repo_id):
            raise HubHTTPError(401 if user is None else 403, f"Access to model {repo_id} is restricted.", "GatedRepo")
        return repo

    def writable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.readable_repo(repo_id, user)
        if not self.can_write(user, repo_id):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo


def validate_card_yaml(content: str) -> list[str]:
    """The checks the fake Hub applies to README.md metadata (a subset of the real Hub's)."""
    if not content.startswith("---\n"):
        return ["README.md has no YAML metadata block"]
    try:
        meta = yaml.safe_load(content.split("---\n", 2)[1])
    except (yaml.YAMLError, IndexError) as err:
        return [f"YAML does not parse: {err}"]
    if not isinstance(meta, dict):
        return ["metadata is not a mapping"]
    errors = []
    if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
        errors.append(f"base_model_relation {meta['base_model_relation']!r} not allowed")
    if "base_model_relation" in meta and "base_model" not in meta:
        errors.append("base_model_relation needs base_model")
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f"pipeline_tag {meta['pipeline_tag']!r} unknown")
    for key in ("tags", "language"):
        value = meta.get(key, [])
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f"{key} must be a string or a list of strings")
    if any(k.startswith("extra_gated") for k in meta):
        errors.append("gating fields are only allowed on gated repos")
    return errors


def _make_handler(hub: FakeHub):
    from hub_server_routes import Routes  # the endpoints live in their own file

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _dispatch(self, method: str) -> None:
            split = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            with hub.lock:
                hub.requests.append((method, split.path, auth))
            length = int(self.headers.get("Content-Length") or 0)
            routes = None
            try:
                routes = Routes(hub, self, method, split.path, parse_qs(split.query), auth, length)
                status, headers, body = routes.handle()
            except HubHTTPError as err:
                headers = {"X-Error-Message": err.message, "Content-Type": "application/json"}
                if err.code:
                    headers["X-Error-Code"] = err.code
                if err.code == "EntryNotFound" and routes is not None and routes.commit_sha:
                    headers["X-Repo-Commit"] = routes.commit_sha
                status, body = err.status, json.dumps({"error": err.message}).encode()
            except ConnectionError:
                return
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:  # say so, or the client may reuse the socket we are about to close
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

    return Handler


def decode_ndjson(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode())

"""Endpoints of the fake Hub (see hub_server.py). One method per endpoint; errors raise HubHTTPError."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from urllib.parse import parse_qs, unquote

from hub_server import (
    LFS_SUFFIXES,
    Entry,
    FakeHub,
    HubHTTPError,
    b64decode,
    decode_ndjson,
    git_blob_sha,
    validate_card_yaml,
)

JSON = {"Content-Type": "application/json"}
API_REPO = re.compile(
    r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree|paths-info|preupload|commit|branch|lfs-files)(/.*)?)?$"
)
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
LFS_PUT = re.compile(r"^/_lfs/([^/]+/[^/]+)/([0-9a-f]{64})$")


def _json(data, status: int = 200):
    return status, dict(JSON), json.dumps(data).encode()


class Routes:
    def __init__(self, hub: FakeHub, handler, method: str, path: str, query: dict, auth: str | None, length: int):
        self.hub, self.handler, self.method, self.query, self.length = hub, handler, method, query, length
        self.path = path
        self.commit_sha: str | None = None
        self._body: bytes | None = None
        if not LFS_PUT.match(path):
            self.body()  # read it now so that an error answer leaves the connection clean
        self.user = hub.user_of(auth) if auth is not None else None

    def body(self) -> bytes:
        if self._body is None:
            self._body = self.handler.rfile.read(self.length) if self.length else b""
        return self._body

    def handle(self):
        p = self.path
        if p == "/api/repos/create" and self.method == "POST":
            return self.create_repo()
        if p == "/api/validate-yaml" and self.method == "POST":
            errors = validate_card_yaml(json.loads(self.body())["content"])
            return _json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
        if p == "/api/whoami-v2":
            if self.user is None:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            return _json({"name": self.user, "type": "user", "auth": {"accessToken": {"role": "write"}}})
        if m := LFS_BATCH.match(p):
            return self.lfs_batch(m.group(1))
        if m := LFS_PUT.match(p):
            return self.lfs_put(m.group(1), m.group(2))
        if m := API_REPO.match(p):
            return self.api_repo(m.group(1), m.group(2), unquote(m.group(3) or ""))
        if m := RESOLVE.match(p):
            return self.resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        raise HubHTTPError(404, f"no route {self.method} {p}")

    # ---- repos --------------------------------------------------------------------------------
    def create_repo(self):
        payload = json.loads(self.body())
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if not self.hub.can_write(self.user, repo_id):
            raise HubHTTPError(401 if self.user is None else 403, f"You cannot create {repo_id}")
        if repo_id in self.hub.repos:
            return _json({"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_id, private=private)
        return _json({"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def api_repo(self, repo_id: str, action: str | None, rest: str):
        rest = rest.lstrip("/")
        if action in (None, "revision"):
            return self.repo_info(repo_id, rest or "main")
        if action == "tree":
            return self.tree(repo_id, rest.split("/", 1)[0] if rest else "main")
        if action == "paths-info":
            return self.paths_info(repo_id, rest)
        if action == "preupload":
            return self.preupload(repo_id, rest)
        if action == "commit":
            return self.commit(repo_id, rest)
        if action == "branch":
            return self.create_branch(repo_id, rest)
        if action == "lfs-files" and rest == "duplicate":
            return self.duplicate(repo_id)
        raise HubHTTPError(404, f"no route {self.path}")

    def repo_info(self, repo_id: str, revision: str):
        repo = self.hub.readable_repo(repo_id, self.user)
        sha = self.hub.resolve_revision(repo, revision)
        files = repo.commits[sha]
        return _json(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(files)],
            }
        )

    def tree(self, repo_id: str, revision: str):
        repo = self.hub.readable_repo(repo_id, self.user)
        files = repo.commits[self.hub.resolve_revision(repo, revision)]
        return _json([files[path].tree_item(path) for path in sorted(files)])

    def paths_info(self, repo_id: str, revision: str):
        repo = self.hub.readable_repo(repo_id, self.user)
        files = repo.commits[self.hub.resolve_revision(repo, revision)]
        paths = parse_qs(self.body().decode()).get("paths", [])
        return _json([files[p].tree_item(p) for p in paths if p in files])

    def create_branch(self, repo_id: str, branch: str):
        repo = self.hub.writable_repo(repo_id, self.user)
        if branch in repo.branches:
            raise HubHTTPError(409, f"Branch {branch} already exists")
        start = json.loads(self.body() or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self.hub.resolve_revision(repo, start)
        return _json({})

    # ---- uploads ------------------------------------------------------------------------------
    def preupload(self, repo_id: str, revision: str):
        repo = self.hub.writable_repo(repo_id, self.user)
        create_pr = self.query.get("create_pr") == ["1"]
        files = {} if create_pr and revision not in repo.branches else self.hub.tree(repo_id, revision)
        out = []
        for item in json.loads(self.body())["files"]:
            if not isinstance(item.get("size"), int) or not isinstance(item.get("sample"), str):
                raise HubHTTPError(400, f"bad preupload item {item}")
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 10_000_000
            existing = files.get(item["path"])
            out.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing and not existing.lfs_sha256 else (existing and existing.lfs_sha256),
                }
            )
        return _json({"files": out})

    def lfs_batch(self, repo_id: str):
        repo = self.hub.writable_repo(repo_id, self.user)
        payload = json.loads(self.body())
        if payload.get("operation") != "upload" or payload.get("hash_algo") != "sha256":
            raise HubHTTPError(400, f"bad LFS batch request {payload}")
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_store:
                item["actions"] = {"upload": {"href": f"{self.hub.endpoint}/_lfs/{repo_id}/{obj['oid']}"}}
            else:
                repo.lfs_objects.add(obj["oid"])
            objects.append(item)
        return _json({"transfer": "basic", "objects": objects})

    def lfs_put(self, repo_id: str, oid: str):
        repo = self.hub.repos[repo_id]
        self.hub.upload_started.set()
        chunk = self.handler.rfile.read(min(self.length, 16))
        if not self.hub.hold_uploads.wait(timeout=30):
            raise ConnectionError("upload held too long")
        data = chunk + self.handler.rfile.read(self.length - len(chunk))
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubHTTPError(400, f"LFS object does not match its oid {oid}")
        self.hub.lfs_store[oid] = data
        repo.lfs_objects.add(oid)
        return _json({})

    def duplicate(self, src_repo_id: str):
        self.hub.readable_repo(src_repo_id, self.user, files=True)
        payload = json.loads(self.body())
        target = self.hub.writable_repo(payload["target"]["name"], self.user)
        failed = []
        for item in payload["files"]:
            if item["sha256"] in self.hub.repos[src_repo_id].lfs_objects and item.get("xetHash"):
                target.lfs_objects.add(item["sha256"])
            else:
                failed.append({"sha256": item["sha256"], "error": "not in source repo"})
        return _json({"failed": failed})

    # ---- commits ------------------------------------------------------------------------------
    def commit(self, repo_id: str, revision: str):
        repo = self.hub.writable_repo(repo_id, self.user)
        if self.handler.headers.get("Content-Type") != "application/x-ndjson":
            raise HubHTTPError(400, "commit payload must be application/x-ndjson")
        lines = decode_ndjson(self.body())
        self.hub.commit_payloads.append(lines)
        if self.hub.fail_commit:
            raise HubHTTPError(500, "Internal Error (injected)")
        header, ops = lines[0], lines[1:]
        if header.get("key") != "header" or not header["value"].get("summary"):
            raise HubHTTPError(400, "first NDJSON line must be the commit header with a summary")
        create_pr = self.query.get("create_pr") == ["1"]
        parent = self.hub.resolve_revision(repo, revision)
        if header["value"].get("parentCommit") not in (None, parent):
            raise HubHTTPError(412, "parent commit is not the head of the branch")
        tree = dict(repo.commits[parent])
        for op in ops:
            self._apply(repo, tree, op)
        sha = self.hub.new_sha()
        repo.commits[sha] = tree
        out = {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha}
        if create_pr:
            repo.prs += 1
            repo.branches[f"refs/pr/{repo.prs}"] = sha
            out["pullRequestUrl"] = f"{self.hub.endpoint}/{repo_id}/discussions/{repo.prs}"
        else:
            repo.branches[revision if revision in repo.branches else "main"] = sha
        return _json(out)

    def _apply(self, repo, tree: dict, op: dict) -> None:
        key, value = op.get("key"), op.get("value", {})
        path = value.get("path", "")
        if not path or path.startswith("/") or posixpath.normpath(path) != path or ".." in path.split("/"):
            raise HubHTTPError(400, f"invalid path in commit: {path!r}")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubHTTPError(400, "regular files must be base64")
            data = b64decode(value["content"])
            if path == "README.md" and (errors := validate_card_yaml(data.decode())):
                raise HubHTTPError(400, "Invalid metadata in README.md: " + "; ".join(errors))
            tree[path] = Entry(len(data), git_blob_sha(data), content=data)
        elif key == "lfsFile":
            oid = value.get("oid", "")
            if value.get("algo") != "sha256" or oid not in repo.lfs_objects or oid not in self.hub.lfs_store:
                raise HubHTTPError(400, f"LFS object {oid} for {path} was never uploaded to {repo.repo_id}")
            size = len(self.hub.lfs_store[oid])
            if value.get("size", size) != size:
                raise HubHTTPError(400, f"LFS size mismatch for {path}")
            tree[path] = Entry(size, git_blob_sha(f"lfs {oid}".encode()), lfs_sha256=oid)
        elif key == "deletedFile":
            tree.pop(path, None)
        else:
            raise HubHTTPError(400, f"unknown commit operation {key!r}")

    # ---- downloads ----------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str, path: str):
        repo = self.hub.readable_repo(repo_id, self.user, files=True)
        self.commit_sha = self.hub.resolve_revision(repo, revision)
        entry = repo.commits[self.commit_sha].get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        data = entry.content if entry.lfs_sha256 is None else self.hub.lfs_store[entry.lfs_sha256]
        headers = {"ETag": f'"{entry.lfs_sha256 or entry.oid}"', "X-Repo-Commit": self.commit_sha}
        headers["Content-Type"] = "application/octet-stream"
        return 200, headers, data

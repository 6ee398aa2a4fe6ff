"""A loopback stand-in for the Hub endpoints `huggingface_hub` calls to create a dataset repo and commit to it.

Answers, on 127.0.0.1, what huggingface_hub 2.x sends for create_repo, repo_info, create_branch,
list_repo_tree, preupload (upload modes), the LFS batch API with basic PUT uploads, validate-yaml,
commit (NDJSON) and resolve (file download). It keeps repos in memory (branches of path ->
content), records every request, checks the bearer token on every Hub API call, and can answer
chosen requests with an error first (`fail`). It is written from the library's client code in
.venv, not from the Hub's server: it agrees with the client, which is all a test of the client
side can show. No Xet: tests set HF_HUB_DISABLE_XET=1 so uploads take the LFS path.

Example: with HubStub(token="hf_x") as hub: os.environ["HF_ENDPOINT"] = hub.url
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".parquet",)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    at: float = 0.0


@dataclass
class Failure:
    method: str
    path_contains: str
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # matching requests to let through first


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, dict[str, bytes]]
    heads: dict[str, str]
    commits: list[dict] = field(default_factory=list)


class HubStub:
    """The fake Hub (module docstring). Example: hub.commits("me/q") -> [{'summary': ..., 'operations': [...]}]"""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubStub":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, path_contains: str, status: int, times: int = 1, headers: dict | None = None,
             after: int = 0) -> None:
        """Answer `times` matching requests, after letting `after` through, with `status` instead of handling them."""
        self.failures.append(Failure(method, path_contains, status, times, dict(headers or {}), after))

    def commits(self, repo_id: str) -> list[dict]:
        return self.repos[repo_id].commits

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    # Request handling ----------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = Recorded(method, self.path, dict(self.headers.items()), body, at=time.monotonic())
                with hub.lock:
                    hub.requests.append(record)
                    status, headers, payload = hub._answer(method, self.path, dict(self.headers.items()), body)
                record.status = status
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                headers.setdefault("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_HEAD(self):
                self._serve("HEAD")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

        return Handler

    def _answer(self, method: str, raw_path: str, headers: dict, body: bytes):
        url = urlparse(raw_path)
        path, query = url.path, parse_qs(url.query)
        for failure in self.failures:
            if failure.times and failure.method == method and failure.path_contains in path:
                if failure.after:
                    failure.after -= 1
                    continue
                failure.times -= 1
                return failure.status, dict(failure.headers), {"error": f"injected {failure.status}"}
        if path.startswith("/lfs-upload/"):  # presigned-style upload URL: no Hub token expected
            data_oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != data_oid:
                return 400, {}, {"error": "sha256 mismatch"}
            self.lfs[data_oid] = body
            return 200, {}, b""
        if path == "/api/agent-harnesses":  # fetched anonymously by huggingface_hub's agent detection
            return 404, {}, {"error": "not served by the stub"}
        if headers.get("authorization", headers.get("Authorization")) != f"Bearer {self.token}":
            return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}, {"error": "Invalid credentials"}
        if path == "/api/repos/create" and method == "POST":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        m = re.match(r"^/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m:
            return self._lfs_batch(json.loads(body))
        m = re.match(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        m = re.match(r"^/api/datasets/([^/]+/[^/]+)(?:/(tree|preupload|commit|revision|branch)/([^/]+)(/.*)?)?$", path)
        if not m:
            return 404, {}, {"error": f"stub does not serve {method} {path}"}
        repo_id, action, rev = m.group(1), m.group(2), unquote(m.group(3) or "main")
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if action == "branch":
            if rev in repo.branches:
                return 409, {}, {"error": "Branch already exists"}
            repo.branches[rev] = dict(repo.branches["main"])
            repo.heads[rev] = repo.heads["main"]
            return 200, {}, {}
        if rev not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": "Revision not found"}
        if action in (None, "revision"):
            return 200, {}, {"id": repo_id, "private": repo.private, "sha": repo.heads[rev], "siblings": []}
        if action == "tree":
            return 200, {}, self._tree(repo.branches[rev], unquote((m.group(4) or "").lstrip("/")), query)
        if action == "preupload":
            return 200, {}, self._preupload(repo.branches[rev], json.loads(body))
        return self._commit(repo, rev, body)

    def _create(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}"
        if payload.get("type") != "dataset":
            return 400, {}, {"error": "the stub serves dataset repos only"}
        if repo_id in self.repos:
            return 409, {}, {"error": "You already created this dataset repo", "url": f"{self.url}/datasets/{repo_id}"}
        attributes = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
        self.repos[repo_id] = Repo(id=repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")),
                                   branches={"main": {".gitattributes": attributes}}, heads={"main": "0" * 40})
        return 200, {}, {"url": f"{self.url}/datasets/{repo_id}"}

    def _entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            entry.update(oid=git_blob_id(pointer), lfs={"oid": sha, "size": len(data), "pointerSize": len(pointer)})
        return entry

    def _tree(self, files: dict[str, bytes], prefix: str, query: dict) -> list[dict]:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = f"{prefix}/" if prefix else ""
        out, folders = [], set()
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                folders.add(base + rest.split("/", 1)[0])
                if not recursive:
                    continue
            out.append(self._entry(path, files[path]))
        if recursive:  # every intermediate folder, like the Hub
            for path in files:
                parts = path[len(base):].split("/")[:-1] if path.startswith(base) else []
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
        return out + [{"type": "directory", "path": f, "oid": "f" * 40} for f in sorted(folders)]

    def _preupload(self, files: dict[str, bytes], payload: dict) -> dict:
        answer = []
        for item in payload["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES)
            current = files.get(item["path"])
            oid = None
            if current is not None:
                oid = hashlib.sha256(current).hexdigest() if lfs else git_blob_id(current)
            answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": answer}

    def _lfs_batch(self, payload: dict):
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def _commit(self, repo: Repo, branch: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        files = dict(repo.branches[branch])
        operations = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {}, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile":
                if value["path"] not in files:
                    return 404, {"X-Error-Code": "EntryNotFound"}, {"error": "A file with this name doesn't exist"}
                del files[value["path"]]
            else:
                return 400, {}, {"error": f"stub does not handle {key}"}
            operations.append({"key": key, **{k: v for k, v in value.items() if k != "content"}})
        oid = hashlib.sha1(f"{repo.heads[branch]}{len(repo.commits)}{body!r}".encode()).hexdigest()
        repo.branches[branch], repo.heads[branch] = files, oid
        repo.commits.append({"branch": branch, "summary": header["summary"], "operations": operations, "oid": oid})
        return 200, {}, {"commitUrl": f"{self.url}/datasets/{repo.id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _resolve(self, repo_id: str, rev: str, path: str):
        repo = self.repos.get(repo_id)
        if repo is None or rev not in repo.branches:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "not found"}
        data = repo.branches[rev].get(path)
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": "Entry not found"}
        headers = {"X-Repo-Commit": repo.heads[rev], "ETag": f'"{git_blob_id(data)}"', "Content-Type": "text/plain"}
        return 200, headers, data

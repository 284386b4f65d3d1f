"""A small Hugging Face Hub-compatible HTTP server for tests (127.0.0.1 only).

It answers the calls ``huggingface_hub`` makes to create a repo, upload a folder
(regular, base64 NDJSON commits: the preupload step always answers "regular",
so no LFS/Xet storage is involved) and download it again (repo info, tree
listing, resolve with HEAD/GET), keeping repos in memory.  It is bounded: it
binds to 127.0.0.1 only, refuses request bodies over ``max_body`` bytes, serves
at most ``max_requests`` requests and shuts itself down after ``lifetime``
seconds even if a test forgets to stop it.

    with HubServer(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url}   # give this to a subprocess (read at import)
        ...
        hub.files("user/repo")           # {path: bytes} at the head of main
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict  # path -> bytes, the whole tree at this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]


_REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubServer:
    def __init__(self, token: Optional[str] = None, *, lifetime: float = 120.0, max_requests: int = 500,
                 max_body: int = 16 * 1024 * 1024):
        self.token = token
        self.lifetime = lifetime
        self.max_requests = max_requests
        self.max_body = max_body
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopping = self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopping:
                return
            self._stopping = True
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._stopped = True  # only once the socket is closed: nothing can connect any more

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str) -> dict:
        with self.lock:
            return dict(self.repos[repo_id].head.files)

    # -- request handling --------------------------------------------------------------
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._dispatch(self, "GET")

            def do_HEAD(self):
                server._dispatch(self, "HEAD")

            def do_POST(self):
                server._dispatch(self, "POST")

        return Handler

    def _send(self, h, status: int, body: bytes = b"", headers: Optional[dict] = None,
              content_type: str = "application/json", head: bool = False) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, status: int, payload, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(h, status, json.dumps(payload).encode(), headers, head=head)

    def _error(self, h, status: int, message: str, code: Optional[str] = None,
               headers: Optional[dict] = None, head: bool = False, body: Optional[dict] = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(h, status, {"error": message, **(body or {})}, extra, head=head)

    def _authorized(self, h) -> bool:
        return self.token is None or h.headers.get("Authorization") == f"Bearer {self.token}"

    def _dispatch(self, h, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        with self.lock:
            self.log.append((method, h.path))
            over = len(self.log) > self.max_requests
        length = int(h.headers.get("Content-Length") or 0)
        if over:
            self._error(h, 503, "test hub server: request limit reached")
            threading.Thread(target=self.stop, daemon=True).start()
            return
        if length > self.max_body:
            h.close_connection = True
            self._error(h, 413, f"request body over {self.max_body} bytes")
            return
        body = h.rfile.read(length) if length else b""
        try:
            self._route(h, method, path, body)
        except Exception as err:  # a bug in a test must show up as a 500, not a hang
            self._error(h, 500, f"test hub server error: {err!r}")

    def _route(self, h, method: str, path: str, body: bytes) -> None:
        head = method == "HEAD"
        if method == "GET" and path == "/api/whoami-v2":
            if not self._authorized(h) or self.token is None:
                return self._error(h, 401, "Invalid credentials in Authorization header")
            return self._json(h, 200, {"type": "user", "name": "tester", "orgs": [],
                                       "auth": {"type": "access_token",
                                                "accessToken": {"displayName": "test", "role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(h, json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(h, json.loads(body or b"{}"))
        m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path)
        if method == "POST" and m:
            return self._preupload(h, m["repo"], json.loads(body or b"{}"))
        m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path)
        if method == "POST" and m:
            return self._commit(h, m["repo"], m["rev"], body)
        m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if method == "GET" and m:
            return self._repo_info(h, m["repo"], m["rev"] or "main")
        m = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
        if method == "GET" and m:
            return self._tree(h, m["repo"], m["rev"], m["sub"] or "")
        m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if method in ("GET", "HEAD") and m:
            return self._resolve(h, m["repo"], m["rev"], m["file"], head)
        return self._error(h, 404, f"test hub server: no route for {method} {path}", head=head)

    # -- repos ----------------------------------------------------------------------------
    def _find(self, h, repo_id: str, rev: str, head: bool = False) -> Optional[Commit]:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(h)):
            self._error(h, 404, f"Repository {repo_id} not found", "RepoNotFound", head=head)
            return None
        if rev in ("main", repo.head.oid):
            return repo.head
        for commit in repo.commits:
            if commit.oid == rev:
                return commit
        self._error(h, 404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
        return None

    def _create_repo(self, h, payload: dict) -> None:
        if not self._authorized(h):
            return self._error(h, 401, "Invalid credentials in Authorization header")
        if payload.get("type", "model") != "model":
            return self._error(h, 400, "test hub server: model repos only")
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        with self.lock:
            if repo_id in self.repos:
                # Like the real Hub, the conflict names the existing repo's url: create_repo(exist_ok=True)
                # reads it and a second push to one repo goes on to commit.
                return self._error(h, 409, "You already created this model repo",
                                   headers={"X-Repo-Url": f"{self.url}/{repo_id}"},
                                   body={"url": f"{self.url}/{repo_id}"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.commits.append(Commit(hashlib.sha1(f"{repo_id}/init".encode()).hexdigest(),
                                       "initial commit", {}))
            self.repos[repo_id] = repo
        self._json(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, h, payload: dict) -> None:
        content = payload.get("content", "")
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match is None:
            errors.append({"message": "README.md has no YAML metadata block"})
        else:
            try:
                meta = yaml.safe_load(match.group(1))
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        self._json(h, 400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, h, repo_id: str, payload: dict) -> None:
        if not self._authorized(h):
            return self._error(h, 401, "Invalid credentials in Authorization header")
        commit = self._find(h, repo_id, "main")
        if commit is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_oid(commit.files[f["path"]]) if f["path"] in commit.files else None}
                 for f in payload.get("files", [])]
        self._json(h, 200, {"files": files, "commitOid": commit.oid})

    def _commit(self, h, repo_id: str, rev: str, body: bytes) -> None:
        if not self._authorized(h):
            return self._error(h, 401, "Invalid credentials in Authorization header")
        if rev != "main":
            return self._error(h, 400, "test hub server: commits to main only")
        with self.lock:
            repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, f"Repository {repo_id} not found", "RepoNotFound")
        files = dict(repo.head.files)
        summary = ""
        for line in body.decode("utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(h, 400, "test hub server: base64 file contents only")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(h, 400, f"test hub server: unsupported commit operation {key!r}")
        digest = hashlib.sha1(repo.head.oid.encode() + summary.encode() + repr(sorted(
            (p, git_blob_oid(d)) for p, d in files.items())).encode() + str(time.time_ns()).encode())
        commit = Commit(digest.hexdigest(), summary, files)
        with self.lock:
            repo.commits.append(commit)
        self._json(h, 200, {"success": True, "commitOid": commit.oid,
                            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
                            "pullRequestUrl": None})

    def _repo_info(self, h, repo_id: str, rev: str) -> None:
        commit = self._find(h, repo_id, rev)
        if commit is None:
            return
        repo = self.repos[repo_id]
        self._json(h, 200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                            "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": [],
                            "library_name": "timm_fslt"})

    def _tree(self, h, repo_id: str, rev: str, sub: str) -> None:
        commit = self._find(h, repo_id, rev)
        if commit is None:
            return
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_oid(d)}
                   for p, d in sorted(commit.files.items()) if p.startswith(prefix)]
        self._json(h, 200, entries)

    def _resolve(self, h, repo_id: str, rev: str, filename: str, head: bool) -> None:
        commit = self._find(h, repo_id, rev, head=head)
        if commit is None:
            return
        data = commit.files.get(filename)
        if data is None:
            return self._error(h, 404, f"Entry not found: {filename}", "EntryNotFound",
                               headers={"X-Repo-Commit": commit.oid}, head=head)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, start = 200, 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if ranged and int(ranged.group(1)) < len(data):
            status, start = 206, int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(h, status, data[start:], headers, content_type="application/octet-stream", head=head)


# -- a client of this server in a subprocess ----------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def hub_env(hub: HubServer, hf_home, offline: bool = False) -> dict:
    """The environment of a huggingface_hub client that talks to ``hub`` only, with its own cache."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", OUTDATED_IGNORE="1")
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        env.pop(key, None)
    return env


def run_python(args, env: dict) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root; fails the test (with its output) unless it exits 0."""
    run = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run

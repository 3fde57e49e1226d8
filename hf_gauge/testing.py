"""A tiny in-memory Hub-compatible HTTP server (stdlib only, 127.0.0.1), for tests and offline notebooks.

``with local_hub() as hub:`` points the real ``huggingface_hub`` client at it (``push_to_hub``, ``list_gauges``,
``Gauge.from_pretrained``, ``hf_hub_download``: endpoint, URL template and a throw-away cache), and restores the
client's settings on exit. Nothing leaves the machine; the repositories live in ``hub.repos`` until the block ends.

It speaks the subset of the Hub API that the real client uses to create repos, commit regular and LFS files, open
pull requests (``create_pr``), create branches, list trees, read repo info and resolve/download files. Every
request is logged in ``HubServer.log`` as ``(method, path)``.

LFS as on the Hub: ``preupload`` answers ``uploadMode: "lfs"`` for paths the repo's ``.gitattributes`` marks
``filter=lfs`` (``*.safetensors`` in a new repo), the client asks ``/{repo}.git/info/lfs/objects/batch`` where to
upload, PUTs the bytes (basic transfer; the sha256 is checked) and commits an ``lfsFile`` pointer. The Hub's Xet
transfer is not spoken: while the server runs, ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` is set so the client
uses the LFS protocol (restored on exit).
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)           # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    private: bool = False
    lfs: dict[str, set[str]] = field(default_factory=dict)           # commit sha -> paths stored through LFS

    def is_lfs_path(self, rev_sha: str | None, path: str) -> bool:
        """Does the tree's ``.gitattributes`` route ``path`` through LFS (``pattern filter=lfs``)?"""
        attrs = self.commits.get(rev_sha, {}).get(".gitattributes", b"").decode(errors="replace") if rev_sha else ""
        pats = [ln.split()[0] for ln in attrs.splitlines() if "filter=lfs" in ln and ln.split()]
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) or fnmatch.fnmatch(path, p) for p in pats)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.commits:
            return rev
        return None


class HubServer:
    """``with HubServer() as hub: HfApi(endpoint=hub.url)...``; ``hub.repos`` holds the state."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail_paths: set[str] = set()   # requests whose path contains one of these answer 500 (fault injection)
        self.auth: list[str | None] = []          # the Authorization header of every request (in log order)
        self.lfs_objects: dict[str, bytes] = {}   # sha256 hex -> content uploaded through the LFS batch API
        self.pull_requests: dict[str, list[str]] = {}  # repo_id -> PR refs ("refs/pr/1", ...)
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        import huggingface_hub.constants as hc
        self._xet = hc.HF_HUB_DISABLE_XET
        hc.HF_HUB_DISABLE_XET = True          # this server speaks LFS basic transfer, not Xet
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import huggingface_hub.constants as hc
        hc.HF_HUB_DISABLE_XET = self._xet
        self.httpd.shutdown()
        self.httpd.server_close()

    def lfs_paths(self, repo_id: str, rev: str = "main") -> list[str]:
        """Paths of ``rev`` whose content was committed as an LFS pointer."""
        repo = self.repos[repo_id]
        return sorted(p for p in repo.commits[repo.resolve(rev)] if p in repo.lfs.get(repo.resolve(rev), set()))

    # ------------------------------------------------------------------ state helpers (used by tests)
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent]) if parent else {}
            tree.update(files)
            sha = hashlib.sha1(f"{parent}{message}{time.time_ns()}{sorted(tree)}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            return sha


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:   # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, msg: str, code: str | None = None, head: bool = False,
               headers: dict[str, str] | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = msg
        self._send(status, json.dumps({"error": msg}).encode(), h, head=head)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.hub.lock:
            self.hub.log.append((method, path))
            self.hub.auth.append(self.headers.get("Authorization"))
        if any(p in path for p in self.hub.fail_paths):
            self._error(500, "injected failure")
            return
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
            elif method == "PUT" and parts[:1] == ["lfs-upload"] and len(parts) == 2:
                self._lfs_put(parts[1])
            elif parts[:1] == ["api"]:
                self._api(method, parts[1:], query)
            elif "resolve" in parts[1:3]:
                self._resolve(method, parts)
            else:
                self._error(404, f"unknown route {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # ------------------------------------------------------------------ LFS (basic transfer)
    def _lfs_batch(self, repo_id: str) -> None:
        body = json.loads(self._body() or b"{}")
        if repo_id not in self.hub.repos:
            self._error(404, "Repository not found", "RepoNotFound")
            return
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            self._error(400, "this test server supports LFS uploads with the basic transfer only")
            return
        objects = []
        for o in body.get("objects", []):
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}", "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "uploaded content does not match its sha256 oid")
            return
        with self.hub.lock:
            self.hub.lfs_objects[oid] = data
        self._send(200)

    # ------------------------------------------------------------------ /api/...
    def _repo(self, parts: list[str]) -> tuple[str, Repo | None, list[str]]:
        # /api/models/{ns}/{name}/<action>/...
        repo_id = "/".join(parts[1:3])
        return repo_id, self.hub.repos.get(repo_id), parts[3:]

    def _api(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        hub = self.hub
        if method == "POST" and parts == ["repos", "create"]:
            body = json.loads(self._body() or b"{}")
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if "/" not in repo_id:
                repo_id = f"user/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:   # like the Hub: 409 whose body still carries the url
                    self._send(409, json.dumps({"error": "You already created this model repo",
                                                "url": f"{hub.url}/{repo_id}"}).encode(),
                               {"X-Error-Message": "You already created this model repo"})
                    return
                repo = Repo(private=bool(body.get("private")))
                sha = hashlib.sha1(f"init {repo_id} {time.time_ns()}".encode()).hexdigest()
                repo.commits[sha] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                repo.branches["main"] = sha
                hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            return
        if method == "POST" and parts == ["validate-yaml"]:
            self._body()
            self._json(200, {"errors": [], "warnings": []})
            return
        if len(parts) == 3 and parts[0] == "models" and method == "GET":    # model_info without a revision
            parts = parts + ["revision", "main"]
        if not parts or parts[0] != "models" or len(parts) < 4:
            self._error(404, f"unknown api route {'/'.join(parts)}")
            return
        repo_id, repo, rest = self._repo(parts)
        if repo is None:
            self._body()
            self._error(404, "Repository not found", "RepoNotFound")
            return
        action, args = rest[0], rest[1:]
        rev = "/".join(args) if args else "main"
        if action == "preupload" and method == "POST":
            body = json.loads(self._body())
            files = []
            sha = repo.resolve(rev)
            tree = repo.commits.get(sha, {}) if sha else {}
            for f in body["files"]:
                old = tree.get(f["path"])
                mode = "lfs" if repo.is_lfs_path(sha, f["path"]) else "regular"
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                              "oid": _git_blob_sha(old) if old is not None else None})
            self._json(200, {"files": files, "commitOid": sha})
            return
        if action == "commit" and method == "POST":
            lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            if rev not in repo.branches:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return
            pr_url = None
            if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
                refs = hub.pull_requests.setdefault(repo_id, [])
                num = len(refs) + 1
                refs.append(f"refs/pr/{num}")
                repo.branches[refs[-1]] = repo.branches[rev]
                rev, pr_url = refs[-1], f"{hub.url}/{repo_id}/discussions/{num}"
            elif header.get("parentCommit") and header["parentCommit"] != repo.branches[rev]:
                self._error(412, "parent commit is not the head of the branch")
                return
            with hub.lock:
                tree = dict(repo.commits[repo.branches[rev]])
                lfs = {p for p in repo.lfs.get(repo.branches[rev], set()) if p in tree}
                for x in lines:
                    v = x["value"]
                    if x["key"] == "file":
                        tree[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" \
                            else v["content"].encode()
                        lfs.discard(v["path"])
                    elif x["key"] == "lfsFile":
                        data = hub.lfs_objects.get(v.get("oid", ""))
                        if data is None or len(data) != v.get("size"):
                            self._error(400, f"LFS object {v.get('oid')} of {v['path']} was never uploaded")
                            return
                        tree[v["path"]] = data
                        lfs.add(v["path"])
                    elif x["key"] == "deletedFile":
                        tree.pop(v["path"], None)
                    elif x["key"] == "deletedFolder":
                        for k in [k for k in tree if k.startswith(v["path"].rstrip("/") + "/")]:
                            tree.pop(k)
                    elif x["key"] != "header":
                        self._error(400, f"unsupported commit operation {x['key']} (this test server only "
                                         "accepts regular files)")
                        return
                sha = hashlib.sha1(f"{header.get('summary')}{time.time_ns()}{sorted(tree)}".encode()).hexdigest()
                repo.commits[sha] = tree
                repo.lfs[sha] = lfs
                repo.branches[rev] = sha
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "success": True, "pullRequestUrl": pr_url})
            return
        if action == "branch" and method == "POST":
            body = json.loads(self._body() or b"{}")
            start = repo.resolve(body.get("startingPoint") or "main")
            if rev in repo.branches:
                self._error(409, f"Reference already exists: {rev}")
                return
            if start is None:
                self._error(404, "Invalid starting point", "RevisionNotFound")
                return
            repo.branches[rev] = start
            self._json(200, {})
            return
        if action in ("revision", "tree") and method == "GET":
            if action == "tree":
                rev, prefix = args[0], "/".join(args[1:])
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return
            tree = repo.commits[sha]
            if action == "revision":
                info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(tree)]}
                readme = tree.get("README.md", b"").decode(errors="replace")
                if readme.startswith("---\n") and "\n---" in readme[4:]:             # the card's YAML, as cardData
                    import yaml
                    info["cardData"] = yaml.safe_load(readme[4:readme.index("\n---", 4)]) or {}
                self._json(200, info)
                return
            entries = [{"type": "file", "path": p, "size": len(c), "oid": _git_blob_sha(c)}
                       for p, c in sorted(tree.items()) if not prefix or p.startswith(prefix.rstrip("/") + "/")]
            self._json(200, entries)
            return
        self._body()
        self._error(404, f"unknown api route {'/'.join(parts)}")

    # ------------------------------------------------------------------ /{repo}/resolve/{rev}/{path}
    def _resolve(self, method: str, parts: list[str]) -> None:
        head = method == "HEAD"
        k = parts.index("resolve")
        repo_id, rev, fpath = "/".join(parts[:k]), parts[k + 1], "/".join(parts[k + 2:])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
            return
        data = repo.commits[sha].get(fpath)
        if data is None:
            self._error(404, "Entry not found", "EntryNotFound", head=head, headers={"X-Repo-Commit": sha})
            return
        lfs = {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))} \
            if fpath in repo.lfs.get(sha, set()) else {}
        self._send(200, data, {**lfs, "X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(data)}"',
                               "Content-Disposition": f"attachment; filename={quote(fpath.split('/')[-1])}"},
                   content_type="application/octet-stream", head=head)


@contextmanager
def local_hub(cache_dir: str | None = None) -> Iterator[HubServer]:
    """Start a ``HubServer`` and point ``huggingface_hub`` at it for the block: ``constants.ENDPOINT`` (what
    ``HF_ENDPOINT`` sets), the resolve URL template, and the download cache (``cache_dir``, else a temporary folder
    removed on exit). Offline mode (``HF_HUB_OFFLINE=1``) is lifted for the block: the server is on this machine.
    The previous settings come back on exit, also after an error."""
    import huggingface_hub.constants as hc

    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
    saved = {n: getattr(hc, n) for n in names}
    with tempfile.TemporaryDirectory(prefix="hf_gauge_local_hub_") as tmp, HubServer() as hub:
        hc.HF_HUB_OFFLINE = False
        hc.ENDPOINT = hub.url
        hc.HUGGINGFACE_CO_URL_TEMPLATE = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        hc.HF_HUB_CACHE = cache_dir or tmp
        try:
            yield hub
        finally:
            for n, v in saved.items():
                setattr(hc, n, v)

"""A small Hugging Face Hub on 127.0.0.1 for upload tests: a real HTTP server, no network, no mocks.

It speaks the endpoints huggingface_hub 2.4 calls for `create_repo(exist_ok=True)` + `create_branch` +
`upload_folder` with Xet disabled (read from its source): repository creation and info, README metadata validation,
branch creation, preupload (it answers "lfs" for *.safetensors like the Hub's .gitattributes, "regular" otherwise),
the git-LFS batch API with a basic single-part PUT (as to a presigned storage URL, no auth) and verify, and the
NDJSON commit (base64 file lines, lfsFile lines resolved from the LFS store). Tokens are checked like the Hub does:
unknown -> 401, read-only token writing -> 403. Every request is recorded for the tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+?)"
TOKEN = "hf_growkitTestToken0123456789abcdef"  # write access on every LocalHub the tests start
READ_TOKEN = "hf_readOnlyToken0123456789abcdefgh"  # read-only: writes get 403
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class LocalHub:
    """Start with `with LocalHub(tokens={"tok": "write"}) as hub:`; `hub.endpoint` is the base URL."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})  # token -> "write" | "read"
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.fail_commit: tuple[int, str] | None = None  # (status, message; "{auth}" is replaced by the header)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[branch])

    def paths(self) -> list[str]:
        """'METHOD path' of every request, in order (query strings dropped)."""
        return [f"{r.method} {urlparse(r.path).path}" for r in self.requests]

    # --- request handling -------------------------------------------------------------------------------------
    def handle(self, req: Request) -> tuple[int, dict, dict[str, str]]:
        path = unquote(urlparse(req.path).path)
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>.+))?", self._info),
            ("POST", rf"/api/models/{REPO}/branch/(?P<rev>.+)", self._branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>.+)", self._commit),
        ]
        for method, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and method == req.method:
                if fn != self._lfs_put:  # storage URLs are presigned: no token, like S3
                    denied = self._auth(req, write=req.method != "GET")
                    if denied:
                        return denied
                with self._lock:
                    return fn(req, **m.groupdict())
        self.unhandled.append(f"{req.method} {path}")
        return 404, {"error": f"not implemented by LocalHub: {req.method} {path}"}, {}

    def _auth(self, req: Request, write: bool) -> tuple[int, dict, dict[str, str]] | None:
        header = req.headers.get("authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
        if token not in self.tokens:
            msg = "Invalid credentials in Authorization header"
            return 401, {"error": msg}, {"X-Error-Message": msg}
        if write and self.tokens[token] != "write":
            return 403, {"error": "You don't have the rights to create a model under this namespace"}, {}
        return None

    def _create(self, req: Request) -> tuple[int, dict, dict[str, str]]:
        body = json.loads(req.body)
        repo_id = f"{body['organization']}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}

    def _info(self, req: Request, repo: str, rev: str | None = None) -> tuple[int, dict, dict[str, str]]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        r = self.repos[repo]
        sha = r.commits[-1]["oid"] if r.commits else "0" * 40
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": []}, {}

    def _validate_yaml(self, req: Request) -> tuple[int, dict, dict[str, str]]:
        content = json.loads(req.body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if m is not None and not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": [] if meta else [{"message": "empty or missing yaml metadata"}]}, {}

    def _branch(self, req: Request, repo: str, rev: str) -> tuple[int, dict, dict[str, str]]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        branches = self.repos[repo].branches
        if rev in branches:
            return 409, {"error": f"Reference already exists: refs/heads/{rev}"}, {}
        branches[rev] = dict(branches["main"])
        return 200, {}, {}

    def _preupload(self, req: Request, repo: str, rev: str) -> tuple[int, dict, dict[str, str]]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = json.loads(req.body)["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
             "shouldIgnore": False, "oid": None}
            for f in files
        ]
        return 200, {"files": modes, "commitOid": "0" * 40}, {}

    def _lfs_batch(self, req: Request, repo: str) -> tuple[int, dict, dict[str, str]]:
        body = json.loads(req.body)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-storage/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, req: Request, oid: str) -> tuple[int, dict, dict[str, str]]:
        if hashlib.sha256(req.body).hexdigest() != oid:
            return 400, {"error": "content does not match its sha256"}, {}
        self.lfs[oid] = req.body
        return 200, {}, {}

    def _lfs_verify(self, req: Request, repo: str) -> tuple[int, dict, dict[str, str]]:
        body = json.loads(req.body)
        ok = body["oid"] in self.lfs and len(self.lfs[body["oid"]]) == body["size"]
        return (200, {}, {}) if ok else (404, {"error": "object not found"}, {})

    def _commit(self, req: Request, repo: str, rev: str) -> tuple[int, dict, dict[str, str]]:
        if self.fail_commit is not None:
            status, message = self.fail_commit
            return status, {"error": message.replace("{auth}", req.headers.get("authorization", ""))}, {}
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        r = self.repos[repo]
        if rev not in r.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "first NDJSON line must be the header"}, {}
        staged = dict(r.branches[rev])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": "only base64 file content"}, {}
                staged[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                blob = self.lfs.get(value["oid"])
                if blob is None or len(blob) != value["size"]:
                    return 400, {"error": f"LFS object {value['oid']} was not uploaded"}, {}
                staged[value["path"]] = blob
            elif line["key"] == "deletedFile":
                staged.pop(value["path"], None)
            else:
                return 400, {"error": f"unsupported NDJSON key {line['key']}"}, {}
        oid = hashlib.sha1(req.body).hexdigest()
        r.branches[rev] = staged
        r.commits.append({"oid": oid, "branch": rev, "summary": lines[0]["value"]["summary"]})
        url = f"{self.endpoint}/{repo}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}, {}


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self._read_body()
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            hub.requests.append(req)
            status, payload, headers = hub.handle(req)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    return Handler

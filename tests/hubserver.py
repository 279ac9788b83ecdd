"""A stand-in Hugging Face Hub on 127.0.0.1, for testing downloads offline through huggingface_hub itself.

It answers the few endpoints `snapshot_download` and `hf_hub_download` call for a model repository:

- `GET /api/models/{repo}[/revision/{rev}]`: the repo's info (`sha` = the commit, `siblings` = its files);
- `GET /api/models/{repo}/tree/{rev}`: the file list, for clients that do not trust `siblings`;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: a small (git) file is served directly with its git blob id as `ETag`;
  a `*.safetensors` file, like an LFS file on the real Hub, is a 302 to `/cdn/{sha256}` with `X-Linked-Etag` and
  `X-Linked-Size`. Every answer carries `X-Repo-Commit`; `Range: bytes=N-[M]` gets a 206 (resumed downloads);
- errors as the Hub gives them: 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound.

Faults are injected per file name: `server.cut[name] = n` sends the full `Content-Length` but only n bytes, then
closes the connection, until the entry is removed. Every request is logged in `server.log` as (method, path).

The server binds 127.0.0.1 only, speaks HTTP/1.0 (one request per connection, so no idle connection outlives a
test), gives each connection a 5 s socket timeout and reads no request bodies; `close()` stops it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_LFS = (".safetensors", ".bin")  # stored in LFS on the real Hub: served through a redirect, like its CDN
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/.*)?)?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class _Repo:
    """One repository's files at one commit, with the ids the Hub derives from them."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.sha256 = {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()}
        self.blob = {n: hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest() for n, b in self.files.items()}
        listing = json.dumps(sorted(self.sha256.items())).encode()
        self.commit = hashlib.sha1(listing).hexdigest()  # 40 hex digits, like a git commit id

    def has_revision(self, rev: str) -> bool:
        return rev in ("main", self.commit)

    def info(self, repo_id: str) -> dict:
        siblings = [{"rfilename": n, "size": len(b), "blobId": self.blob[n],
                     **({"lfs": {"sha256": self.sha256[n], "size": len(b), "pointerSize": 134}}
                        if n.endswith(_LFS) else {})}
                    for n, b in sorted(self.files.items())]
        return {"_id": self.commit[:24], "id": repo_id, "modelId": repo_id, "sha": self.commit, "private": False,
                "gated": False, "disabled": False, "tags": [], "siblings": siblings}

    def tree(self) -> list[dict]:
        return [{"type": "file", "path": n, "size": len(b), "oid": self.blob[n],
                 **({"lfs": {"oid": self.sha256[n], "size": len(b), "pointerSize": 134}} if n.endswith(_LFS) else {})}
                for n, b in sorted(self.files.items())]


class HubServer:
    """`endpoint = HubServer().serve({"org/name": {"config.json": b"...", ...}})`; `close()` when done."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, repos: dict[str, dict[str, bytes]]) -> str:
        """Serve these repositories (replacing any served before) and return the endpoint URL for HF_ENDPOINT."""
        self.repos = {repo_id: _Repo(files) for repo_id, files in repos.items()}
        if self._httpd is None:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
            self._httpd.daemon_threads = True
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="hubserver", daemon=True)
            self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo_id: str) -> str:
        return self.repos[repo_id].commit

    def downloads(self) -> list[str]:
        """Paths of the GET requests that asked for a file's bytes (resolve or CDN), in order."""
        return [p for m, p in self.log if m == "GET" and ("/resolve/" in p or p.startswith("/cdn/"))]

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    server_hub: HubServer
    timeout = 5  # seconds a connection may sit idle before it is dropped
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # quiet: requests are kept in hub.log instead
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body: bool) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        hub.log.append((self.command, path))
        if m := _API.match(path):
            return self._api(m["repo"], m["kind"], unquote(m["rev"] or "main"), body)
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]), body)
        if m := _CDN.match(path):
            for repo in hub.repos.values():
                for name, sha in repo.sha256.items():
                    if sha == m["sha"]:  # 1.x follows a same-host redirect with its HEAD: the ETag is read here
                        return self._file(repo, name, {"ETag": f'"{sha}"'}, body)
        self._error(404, "EntryNotFound", f"{path}: not found", body=body)

    def _api(self, repo_id: str, kind: str | None, rev: str, body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is not None:
            self._json(repo.tree() if kind == "tree" else repo.info(repo_id), body)

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {rev}", body, repo.commit)
        if name.endswith(_LFS):  # the Hub answers with its CDN's address; clients HEAD here, then GET there
            host, port = self.server.server_address[:2]
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{port}/cdn/{repo.sha256[name]}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{repo.sha256[name]}"')
            self.send_header("X-Linked-Size", str(len(repo.files[name])))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._file(repo, name, {"ETag": f'"{repo.blob[name]}"'}, body)

    def _file(self, repo: _Repo, name: str, headers: dict[str, str], body: bool) -> None:
        data = repo.files[name]
        span = _byte_range(self.headers.get("Range"), len(data))
        part = data[span[0]: span[1] + 1] if span else data
        self.send_response(206 if span else 200)
        if span:
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1]}/{len(data)}")
        for k, v in {**headers, "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                     "Content-Type": "application/octet-stream", "Content-Length": str(len(part))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(part[: self.server_hub.cut.get(name, len(part))])
            self.wfile.flush()
        self.close_connection = True

    def _repo(self, repo_id: str, rev: str, body: bool) -> _Repo | None:
        """The repository, or None after answering 404 the way the Hub does."""
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if not repo.has_revision(rev):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            return None
        return repo

    def _json(self, obj, body: bool) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte asked for by `Range: bytes=N-` or `bytes=N-M`; None (send it all) when absent or odd."""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
    if m is None or int(m[1]) >= size:
        return None
    return int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1


# ------------------------------------------------------------------------------ pointing huggingface_hub at it

def use_hub(monkeypatch, endpoint: str, home) -> None:
    """Point huggingface_hub at `endpoint`, with HF_HOME (cache, token) under `home`, online.

    Sets the environment a user would (for code that reads it later, and subprocesses) and, because
    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once at import, the module constants too.
    """
    from huggingface_hub import constants, file_download

    hub_cache = f"{home}/hub"
    for k, v in {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": hub_cache,
                 "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(k, raising=False)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    patches = {constants: {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HOME": str(home),
                           "HF_HUB_CACHE": hub_cache, "HUGGINGFACE_HUB_CACHE": hub_cache,
                           "HF_TOKEN_PATH": f"{home}/token", "HF_STORED_TOKENS_PATH": f"{home}/stored_tokens",
                           "HF_HUB_ENABLE_HF_TRANSFER": False},
               file_download: {"HUGGINGFACE_CO_URL_TEMPLATE": template}}  # imported by name there
    for module, values in patches.items():
        for name, value in values.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    set_offline(monkeypatch, False)


def set_offline(monkeypatch, offline: bool) -> None:
    """HF_HUB_OFFLINE as a user sets it, applied to the already-imported library (and its cached sessions)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    reset_sessions()


def reset_sessions() -> None:
    """Drop huggingface_hub's cached HTTP sessions: 0.x builds them once per thread, offline or not."""
    from huggingface_hub import utils

    for name in ("reset_sessions", "close_session"):  # 0.x, 1.x
        if hasattr(utils, name):
            getattr(utils, name)()

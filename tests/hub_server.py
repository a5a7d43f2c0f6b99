"""
A local HTTP server that answers the Hugging Face Hub's read API for model repositories, so that tests download
through huggingface_hub's real HTTP path (`HF_ENDPOINT` pointed at it) instead of a hand-built cache:

- `GET /api/models/<id>` and `/api/models/<id>/revision/<rev>`: the repository's info, with its commit and files;
- `GET /api/models/<id>/tree/<rev>[/<path>]`: the file listing `snapshot_download` reads;
- `HEAD` / `GET /<id>/resolve/<rev>/<path>`: a file's metadata headers and its bytes.

Repositories are `{path: bytes}` dicts, e.g. exactly the files that [`FakeHub`], the mock of the Hub's write calls,
received.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx2
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.errors import HfHubHTTPError

USER = "someone"
REVISION = "0123456789abcdef0123456789abcdef01234567"
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """Every file under `folder` as `{posix path: bytes}`."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class LocalHub:
    """
    Serves `repos` (`{"user/name": {path: bytes}}`, which may grow while it runs) on 127.0.0.1; `endpoint` is the URL
    to put in `HF_ENDPOINT`. Every request is recorded in `requests` as `(method, path)`.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None):
        self.repos = repos if repos is not None else {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, send_body=False)

            def do_GET(self):
                hub._answer(self, send_body=True)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def commit(files: dict[str, bytes]) -> str:
        """The repository's commit id: a hash of its content, so a changed repository is a new revision."""
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        return digest.hexdigest()

    def _answer(self, request: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path))
        for pattern, respond in ((_API, self._info), (_TREE, self._tree), (_RESOLVE, self._resolve)):
            match = pattern.match(path)
            if match:
                files = self.repos.get(match["repo"])
                if files is None:
                    return self._send(request, 404, b'{"error": "Repository not found"}', send_body,
                                      {"X-Error-Code": "RepoNotFound"})
                if match["rev"] not in (None, "main", self.commit(files)):
                    return self._send(request, 404, b'{"error": "Invalid rev id"}', send_body,
                                      {"X-Error-Code": "RevisionNotFound"})
                return respond(request, match, files, send_body)
        self._send(request, 404, b'{"error": "Not found"}', send_body)

    def _info(self, request, match, files, send_body) -> None:
        info = {
            "id": match["repo"],
            "modelId": match["repo"],
            "sha": self.commit(files),
            "private": False,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._send(request, 200, json.dumps(info).encode(), send_body)

    def _tree(self, request, match, files, send_body) -> None:
        prefix = f"{match['path'].rstrip('/')}/" if match["path"] else ""
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for name, content in sorted(files.items())
            if name.startswith(prefix)
        ]
        self._send(request, 200, json.dumps(entries).encode(), send_body)

    def _resolve(self, request, match, files, send_body) -> None:
        content = files.get(match["path"])
        commit = {"X-Repo-Commit": self.commit(files)}
        if content is None:
            return self._send(request, 404, b'{"error": "Entry not found"}', send_body,
                              {"X-Error-Code": "EntryNotFound", **commit})
        etag = f'"{hashlib.sha1(content).hexdigest()}"'
        self._send(request, 200, content, send_body, {"ETag": etag, **commit}, "application/octet-stream")

    @staticmethod
    def _send(request, status: int, body: bytes, send_body: bool, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        if send_body:
            request.wfile.write(body)


class FakeHub:
    """Records what reaches the Hub API's write calls; a token "bad" is refused like an expired one. Every commit's
    files land in `served` (`{repo_id: {path: bytes}}`), which a `LocalHub` can serve back."""

    def __init__(self):
        self.repos: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.whoami_tokens: list[str | None] = []
        self.served: dict[str, dict[str, bytes]] = {}

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def whoami(api, token=None):
            hub.whoami_tokens.append(token or api.token)
            if (token or api.token) == "bad":
                request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
                raise HfHubHTTPError("401 Unauthorized: invalid token", response=httpx2.Response(401, request=request))
            return {"name": USER}

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            repo_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"
            hub.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "token": token or api.token})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.branches.append((repo_id, branch))

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, create_pr=None, token=None,
                          **kwargs):
            files = {}
            for operation in operations:
                with open(operation.path_or_fileobj, "rb") as file:
                    files[operation.path_in_repo] = file.read()
            hub.commits.append(
                {"repo_id": repo_id, "files": files, "message": commit_message, "revision": revision,
                 "create_pr": create_pr, "token": token or api.token}
            )
            hub.served.setdefault(repo_id, {}).update(files)
            return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{REVISION}", commit_message, "", REVISION)

        for name, method in [("whoami", whoami), ("create_repo", create_repo), ("create_branch", create_branch),
                             ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, method)
        return self

    @property
    def pushed(self) -> dict[str, bytes]:
        assert len(self.commits) == 1, f"expected one commit, got {len(self.commits)}"
        return self.commits[0]["files"]

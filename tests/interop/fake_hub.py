"""A stand-in for the Hugging Face Hub: the endpoints `huggingface_hub` calls to download a model,
served on 127.0.0.1 from memory by a thread of the test process (no test touches the internet).

- GET  /api/models/ORG/NAME[/revision/REV] model info: `sha` (the commit) and `siblings` (the files)
- GET  /api/models/ORG/NAME/tree/REV      the file listing that `snapshot_download` reads
- HEAD /ORG/NAME/resolve/REV/FILE          ETag, X-Repo-Commit, Content-Length (file metadata)
- GET  /ORG/NAME/resolve/REV/FILE          the bytes

Unknown repositories, revisions and files get 404 with the `X-Error-Code` the Hub sends
(RepoNotFound, RevisionNotFound, EntryNotFound), which `huggingface_hub` turns into its typed errors.
Every request is recorded (method, path, Authorization header) for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

MAIN = "main"


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0" * 40
    branches: tuple[str, ...] = (MAIN,)

    def __post_init__(self) -> None:
        digest = hashlib.sha1("\n".join(sorted(self.files)).encode() + b"".join(self.files.values()))
        self.commit = digest.hexdigest()

    def knows(self, revision: str) -> bool:
        return revision in self.branches or revision == self.commit


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add_folder(self, repo: str, folder: Path) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo] = Repo(files)
        return self.repos[repo]

    def downloads(self, name: str) -> int:
        """How many times the bytes of files named `name` were sent."""
        return sum(1 for method, path, _ in self.requests if method == "GET" and path.endswith("/" + name))

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                return

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.timeout = 10
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving (once; later calls do nothing): the port then refuses connections."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = None

    # -- answers -------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # model info of the default branch
            status, headers, data = self._api("/".join(parts[2:4]), "revision", MAIN)
        elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            status, headers, data = self._api(repo, kind, revision)
        elif len(parts) >= 5 and parts[2] == "resolve":
            status, headers, data = self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        else:
            status, headers, data = 404, {}, b"not found"
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _missing(self, repo: str, revision: str, file: str | None = None):
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        if not self.repos[repo].knows(revision):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}'
        if file is not None and file not in self.repos[repo].files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "Entry not found"}'
        return None

    def _api(self, repo: str, kind: str, revision: str):
        if missing := self._missing(repo, revision):
            return missing
        r = self.repos[repo]
        if kind == "revision":
            info = {"id": repo, "modelId": repo, "sha": r.commit, "siblings": [{"rfilename": f} for f in r.files]}
        else:
            info = [
                {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in r.files.items()
            ]
        return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()

    def _resolve(self, repo: str, revision: str, file: str):
        if missing := self._missing(repo, revision, file):
            return missing
        r = self.repos[repo]
        data = r.files[file]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": r.commit}
        return 200, headers, data

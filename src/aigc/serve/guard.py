"""ASGI middleware run before routing: which Host names are served, the API key, the body size cap.

Host check (against DNS rebinding): without an API key, any web page the user visits could point a
name it controls at 127.0.0.1 and drive the local server from the browser. Such requests carry the
attacker's name in `Host`, so without a key only loopback names and addresses (plus the bind address
and `--allowed-host` values) are served. With a key the key is the protection, and any Host is fine.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aigc.serve.api import ApiError

WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # binding to these says nothing about the names clients use


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def host_name(header: str) -> str:
    """The name or address of a Host header, without port, brackets or trailing dot, lower case."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:].partition("]")[0]
    if header.count(":") == 1:  # name:port or 1.2.3.4:port (a bare IPv6 address has several colons)
        header = header.partition(":")[0]
    return header.rstrip(".")


def is_loopback(name: str) -> bool:
    """localhost, *.localhost (RFC 6761 keeps them on this machine), 127.0.0.0/8 and ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostAllowList:
    """Which Host values are served: loopback always, then the given names ('*' = every name)."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(host_name(n) for n in names if n not in WILDCARD_HOSTS)
        self.any = "*" in self.names

    def __contains__(self, header: str) -> bool:
        name = host_name(header)
        return bool(name) and (self.any or name in self.names or is_loopback(name))


class Guard:
    """The Host allow-list (only when no API key is set), the API key on /v1 routes, and the request
    body size cap (checked on the declared length and on the bytes actually received, so chunked
    bodies count too)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, hosts: HostAllowList):
        self.app, self.api_key, self.max_body_bytes, self.hosts = (
            app,
            api_key,
            max_body_bytes,
            hosts,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._refusal(scope, headers)
        body, complete = b"", False
        declared = headers.get("content-length", "")
        if error is None and not (declared.isdigit() and int(declared) > self.max_body_bytes):
            body, complete = await _read_body(receive, self.max_body_bytes)
        if error is None and not complete:
            error = ApiError(
                413,
                f"request body is over {self.max_body_bytes} bytes (--max-body-bytes)",
                code="request_too_large",
            )
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        if not self.api_key and headers.get("host", "") not in self.hosts:
            return ApiError(
                403,
                f"Host {headers.get('host', '')!r} is not served: without an API key this server answers "
                "only loopback names (localhost, 127.0.0.1, ::1); start it with --allowed-host NAME or --api-key",
                type="permission_error",
                code="host_not_allowed",
            )
        if self.api_key and scope["path"].startswith("/v1") and not self._authorised(headers):
            return ApiError(
                401,
                "missing or invalid API key; send `Authorization: Bearer KEY`",
                code="invalid_api_key",
            )
        return None

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The whole request body, or (partial, False) once it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True  # client left; the app will notice on its own receive
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that first hands out the already-read body, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

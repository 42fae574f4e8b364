"""ASGI middleware around the app, outermost first:

    CountRequests  counts every response by endpoint and status code (401s and 400s below included);
    RequestIds     gives each request an id: its X-Request-Id header, else a fresh one; the response
                   carries it back in X-Request-Id, and handlers read it as `request.state.request_id`;
    ApiKey         with `--api-key`: every path but PUBLIC_PATHS needs `Authorization: Bearer <key>`
                   (401 otherwise), as vLLM guards every route but its probes, /version and /metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from kvforge.server.protocol import ApiError

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/chunks", "/v1/kv_events", "/health",
             "/metrics", "/tokenize", "/detokenize", "/version")
PUBLIC_PATHS = frozenset(("/health", "/version", "/metrics"))
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII


async def _refuse(scope, receive, send, err: ApiError) -> None:
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class CountRequests:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


class RequestIds:
    """A given X-Request-Id must be 1 to 256 visible ASCII characters (400 otherwise); a request
    without one gets a random hex id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id")
        if given is not None and not _REQUEST_ID.fullmatch(given):
            return await _refuse(scope, receive, send, ApiError(
                400, "the X-Request-Id header must be 1 to 256 visible ASCII characters", param="X-Request-Id"))
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKey:
    """The key is compared in constant time (as hashes of equal length, so not even its length leaks)."""

    def __init__(self, app, api_key: str):
        self.app, self._digest = app, hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        given = hashlib.sha256(token.encode("latin-1")).digest()
        if not (hmac.compare_digest(given, self._digest) and scheme.lower() == "bearer"):
            return await _refuse(scope, receive, send, ApiError(
                401, "a valid API key is required: send it as the header 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)

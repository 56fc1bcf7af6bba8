"""The one place exceptions become HTTP responses, OpenAI-shaped: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kiln.errors import KilnError, RetryLater

log = logging.getLogger(__name__)


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def kiln_error_response(exc: KilnError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    headers.update(getattr(exc, "headers", None) or {})
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.code, exc.param),
        status_code=exc.status_code,
        headers=headers,
    )


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _pattern(template: str) -> str:
    """/v1/jobs/{job_id} → a regex matching its paths (a parameter is one path segment)."""
    parts = re.split(r"(\{[^/}]+\})", template)
    return "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)


def allowed_methods(request: Request) -> str:
    """The methods served at this path. Starlette's 405 names only the first matching route's, and
    FastAPI makes a route per method (GET and POST /v1/jobs are two). The documented paths answer
    first, a fixed one before a template (/v1/images/generations, not /v1/images/{image_id}); the
    web UI's undocumented ones by what their routes match."""
    path = request.url.path
    documented = request.app.openapi().get("paths", {})
    templates = [path] if path in documented else [t for t in documented if re.fullmatch(_pattern(t), path)]
    if templates:
        return ", ".join(m.upper() for m in documented[templates[0]] if m.upper() in _METHODS)
    routes = request.app.router.routes
    return ", ".join(method for method in _METHODS if any(
        route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KilnError)
    async def _kiln(_: Request, exc: KilnError) -> JSONResponse:
        return kiln_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = _param_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if param:
            message = f"{message} (param: {param})"
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_value", param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 204:
            return Response(status_code=204)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code),
            status_code=exc.status_code,
            headers=headers or None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("The server had an error while processing your request.", "server_error",
                       "internal_error"),
            status_code=500,
        )

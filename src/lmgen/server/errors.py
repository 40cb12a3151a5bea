"""OpenAI-style error shaping for the server: every failure becomes ``{"error": {message, type, param, code}}``
with the right status, from request-body validation through engine admission to unexpected exceptions."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmgen.errors import ContextOverflowError, EngineClosedError, InvalidRequestError, QueueFullError
from lmgen.server.protocol.api_error import APIError

logger = logging.getLogger("lmgen.server")


def api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param=e.param or "prompt", code="context_length_exceeded")
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return APIError(503, str(e), type="server_unavailable", code="shutting_down")
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e))
    logger.error("internal error: %r", e, exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")


def error_response(e: BaseException) -> JSONResponse:
    err = api_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON body: {first['msg']}", None
    if not first["loc"]:
        return f"the request body must be a JSON object: {first['msg']}", None
    param = str(first["loc"][0])
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."  # never echo a huge value back
        parts.append(f"{loc}: {err['msg']}" + (f" (got {shown})" if err["type"] != "missing" and not isinstance(got, dict) else ""))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param


async def parse_body(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param) from None


def install_error_handlers(app: FastAPI) -> None:
    """Answers every error the app raises (or Starlette / FastAPI raise for it) in OpenAI's shape."""
    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind, code=e.status_code).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    async def _on_known(request: Request, e: Exception):
        return error_response(e)

    for exc in (ValueError, TypeError, QueueFullError, EngineClosedError):
        app.add_exception_handler(exc, _on_known)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, e: Exception):
        return error_response(e)

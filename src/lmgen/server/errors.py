"""OpenAI-style error shaping for the server: every failure becomes ``{"error": {message, type, param, code}}``
with the right status, from request-body validation through engine admission to unexpected exceptions."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmgen.errors import ContextOverflowError, InvalidRequestError
from lmgen.server import protocol as P
from lmgen.server.async_engine import EngineClosedError, QueueFullError

logger = logging.getLogger("lmgen.server")


def _api_error(e: BaseException) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return P.APIError(400, str(e), param="messages" if "in the messages" in str(e) or "your messages" in str(e) else "prompt", code="context_length_exceeded")
    if isinstance(e, QueueFullError):
        return P.APIError(503, str(e), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return P.APIError(503, str(e), type="server_unavailable", code="shutting_down")
    if isinstance(e, InvalidRequestError):
        return P.APIError(400, str(e), param=e.param)
    if isinstance(e, (ValueError, TypeError)):
        return P.APIError(400, str(e), param=P.param_of(e) if isinstance(e, ValueError) else None)
    logger.error("internal error: %r", e, exc_info=e)
    return P.APIError(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _api_error(e)
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


async def _parse(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        message, param = _validation_message(e)
        raise P.APIError(400, message, param=param) from None


def install_error_handlers(app: FastAPI) -> None:
    """Answers every error the app raises (or Starlette / FastAPI raise for it) in OpenAI's shape."""
    @app.exception_handler(P.APIError)
    async def _on_api_error(request: Request, e: P.APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(P.APIError(e.status_code, str(e.detail), type=kind, code=e.status_code).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, e: RequestValidationError):
        return JSONResponse(P.APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    async def _on_known(request: Request, e: Exception):
        return _error_response(e)

    for exc in (ValueError, TypeError, QueueFullError, EngineClosedError):
        app.add_exception_handler(exc, _on_known)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, e: Exception):
        return _error_response(e)

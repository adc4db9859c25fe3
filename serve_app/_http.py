"""HTTP plumbing for the ingress: body-size cap and mapping of any exception to a client error."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serve_app.errors import ServeAppError


class BodyLimitMiddleware:
    """Refuse bodies over ``app.state.max_request_bytes`` with 413, before anything parses them.

    Checks Content-Length up front and counts chunked bodies as they arrive, so a client cannot
    make the replica buffer an unbounded body.
    """

    def __init__(self, app, default_max_bytes: int = 96 * 1024 * 1024):
        self.app = app
        self.default = default_max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        app_state = getattr(scope.get("app"), "state", None)
        limit = getattr(app_state, "max_request_bytes", None) or self.default
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return await _send_error(send, _too_large(limit))
                except ValueError:
                    return await _send_error(send, ServeAppError("invalid Content-Length", 400,
                                                                 "invalid_request"))
        seen = 0
        too_large = False

        async def limited_receive():
            nonlocal seen, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    too_large = True
                    raise _BodyTooLarge()
            return msg

        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, _too_large(limit))
        except Exception:
            if too_large and not started:
                await _send_error(send, _too_large(limit))
            else:
                raise


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> ServeAppError:
    return ServeAppError(f"request body is larger than {limit} bytes", 413, "request_too_large")


async def _send_error(send, err: ServeAppError) -> None:
    body = json.dumps(err.to_dict()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def read_image_payload(request, max_bytes: int) -> bytes | str:
    """One image from a request body: multipart (field ``file`` or ``image``), a raw ``image/*`` or
    ``application/octet-stream`` body, or JSON ``{"image": "data:...|https://...|image://..."}``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
        except Exception as e:
            raise ServeAppError(f"invalid multipart body: {e}", 400, "invalid_request") from None
        part = form.get("file") or form.get("image")
        if part is None:
            raise ServeAppError("multipart body needs a 'file' (or 'image') field", 400,
                                "invalid_request", "file")
        return await part.read() if hasattr(part, "read") else str(part)
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ServeAppError("request body is not valid JSON", 400, "invalid_request") from None
        image = body.get("image") if isinstance(body, dict) else None
        if not isinstance(image, str) or not image:
            raise ServeAppError('JSON body needs "image": a data URL, http(s) URL or image:// id',
                                400, "invalid_request", "image")
        return image
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await request.body()
    raise ServeAppError(f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data, "
                        "application/json or the raw image bytes", 415, "unsupported_media_type")


def client_error(exc: BaseException) -> ServeAppError:
    """The client-facing error for any exception, unwrapping Ray's task-error wrappers."""
    seen: set[int] = set()
    e: Any = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, ServeAppError):
            return cause if type(cause) is ServeAppError else ServeAppError(
                cause.message, cause.status, cause.code, cause.param)
        if type(e) is ServeAppError:
            return e
        name = type(e).__name__
        if name == "BackPressureError":   # the VLM's queue is full: its backpressure_config says how
            return ServeAppError("the service is overloaded; retry later",
                                 getattr(e, "status_code", None) or 429, "overloaded",
                                 retry_after_s=getattr(e, "retry_after_s", None))
        if name in ("DeploymentUnavailableError", "ActorDiedError", "ActorUnavailableError"):
            return ServeAppError("the model service is unavailable; retry later", 503, "unavailable")
        if name == "RequestCancelledError" or isinstance(e, asyncio.CancelledError):
            return ServeAppError("request cancelled", 499, "cancelled")
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            return ServeAppError("the request timed out", 504, "timeout")
        e = cause if cause is not None else e.__cause__
    return ServeAppError(f"internal error ({type(exc).__name__})", 500, "internal_error")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list, plus the offending parameter path."""
    if not errors:
        return "invalid request", None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        parts.append(f"{where}: {msg}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param

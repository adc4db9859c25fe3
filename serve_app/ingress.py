"""HTTP ingress: thin FastAPI routes over the Preprocess, VLM and TableExtractor deployments.

Every error leaves as OpenAI's error JSON with a meaningful status; request bodies are size-capped
before parsing; a client disconnect cancels the downstream generation (the streaming handle is
cancelled, which cancels the VLM's generator, which cancels the engine request).
"""


import asyncio
import logging
import math
import uuid
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from serve_app import _chat
from serve_app._table_routing import answer_table_question, asks_about_table, table_context
from serve_app._http import (BodyLimitMiddleware, client_error, read_image_payload,
                             validation_message)
from serve_app.config import AppConfig
from serve_app.errors import ServeAppError
from serve_app.protocol import ChatCompletionRequest, ModelCard, ModelList
from serve_app.vlm import PendingImages

logger = logging.getLogger("ray.serve")

api = FastAPI(title="serve_app", description="Qwen3-VL over an OpenAI-compatible API",
              docs_url="/docs", redoc_url=None)


def _error_response(err: ServeAppError, headers: dict | None = None) -> JSONResponse:
    if err.retry_after_s is not None:
        headers = {**(headers or {}), "Retry-After": str(max(0, math.ceil(err.retry_after_s)))}
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


def _vlm_error(e: BaseException) -> ServeAppError:
    """The client's error for a failed VLM call. An unexpected 5xx is logged with its cause (the
    client sees one line); 503s (overload, restarts, out of memory) are expected and not logged."""
    err = client_error(e)
    if err.status >= 500 and err.status != 503:
        logger.warning("VLM call failed: %r", err, exc_info=e)
    return err


def _cancel(gen) -> None:
    """Cancel a VLM call. A call that failed (backpressure, a dead replica) raises its error again
    from ``cancel()``; it is already being answered, so that second raise is dropped here."""
    try:
        gen.cancel()
    except Exception:
        pass


@api.exception_handler(ServeAppError)
async def _serve_app_error(_: Request, exc: ServeAppError):
    return _error_response(client_error(exc))  # may be Ray's wrapper around a remote ServeAppError


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    msg, param = validation_message(exc.errors())
    return _error_response(ServeAppError(msg, 400, "invalid_request", param))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return _error_response(ServeAppError(str(exc.detail), exc.status_code,
                                         codes.get(exc.status_code, "http_error")),
                           headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    err = client_error(exc)
    if err.status >= 500:
        logger.exception("unhandled error", exc_info=exc)
    return _error_response(err)


api.add_middleware(BodyLimitMiddleware)

_PAGE = Path(__file__).with_name("static") / "index.html"


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, preprocess: DeploymentHandle, vlm: DeploymentHandle,
                 tables: DeploymentHandle | None, config: dict):
        self.cfg = AppConfig.model_validate(config)
        self.preprocess, self.vlm, self.tables = preprocess, vlm, tables
        self.served_name = self.cfg.served_model_name
        api.state.max_request_bytes = self.cfg.api.max_request_bytes
        # Keep multipart uploads in memory (Starlette spools parts over 1 MB to disk otherwise); the
        # body-size middleware already bounds them.
        MultiPartParser.spool_max_size = self.cfg.api.max_request_bytes + 1

    # ---- health & discovery --------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the HTTP path works (does not touch the model)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        """Readiness: the model is loaded and the engine answers."""
        try:
            info = await asyncio.wait_for(self.vlm.info.remote(), timeout=5)
        except Exception as e:
            return _error_response(ServeAppError(f"model not ready: {e}", 503, "not_ready"))
        if not info.get("ready"):
            return _error_response(ServeAppError("model not ready", 503, "not_ready"))
        return {"status": "ready", **info}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served_name, max_model_len=self.cfg.engine.max_model_len)])

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """Engine and preprocessing counters from one replica of each (ops convenience)."""
        vlm, pre = await asyncio.gather(self.vlm.stats.remote(), self.preprocess.stats.remote(),
                                        return_exceptions=True)
        return {"vlm": vlm if isinstance(vlm, dict) else {"error": str(vlm)},
                "preprocess": pre if isinstance(pre, dict) else {"error": str(pre)}}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        if not self.cfg.api.enable_web_page:
            raise ServeAppError("the web page is disabled", 404, "not_found")
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    # ---- images --------------------------------------------------------------------------------
    @api.post("/v1/images")
    async def upload_image(self, request: Request) -> dict:
        """Upload once, refer to it later as ``image://<image_id>``; returns metadata and hints."""
        data = await read_image_payload(request, self.cfg.api.max_request_bytes)
        return await self.preprocess.upload.remote(data)

    # ---- tables --------------------------------------------------------------------------------
    @api.post("/v1/tables")
    async def extract_tables(self, request: Request, format: str = "json"):
        """Tables in one image (same image forms as /v1/images): cells + HTML + CSV renderings."""
        if self.tables is None:
            raise ServeAppError("table extraction is disabled on this server (tables.enabled: false)",
                                501, "not_implemented")
        if format not in ("json", "html", "csv"):
            raise ServeAppError("format must be json, html or csv", 400, "invalid_value", "format")
        data = await read_image_payload(request, self.cfg.api.max_request_bytes)
        tables = await self._tables_of(data)
        if format == "html":
            return HTMLResponse("\n".join(t["html"] for t in tables))
        if format == "csv":
            return PlainTextResponse("\n\n".join(t["csv"] for t in tables), media_type="text/csv")
        return {"object": "list", "data": tables}

    async def _tables_of(self, source) -> list[dict]:
        # decoded pixels go from Preprocess to TableExtractor through the object store
        return await self.tables.extract.remote(self.preprocess.decode.remote(source))

    async def _route_table_question(self, body: ChatCompletionRequest, messages: list[dict],
                                    sources: list[str]) -> tuple[list[dict], str | None, str | None]:
        """README "Tables": a table question about the most recent image is answered from
        TableExtractor — exactly when it names a row/column/cell, else as context for the VLM.
        Returns (messages, exact answer or None, route name for the X-Serve-App-Route header)."""
        if (self.tables is None or not self.cfg.tables.route_table_questions or not sources):
            return messages, None, None
        text = _chat.last_user_text(body)
        if not asks_about_table(text):
            return messages, None, None
        tables = await self._tables_of(sources[-1])
        exact = answer_table_question(text, tables)
        if exact is not None:
            return messages, exact, "table-exact"
        return _chat.with_table_context(messages, table_context(tables)), None, "table-context"

    # ---- chat ----------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, response: Response):
        _chat.check_request(body, self.cfg, self.served_name)
        messages, sources = _chat.split_images(body, self.cfg.images.max_images_per_request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages, exact, route = await self._route_table_question(body, messages, sources)
        route_header = {"X-Serve-App-Route": route} if route else {}
        if exact is not None:  # answered from the table itself: no generation, no tokens
            if body.stream:
                sse = _chat.SSEWriter(request_id, self.served_name,
                                      bool(body.stream_options and body.stream_options.include_usage))
                events = [sse.role(), sse.content(exact), sse.finish("stop", 0, 0)]
                return StreamingResponse(iter(events), media_type="text/event-stream",
                                         headers=route_header)
            return JSONResponse(_chat.full_response(request_id, self.served_name, exact, "stop", 0, 0)
                                .model_dump(), headers=route_header)
        images = []
        if sources:
            # The pixel tensors go straight from Preprocess to the VLM through the object store;
            # they are not copied through this replica. The VLM call is routed while Preprocess
            # runs: its result's ref goes nested (PendingImages), so Serve does not wait for it.
            pre = self.preprocess.process.remote(sources, body.min_pixels, body.max_pixels)
            try:
                images = PendingImages(await pre._to_object_ref())   # once a replica accepted it
            except BaseException as e:
                pre.cancel()
                raise _vlm_error(e) if isinstance(e, Exception) else e
        gen = self.vlm.options(stream=True).generate.remote(
            request_id, messages, images, _chat.sampling_overrides(body))
        try:
            accepted = await gen.__anext__()  # prompt built and admitted, or a 4xx
        except BaseException as e:
            _cancel(gen)
            raise _vlm_error(e) from e
        n_prompt = accepted.num_prompt_tokens
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = _chat.SSEWriter(request_id, self.served_name, include_usage)
            return StreamingResponse(self._stream(gen, sse, n_prompt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id,
                                              **route_header})
        text, finish, n_gen = [], None, 0
        try:
            async for d in gen:
                text.append(d.text)
                finish, n_gen = d.finish_reason, d.num_generated_tokens
        except BaseException as e:
            _cancel(gen)  # includes client disconnect (CancelledError)
            raise _vlm_error(e) if isinstance(e, Exception) else e
        response.headers.update(route_header)
        return _chat.full_response(request_id, self.served_name, "".join(text), finish, n_prompt, n_gen)

    async def _stream(self, gen, sse: _chat.SSEWriter, n_prompt: int):
        finish, n_gen, done = None, 0, False
        try:
            yield sse.role()
            async for d in gen:
                finish, n_gen = d.finish_reason, d.num_generated_tokens
                if d.text:
                    yield sse.content(d.text)
            done = True
            yield sse.finish(finish, n_prompt, n_gen)
        except Exception as e:  # mid-stream failure: tell the client in-band, as OpenAI does
            done = True
            yield sse.error(_vlm_error(e))
        finally:
            if not done:
                _cancel(gen)  # client went away: stop generating

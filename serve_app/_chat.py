"""Chat-completions serving logic between the HTTP routes and the deployments.

Turns a validated :class:`ChatCompletionRequest` into (template messages, image sources,
sampling overrides), and engine deltas back into OpenAI responses and SSE chunks. No Ray here,
so it is unit-testable and the routes in ``ingress.py`` stay thin.
"""

from __future__ import annotations

import json
import time
from typing import Any

from serve_app.config import AppConfig
from serve_app.errors import ServeAppError
from serve_app.protocol import (AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
                                ChatCompletionResponse, Choice, ChunkChoice, DeltaMessage, ImagePart,
                                Usage)


def check_request(req: ChatCompletionRequest, cfg: AppConfig, served_name: str) -> None:
    """Reject what we cannot honour with a precise 4xx (never silently ignore it)."""
    if req.model not in (served_name, cfg.engine.model):
        raise ServeAppError(f"The model '{req.model}' does not exist. This server serves "
                            f"'{served_name}' (see GET /v1/models).", 404, "model_not_found", "model")
    if req.n not in (None, 1):
        raise ServeAppError("only n=1 is supported", 400, "unsupported_parameter", "n")
    if req.tools or req.tool_choice not in (None, "none"):
        raise ServeAppError("tools / function calling are not supported", 400,
                            "unsupported_parameter", "tools")
    if req.logprobs or req.top_logprobs:
        raise ServeAppError("logprobs are not supported", 400, "unsupported_parameter", "logprobs")
    if req.response_format is not None and req.response_format.type != "text":
        raise ServeAppError("only response_format type 'text' is supported", 400,
                            "unsupported_parameter", "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ServeAppError(f"{name} is not supported (use repetition_penalty)", 400,
                                "unsupported_parameter", name)
    if len(req.messages) > cfg.api.max_messages:
        raise ServeAppError(f"too many messages ({len(req.messages)} > {cfg.api.max_messages})",
                            400, "too_many_messages", "messages")
    if len(req.stop) > cfg.api.max_stop_sequences:
        raise ServeAppError(f"at most {cfg.api.max_stop_sequences} stop sequences", 400,
                            "too_many_stop_sequences", "stop")
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise ServeAppError("max_tokens and max_completion_tokens disagree", 400,
                            "invalid_value", "max_completion_tokens")
    if req.min_tokens and req.max_tokens and req.min_tokens > req.max_tokens:
        raise ServeAppError("min_tokens exceeds max_tokens", 400, "invalid_value", "min_tokens")
    for name in ("min_pixels", "max_pixels"):
        v = getattr(req, name)
        if v is not None and not (cfg.images.min_pixels <= v <= cfg.images.max_pixels):
            raise ServeAppError(f"{name} must lie within the server's bounds "
                                f"[{cfg.images.min_pixels}, {cfg.images.max_pixels}]", 400,
                                "invalid_value", name)


def split_images(req: ChatCompletionRequest, max_images: int) -> tuple[list[dict], list[str]]:
    """Template messages with ``{"type": "image"}`` placeholders, and the image URLs in order."""
    messages: list[dict] = []
    sources: list[str] = []
    has_content = False
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        parts: list[dict] = []
        for p in m.parts():
            if isinstance(p, ImagePart):
                if role != "user":
                    raise ServeAppError(f"messages[{i}]: images are only allowed in user messages",
                                        400, "invalid_messages", f"messages[{i}].content")
                sources.append(p.image_url.url)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p.text})
        if any(p["type"] == "image" or p["text"].strip() for p in parts):
            has_content = True
        if role in ("system", "assistant"):  # text only: keep the template's plain-string path
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            messages.append({"role": role, "content": parts})
    if not has_content:
        raise ServeAppError("messages have no text and no images", 400, "empty_messages", "messages")
    if req.messages[-1].role == "assistant":
        raise ServeAppError("the last message must not be from the assistant (no prefill support)",
                            400, "invalid_messages", "messages")
    if len(sources) > max_images:
        raise ServeAppError(f"too many images: {len(sources)} > {max_images} per request", 400,
                            "too_many_images", "messages")
    return messages, sources


def last_user_text(req: ChatCompletionRequest) -> str:
    """The text of the last user message (what a table question is read from)."""
    for m in reversed(req.messages):
        if m.role == "user":
            return " ".join(p.text for p in m.parts() if not isinstance(p, ImagePart))
    return ""


def with_table_context(messages: list[dict], context: str) -> list[dict]:
    """Give the VLM the extracted tables as a system message (merged into an existing one)."""
    note = ("Tables extracted by OCR from the most recent image in this conversation. Quote cell "
            "values exactly as given here.\n\n" + context) if context else (
            "No table was found in the most recent image in this conversation.")
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}] + messages[1:]
    return [{"role": "system", "content": note}] + messages


def sampling_overrides(req: ChatCompletionRequest) -> dict[str, Any]:
    """Only what the client set; the VLM fills the rest from the model's generation config."""
    out = {"max_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
           "top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
           "seed": req.seed, "stop": req.stop, "ignore_eos": req.ignore_eos,
           "min_tokens": req.min_tokens}
    return {k: v for k, v in out.items() if v is not None}


def usage(n_prompt: int, n_gen: int) -> Usage:
    return Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen)


def full_response(request_id: str, model: str, text: str, finish: str | None, n_prompt: int,
                  n_gen: int) -> ChatCompletionResponse:
    return ChatCompletionResponse(id=request_id, model=model, usage=usage(n_prompt, n_gen),
                                  choices=[Choice(message=AssistantMessage(content=text),
                                                  finish_reason=_finish(finish))])


def _finish(reason: str | None) -> str | None:
    # OpenAI has no "cancelled"; a cancelled request has no reader anyway.
    return "stop" if reason == "cancelled" else reason


class SSEWriter:
    """Formats OpenAI ``chat.completion.chunk`` server-sent events for one request."""

    def __init__(self, request_id: str, model: str, include_usage: bool):
        self.id, self.model, self.include_usage = request_id, model, include_usage
        self.created = int(time.time())

    def _event(self, choices: list[ChunkChoice], usage_: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=choices, usage=usage_)
        return f"data: {chunk.model_dump_json(exclude_none=not self.include_usage)}\n\n"

    def role(self) -> str:
        return self._event([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])

    def content(self, text: str) -> str:
        return self._event([ChunkChoice(delta=DeltaMessage(content=text))])

    def finish(self, reason: str | None, n_prompt: int, n_gen: int) -> str:
        out = self._event([ChunkChoice(delta=DeltaMessage(), finish_reason=_finish(reason))])
        if self.include_usage:
            out += self._event([], usage(n_prompt, n_gen))
        return out + "data: [DONE]\n\n"

    @staticmethod
    def error(err: ServeAppError) -> str:
        return f"data: {json.dumps(err.to_dict())}\n\ndata: [DONE]\n\n"

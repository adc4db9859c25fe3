"""Streaming HTTP client and the two load shapes: closed loop (N sessions) and open loop (Poisson).

Both loops are bounded by time and by a request budget and stop by themselves; requests still open
``drain_s`` after the window closes are cancelled and counted as ``drain_timeout`` errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from benchmarks.loadgen.workload import Conversation, Turn, Workload, poisson_arrivals


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds relative to the run's start."""

    cls: str
    turn: int
    start: float
    end: float = 0.0
    ttft: float | None = None       # first non-empty content chunk
    status: int | None = None       # HTTP status (None: no response)
    error: str | None = None        # None when the request completed normally
    prompt_tokens: int | None = None
    output_tokens: int = 0
    expected_tokens: int | None = None
    error_message: str | None = None  # the server's words, when it sent any

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SSEParser:
    """Incremental parser for ``text/event-stream``: feed lines, get each event's ``data`` payload.

    Handles multi-line ``data:`` fields, comments and CRLF; yields ``"[DONE]"`` verbatim.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed_line("")


@dataclass
class StreamOutcome:
    text: str = ""
    done: bool = False
    error: str | None = None
    error_message: str | None = None
    first_content_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0


def apply_event(out: StreamOutcome, data: str, now: float) -> None:
    """Fold one SSE ``data`` payload (an OpenAI chunk, an error object or ``[DONE]``) into ``out``."""
    if data == "[DONE]":
        out.done = True
        return
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        out.error = out.error or "bad_sse_json"
        return
    if "error" in obj:
        err = obj["error"] or {}
        if out.error is None:
            out.error = f"stream_{err.get('code') or err.get('type') or 'error'}"
            out.error_message = str(err.get("message") or "")[:500] or None
        return
    for choice in obj.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            out.chunks += 1
            out.text += content
            if out.first_content_at is None:
                out.first_content_at = now
    usage = obj.get("usage")
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens")
        out.completion_tokens = usage.get("completion_tokens")


def check_local(url: str) -> None:
    """Refuse non-loopback targets: the benchmark is meant for a service on this host."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{url}: only loopback targets (127.0.0.1, ::1, localhost) are allowed; "
                     "pass allow_remote=True / --allow-remote to override")


def make_client(max_connections: int = 1024) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0), trust_env=False)


async def send(client: httpx.AsyncClient, url: str, turn: Turn, t0: float,
               timeout_s: float = 120.0) -> tuple[RequestResult, str]:
    """POST one streaming chat request; returns its result and the generated text."""
    res = RequestResult(turn.cls, turn.turn, time.perf_counter() - t0,
                        expected_tokens=turn.body.get("min_tokens") or None)
    out = StreamOutcome()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=turn.body) as r:
                res.status = r.status_code
                if r.status_code != 200:
                    body = (await r.aread())[:2000]
                    code = ""
                    try:
                        err = json.loads(body)["error"]
                        code = err.get("code") or ""
                        res.error_message = str(err.get("message") or "")[:500] or None
                    except (ValueError, KeyError, TypeError, AttributeError):
                        pass
                    res.error = f"http_{r.status_code}" + (f"_{code}" if code else "")
                else:
                    parser = SSEParser()
                    async for line in r.aiter_lines():
                        data = parser.feed_line(line)
                        if data is not None:
                            apply_event(out, data, time.perf_counter() - t0)
                    tail = parser.flush()
                    if tail is not None:
                        apply_event(out, tail, time.perf_counter() - t0)
                    res.error = out.error or (None if out.done else "incomplete_stream")
                    res.error_message = out.error_message
    except TimeoutError:
        res.error = "timeout"
    except httpx.ConnectError:
        res.error = "connect_error"
    except httpx.HTTPError as e:
        res.error = f"transport_{type(e).__name__}"
    except asyncio.CancelledError:
        res.error = "drain_timeout"
        res.end = time.perf_counter() - t0
        _fill(res, out)
        raise _Cancelled(res) from None
    res.end = time.perf_counter() - t0
    _fill(res, out)
    return res, out.text


def _fill(res: RequestResult, out: StreamOutcome) -> None:
    res.ttft = None if out.first_content_at is None else out.first_content_at - res.start
    res.prompt_tokens = out.prompt_tokens
    res.output_tokens = out.completion_tokens if out.completion_tokens is not None else out.chunks


class _Cancelled(BaseException):
    """Carries the partial result of a request cancelled at the end of a run."""

    def __init__(self, result: RequestResult):
        super().__init__("cancelled")
        self.result = result


@dataclass
class LoadSpec:
    """What to offer: ``open`` (Poisson at ``qps`` or a ``profile`` of (seconds, qps) phases) or
    ``closed`` (``sessions`` concurrent conversations, each waiting for its answer)."""

    mode: str = "open"
    qps: float = 1.0
    sessions: int = 1
    duration_s: float = 30.0
    max_requests: int | None = None
    profile: list[tuple[float, float]] | None = None
    turns: int = 3
    think_time_s: float = 0.0
    drain_s: float = 30.0
    request_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', not {self.mode!r}")
        if self.profile:
            self.duration_s = sum(d for d, _ in self.profile)
        if self.duration_s <= 0:
            raise ValueError("duration_s must be positive")

    @property
    def offered(self) -> float:
        return self.qps if self.mode == "open" else float(self.sessions)


@dataclass
class RunResult:
    spec: LoadSpec
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0             # load window (not counting the drain)
    arrivals: list[float] = field(default_factory=list)


def profile_arrivals(profile: list[tuple[float, float]], rng: random.Random,
                     max_requests: int | None = None) -> list[float]:
    """Arrivals of a piecewise-constant-rate Poisson process: ``[(seconds, qps), ...]``."""
    out, offset = [], 0.0
    for dur, qps in profile:
        out += [offset + t for t in poisson_arrivals(qps, dur, rng)]
        offset += dur
    return out[:max_requests] if max_requests is not None else out


async def run_load(url: str, workload: Workload, spec: LoadSpec, allow_remote: bool = False,
                   client: httpx.AsyncClient | None = None,
                   on_result: Callable[[RequestResult], None] | None = None,
                   t0: float | None = None) -> RunResult:
    """Offer ``spec``'s load to ``url`` and collect every request's result.

    Times are relative to ``t0`` (a ``time.perf_counter()`` value; default: now), so callers can
    line results up with their own samples.
    """
    if not allow_remote:
        check_local(url)
    url = url.rstrip("/")
    own = client is None
    client = client or make_client()
    run = RunResult(spec)
    t0 = time.perf_counter() if t0 is None else t0
    tasks: set[asyncio.Task] = set()
    budget = [spec.max_requests if spec.max_requests is not None else float("inf")]

    def done(res: RequestResult) -> None:
        run.results.append(res)
        if on_result:
            on_result(res)

    async def one(turn: Turn) -> str | None:
        try:
            res, text = await send(client, url, turn, t0, spec.request_timeout_s)
        except _Cancelled as c:
            done(c.result)
            raise asyncio.CancelledError from None
        done(res)
        return text if res.ok else None

    async def session(i: int) -> None:
        rng = random.Random(spec.seed * 1000 + i)
        conv = Conversation(workload, spec.turns)
        await asyncio.sleep(rng.uniform(0, min(1.0, spec.duration_s / 10)))  # de-synchronise
        while time.perf_counter() - t0 < spec.duration_s and budget[0] > 0:
            budget[0] -= 1
            text = await one(conv.next_turn())
            if text is None:
                conv.reset()
            else:
                conv.record_answer(text)
            if spec.think_time_s:
                await asyncio.sleep(rng.expovariate(1 / spec.think_time_s))

    try:
        if spec.mode == "closed":
            for i in range(spec.sessions):
                tasks.add(asyncio.create_task(session(i)))
            await asyncio.wait(tasks, timeout=spec.duration_s)
        else:
            rng = random.Random(spec.seed)
            profile = spec.profile or [(spec.duration_s, spec.qps)]
            run.arrivals = profile_arrivals(profile, rng, spec.max_requests)
            for at in run.arrivals:
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(workload.single()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            rest = spec.duration_s - (time.perf_counter() - t0)
            if rest > 0:
                await asyncio.sleep(rest)
        run.wall_s = time.perf_counter() - t0
        pending = {t for t in tasks if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=spec.drain_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        if own:
            await client.aclose()
    run.results.sort(key=lambda r: r.start)
    return run

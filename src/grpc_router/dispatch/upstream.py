"""Forward a conversation to OpenAI-compatible chat-completion endpoints, with fallbacks.

Knows nothing of routing engines or gRPC: it gets an ordered list of models and a conversation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from grpc_router.errors import UpstreamError
from grpc_router.observability import metrics
from grpc_router.settings import ModelConfig
from grpc_router.types import Message

_RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class GenerationParams:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed upstream call."""

    model: str
    error: str
    http_status: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    finish_reason: str
    usage: Usage
    answered_by: str
    failed_attempts: tuple[Attempt, ...]
    upstream_ms: float


@dataclass(frozen=True, slots=True)
class StreamDelta:
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: str
    usage: Usage
    answered_by: str
    failed_attempts: tuple[Attempt, ...]
    upstream_ms: float


class _Failure(Exception):
    def __init__(self, attempt: Attempt, *, retryable: bool = True) -> None:
        super().__init__(attempt.error)
        self.attempt = attempt
        self.retryable = retryable


class DispatchFailed(UpstreamError):
    """Every model in the chain failed (or one failed in a way retrying cannot fix)."""

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        detail = "; ".join(f"{a.model}: {a.error}" for a in attempts) or "no model to try"
        super().__init__(f"all upstream models failed: {detail}")
        self.attempts = tuple(attempts)


def _body(model: ModelConfig, messages: Sequence[Message], p: GenerationParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model.model,
        "messages": [{"role": m.role.value, "content": m.content} for m in messages],
    }
    optional = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
        "stop": list(p.stop) or None,
        "user": p.user or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(
        int(raw.get("prompt_tokens") or 0),
        int(raw.get("completion_tokens") or 0),
        int(raw.get("total_tokens") or 0),
    )


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """Yield the `data` payload of each server-sent event (WHATWG event-stream framing)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


class Dispatcher:
    """Pooled HTTP client over every configured upstream."""

    def __init__(self, *, max_connections: int = 100) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def _request(
        self, key: str, model: ModelConfig, body: dict[str, Any]
    ) -> tuple[httpx.Request, httpx.Timeout]:
        headers = {"content-type": "application/json", **model.headers}
        if model.api_key_env:
            api_key = os.environ.get(model.api_key_env)
            if not api_key:
                raise _Failure(Attempt(key, f"API key variable {model.api_key_env} is not set"))
            headers["authorization"] = f"Bearer {api_key}"
        url = model.base_url.rstrip("/") + "/chat/completions"
        timeout = httpx.Timeout(model.timeout_s, connect=model.connect_timeout_s)
        request = self._client.build_request(
            "POST", url, content=json.dumps(body), headers=headers, timeout=timeout
        )
        return request, timeout

    async def complete(
        self,
        chain: Sequence[tuple[str, ModelConfig]],
        messages: Sequence[Message],
        params: GenerationParams,
    ) -> Completion:
        """Ask each model in `chain` in turn until one answers."""
        failed: list[Attempt] = []
        start = time.perf_counter()
        for key, model in chain:
            body = _body(model, messages, params)
            t0 = time.perf_counter()
            try:
                request, _ = self._request(key, model, body)
                response = await self._client.send(request)
                await response.aread()
                _raise_for_status(key, response)
                payload = response.json()
                choice = payload["choices"][0]
                content = choice["message"].get("content") or ""
                finish = str(choice.get("finish_reason") or "")
            except _Failure as f:
                _record_failure(failed, f.attempt, t0)
                if not f.retryable:
                    break
                continue
            except httpx.HTTPError as e:
                _record_failure(failed, Attempt(key, _describe(e)), t0)
                continue
            except (ValueError, KeyError, IndexError, TypeError) as e:
                _record_failure(failed, Attempt(key, f"malformed response: {e!r}"), t0)
                continue
            metrics.UPSTREAM_LATENCY.labels(key).observe(time.perf_counter() - t0)
            return Completion(
                content,
                finish,
                _usage(payload.get("usage")),
                key,
                tuple(failed),
                (time.perf_counter() - start) * 1000,
            )
        raise DispatchFailed(failed)

    async def stream(
        self,
        chain: Sequence[tuple[str, ModelConfig]],
        messages: Sequence[Message],
        params: GenerationParams,
    ) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Stream the first model that answers. A model is abandoned for the next one only
        before its first token; a failure after that ends the stream with DispatchFailed."""
        failed: list[Attempt] = []
        start = time.perf_counter()
        for key, model in chain:
            body = _body(model, messages, params)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            t0 = time.perf_counter()
            started = False
            finish = ""
            done = False
            usage = Usage()
            try:
                request, _ = self._request(key, model, body)
                response = await self._client.send(request, stream=True)
                try:
                    if response.status_code >= 400:
                        await response.aread()
                    _raise_for_status(key, response)
                    async for data in _sse_data(response):
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if event.get("usage"):
                            usage = _usage(event["usage"])
                        for choice in event.get("choices") or ():
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                started = True
                                yield StreamDelta(text)
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                    if not (done or finish):
                        raise httpx.RemoteProtocolError("stream ended before it finished")
                finally:
                    await response.aclose()
            except _Failure as f:
                _record_failure(failed, f.attempt, t0)
                if not f.retryable:
                    break
                continue
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                desc = _describe(e) if isinstance(e, httpx.HTTPError) else f"bad event: {e!r}"
                _record_failure(failed, Attempt(key, desc), t0)
                if started:
                    raise DispatchFailed(failed) from None
                continue
            metrics.UPSTREAM_LATENCY.labels(key).observe(time.perf_counter() - t0)
            yield StreamEnd(finish, usage, key, tuple(failed), (time.perf_counter() - start) * 1000)
            return
        raise DispatchFailed(failed)


def _raise_for_status(key: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = response.text[:200].strip() if response.is_stream_consumed else ""
    error = f"http {status}" + (f": {detail}" if detail else "")
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    raise _Failure(Attempt(key, error, status), retryable=retryable)


def _describe(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.TimeoutException):
        return f"timeout ({type(e).__name__})"
    if isinstance(e, httpx.ConnectError):
        return "connect error"
    if isinstance(e, httpx.RemoteProtocolError):
        return "connection dropped"
    return f"{type(e).__name__}: {e}"


def _reason(attempt: Attempt) -> str:
    """A low-cardinality metrics label for a failed attempt."""
    if attempt.http_status:
        return f"http_{attempt.http_status}"
    for prefix, reason in (
        ("timeout", "timeout"),
        ("connect error", "connect"),
        ("connection dropped", "dropped"),
        ("API key", "no_api_key"),
        ("malformed", "malformed"),
        ("bad event", "malformed"),
    ):
        if attempt.error.startswith(prefix):
            return reason
    return "other"


def _record_failure(failed: list[Attempt], attempt: Attempt, t0: float) -> None:
    failed.append(attempt)
    metrics.UPSTREAM_ERRORS.labels(attempt.model, _reason(attempt)).inc()
    metrics.UPSTREAM_LATENCY.labels(attempt.model).observe(time.perf_counter() - t0)

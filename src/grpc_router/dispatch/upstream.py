"""Forward a conversation to OpenAI-compatible chat-completion endpoints, with fallbacks.

Knows nothing of routing engines or gRPC: it gets an ordered list of models and a conversation.
Each model has a circuit breaker (`grpc_router.dispatch.breaker`): a model whose breaker is open
is skipped at once, with the attempt error "circuit open".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from grpc_router.dispatch.breaker import CircuitBreakers, Permit, Verdict, retry_after_s
from grpc_router.errors import UpstreamError
from grpc_router.observability import metrics
from grpc_router.settings import AppConfig, ModelConfig
from grpc_router.types import Message

_RETRYABLE_STATUS = frozenset({408, 409, 429})
# Attempt error of a model skipped because its breaker is open.
CIRCUIT_OPEN = "circuit open"
# Failure reasons (metrics labels) that count against a model's breaker, besides 5xx and 429.
_BREAKER_REASONS = frozenset({"timeout", "connect", "dropped"})
# A connection reset or closed mid-request or mid-response.
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


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
    redacted: str = ""
    """`error` without what the upstream sent back (its response body may quote the prompt):
    what logs show unless `logging.log_content` is on. Empty: `error` holds nothing to hide."""

    @property
    def loggable(self) -> str:
        return self.redacted or self.error


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
    def __init__(
        self, attempt: Attempt, *, retryable: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(attempt.error)
        self.attempt = attempt
        self.retryable = retryable
        self.retry_after = retry_after


def _summary(attempts: Sequence[Attempt], *, redact: bool) -> str:
    detail = "; ".join(f"{a.model}: {a.loggable if redact else a.error}" for a in attempts)
    return f"all upstream models failed: {detail or 'no model to try'}"


class DispatchFailed(UpstreamError):
    """Every model in the chain failed or was skipped (or one failed in a way retrying cannot
    fix). `str()` is the full message, for the caller; `log_message` is what logs may show:
    without upstream response bodies unless `logging.log_content` is on."""

    def __init__(self, attempts: Sequence[Attempt], *, log_content: bool = False) -> None:
        super().__init__(_summary(attempts, redact=False))
        self.attempts = tuple(attempts)
        self.log_message = str(self) if log_content else _summary(attempts, redact=True)


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
    """Pooled HTTP client over every configured upstream, with a circuit breaker per model."""

    def __init__(self, config: AppConfig | None = None, *, max_connections: int = 100) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
            follow_redirects=False,
        )
        # Each upstream request gets a client span and carries the trace context onward
        # (traceparent); without a configured tracer provider this records nothing.
        HTTPXClientInstrumentor.instrument_client(self._client)
        self._breakers = CircuitBreakers()
        self._log_content = False
        if config is not None:
            self.configure(config)

    @property
    def breakers(self) -> CircuitBreakers:
        return self._breakers

    def configure(self, config: AppConfig) -> None:
        """Apply a (reloaded) config: the breakers' settings and models (a model still
        configured keeps its breaker's state) and whether logs may hold upstream bodies."""
        self._breakers.configure(config.circuit_breaker, config.models)
        self._log_content = config.logging.log_content

    async def close(self) -> None:
        await self._client.aclose()

    def _request(self, key: str, model: ModelConfig, body: dict[str, Any]) -> httpx.Request:
        headers = {"content-type": "application/json", **model.headers}
        if model.api_key_env:
            api_key = os.environ.get(model.api_key_env)
            if not api_key:
                raise _Failure(Attempt(key, f"API key variable {model.api_key_env} is not set"))
            headers["authorization"] = f"Bearer {api_key}"
        url = model.base_url.rstrip("/") + "/chat/completions"
        timeout = httpx.Timeout(model.timeout_s, connect=model.connect_timeout_s)
        return self._client.build_request(
            "POST", url, content=json.dumps(body), headers=headers, timeout=timeout
        )

    def _fail(self, failed: list[Attempt], f: _Failure, permit: Permit, t0: float) -> None:
        _record_failure(failed, f.attempt, t0)
        reason = _reason(f.attempt)
        self._breakers.settle(permit, _verdict(f.attempt), reason, retry_after=f.retry_after)

    def _all_failed(self, failed: Sequence[Attempt]) -> DispatchFailed:
        return DispatchFailed(failed, log_content=self._log_content)

    async def complete(
        self,
        chain: Sequence[tuple[str, ModelConfig]],
        messages: Sequence[Message],
        params: GenerationParams,
    ) -> Completion:
        """Ask each model in `chain` in turn until one answers; skip those whose breaker is
        open."""
        failed: list[Attempt] = []
        start = time.perf_counter()
        for key, model in chain:
            permit = self._breakers.admit(key)
            if permit is None:
                failed.append(Attempt(key, CIRCUIT_OPEN))
                continue
            body = _body(model, messages, params)
            t0 = time.perf_counter()
            span = _attempt_span(key, model)
            try:
                request = self._request(key, model, body)
                with trace.use_span(span, end_on_exit=False):
                    response = await self._client.send(request)
                await response.aread()
                _raise_for_status(key, response)
                payload = response.json()
                choice = payload["choices"][0]
                content = choice["message"].get("content") or ""
                finish = str(choice.get("finish_reason") or "")
                self._breakers.settle(permit, Verdict.SUCCESS)
            except _Failure as f:
                self._fail(failed, f, permit, t0)
                if not f.retryable:
                    break
                continue
            except httpx.HTTPError as e:
                self._fail(failed, _Failure(_transport_attempt(key, e)), permit, t0)
                continue
            except (ValueError, KeyError, IndexError, TypeError) as e:
                attempt = _malformed(key, "malformed response", e)
                self._fail(failed, _Failure(attempt), permit, t0)
                continue
            finally:  # cancelled (the caller went away): says nothing of the upstream
                self._breakers.settle(permit, Verdict.NEUTRAL)
                _end_attempt_span(span, failed, key)
            metrics.UPSTREAM_LATENCY.labels(key).observe(time.perf_counter() - t0)
            return Completion(
                content,
                finish,
                _usage(payload.get("usage")),
                key,
                tuple(failed),
                (time.perf_counter() - start) * 1000,
            )
        raise self._all_failed(failed)

    async def stream(
        self,
        chain: Sequence[tuple[str, ModelConfig]],
        messages: Sequence[Message],
        params: GenerationParams,
    ) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Stream the first model that answers, skipping those whose breaker is open. A model
        is abandoned for the next one only before its first token, and only a failure before
        it counts against the model's breaker; a failure after it ends the stream with
        DispatchFailed."""
        failed: list[Attempt] = []
        start = time.perf_counter()
        for key, model in chain:
            permit = self._breakers.admit(key)
            if permit is None:
                failed.append(Attempt(key, CIRCUIT_OPEN))
                continue
            body = _body(model, messages, params)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            t0 = time.perf_counter()
            started = False
            finish = ""
            done = False
            usage = Usage()
            span = _attempt_span(key, model)
            try:
                request = self._request(key, model, body)
                with trace.use_span(span, end_on_exit=False):
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
                                if not started:
                                    started = True
                                    self._breakers.settle(permit, Verdict.SUCCESS)
                                yield StreamDelta(text)
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                    if not (done or finish):
                        raise httpx.RemoteProtocolError("stream ended before it finished")
                    self._breakers.settle(permit, Verdict.SUCCESS)
                finally:
                    await response.aclose()
            except _Failure as f:
                self._fail(failed, f, permit, t0)
                if not f.retryable:
                    break
                continue
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                if isinstance(e, httpx.HTTPError):
                    attempt = _transport_attempt(key, e)
                else:
                    attempt = _malformed(key, "bad event", e)
                self._fail(failed, _Failure(attempt), permit, t0)  # after a token: settled
                if started:
                    raise self._all_failed(failed) from None
                continue
            finally:  # cancelled, or the caller stopped reading before the first token
                self._breakers.settle(permit, Verdict.NEUTRAL)
                _end_attempt_span(span, failed, key)
            metrics.UPSTREAM_LATENCY.labels(key).observe(time.perf_counter() - t0)
            yield StreamEnd(finish, usage, key, tuple(failed), (time.perf_counter() - start) * 1000)
            return
        raise self._all_failed(failed)


def _attempt_span(key: str, model: ModelConfig) -> trace.Span:
    """A child of the current span (the RPC's) for one upstream attempt."""
    return trace.get_tracer("grpc_router").start_span(
        "upstream.attempt",
        kind=trace.SpanKind.INTERNAL,
        attributes={"upstream.model_key": key, "upstream.model": model.model},
    )


def _end_attempt_span(span: trace.Span, failed: Sequence[Attempt], key: str) -> None:
    """End an attempt's span, marked as an error when this attempt is the latest failure."""
    if failed and failed[-1].model == key and span.is_recording():
        span.set_status(trace.Status(trace.StatusCode.ERROR, _reason(failed[-1])))
        span.set_attribute("upstream.error", failed[-1].loggable)
    span.end()


def _raise_for_status(key: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = response.text[:200].strip() if response.is_stream_consumed else ""
    error = f"http {status}" + (f": {detail}" if detail else "")
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    retry_after = retry_after_s(response.headers.get("retry-after")) if status == 429 else None
    attempt = Attempt(key, error, status, redacted=f"http {status}" if detail else "")
    raise _Failure(attempt, retryable=retryable, retry_after=retry_after)


def _describe(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.TimeoutException):
        return f"timeout ({type(e).__name__})"
    if isinstance(e, httpx.ConnectError):
        return "connect error"
    if isinstance(e, _DROPPED):
        return f"connection dropped ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def _transport_attempt(key: str, e: httpx.HTTPError) -> Attempt:
    error = _describe(e)
    named = error.startswith(("timeout", "connect error", "connection dropped"))
    return Attempt(key, error, redacted="" if named else type(e).__name__)


def _malformed(key: str, what: str, e: Exception) -> Attempt:
    return Attempt(key, f"{what}: {e!r}", redacted=f"{what} ({type(e).__name__})")


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


def _verdict(attempt: Attempt) -> Verdict:
    """What a failed attempt says of its model's health: 5xx, 429, timeouts, connection errors
    and dropped connections count against it; another 4xx means it answered."""
    status = attempt.http_status
    if status >= 500 or status == 429 or _reason(attempt) in _BREAKER_REASONS:
        return Verdict.FAILURE
    return Verdict.SUCCESS if status else Verdict.NEUTRAL


def _record_failure(failed: list[Attempt], attempt: Attempt, t0: float) -> None:
    failed.append(attempt)
    metrics.UPSTREAM_ERRORS.labels(attempt.model, _reason(attempt)).inc()
    metrics.UPSTREAM_LATENCY.labels(attempt.model).observe(time.perf_counter() - t0)

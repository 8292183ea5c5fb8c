"""Forward a conversation to OpenAI-compatible chat-completion endpoints, with fallbacks.

Knows nothing of routing engines or gRPC: it gets an ordered list of models and a conversation.
Each model has a circuit breaker (`grpc_router.dispatch.breaker`): a model whose breaker is open
is skipped at once, with the attempt error "circuit open".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
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

    async def _send(
        self, attempt: _Attempt, body: dict[str, Any], *, stream: bool
    ) -> httpx.Response:
        """POST `body` to the attempt's model inside the attempt's span, so that the HTTP
        client's span (and the traceparent it sends on) is the attempt's child."""
        request = self._request(attempt.key, attempt.model, body)
        with trace.use_span(attempt.span, end_on_exit=False):
            return await self._client.send(request, stream=stream)

    def _attempts(
        self, chain: Sequence[tuple[str, ModelConfig]], classify: _Classifier
    ) -> _Attempts:
        """A walk down `chain` with this dispatcher's breakers; `classify` says which errors
        of the caller's exchange mean "try the next model"."""
        return _Attempts(self._breakers, chain, classify, log_content=self._log_content)

    async def complete(
        self,
        chain: Sequence[tuple[str, ModelConfig]],
        messages: Sequence[Message],
        params: GenerationParams,
    ) -> Completion:
        """Ask each model in `chain` in turn until one answers; skip those whose breaker is
        open."""
        run = self._attempts(chain, _unary_failure)
        for attempt in run:
            body = _body(attempt.model, messages, params)
            with attempt:
                response = await self._send(attempt, body, stream=False)
                await response.aread()
                _raise_for_status(attempt.key, response)
                payload = response.json()
                choice = payload["choices"][0]
                content = choice["message"].get("content") or ""
                finish = str(choice.get("finish_reason") or "")
                self._breakers.settle(attempt.permit, Verdict.SUCCESS)
            if not attempt.answered:
                continue
            usage = _usage(payload.get("usage"))
            return Completion(
                content, finish, usage, attempt.key, tuple(run.failed), run.elapsed_ms()
            )
        raise run.all_failed()

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
        run = self._attempts(chain, _stream_failure)
        for attempt in run:
            body = _body(attempt.model, messages, params)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            finish = ""
            done = False
            usage = Usage()
            with attempt:
                response = await self._send(attempt, body, stream=True)
                try:
                    if response.status_code >= 400:
                        await response.aread()
                    _raise_for_status(attempt.key, response)
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
                                if not attempt.started:
                                    attempt.started = True
                                    self._breakers.settle(attempt.permit, Verdict.SUCCESS)
                                yield StreamDelta(text)
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                    if not (done or finish):
                        raise httpx.RemoteProtocolError("stream ended before it finished")
                    self._breakers.settle(attempt.permit, Verdict.SUCCESS)
                finally:
                    await response.aclose()
            if attempt.answered:
                failed = tuple(run.failed)
                yield StreamEnd(finish, usage, attempt.key, failed, run.elapsed_ms())
                return
        raise run.all_failed()


# Maps an exception raised inside `with attempt:` to the failed attempt it records (the walk
# then moves on), or None to let it propagate: each of complete and stream decides which
# errors of its own exchange (transport, malformed body or event) mean "try the next model".
_Classifier = Callable[[str, Exception], Attempt | None]


def _unary_failure(key: str, e: Exception) -> Attempt | None:
    """A unary call's transport errors and malformed response bodies."""
    if isinstance(e, httpx.HTTPError):
        return _transport_attempt(key, e)
    if isinstance(e, (ValueError, KeyError, IndexError, TypeError)):
        return _malformed(key, "malformed response", e)
    return None


def _stream_failure(key: str, e: Exception) -> Attempt | None:
    """A streamed call's transport errors and unreadable events."""
    if isinstance(e, httpx.HTTPError):
        return _transport_attempt(key, e)
    if isinstance(e, (ValueError, AttributeError)):
        return _malformed(key, "bad event", e)
    return None


class _Attempts:
    """The walk down a model chain shared by `Dispatcher.complete` and `Dispatcher.stream`.

    Iterating yields an `_Attempt` for each model its breaker admits, records a "circuit open"
    attempt for each one it refuses, and stops early after a failure retrying cannot fix. It
    keeps the failed attempts and the dispatch's start time for the answer or the error.
    """

    def __init__(
        self,
        breakers: CircuitBreakers,
        chain: Sequence[tuple[str, ModelConfig]],
        classify: _Classifier,
        *,
        log_content: bool,
    ) -> None:
        self.breakers = breakers
        self.classify = classify
        self.failed: list[Attempt] = []
        self.stopped = False
        self._chain = chain
        self._log_content = log_content
        self._start = time.perf_counter()

    def __iter__(self) -> Iterator[_Attempt]:
        for key, model in self._chain:
            if self.stopped:
                return
            permit = self.breakers.admit(key)
            if permit is None:
                self.failed.append(Attempt(key, CIRCUIT_OPEN))
                continue
            yield _Attempt(self, key, model, permit)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000

    def all_failed(self) -> DispatchFailed:
        return DispatchFailed(self.failed, log_content=self._log_content)


class _Attempt:
    """One admitted call to one model, made inside `with attempt:`.

    Entering starts the attempt's clock and span. Leaving settles the breaker as neutral unless
    the call settled it (a cancelled call says nothing of the upstream) and ends the span. Then:
    no exception records the latency and sets `answered`; a `_Failure`, or an exception the
    run's classifier recognises, is recorded (metrics, breaker verdict) and swallowed so the
    walk moves on, unless retrying cannot fix it (the walk stops) or the answer had already
    begun (`started`: no fallback is possible, so it raises DispatchFailed); anything else
    propagates.
    """

    def __init__(self, run: _Attempts, key: str, model: ModelConfig, permit: Permit) -> None:
        self.key = key
        self.model = model
        self.permit = permit
        self.span: trace.Span = trace.INVALID_SPAN
        self.started = False
        """Part of the answer has reached the caller: a later failure cannot fall back."""
        self.answered = False
        """The `with` block ran to its end."""
        self._run = run
        self._t0 = 0.0

    def __enter__(self) -> _Attempt:
        self._t0 = time.perf_counter()
        self.span = _attempt_span(self.key, self.model)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        run = self._run
        failure = self._failure(exc)
        if failure is not None:
            _record_failure(run.failed, failure.attempt, self._t0)
            verdict, reason = _verdict(failure.attempt), _reason(failure.attempt)
            run.breakers.settle(self.permit, verdict, reason, retry_after=failure.retry_after)
        run.breakers.settle(self.permit, Verdict.NEUTRAL)
        _end_attempt_span(self.span, run.failed, self.key)
        if exc is None:
            self.answered = True
            metrics.UPSTREAM_LATENCY.labels(self.key).observe(time.perf_counter() - self._t0)
            return False
        if failure is None:
            return False
        if not failure.retryable:
            run.stopped = True
        elif self.started:
            raise run.all_failed() from None
        return True

    def _failure(self, exc: BaseException | None) -> _Failure | None:
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, Exception):
            attempt = self._run.classify(self.key, exc)
            if attempt is not None:
                return _Failure(attempt)
        return None


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

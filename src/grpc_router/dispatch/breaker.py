"""Per-model circuit breakers with Envoy outlier-detection semantics.

Written here rather than taken from purgatory or aiobreaker: both wrap one whole call and let
every concurrent call through while half-open, and neither can give each opening its own
cooldown (doubling per failed probe, or a 429's Retry-After) nor count a stream as healthy at
its first token.

A model's breaker opens after `consecutive_failures` failures in a row, or at once on a 429 with
`Retry-After`. While open, calls skip the model. The first call after the cooldown is a
half-open probe (concurrent calls keep skipping): success closes the breaker, failure re-opens
it with the cooldown doubled, up to `max_cooldown_s`. Everything runs on the event loop's
thread, so the state needs no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum, IntEnum

from grpc_router.observability import logs
from grpc_router.observability.metrics import CIRCUIT_STATE, CIRCUIT_TRANSITIONS
from grpc_router.settings import CircuitBreakerConfig

_log = logs.get_logger("grpc_router.dispatch.breaker")


class CircuitState(IntEnum):
    """The gauge's value of each state."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Verdict(Enum):
    """What an attempt says about its upstream's health."""

    SUCCESS = "success"
    """It answered (4xx client errors included): resets the failure count, closes a probe."""
    FAILURE = "failure"
    """5xx, 429, timeout, connect error, dropped connection."""
    NEUTRAL = "neutral"
    """Says nothing (no request sent, cancelled by the caller, malformed body)."""


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    """Consecutive failures while closed."""
    openings: int = 0
    """Openings since it was last closed: each doubles the cooldown."""
    open_until: float = 0.0
    cooldown_s: float = 0.0
    """Of the current (or last) opening."""
    probing: bool = False


@dataclass(slots=True)
class Permit:
    """Leave to call a model once; hand it back with `CircuitBreakers.settle` (the first
    settle counts, later ones are no-ops, so a `finally` can always settle it as neutral)."""

    model: str
    circuit: _Circuit | None
    """None: not tracked (breakers off, or a model the config does not have)."""
    probe: bool = False
    settled: bool = False


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date); None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class CircuitBreakers:
    """One breaker per configured model key."""

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        models: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or CircuitBreakerConfig()
        self._circuits: dict[str, _Circuit] = {}
        self._clock = clock
        self.configure(self._config, models)

    def configure(self, config: CircuitBreakerConfig, models: Iterable[str]) -> None:
        """Apply a (reloaded) config. Models still configured keep their state; removed ones are
        forgotten; turning breakers off closes them all."""
        self._config = config
        keep = set(models)
        for gone in set(self._circuits) - keep:
            del self._circuits[gone]
            CIRCUIT_STATE.remove(gone)
        for key in sorted(keep):
            circuit = self._circuits.get(key)
            if circuit is not None and not config.enabled:
                if circuit.state is not CircuitState.CLOSED:
                    self._move(key, circuit, CircuitState.CLOSED, "circuit breaker disabled")
                circuit = None
            if circuit is None:
                circuit = self._circuits[key] = _Circuit()
            CIRCUIT_STATE.labels(key).set(circuit.state)

    def state(self, model: str) -> CircuitState:
        circuit = self._circuits.get(model)
        return circuit.state if circuit is not None else CircuitState.CLOSED

    def admit(self, model: str) -> Permit | None:
        """A permit to call `model`, or None to skip it: its breaker is open, or half-open with
        the probe already in flight."""
        circuit = self._circuits.get(model)
        if circuit is None or not self._config.enabled:
            return Permit(model, None)
        if circuit.state is CircuitState.CLOSED:
            return Permit(model, circuit)
        if circuit.state is CircuitState.OPEN:
            if self._clock() < circuit.open_until:
                return None
            self._move(model, circuit, CircuitState.HALF_OPEN, "cooldown elapsed")
        if circuit.probing:
            return None
        circuit.probing = True
        return Permit(model, circuit, probe=True)

    def settle(
        self,
        permit: Permit,
        verdict: Verdict,
        reason: str = "",
        *,
        retry_after: float | None = None,
    ) -> None:
        """Record a permitted attempt's outcome. `reason` (a metrics-style label such as
        `timeout` or `http_503`, never content) explains a failure; `retry_after` is a 429's
        Retry-After in seconds."""
        if permit.settled:
            return
        permit.settled = True
        circuit = permit.circuit
        if circuit is None or self._circuits.get(permit.model) is not circuit:
            return
        if permit.probe:
            circuit.probing = False
        if not self._config.enabled:
            return
        if circuit.state is CircuitState.OPEN:
            return  # a call admitted before it opened: the opening already counted
        if circuit.state is CircuitState.HALF_OPEN and not permit.probe:
            return  # only the probe decides
        if verdict is Verdict.NEUTRAL:
            return
        if verdict is Verdict.SUCCESS:
            circuit.failures = 0
            if circuit.state is CircuitState.HALF_OPEN:
                circuit.openings = 0
                self._move(permit.model, circuit, CircuitState.CLOSED, "probe succeeded")
            return
        cfg = self._config
        circuit.failures += 1
        if cfg.honor_retry_after and retry_after is not None and retry_after > 0:
            self._open(permit.model, circuit, min(retry_after, cfg.max_cooldown_s), "retry-after")
        elif circuit.state is CircuitState.HALF_OPEN:
            self._open(permit.model, circuit, self._cooldown(circuit), f"probe failed: {reason}")
        elif circuit.failures >= cfg.consecutive_failures:
            why = f"{circuit.failures} consecutive failures, last: {reason}"
            self._open(permit.model, circuit, self._cooldown(circuit), why)

    def _cooldown(self, circuit: _Circuit) -> float:
        cfg = self._config
        return float(min(cfg.cooldown_s * 2.0 ** min(circuit.openings, 64), cfg.max_cooldown_s))

    def _open(self, model: str, circuit: _Circuit, cooldown_s: float, reason: str) -> None:
        circuit.failures = 0
        circuit.openings += 1
        circuit.cooldown_s = cooldown_s
        circuit.open_until = self._clock() + cooldown_s
        self._move(model, circuit, CircuitState.OPEN, reason)

    def _move(self, model: str, circuit: _Circuit, to: CircuitState, reason: str) -> None:
        before = circuit.state
        circuit.state = to
        CIRCUIT_STATE.labels(model).set(to)
        CIRCUIT_TRANSITIONS.labels(model, to.label).inc()
        level = "warning" if to is CircuitState.OPEN else "info"
        getattr(_log, level)(
            "circuit breaker",
            model=model,
            **{"from": before.label, "to": to.label},
            reason=reason,
            cooldown_s=round(circuit.cooldown_s, 3) if to is CircuitState.OPEN else None,
        )

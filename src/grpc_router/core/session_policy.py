"""The session policy: a conversation or agent run keeps its route instead of bouncing between
models.

Policies (`session.policy`):

- off: sessions are not tracked; every new user turn decides afresh.
- sticky: a new user turn runs the engine; the session keeps its route unless the turn's best
  route is more probable than the session's route, on this turn, by `switch_margin`, and the
  session has switches left (`max_switches`).
- pin: the first decision holds for the session's lifetime; later turns still run the engine,
  so that its own answer is reported as the counterfactual `engine_route`.

A call that adds no user turn (a tool step) gets the session's route without a model run.
The Router asks `SessionPolicy.begin` before deciding and `SessionPolicy.settle` after the
engine (or the decision cache) answered; the sessions themselves are kept by
`grpc_router.core.sessions.SessionStore`. Session metrics are counted here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from grpc_router.core.sessions import Session, SessionStore
from grpc_router.observability import metrics
from grpc_router.settings import SessionConfig
from grpc_router.types import Decision, SessionStatus


@dataclass(frozen=True, slots=True)
class SessionTurn:
    """One call's place in its session, taken before deciding.

    `config` is the snapshot the call started with, so that a reload mid-call cannot apply
    another policy to the same call."""

    config: SessionConfig
    session_id: str
    session: Session | None
    """The live session on the call's route set; None when there is none (yet)."""
    status: SessionStatus
    route_set: str
    key: str
    """View key of the call's routing view and route set."""

    @property
    def tracked(self) -> bool:
        """Whether the policy applies: the call has a session id and sessions are on."""
        return bool(self.session_id) and self.config.policy != "off"

    def held(self) -> Decision | None:
        """The session's route when the call adds no user turn (a tool step), else None: such
        a call keeps its session's route without running the engine."""
        if self.session is None or self.session.view != self.key:
            return None
        return Decision(route=self.session.route, confidence=self.session.confidence, engine="")


@dataclass(frozen=True, slots=True)
class SessionAnswer:
    """The decision to serve under the session policy, and how the session shaped it."""

    decision: Decision
    """The engine's decision, or (pinned) a copy carrying the session's route."""
    pinned: bool
    """The session's route was kept although the engine preferred another."""
    switched: bool
    """This turn moved the session to the engine's route."""


class SessionPolicy:
    """Applies `session.policy` (off, sticky, pin) to decisions, over a `SessionStore`."""

    def __init__(self, config: SessionConfig) -> None:
        self._store = SessionStore(config.max_sessions, config.ttl_s)

    @property
    def store(self) -> SessionStore:
        return self._store

    def resize(self, config: SessionConfig) -> None:
        """Adopt a reloaded config's bounds; sessions beyond them are forgotten."""
        self._store.resize(config.max_sessions, config.ttl_s)

    def begin(
        self, config: SessionConfig, session_id: str, route_set: str, key: str
    ) -> SessionTurn:
        """Look up the call's session (expiring idle ones first) and count what was found.
        A session kept for another route set is ignored: its route means nothing here."""
        turn = SessionTurn(config, session_id, None, SessionStatus.NONE, route_set, key)
        if not turn.tracked:
            return turn
        self._store.expire_idle()
        session, status = self._store.get(session_id)
        metrics.SESSIONS.set(len(self._store))
        if status is not SessionStatus.CONTINUED:
            metrics.SESSION_EVENTS.labels(status).inc()
        if session is not None and session.route_set != route_set:
            session = None
        return replace(turn, session=session, status=status)

    def settle(self, turn: SessionTurn, decision: Decision) -> SessionAnswer:
        """The answer under the session policy for a turn the engine (or the decision cache)
        decided; the session remembers this turn, or starts with it."""
        if not turn.tracked:
            return SessionAnswer(decision, pinned=False, switched=False)
        session = turn.session
        if session is None:
            started = Session(decision.route, decision.confidence, turn.route_set, turn.key)
            self._store.put(turn.session_id, started)
            return SessionAnswer(decision, pinned=False, switched=False)
        session.view = turn.key
        self._store.put(turn.session_id, session)
        if decision.route == session.route:
            session.confidence = decision.confidence
            return SessionAnswer(decision, pinned=False, switched=False)
        return self._contest(turn.config, session, decision)

    def _contest(
        self, config: SessionConfig, session: Session, decision: Decision
    ) -> SessionAnswer:
        """The engine prefers another route than the session's: switch (sticky, by the margin,
        with switches left) or hold the session's route."""
        best = decision.scores.get(decision.route, decision.confidence)
        kept = decision.scores.get(session.route, 0.0)
        may_switch = config.policy == "sticky" and session.switches < config.max_switches
        if may_switch and best - kept >= config.switch_margin:
            session.route, session.confidence = decision.route, best
            session.switches += 1
            metrics.SESSION_EVENTS.labels("switched").inc()
            return SessionAnswer(decision, pinned=False, switched=True)
        metrics.SESSION_EVENTS.labels("held").inc()
        session.confidence = kept
        pinned = replace(decision, route=session.route, confidence=kept)
        return SessionAnswer(pinned, pinned=True, switched=False)

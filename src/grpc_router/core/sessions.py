"""The session store: a conversation or agent run remembered by id, bounded in number and age.

A session remembers the route its calls were given and the view key of its latest user turn.
Sessions live in this process's memory, idle ones expire after `ttl_s`, and at most
`max_sessions` are kept (least recently used first out). A forgotten session starts afresh.
What a session does to a call (`session.policy`: off, sticky, pin) is decided by
`grpc_router.core.session_policy`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from grpc_router.types import SessionStatus


@dataclass(slots=True)
class Session:
    route: str
    """The engine answer the session holds (a route name, or "other")."""
    confidence: float
    route_set: str
    """Key of the route set the route belongs to; another route set starts afresh."""
    view: str
    """View key of the latest decided user turn."""
    switches: int = 0
    last_seen: float = 0.0


class SessionStore:
    """Sessions by id, bounded in number and idle time; asyncio-only."""

    def __init__(
        self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        """Ids recently expired or evicted, so that their next call can say so."""

    def __len__(self) -> int:
        return len(self._items)

    def resize(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        self._trim()

    def get(self, session_id: str) -> tuple[Session | None, SessionStatus]:
        """The live session of `session_id`, or None with NEW or EXPIRED."""
        now = self._clock()
        found = self._items.get(session_id)
        if found is not None and now - found.last_seen > self.ttl_s:
            del self._items[session_id]
            found = None
            self._remember_forgotten(session_id)
        if found is None:
            if session_id in self._forgotten:
                return None, SessionStatus.EXPIRED
            return None, SessionStatus.NEW
        found.last_seen = now
        self._items.move_to_end(session_id)
        return found, SessionStatus.CONTINUED

    def put(self, session_id: str, session: Session) -> None:
        session.last_seen = self._clock()
        self._items[session_id] = session
        self._items.move_to_end(session_id)
        self._forgotten.pop(session_id, None)
        self._trim()

    def expire_idle(self) -> int:
        """Forget sessions idle past the TTL (oldest first); returns how many."""
        now, n = self._clock(), 0
        while self._items:
            sid, oldest = next(iter(self._items.items()))
            if now - oldest.last_seen <= self.ttl_s:
                break
            del self._items[sid]
            self._remember_forgotten(sid)
            n += 1
        return n

    def _trim(self) -> None:
        while len(self._items) > self.max_sessions:
            sid, _ = self._items.popitem(last=False)
            self._remember_forgotten(sid)

    def _remember_forgotten(self, session_id: str) -> None:
        self._forgotten[session_id] = None
        while len(self._forgotten) > self.max_sessions:
            self._forgotten.popitem(last=False)

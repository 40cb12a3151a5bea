"""The server's inspector sessions: at most `MAX_SESSIONS`, the least recently used one dropped for a new one, so the
stored logits stay bounded (MAX_SESSIONS x session.MAX_STEPS rows of the vocabulary)."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from lmgen.inspect.session import InspectSession

MAX_SESSIONS = 8


class SessionStore:
    """Session id -> InspectSession, touched only on the event loop."""

    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, InspectSession] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return "insp-" + secrets.token_hex(8)

    def add(self, session: InspectSession) -> None:
        while len(self.sessions) >= self.max_sessions:
            self.sessions.popitem(last=False)
        self.sessions[session.id] = session

    def get(self, session_id: str) -> InspectSession | None:
        session = self.sessions.get(session_id)
        if session is not None:
            self.sessions.move_to_end(session_id)
            session.last_used = time.monotonic()
        return session

    def remove(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

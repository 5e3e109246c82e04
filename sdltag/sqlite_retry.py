"""Retrying the SQLite steps that "database is locked" can interrupt without any wait.

SQLite's busy timeout covers ordinary lock waits, but where waiting could deadlock
SQLite answers SQLITE_BUSY at once, without calling the busy handler: a connection
that holds a read lock and needs a write lock (switching a new file to WAL, upgrading
a read transaction while another process commits). Both the label cache and the image
index are shared by every sdltag process of a user, so such a step is backed off and
started again. Each step passed here is one whole transaction (or an idempotent
open), so a retry never repeats anything half done.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "database is busy" (not damage, not permissions)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def retry_while_busy(step: Callable[[], T], timeout: float = 60.0) -> T:
    """Run ``step``; while it fails with a lock error, back off (jittered, up to 0.25 s) and run it again."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)

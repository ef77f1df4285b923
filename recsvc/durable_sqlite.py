"""One way to open the service's append-only SQLite logs (events, exposures).

WAL lets readers run beside the single writer; `synchronous=FULL` fsyncs each commit, so a
write that returned is on disk: "acknowledged" means durable for both logs. Several server
processes (ServeConfig.processes) append to the same files: a writer that finds the database
locked waits up to BUSY_TIMEOUT_S for its turn instead of failing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_S = 5.0


def open_durable(path: Path, schema: str) -> sqlite3.Connection:
    """Connection in autocommit mode (callers BEGIN/COMMIT explicitly), shared across threads.

    Raises sqlite3.Error or OSError; callers wrap them in their own error naming the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(schema)
    return conn

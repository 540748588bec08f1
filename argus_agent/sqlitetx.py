"""One explicit SQLite transaction, for connections opened in autocommit mode
(``isolation_level=None``), as the outbox's and the salvage copy's are.

Threads: none of its own; it runs on the thread that owns the connection it is given (the
outbox's writer thread, or whichever thread ``dbrecovery.salvage_copy`` runs on).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction (the connection is in autocommit mode, where ``with db``
    alone would commit, and fsync, every statement on its own). A failed COMMIT is rolled
    back when SQLite left the transaction open, so nothing of it stays visible."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise

"""The audit log: one JSON line per launch, refusal and stop, with who asked and as whom.

``<state_dir>/audit.log``, mode 0600, appended and flushed line by line (a line is written
with one ``write`` call, so concurrent readers never see half a record). Tokens never appear:
the environment is not logged, only the names of variables the deny list dropped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from argus_agent.logsetup import get_logger, redact_text

log = get_logger(__name__)


class AuditLog:
    """Appends audit records. Blocking, one small write per record; never raises."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, action: str, **fields: Any) -> None:
        """Append ``{"ts", "action", **fields}``; failures are logged, not raised."""
        entry = {"ts": round(time.time(), 3), "action": action, **fields}
        line = redact_text(json.dumps(entry, default=str, sort_keys=True)) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write the audit log", path=str(self.path), error=str(exc))

    def read(self) -> list[dict[str, Any]]:
        """All records (for tests and tools)."""
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line]
        except FileNotFoundError:
            return []

"""Whether this host is draining: the operator's ``argus-agent drain`` / ``undrain``.

A draining agent refuses every new rerun (acked ``failed`` with "host draining", and the
rerun's batch ended ``failed`` as for any refused rerun) while the jobs it runs go on and
stops still work. The state lives in ``<state_dir>/drain.json`` (mode 0600, replaced whole by
``fsutil.atomic_write_json``, removed by ``undrain``), so it survives agent restarts and
upgrades.

Fails closed: a ``drain.json`` that cannot be read or makes no sense keeps the host draining
(an operator drained it for a reason; a damaged file must not silently undrain a host under
maintenance), with a reason saying what is wrong; ``undrain`` clears it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

from argus_agent.fsutil import atomic_write_json, read_json
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

DRAIN_FILE = "drain.json"
#: What a refused rerun's ack and its batch's error say (plus ": <the operator's reason>").
REFUSAL = "host draining"
#: The longest reason an operator may give (it ends up in acks and batch errors).
MAX_REASON = 500


class DrainState:
    """The drain state of one state dir. Use from the event loop.

    ``draining``; ``since`` (unix time), ``by`` (the OS user who drained) and ``reason`` (the
    operator's text, or None) while draining, else None.
    """

    def __init__(self, path: Path) -> None:
        #: ``<state_dir>/drain.json``. Nothing is read until ``load``.
        self.path = path
        self.draining = False
        self.since: float | None = None
        self.by: str | None = None
        self.reason: str | None = None

    def load(self) -> None:
        """Read the state the file records (call at start-up, under the state dir's lock).
        Never raises: an unreadable or damaged file keeps the host draining (logged)."""
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            self._set(False, None, None, None)
            return
        except (OSError, ValueError) as exc:
            self._damaged(str(getattr(exc, "strerror", None) or exc))
            return
        if not _well_formed(data):
            self._damaged("unexpected content")
            return
        since, by, reason = data["since"], data["by"], data.get("reason")
        self._set(True, float(since), by, reason)
        log.warning(
            "this host is draining: new reruns are refused (argus-agent undrain ends it)",
            since=since,
            by=by,
            reason=reason,
        )

    def drain(self, by: str, reason: str | None) -> bool:
        """Start draining (recorded as asked by ``by``, with ``reason``). Already draining:
        ``since`` is kept, ``by`` and ``reason`` are replaced. Returns whether the host was
        draining before. Raises OSError when the file cannot be written (nothing changes)."""
        was = self.draining
        since = self.since if was and self.since is not None else time.time()
        atomic_write_json(self.path, {"draining": True, "since": since, "by": by, "reason": reason})
        self._set(True, since, by, reason)
        return was

    def undrain(self) -> bool:
        """Stop draining; returns whether the host was draining. Raises OSError when the file
        cannot be removed (nothing changes)."""
        was = self.draining
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a damaged state: an empty directory goes, others stay
            self.path.rmdir()
        else:
            # The removal must survive a crash as a write would (atomic_write fsyncs too).
            with contextlib.suppress(OSError):
                fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._set(False, None, None, None)
        return was

    def refusal(self) -> str | None:
        """The reason a rerun is refused now ("host draining[: reason]"), or None."""
        if not self.draining:
            return None
        return f"{REFUSAL}: {self.reason}" if self.reason else REFUSAL

    def as_dict(self) -> dict[str, Any]:
        """``{"draining", "since", "by", "reason"}`` for status."""
        return {
            "draining": self.draining,
            "since": self.since,
            "by": self.by,
            "reason": self.reason,
        }

    def _set(self, draining: bool, since: float | None, by: str | None, reason: str | None) -> None:
        self.draining, self.since, self.by, self.reason = draining, since, by, reason

    def _damaged(self, problem: str) -> None:
        reason = f"{self.path} is unreadable or damaged ({problem}); run argus-agent undrain"
        self._set(True, time.time(), None, reason)
        log.error(
            "drain state file unusable; the host stays draining", path=str(self.path), error=problem
        )


#: The longest ``by`` (a user name, or ``uid N``) a drain file may hold.
MAX_BY = 256
#: How far in the future a drain's ``since`` may lie (clock steps, NTP).
MAX_SINCE_SKEW_S = 300.0


def has_control_chars(text: str) -> bool:
    """Whether ``text`` holds control characters (newlines, tabs, terminal escapes): reasons
    and names end up in acks, batch errors, logs and one-line outputs."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _printable(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit and not has_control_chars(value)


def _well_formed(data: Any) -> bool:
    """Whether ``data`` is what ``DrainState.drain`` writes, under the control socket's rules
    for the same fields (a hand-edited file gets no more than a request would)."""
    if not isinstance(data, dict) or data.get("draining") is not True:
        return False
    since, by, reason = data.get("since"), data.get("by"), data.get("reason")
    return (
        isinstance(since, int | float)
        and not isinstance(since, bool)
        and math.isfinite(since)
        and 0 <= since <= time.time() + MAX_SINCE_SKEW_S
        and _printable(by, MAX_BY)
        and (reason is None or _printable(reason, MAX_REASON))
    )

"""One agent per state directory: an exclusive lock on ``<state_dir>/agent.lock``.

Two agents on one state dir would fight over the ledger and the jobs (stops acked "no job"
while the job runs, log lines sent twice), so ``argus-agent run`` takes an exclusive
``flock`` on the lock file first and writes its pid into it. A second agent finds the lock
held, reads the holder's pid, and stops at once with one line naming it (exit 4), having
touched nothing. The kernel drops the lock when the holder exits, however it exits, so a
crashed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from argus_agent.errors import AlreadyRunningError, StateError

LOCK_NAME = "agent.lock"


class InstanceLock:
    """The state dir's lock. ``acquire`` once; ``release`` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunningError naming the running agent's pid.
        Raises StateError when the lock file cannot be opened. Does not block."""
        try:
            # O_NOFOLLOW: a root agent never truncates what a planted symlink points to.
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot open the agent's lock file: {exc.strerror}; check the "
                "state dir's owner, permissions and free space"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunningError(
                f"another argus-agent ({who}) is running with state dir {self.path.parent}; "
                "stop it first (systemctl stop argus-agent), or give this one another "
                "agent.state_dir"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.release()
            raise StateError(
                f"{self.path}: cannot write the agent's lock file: {exc.strerror}; free space "
                "on that filesystem (or fix its permissions) and start the agent again"
            ) from None

    def release(self) -> None:
        """Drop the lock (the file stays; its content no longer matters)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None

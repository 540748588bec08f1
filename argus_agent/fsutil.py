"""Small filesystem helpers shared by the state-dir owners: whole-or-nothing writes of state
files, and private (0700) directories.

``atomic_write`` owns the promise that a state file (``token.json``, job records) is replaced
whole or not at all, also on a full disk. ``ensure_private_dir`` owns the promise that the
state dir and its subdirectories are open to nobody but the agent's user.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import Any

from argus_agent.errors import StateError
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: Permission bits that give group or others any access.
GROUP_OR_OTHER = stat.S_IRWXG | stat.S_IRWXO


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def ensure_private_dir(path: Path) -> None:
    """Make sure ``path`` is a directory only its owner, this user, can enter.

    Creates it (and missing parents) when absent; the leaf gets mode 0700. An existing
    directory of this user that group or others can access is set to 0700, with a warning.
    Raises StateError (one line: path, owner, fix) when it belongs to another user and group
    or others can access it, OSError when it cannot be created, inspected or changed.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & GROUP_OR_OTHER:
        return
    me = os.geteuid()
    if info.st_uid != me:
        owner = _user_name(info.st_uid)
        user = _user_name(me)
        raise StateError(
            f"{path}: directory is owned by {owner} (uid {info.st_uid}), not by {user} who runs "
            f"the agent, and is open to group or others (mode {mode:04o}); fix it with "
            f"`chown -R {user} {path} && chmod 700 {path}` or use a directory of your own"
        )
    os.chmod(path, 0o700)
    log.warning(
        "private directory was open to group or others; set it to mode 0700",
        path=str(path),
        old_mode=f"{mode:04o}",
    )


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` whole or not at all.

    Writes a temp file next to ``path`` until every byte is written (a short write on a
    nearly full disk is continued, and fails with ENOSPC when nothing more fits), fsyncs it,
    renames it over ``path`` and fsyncs the directory. A reader sees either the old or the
    new content, never a torn file. On any failure before the rename the temp file is
    removed, ``path`` is left as it was and the OSError is raised; when only the final fsync
    of the directory fails, the new content is in place but OSError is raised all the same.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # a regular file never does this; never loop on it
                    raise OSError(errno.EIO, f"{tmp}: write made no progress")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, value: Any, *, mode: int = 0o600) -> None:
    """``atomic_write`` of ``value`` as JSON."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n", mode=mode)


def read_json(path: Path) -> Any:
    """Parse a JSON file. Raises OSError or ValueError."""
    return json.loads(path.read_text())

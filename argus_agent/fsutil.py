"""Small filesystem helpers shared by the state-dir owners: atomic writes, private dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; the leaf gets mode 0700. Raises OSError."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: write a temp file, fsync, rename, fsync dir.

    A reader sees either the old or the new content, never a torn file. Raises OSError.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
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

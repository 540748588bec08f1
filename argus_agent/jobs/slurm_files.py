"""The files of a Slurm rerun outside the state dir: the batch script, and reading what the
job wrote on the shared filesystem without trusting it.

The **batch script** (sbatch reads it on stdin; Slurm keeps its copy) runs the launch argv
(the configured shell, the recorded command, the overrides as positional parameters: the
same argv as a local launch, each word single-quoted), then writes the command's exit status
to ``exit_code`` in the job's output directory, for the day Slurm no longer remembers the
job. It traps SIGTERM, so the ``scancel --signal=TERM --full`` of a stop reaches the command
(whose handlers run or which dies) while the script itself lives on to record the status;
the command itself sees SIGTERM as usual (a caught signal is reset by exec).

The job's **output directory** (``argus-<batch>/`` in its working directory or in
``jobs.slurm_output_dir``) is made by the job's user and written by Slurm as that user, so a
system agent reads it as root from a place the user controls. Every read here therefore
opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks that what it opened is a regular file
owned by the job's user: a symlink to ``/etc/shadow``, a hard link to a file of someone else
or a FIFO is refused, never read, so the agent never sends into Argus a byte the job's user
could not read. Blocking I/O (a shared filesystem may hang): call off the event loop.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_NAME = "output.log"
EXIT_NAME = "exit_code"
#: Bytes copied from a job's output per look (the rest comes at the next one).
COPY_BYTES = 4 * 1024 * 1024
TRUNCATED = "\n[argus-agent] output beyond jobs.log_max_bytes is not copied (the job's own "


def output_dir_name(batch_id: str) -> str:
    """The job's output directory's name (batch ids hold no ``/`` nor ``%``)."""
    return f"argus-{batch_id}"


def batch_script(argv: Sequence[str], output_dir: str, batch_id: str) -> str:
    """The batch script for ``argv`` (see the module doc). Every word is single-quoted:
    newlines, quotes and ``$`` in the command or the overrides reach it unchanged."""
    command = " ".join(shlex.quote(word) for word in argv)
    exit_path = shlex.quote(os.path.join(output_dir, EXIT_NAME))
    partial = shlex.quote(os.path.join(output_dir, EXIT_NAME + ".tmp"))
    return (
        "#!/bin/sh\n"
        f"# argus-agent: Argus batch {batch_id}. Runs the recorded command, then records its\n"
        "# exit status for the agent. SIGTERM (a stop) reaches the command; this script\n"
        "# outlives it to write the status.\n"
        "trap 'argus_agent_term=1' TERM\n"
        f"{command}\n"
        "argus_agent_status=$?\n"
        f"printf '%s\\n' \"$argus_agent_status\" > {partial} && mv -f {partial} {exit_path}\n"
        'exit "$argus_agent_status"\n'
    )


class UnsafeFile(OSError):
    """A file of the job that must not be read (not a regular file of the job's user)."""


def open_owned(path: str, uid: int | None) -> int:
    """Open ``path`` for reading if it is a regular file owned by ``uid`` (any owner when
    None); returns the fd. Raises FileNotFoundError, UnsafeFile or another OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path} is not a regular file")
        if uid is not None and info.st_uid != uid:
            raise UnsafeFile(f"{path} is not owned by the job's user")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Copied:
    """What one look at a job's output did: bytes copied, whether the copy hit the cap, and
    why the output cannot be read (None when it can, or does not exist yet)."""

    copied: int
    capped: bool = False
    unreadable: str | None = None


def copy_output(source: str, mirror: str, uid: int | None, cap: int) -> Copied:
    """Append what the job's output file ``source`` gained since the last call to the
    agent's copy ``mirror`` (its size is the offset), up to ``cap`` bytes in all, then a
    marker line. Never raises for the job's file: a file that is missing is no error, one
    that cannot or must not be read is named in ``unreadable``."""
    try:
        done = os.path.getsize(mirror)
    except FileNotFoundError:
        done = 0
    if done >= cap:
        return Copied(0, capped=True)
    try:
        fd = open_owned(source, uid)
    except FileNotFoundError:
        return Copied(0)
    except OSError as exc:
        return Copied(0, unreadable=f"{source}: {exc.strerror or exc}")
    try:
        os.lseek(fd, done, os.SEEK_SET)
        data = os.read(fd, min(COPY_BYTES, cap - done))
    except OSError as exc:
        return Copied(0, unreadable=f"{source}: {exc.strerror or exc}")
    finally:
        os.close(fd)
    capped = done + len(data) >= cap
    if capped:
        data += (TRUNCATED + f"file {source} keeps it)\n").encode()
    if data:
        out = os.open(mirror, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(out, data)
        finally:
            os.close(out)
    return Copied(len(data), capped=capped)


def read_exit_code(output_dir: str, uid: int | None) -> int | None:
    """The exit status the batch script recorded, or None (not written, unsafe, garbage)."""
    try:
        fd = open_owned(os.path.join(output_dir, EXIT_NAME), uid)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and int(text) <= 255 else None

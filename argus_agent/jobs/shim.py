"""The per-job supervisor ("shim"): one small process per job that owns the job's process.

Stdlib only, and run as a script (``python -I -S shim.py``) so that it imports nothing of
the agent and starts fast with a small RSS. The idea is containerd's shim and podman's
conmon: the agent can stop, crash or be upgraded while the shim keeps the job supervised.

Protocol with the agent:

- stdin: one JSON launch spec (see ``_Spec``); read once, then closed.
- stdout: one JSON line, ``{"ok": true, "pid": ..., ...}`` once the job's exec succeeded, or
  ``{"ok": false, "error": "..."}``; then stdout is pointed at /dev/null, so a dead agent
  can never block or SIGPIPE the shim.
- SIGTERM: stop the job: SIGTERM to the whole tree, SIGKILL to what is left after the grace
  period (``stop_grace_s`` from ``stop.json`` in the job dir when present, else the spec's).
  Processes that survive SIGKILL for ``UNKILLABLE_WAIT_S`` more (uninterruptible sleep on
  NFS or a GPU driver, a frozen cgroup, a setuid program the shim may not signal) do not
  keep the stop from ending: the job is recorded as ended with their pids in the reason.

The job is started as its user (uid, gid, groups dropped first) and only then enters its
working directory, so a path the user cannot enter fails the launch whatever happened to
it after the agent's check.

When the agent gives the job cgroups (the spec's ``cgroup``, see ``cgroupfs``), the job's
process joins them between fork and exec, while it still has the shim's privileges and
before it drops them: nothing the command runs or forks, however early, starts outside
them (placing it from outside after the exec would leave a window in which it could fork
unplaced children). The shim itself stays in the agent's cgroup, so killing the job's
cgroup never kills the shim. A stop then ends, after the grace period, with the cgroup
killed (``cgroup.kill``, else freeze and SIGKILL): whatever ran in it is gone, however it
left the process tree; the exit status records the OOM kills, memory peak and limit the
cgroup saw.

Files it writes in the job dir (atomically: temp file, fsync, rename):

- ``started.json``: job pid, process group, start ticks of the job and of the shim, and the
  shim's fds and inodes of the job's output pipes (the agent opens its own read ends through
  ``/proc/<shim>/fd/N``, so a killed shim never leaves the job writing into a pipe without
  readers: the job keeps running and the agent carries its output on);
- ``exit.json``: exit code or signal, end time, whether a stop was requested, log size; if it
  cannot be written (disk full), the shim keeps the status and retries until it can;
- ``output.log``: the job's stdout and stderr, capped at ``log_max_bytes`` with a marker.

The shim is a child subreaper (``PR_SET_CHILD_SUBREAPER``): descendants that leave the
job's session or double-fork are re-parented to it instead of to init, so the job's whole
tree stays findable as "the shim's descendants" and nothing escapes a stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

if __package__:  # imported by the agent
    from argus_agent.jobs import cgroupfs
    from argus_agent.jobs.joboutput import PROGRESS_FLUSH_S, READ_CHUNK, JobOutput, keep_output
    from argus_agent.jobs.procfs import (
        boot_id,
        descendants,
        descendants_with_ticks,
        signal_process,
        start_ticks,
    )
else:  # run as a script (python -I -S shim.py): its stdlib-only siblings, nothing else
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cgroupfs
    from joboutput import PROGRESS_FLUSH_S, READ_CHUNK, JobOutput, keep_output
    from procfs import boot_id, descendants, descendants_with_ticks, signal_process, start_ticks

PR_SET_CHILD_SUBREAPER = 36
TICK_S = 0.2
#: After SIGKILL, how long processes that will not die may keep a stop from ending (the
#: spec's ``unkillable_wait_s``, from ``jobs.unkillable_wait_s``, when given).
UNKILLABLE_WAIT_S = 10.0
#: How often an exit status that could not be written (disk full) is written again.
EXIT_RETRY_S = 2.0
#: The key of ``stop.json`` that carries the grace period (written by ``jobs.store``).
STOP_GRACE_KEY = "stop_grace_s"


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` (``os.write`` may write less). Raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _atomic_json(path: str, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, whole or not at all (temp file written in
    full and fsynced, renamed, directory fsynced; the temp file is removed on failure)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            write_all(fd, json.dumps(value, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CwdError(OSError):
    """The job's user could not enter the working directory; the launch failed."""


class PlacementError(OSError):
    """The job's process could not join its cgroups or become its user; the launch failed."""


class _Spec:
    """The launch spec the agent sends on stdin."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.job_dir: str = raw["job_dir"]
        self.argv: list[str] = list(raw["argv"])
        self.cwd: str = raw["cwd"]
        self.env: dict[str, str] = dict(raw["env"])
        self.uid: int | None = raw.get("uid")
        self.gid: int | None = raw.get("gid")
        self.groups: list[int] | None = raw.get("groups")
        self.log_path: str = raw["log_path"]
        self.log_max_bytes: int = int(raw["log_max_bytes"])
        self.stop_grace_s: float = float(raw["stop_grace_s"])
        self.kill_leftovers: bool = bool(raw.get("kill_leftovers", True))
        self.leftover_grace_s: float = float(raw.get("leftover_grace_s", 5.0))
        self.unkillable_wait_s: float = float(raw.get("unkillable_wait_s", UNKILLABLE_WAIT_S))
        #: The job's cgroups (``cgroupfs``: ``{"v2": path, "memory": path, ...}``), or None.
        self.cgroup: dict[str, str] | None = raw.get("cgroup") or None


class Shim:
    """Supervises one job until it and its leftovers are gone."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.child: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        self.stop_requested_at: float | None = None
        self.kill_deadline: float | None = None
        self.killed_after_grace = False
        #: Processes still alive when a stop gave up on them (they would not die).
        self.unkillable: list[int] = []
        self.output: JobOutput | None = None
        self.readers: dict[int, bytes] = {}  # open pipe fd -> stream tag

    # -- start -------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Open the log, fork and exec the job. Returns the answer line for the agent.

        Raises OSError / subprocess.SubprocessError when the exec failed.
        """
        spec = self.spec
        self.output = JobOutput(
            spec.log_path, os.path.join(spec.job_dir, "output.streams"), spec.log_max_bytes
        )
        if spec.uid is not None and os.geteuid() == 0:
            self.output.chown(spec.uid, spec.gid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # Between fork and exec, in this order: join the job's cgroups (with the shim's
        # privileges), drop to the job's user (groups, gid, uid), and enter the working
        # directory as that user, never as root on its behalf. A failure is told through
        # this pipe as "<step>:<reason>".
        cwd_err_r, cwd_err_w = os.pipe2(os.O_CLOEXEC)
        switch_user = spec.uid is not None and spec.uid != os.geteuid()

        def prepare_child() -> None:
            step = "cgroup"
            try:
                if spec.cgroup:
                    cgroupfs.place(spec.cgroup)
                step = "user"
                if switch_user:
                    os.setgroups(spec.groups or [])
                    if spec.gid is not None:
                        os.setregid(spec.gid, spec.gid)
                    os.setreuid(spec.uid, spec.uid)
                step = "cwd"
                os.chdir(spec.cwd)
            except OSError as exc:
                os.write(cwd_err_w, f"{step}:{exc.strerror or exc}".encode()[:500])
                raise

        try:
            self.child = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                close_fds=True,
                umask=0o022,  # the agent may run with UMask=0077; jobs get the usual default
                preexec_fn=prepare_child,
            )
        except BaseException as exc:
            os.close(out_r)
            os.close(err_r)
            os.close(cwd_err_w)
            step, _, reason = os.read(cwd_err_r, 600).decode(errors="replace").partition(":")
            os.close(cwd_err_r)
            if reason and isinstance(exc, subprocess.SubprocessError):
                user = f"uid {spec.uid}" if spec.uid is not None else "the job's user"
                if step == "cwd":
                    raise CwdError(
                        f"cannot enter working directory {spec.cwd} as {user}: {reason}"
                    ) from None
                if step == "cgroup":
                    raise PlacementError(f"cannot place the job in its cgroup: {reason}") from None
                raise PlacementError(f"cannot run the job as {user}: {reason}") from None
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        os.close(cwd_err_w)
        os.close(cwd_err_r)
        self.readers = {out_r: b"o", err_r: b"e"}
        for fd in self.readers:
            os.set_blocking(fd, False)
        try:
            if self.stop_requested_at is not None:
                raise OSError("the agent gave up waiting for the launch")
            return self._started()
        except BaseException:
            # Never leave a job running that the agent is told did not start.
            with contextlib.suppress(OSError):
                os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
            raise

    def _started(self) -> dict[str, Any]:
        assert self.child is not None
        spec = self.spec
        pid = self.child.pid
        started = {
            "pid": pid,
            "pgid": pid,
            "start_ticks": start_ticks(pid),
            "shim_pid": os.getpid(),
            "shim_start_ticks": start_ticks(os.getpid()),
            "boot_id": boot_id(),
            "started_at": time.time(),
            # The agent opens its own read ends of the job's output pipes through
            # /proc/<shim_pid>/fd/<fd> (checking the inode), so the job never loses its
            # last reader when this shim is killed.
            "output_pipes": {
                tag.decode(): {"fd": fd, "inode": os.fstat(fd).st_ino}
                for fd, tag in self.readers.items()
            },
        }
        _atomic_json(os.path.join(spec.job_dir, "started.json"), started)
        return {"ok": True, **started}

    # -- run ---------------------------------------------------------------------------

    def run(self) -> None:
        """Pump output, reap children, handle stops, until the job and its tree ended (or a
        stop gave up on processes that would not die)."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        self.selector = selectors.DefaultSelector()
        for fd in self.readers:
            self.selector.register(fd, selectors.EVENT_READ, "output")
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in self.selector.select(TICK_S):
                if key.data == "output":
                    self._pump(key.fd)
                else:
                    os.read(wake_r, 512)
            self._reap()
            self._escalate()
            if self.output is not None:
                self.output.flush_progress(PROGRESS_FLUSH_S)
            if self.exit_status is not None or self._gave_up():
                break
        try:
            self._finish_leftovers()
            self._drain(deadline=time.monotonic() + 1.0)
        finally:
            self._write_exit()

    def request_stop(self, _signum: int = 0, _frame: Any = None) -> None:
        """SIGTERM handler: signal the tree now; the loop escalates after the grace."""
        if self.stop_requested_at is not None:
            return
        self.stop_requested_at = time.time()
        grace = self.spec.stop_grace_s
        try:
            with open(os.path.join(self.spec.job_dir, "stop.json")) as handle:
                grace = float(json.load(handle).get(STOP_GRACE_KEY, grace))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        self.kill_deadline = time.monotonic() + grace
        if self.child is not None:
            self._signal_tree(signal.SIGTERM)

    def _signal_tree(self, sig: int) -> int:
        """Signal the job's group (while its leader is unreaped, the group id cannot have been
        reused), every live descendant, each checked by start time, and every process in
        the job's cgroup; SIGKILL goes to the cgroup as ``cgroup.kill`` (or freeze + kill).
        Returns how many processes were found."""
        found = descendants_with_ticks(os.getpid())
        if self.child is not None and self.exit_status is None:
            with contextlib.suppress(OSError):
                os.killpg(self.child.pid, sig)
        members = self._members()
        if members and sig == signal.SIGKILL:
            with contextlib.suppress(OSError):
                cgroupfs.kill(self._v2())
        elif members:
            cgroupfs.signal_members(self._v2(), sig)
        for pid, ticks in found.items():
            signal_process(pid, ticks, sig)
        return len(set(found) | set(members))

    def _v2(self) -> str:
        assert self.spec.cgroup is not None
        return self.spec.cgroup[cgroupfs.V2]

    def _members(self) -> list[int]:
        """The processes in the job's cgroup ([] without one)."""
        return cgroupfs.procs_recursive(self._v2()) if self.spec.cgroup else []

    def _job_processes(self) -> set[int]:
        """What is left of the job: the shim's descendants (it is their subreaper) and the
        processes in the job's cgroup, whatever they did to leave the tree."""
        return descendants(os.getpid()) | set(self._members())

    def _escalate(self) -> None:
        due = self.kill_deadline is not None and time.monotonic() >= self.kill_deadline
        if due and self._signal_tree(signal.SIGKILL):
            self.killed_after_grace = True

    def _gave_up(self) -> bool:
        """Whether SIGKILL was sent ``UNKILLABLE_WAIT_S`` ago and processes still live: a
        stop ends then, naming them, rather than waiting forever."""
        if self.kill_deadline is None:
            return False
        if time.monotonic() < self.kill_deadline + self.spec.unkillable_wait_s:
            return False
        self.unkillable = sorted(self._job_processes())
        return True

    def _reap(self) -> None:
        """Collect every exited child (the job, and orphans re-parented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.exit_status = status
                self.child.returncode = os.waitstatus_to_exitcode(status)

    def _finish_leftovers(self) -> None:
        """After the job's main process ended: stop what it left behind (unless configured
        not to), so nothing of the job outlives it. Bounded: what survives SIGKILL for
        ``UNKILLABLE_WAIT_S`` is named in ``exit.json`` and left."""
        if not self.spec.kill_leftovers or self.unkillable:
            return
        deadline = self.kill_deadline or time.monotonic() + self.spec.leftover_grace_s
        give_up = max(deadline, time.monotonic()) + self.spec.unkillable_wait_s
        sig = signal.SIGTERM
        while self._job_processes():
            now = time.monotonic()
            if now >= give_up:
                self.unkillable = sorted(self._job_processes())
                break
            self._signal_tree(sig)
            if sig == signal.SIGKILL:
                self.killed_after_grace = True
            self._drain(deadline=time.monotonic() + TICK_S)
            self._reap()
            if now >= deadline:
                sig = signal.SIGKILL
        self._reap()

    # -- output ------------------------------------------------------------------------

    def _pump(self, fd: int) -> None:
        """Move available output of one pipe to the log; close the pipe at end of file."""
        assert self.output is not None
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if data:
            self.output.feed(self.readers[fd], data)
            return
        self.output.end(self.readers.pop(fd))
        self.selector.unregister(fd)
        os.close(fd)

    def _drain(self, deadline: float) -> None:
        """Pump output until every pipe is at end of file or ``deadline`` passed (writers
        that outlive the job may keep a pipe open)."""
        while self.readers and time.monotonic() < deadline:
            for key, _ in self.selector.select(min(0.05, max(deadline - time.monotonic(), 0))):
                if key.data == "output":
                    self._pump(key.fd)
                else:
                    os.read(key.fd, 512)

    # -- end ---------------------------------------------------------------------------

    def _write_exit(self) -> None:
        """Close the log (writing pending partial lines), then record how the job ended.
        The status is never lost to a full disk: the shim keeps it and retries until
        ``exit.json`` is written (the agent reports the job once it is)."""
        status = self.exit_status
        log_bytes, truncated = 0, False
        log_error = None
        if self.output is not None:
            with contextlib.suppress(OSError):
                self.output.close()
            log_bytes, truncated = self.output.bytes, self.output.truncated
            log_error = self.output.error
        note = None
        if self.unkillable:
            note = (
                f"stop incomplete: process(es) {', '.join(map(str, self.unkillable))} would not "
                f"die {self.spec.unkillable_wait_s:g} s after SIGKILL (uninterruptible sleep, "
                "e.g. on NFS or a GPU driver, or not permitted to signal them)"
            )
        exit_info = {
            "exit_code": (
                os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
            ),
            "exit_signal": (
                os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
            ),
            "ended_at": time.time(),
            "exit_note": note,
            "stop_requested_at": self.stop_requested_at,
            "killed_after_grace": self.killed_after_grace,
            "log_bytes": log_bytes,
            "log_truncated": truncated,
            "log_error": log_error,
        }
        if self.spec.cgroup:
            # Read before the agent removes the cgroup: OOM kills, peak and limit.
            exit_info.update(cgroupfs.memory_facts(self.spec.cgroup))
        path = os.path.join(self.spec.job_dir, "exit.json")
        while True:
            try:
                _atomic_json(path, exit_info)
                return
            except FileNotFoundError:
                return  # the job dir is gone: nobody is left to read the status
            except OSError as exc:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"writing {path} failed ({exc}); retrying\n")
                    sys.stderr.flush()
                time.sleep(EXIT_RETRY_S)


def _ignore(_signum: int, _frame: Any) -> None:
    """A handler that does nothing."""


def _answer(line: dict[str, Any]) -> None:
    """Send the one answer line, then detach stdout so a dead agent can't hurt us."""
    with contextlib.suppress(OSError):
        os.write(1, json.dumps(line).encode() + b"\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def main() -> int:
    """Entry point: read the spec, launch, answer, supervise. Returns the shim's exit code."""
    if sys.argv[1:] == ["--keep-output"]:
        return keep_output()
    # The shim shrugs these off; a handled signal (unlike an ignored one) is reset to its
    # default in the job at exec, so the job sees SIGINT, SIGHUP, SIGUSR1... as usual.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _ignore)
    try:
        spec = _Spec(json.loads(sys.stdin.buffer.read()))
    except (ValueError, KeyError, TypeError) as exc:
        _answer({"ok": False, "error": f"supervisor got a bad launch spec: {exc}"})
        return 2
    # Not Linux: no subreaper, and descendants that double-fork may escape a stop.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    shim = Shim(spec)
    signal.signal(signal.SIGTERM, shim.request_stop)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector via the wakeup fd
    try:
        answer = shim.start()
    except (CwdError, PlacementError) as exc:
        _answer({"ok": False, "error": str(exc)})
        return 1
    except (OSError, subprocess.SubprocessError) as exc:
        what = getattr(exc, "filename", None) or spec.argv[0]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _answer({"ok": False, "error": f"cannot start {what}: {reason}"})
        return 1
    _answer(answer)
    shim.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

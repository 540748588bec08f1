"""GPU readings behind one small interface: NVML (nvidia-ml-py), none, or a fake for tests.

A backend's ``read()`` blocks (NVML calls can be slow on some drivers), so the agent calls it
through :class:`GpuReader`, which runs it on its own thread with a time limit and never lets
slow calls pile up. No driver, no GPU or no NVML library means no GPU fields, one log line,
and no crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from argus_agent.logsetup import get_logger

log = get_logger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as read at one moment. ``processes`` maps pid → GPU memory in MiB."""

    index: int
    uuid: str
    name: str
    util_pct: float | None
    mem_used_mb: float | None
    mem_total_mb: float | None
    temp_c: float | None
    processes: dict[int, float] = field(default_factory=dict)


class GpuBackend(Protocol):
    """Reads every GPU of the host."""

    name: str

    def read(self) -> list[GpuDevice]:
        """Blocking read of every device; raises on a failure of the whole backend."""
        ...

    def close(self) -> None:
        """Release the library."""
        ...


class NoGpuBackend:
    """A host without (usable) GPUs. ``reason`` says why, for status (None when none was
    asked for)."""

    name = "none"

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    def read(self) -> list[GpuDevice]:
        """No devices."""
        return []

    def close(self) -> None:
        """Nothing to release."""


class GpuUnavailable(Exception):
    """NVML cannot be used on this host (no library, no driver, no device)."""


class NvmlBackend:
    """NVIDIA's NVML through nvidia-ml-py (``pynvml``)."""

    name = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise GpuUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML unavailable: {exc}") from None
        if self._count == 0:
            pynvml.nvmlShutdown()
            raise GpuUnavailable("NVML found no GPU")
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._count)]
        self._static = [
            (self._text(pynvml.nvmlDeviceGetUUID, h), self._text(pynvml.nvmlDeviceGetName, h))
            for h in self._handles
        ]

    def _text(self, fn: Any, handle: Any) -> str:
        try:
            value = fn(handle)
        except self._nvml.NVMLError:
            return "?"
        return value.decode() if isinstance(value, bytes) else str(value)

    def _maybe(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def read(self) -> list[GpuDevice]:
        """Utilisation, memory, temperature and per-process memory of every GPU."""
        nvml = self._nvml
        devices = []
        for index, handle in enumerate(self._handles):
            util = self._maybe(nvml.nvmlDeviceGetUtilizationRates, handle)
            mem = self._maybe(nvml.nvmlDeviceGetMemoryInfo, handle)
            temp = self._maybe(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            processes: dict[int, float] = {}
            for getter in (
                nvml.nvmlDeviceGetComputeRunningProcesses,
                nvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                for proc in self._maybe(getter, handle) or ():
                    used = getattr(proc, "usedGpuMemory", None)
                    if isinstance(used, int) and used >= 0:
                        processes[proc.pid] = processes.get(proc.pid, 0.0) + used / MIB
                    else:
                        processes.setdefault(proc.pid, 0.0)
            uuid, name = self._static[index]
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=uuid,
                    name=name,
                    util_pct=float(util.gpu) if util is not None else None,
                    mem_used_mb=mem.used / MIB if mem is not None else None,
                    mem_total_mb=mem.total / MIB if mem is not None else None,
                    temp_c=float(temp) if temp is not None else None,
                    processes=processes,
                )
            )
        return devices

    def close(self) -> None:
        """Shut NVML down."""
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class FakeGpuBackend:
    """Simulated GPUs for tests and demos: set devices and per-process memory at will.

    ``delay_s`` makes every read slow, to exercise the time limit.
    """

    name = "fake"

    def __init__(self, devices: list[GpuDevice], *, delay_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._devices = list(devices)
        self.delay_s = delay_s
        self.reads = 0

    def set_processes(self, index: int, processes: dict[int, float]) -> None:
        """Replace the per-process memory map of device ``index``."""
        with self._lock:
            self._devices[index] = replace(self._devices[index], processes=dict(processes))

    def read(self) -> list[GpuDevice]:
        """The simulated devices (after ``delay_s``)."""
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        with self._lock:
            self.reads += 1
            return list(self._devices)

    def close(self) -> None:
        """Nothing to release."""


def open_backend(mode: str) -> GpuBackend:
    """``auto``: NVML when usable, else none (one log line); ``nvml``: NVML or none with an
    error line; ``none``: no GPU readings."""
    if mode == "none":
        return NoGpuBackend()
    try:
        backend = NvmlBackend()
    except GpuUnavailable as exc:
        if mode == "nvml":
            log.error("GPU readings unavailable; GPU fields will be empty", reason=str(exc))
        else:
            log.info("no GPU readings on this host; GPU fields will be empty", reason=str(exc))
        return NoGpuBackend(str(exc))
    log.info("GPU readings through NVML", devices=len(backend._handles))
    return backend


def in_daemon_thread(fn: Any) -> Future[Any]:
    """Run ``fn()`` on a new daemon thread; its Future. A call that never returns (a wedged
    driver) then never keeps the process from exiting, unlike an executor's worker."""
    future: Future[Any] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="argus-gpu", daemon=True).start()
    return future


async def open_backend_async(mode: str, timeout_s: float) -> GpuBackend:
    """``open_backend`` off the event loop, within ``timeout_s`` (NVML's init can hang on a
    broken driver): on time-out, no GPU readings, and one log line."""
    if mode == "none":
        return NoGpuBackend()
    try:
        return await asyncio.wait_for(
            asyncio.wrap_future(in_daemon_thread(lambda: open_backend(mode))), timeout_s
        )
    except TimeoutError:
        log.error("NVML did not initialise in time; GPU fields will be empty", timeout_s=timeout_s)
        return NoGpuBackend(f"NVML did not initialise within {timeout_s:g} s")


class GpuReader:
    """Calls a backend off the event loop, on a daemon thread, with a time limit.

    While a slow read is still running, later ticks get None instead of queueing more calls.
    """

    def __init__(self, backend: GpuBackend, *, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self._inflight: Future[list[GpuDevice]] | None = None
        self._slow_reported = False
        self._error_reported = False

    async def read(self) -> list[GpuDevice] | None:
        """The devices, or None when the read failed, timed out, or one is still running."""
        if isinstance(self.backend, NoGpuBackend):
            return []
        if self._inflight is not None and not self._inflight.done():
            return None
        self._inflight = in_daemon_thread(self.backend.read)
        try:
            devices = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self._inflight)), self.timeout_s
            )
        except TimeoutError:
            if not self._slow_reported:
                self._slow_reported = True
                log.warning(
                    "GPU read is slow; skipping GPU fields until it answers",
                    backend=self.backend.name,
                    timeout_s=self.timeout_s,
                )
            return None
        except Exception as exc:
            if not self._error_reported:
                self._error_reported = True
                log.warning("GPU read failed", backend=self.backend.name, error=str(exc))
            return None
        self._slow_reported = self._error_reported = False
        return devices

    def close(self) -> None:
        """Release the backend, unless a read still runs in it (a wedged driver)."""
        if self._inflight is None or self._inflight.done():
            self.backend.close()

"""sd_notify for ``Type=notify`` units: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Does nothing when the process is not under systemd (no ``NOTIFY_SOCKET``). Never raises:
a notification is best effort.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends datagrams to systemd's notify socket, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is known."""
        return self.address is not None

    def notify(self, message: str) -> None:
        """Send one ``KEY=VALUE`` message; ignored when not under systemd or on error."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError:
            pass

    def ready(self, status: str) -> None:
        """Tell systemd start-up finished."""
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """Update the one-line status `systemctl status` shows."""
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Feed the watchdog (only call when the daemon is healthy)."""
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        """Tell systemd a configuration reload began; ``ready`` tells it the reload ended.
        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, as ``time.monotonic``) is what a
        ``Type=notify-reload`` unit requires with ``RELOADING=1``."""
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        """Tell systemd shutdown began."""
        self.notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """Half the unit's ``WatchdogSec`` when systemd asked this process for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None

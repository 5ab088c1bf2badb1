"""systemd's readiness protocol (sd_notify(3)), for `Type=notify` units.

The protocol is one datagram of "KEY=value" lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading "@" means the abstract namespace). We write it here rather than
depend on the `sdnotify` package: it is about twenty lines, and that package (last released
2017) neither reports failures nor knows the abstract-namespace form.

Messages confedge sends (systemd.service(5), sd_notify(3)):

* READY=1 with STATUS=... once every enabled part listens (Runtime.start returned);
* WATCHDOG=1 every WATCHDOG_USEC / 2 from the event loop, so a stuck loop is restarted;
* RELOADING=1 (+ MONOTONIC_USEC) then READY=1 around a SIGHUP reload;
* STOPPING=1 when the stop begins.

Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

__all__ = ["Notifier"]

log = logging.getLogger("confedge")


class Notifier:
    """Sends sd_notify datagrams when $NOTIFY_SOCKET is set; see the module docstring."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=value lines; False (logged once) if it could not go."""
        if self.address is None:
            return False
        data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)
        if self.watchdog_interval and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watchdog(), name="watchdog")

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    async def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watchdog(self) -> None:
        assert self.watchdog_interval is not None
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(self.watchdog_interval)

"""systemd's notify protocol (sd_notify), spoken directly: one datagram per message.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) and waits for ``READY=1``; ``STATUS=`` lines show in ``systemctl status``; with
``WatchdogSec=`` it passes ``$WATCHDOG_USEC`` and restarts the daemon unless ``WATCHDOG=1``
arrives at least that often. No dependency needed. Outside systemd every call is a no-op.

Daemon-only.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        watchdog = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if watchdog else None
        self._sock = None

    def send(self, **fields) -> None:
        """``send(READY=1, STATUS="serving 3 models")``: best effort, never raises."""
        if not self.address:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError:
            pass  # systemd went away or the socket is gone: nothing a daemon can do about it

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

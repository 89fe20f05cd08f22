"""A connection to a weightd daemon: the transport under every client call. torch-free.

Two DEALER sockets: the read socket (everyone in the daemon's group) and, connected on the
first call that changes what is loaded, the admin socket beside it. Each call is the kernel's
one round trip (``weightd.protocol.round_trip``) with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket as _socket
import struct
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from weightd import protocol, trust
from weightd.errors import DaemonNotRunning, PermissionDenied, WeightdError

DEFAULT_TIMEOUT = 10.0
ENV_TIMEOUT = "WEIGHTD_TIMEOUT"
PROBE_SECONDS = 2.0  # while waiting, how often the socket file is also probed (connection refused?)


class Connection:
    """One connection to a daemon. Not thread-safe (a ZeroMQ socket is not)."""

    def __init__(self, socket: str | None = None, *, timeout: float | None = None):
        self.socket_path = os.path.abspath(socket or protocol.default_socket())
        self.timeout = timeout if timeout is not None else float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT))
        # Only a socket in a directory nobody else can write is the daemon's (weightd.trust);
        # it is connected by that checked, resolved path.
        trust.check_length(self.socket_path)
        real = self.socket_path
        if os.path.isdir(os.path.dirname(real)):
            real = trust.socket_path(real)
        self.admin_path = protocol.admin_socket(real)
        # Who the daemon runs as, from the kernel (SO_PEERCRED), not from what it says: the
        # segments it names must be that user's.
        self.daemon_uid = check_listening(real)
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)
        # A monitor per socket: a daemon that dies drops the connection, and a caller waiting on
        # a reply (a long load) hears of it within protocol.ALIVE_SECONDS, not at its timeout.
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
        self._sock: zmq.Socket | None = self._connect(real)
        self._admin: zmq.Socket | None = None

    def close(self) -> None:
        for sock, monitor in self._monitors.items():
            # Monitoring off before its reader goes: libzmq's I/O thread (one per process, shared
            # by every connection) would otherwise block for good sending a later event (the
            # daemon going away while the socket closes) to a monitor nobody reads.
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in (self._sock, self._admin):
            if sock is not None:
                sock.close(linger=0)
        self._sock = self._admin = None

    def __del__(self):
        # A connection dropped unclosed: its monitors must still be switched off first (close()).
        with contextlib.suppress(Exception):
            self.close()

    def _connect(self, path: str) -> zmq.Socket:
        sock = _connect(path)
        self._monitors[sock] = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return sock

    def _disconnected(self, sock: zmq.Socket) -> bool:
        """Whether ``sock`` lost its connection to the daemon since the last look."""
        monitor = self._monitors.get(sock)
        lost = False
        while monitor is not None and monitor.poll(0):
            lost |= recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        return lost

    def _watch(self, sock: zmq.Socket, path: str, op: str):
        """``alive()`` for one request: raises once the daemon is seen to be gone."""
        last_probe = [time.monotonic()]

        def alive() -> None:
            if self._disconnected(sock):
                raise DaemonNotRunning(
                    f"the daemon at {path} went away while answering {op!r} (it stopped or died): see "
                    "its log (journalctl -u weightd); what it was doing did not finish"
                )
            now = time.monotonic()
            if now - last_probe[0] >= PROBE_SECONDS:
                last_probe[0] = now
                check_listening(path)

        return alive

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, *, timeout: float | None = None, progress=None, **fields) -> dict:
        """Send one request and wait for its reply; raises the daemon's typed error.

        ``timeout`` bounds the silence between messages: a long load that keeps reporting
        ``progress(done, total)`` is not cut off.
        """
        if self._sock is None:
            raise WeightdError("this Client is closed")
        if os.getpid() != self._pid:
            raise WeightdError("this Client was made before a fork: make a new one in the child")
        sock, path = self._socket_for(op)
        self._disconnected(sock)  # a restart between calls is no error: the socket reconnects
        rid = self._prefix + next(self._ids).to_bytes(8, "little")
        return protocol.round_trip(
            sock,
            rid,
            op,
            fields,
            timeout=self.timeout if timeout is None else timeout,
            progress=progress,
            silent=lambda: check_listening(path),
            where=f"the daemon at {path}",
            alive=self._watch(sock, path, op),
        )

    def _socket_for(self, op: str) -> tuple[zmq.Socket, str]:
        if op in protocol.READ_OPS:
            return self._sock, self.socket_path
        if self._admin is None:
            check_listening(self.admin_path, admin=True)
            self._admin = self._connect(self.admin_path)
        return self._admin, self.admin_path


def _connect(path: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(protocol.endpoint(path))
    return sock


def check_listening(path: str, admin: bool = False) -> int:
    """Tell 'no daemon' apart from 'slow daemon' at once, instead of after a timeout; the uid
    the daemon runs as."""
    hint = (
        "start one with `weightd serve --model NAME=PATH`, or point socket= / $WEIGHTD_SOCKET at the socket "
        "of the daemon that is running"
    )
    if not os.path.exists(path):
        raise DaemonNotRunning(f"no weightd daemon at {path} (no socket file): {hint}")
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return struct.unpack("3i", probe.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]
    except ConnectionRefusedError:
        raise DaemonNotRunning(
            f"no weightd daemon at {path} (connection refused; the daemon that made it is gone): {hint}"
        ) from None
    except PermissionError:
        who = (
            "the daemon's user or root may load, unload and publish"
            if admin
            else "run as a member of the daemon's group"
        )
        raise PermissionDenied(f"may not connect to {path}: {who}") from None
    except OSError as e:
        raise DaemonNotRunning(f"cannot reach a weightd daemon at {path} ({e.strerror}): {hint}") from None
    finally:
        probe.close()

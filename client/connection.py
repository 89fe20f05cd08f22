"""A connection to a weightd daemon: the transport under every client call. torch-free.

Two DEALER sockets: the read socket (everyone in the daemon's group) and, connected on the
first call that changes what is loaded, the admin socket beside it. Each call is the kernel's
one round trip (``weightd.protocol.round_trip``) with a deadline.
"""

from __future__ import annotations

import itertools
import os
import socket as _socket
import struct

import zmq

from weightd import protocol, trust
from weightd.errors import DaemonNotRunning, PermissionDenied, WeightdError

DEFAULT_TIMEOUT = 10.0
ENV_TIMEOUT = "WEIGHTD_TIMEOUT"


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
        self._sock: zmq.Socket | None = _connect(real)
        self._admin: zmq.Socket | None = None

    def close(self) -> None:
        for sock in (self._sock, self._admin):
            if sock is not None:
                sock.close(linger=0)
        self._sock = self._admin = None

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
        )

    def _socket_for(self, op: str) -> tuple[zmq.Socket, str]:
        if op in protocol.READ_OPS:
            return self._sock, self.socket_path
        if self._admin is None:
            check_listening(self.admin_path, admin=True)
            self._admin = _connect(self.admin_path)
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

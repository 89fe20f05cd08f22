"""The daemon's endpoints: the lock that makes it the only daemon on its socket, the two ROUTER
sockets and their permissions, and moving frames in and out.

Access is filesystem permissions. The *read* socket (mode 0660, the daemon's group) serves the
read ops; the *admin* socket beside it (mode 0600) serves everything, including load, unload
and publish. Whoever may connect to the admin socket may change what is loaded: the daemon's
own user, and root.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass

import zmq

from weightd import protocol
from weightd.errors import AlreadyRunning

log = logging.getLogger("weightd")

READ_MODE = 0o660
ADMIN_MODE = 0o600


@dataclass(frozen=True)
class Peer:
    """Where a reply goes: the socket a request came in on, its sender and its request id."""

    sock: zmq.Socket
    identity: bytes
    rid: bytes
    admin: bool


class Endpoints:
    def __init__(self, socket_path: str, group: int | None = None):
        self.socket_path = socket_path
        self.admin_path = protocol.admin_socket(socket_path)
        self.group = group
        self._lock_fd: int | None = None
        self._ctx: zmq.Context | None = None
        self.read: zmq.Socket | None = None
        self.admin: zmq.Socket | None = None
        self._inodes: dict[str, int] = {}

    # --- the lock ---

    def acquire_lock(self) -> None:
        """One daemon per socket: an flock beside it, held for the daemon's life."""
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        fd = os.open(self.socket_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"weightd is already running on {self.socket_path} (pid {pid}): use that daemon, "
                "stop it first, or pass another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        # The lock file stays: unlinking it would let a daemon that opened it a moment ago
        # lock a file nobody else can see any more.
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the sockets ---

    @property
    def bound(self) -> bool:
        return self.read is not None

    def bind(self) -> None:
        self._ctx = zmq.Context()
        self.read = self._ctx.socket(zmq.ROUTER)
        self.admin = self._ctx.socket(zmq.ROUTER)
        for sock, path, mode in self._endpoints():
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REQUEST_BYTES)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._bind_one(sock, path, mode)

    def _endpoints(self):
        return [(self.read, self.socket_path, READ_MODE), (self.admin, self.admin_path, ADMIN_MODE)]

    def _bind_one(self, sock: zmq.Socket, path: str, mode: int) -> None:
        # We hold the lock, so a socket file here is a dead daemon's (or stale): replace it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(protocol.endpoint(path))
        os.chmod(path, mode)
        if self.group is not None:
            os.chown(path, -1, self.group)
        self._inodes[path] = os.stat(path).st_ino

    def check(self) -> None:
        """Bind again if someone deleted (or replaced) a socket file under the running daemon.

        Clients find the daemon by path only; without this, a stray `rm` or a tmp cleaner
        would make a healthy daemon unreachable until restarted.
        """
        for sock, path, mode in self._endpoints():
            try:
                ours = os.stat(path).st_ino == self._inodes.get(path)
            except FileNotFoundError:
                ours = False
            if not ours:
                log.warning("socket %s was removed or replaced: binding it again", path)
                with contextlib.suppress(zmq.ZMQError):
                    sock.unbind(protocol.endpoint(path))
                try:
                    self._bind_one(sock, path, mode)
                except (OSError, zmq.ZMQError) as e:
                    log.error("cannot bind %s again: %s", path, e)

    def receive(self, sock: zmq.Socket):
        """Every message waiting on ``sock``, as (routing identity, the frames after it)."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) < 2:
                log.debug("dropped a message with no request id")
                continue
            yield frames[0], frames[1:]

    @staticmethod
    def send(peer: Peer, reply: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the peer went away: nothing to do
            peer.sock.send_multipart([peer.identity, peer.rid, reply], zmq.NOBLOCK)

    def close(self) -> None:
        was_bound = self.bound
        for sock in (self.read, self.admin):
            if sock is not None:
                sock.close(linger=0)
        if was_bound:
            for path in (self.socket_path, self.admin_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.read = self.admin = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

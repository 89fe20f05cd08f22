"""The daemon's endpoints: the lock that makes it the only daemon on its socket, the two ROUTER
sockets and their permissions, and moving frames in and out.

Access is filesystem permissions. The *read* socket (mode 0660, the daemon's group) serves the
read ops; the *admin* socket beside it (mode 0600) serves everything, including load, unload
and publish. Whoever may connect to the admin socket may change what is loaded: the daemon's
own user, and root.

The socket's directory is made here (0700, or 0750 for ``--group``) or, if it exists, used only
when nobody but trusted users can write it (``weightd.trust``), and from then on by its
resolved path; the lock file beside it is opened without following a symlink.

Note [a request is bounded as a whole]
--------------------------------------
``ZMQ_MAXMSGSIZE`` bounds one frame, not a message, and ZeroMQ hands a multipart message over
only once all of it has arrived. So the daemon counts frames and bytes of every message it
receives: one with more frames than a request has, or more bytes in all than
``MAX_REQUEST_BYTES``, is dropped unanswered at once, its frames never copied (they are
received zero-copy), and logged with the sender's pid and uid (the kernel's, which ZeroMQ
reports as the message's Peer-Address). ``ZMQ_RCVHWM`` bounds how many messages one
connection may have waiting. What remains: ZeroMQ assembles a whole message before the daemon
can see it, so a member of the socket's group can make the daemon hold one oversized message
per connection until it is read (the next turn of the loop). The connection is not shut:
ZeroMQ has no call for that on a ROUTER, and shutting the sender's sockets by its credentials
would cut every connection of that process, good ones included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass

import zmq

from weightd import protocol, trust
from weightd.errors import AlreadyRunning, UnsafePath

log = logging.getLogger("weightd")

READ_MODE = 0o660
ADMIN_MODE = 0o600
REQUEST_FRAMES = 3  # routing identity, request id, header
QUEUED_PER_PEER = 64  # ZMQ_RCVHWM: messages one connection may have waiting (a client sends one at a time)


@dataclass(frozen=True)
class Peer:
    """Where a reply goes: the socket a request came in on, its sender and its request id."""

    sock: zmq.Socket
    identity: bytes
    rid: bytes
    admin: bool
    # From the kernel (SO_PEERCRED, via ZeroMQ): pid 0 is a process in a PID namespace this
    # daemon cannot see into (its own pid is in its namespace only).
    pid: int = 0
    uid: int = -1


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
        """One daemon per socket: an flock beside it, held for the daemon's life.

        First of all: the socket paths fit a Unix socket, and its directory is safe."""
        for path in (self.socket_path, self.admin_path):
            trust.check_length(path)
        self._make_directory(os.path.dirname(self.socket_path))
        self.socket_path = trust.socket_path(self.socket_path)
        self.admin_path = protocol.admin_socket(self.socket_path)
        for path in (self.socket_path, self.admin_path):
            trust.check_length(path)
        fd = _open_lock(self.socket_path + ".lock")
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

    def _make_directory(self, directory: str) -> None:
        """Make the socket's directory if it is missing: 0700, or 0750 with its group for
        ``--group``. An existing one is left as it is, for ``trust.socket_path`` to judge."""
        parent = os.path.dirname(directory)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)  # atomic: if someone made it first, this fails
        except FileExistsError:
            return
        trust.socket_path(os.path.join(directory, "x"))  # ours, reached through safe directories only
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if self.group is not None:
                os.fchown(fd, -1, self.group)
            os.fchmod(fd, 0o700 if self.group is None else 0o750)  # whatever the umask
        finally:
            os.close(fd)

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
            # a frame, and how many messages wait: Note [a request is bounded as a whole]
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REQUEST_BYTES)
            sock.setsockopt(zmq.RCVHWM, QUEUED_PER_PEER)
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
        """Every message waiting on ``sock``, as (routing identity, the frames after it, the
        sender's (pid, uid)); see Note [a request is bounded as a whole]."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                log.debug("dropped a message with no request id")
                continue
            pid, uid, gid = _credentials(frames[1])
            size = sum(len(f) for f in frames[1:])
            if len(frames) > REQUEST_FRAMES or size > protocol.MAX_REQUEST_BYTES:
                log.warning(
                    "dropped a message of %d frames, %d bytes from pid %d uid %d: a request is "
                    "[request-id, header], at most %d bytes",
                    len(frames),
                    size,
                    pid,
                    uid,
                    protocol.MAX_REQUEST_BYTES,
                )
                del frames
                continue
            yield frames[0].bytes, [f.bytes for f in frames[1:]], (pid, uid)

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


def _open_lock(path: str) -> int:
    """The lock file, made with O_EXCL or opened as it is; never through a symlink, and only a
    regular file with one name (not a hard link to something else)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(3):
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            continue  # removed between the two opens: make it
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"{path} is a symbolic link, not weightd's lock file: remove it") from None
            raise
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        raise UnsafePath(f"{path} is not a plain lock file (a directory, FIFO or hard link): remove it")
    raise UnsafePath(f"{path} keeps disappearing: something else is working in {os.path.dirname(path)}")


def _credentials(frame: zmq.Frame) -> tuple[int, int, int]:
    """(pid, uid, gid) of a message's sender: libzmq reports SO_PEERCRED of an ipc:// peer as
    its Peer-Address, "<host>:<uid>:<gid>:<pid>"."""
    try:
        _, uid, gid, pid = frame.get("Peer-Address").rsplit(":", 3)
        return int(pid), int(uid), int(gid)
    except (zmq.ZMQError, ValueError, AttributeError):
        return 0, -1, -1

"""A ZeroMQ DEALER socket in plain Python: what a client needs of ZeroMQ, over the daemon's
Unix socket. torch-free, and free of pyzmq too.

Note [the client speaks ZMTP itself]
------------------------------------
The daemon binds ZeroMQ ROUTER sockets on ``ipc://`` (libzmq, ``weightd.daemon.endpoints``);
a client needs one DEALER connection to each, one request at a time. Importing pyzmq costs a
fresh worker ~8 ms (most of a 1 GiB model's whole attach), and a context starts an I/O thread
whose socket connects in the background, so that a daemon going away must be watched through a
socket monitor. This module speaks the wire protocol itself (ZMTP 3.1, rfc.zeromq.org/spec/37,
NULL security, what libzmq speaks on ``ipc://``): a greeting and a READY command each way, then
messages as frames. A blocking Unix socket connects (or is refused) at once, the kernel says
who the daemon is (``SO_PEERCRED``), and the daemon going away is an end of file on the next
read, not an event on a monitor. Nothing here runs on another thread.

What it sends is what libzmq's DEALER sends: the same greeting, ``READY`` with
``Socket-Type: DEALER``, and only once the daemon's READY came (libzmq drops a peer whose
message arrives while it is still handshaking), frames with the MORE and LONG flags. ``PING``
is answered with ``PONG`` (libzmq sends it only with heartbeats switched on, which the daemon
does not do); any other command is ignored, ``ERROR`` ends the connection.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from weightd.errors import ProtocolError, RequestTimeout

SIGNATURE = b"\xff" + b"\0" * 8 + b"\x7f"
GREETING = SIGNATURE + bytes([3, 1]) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31  # 64 bytes
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
READ_CHUNK = 1 << 20
SEND_SECONDS = 10.0


class PeerGone(EOFError):
    """The daemon closed the connection (it stopped, died, or dropped this peer)."""


class Dealer:
    """One ZMTP connection to the ROUTER socket at ``path``: ``send_multipart``, ``poll``,
    ``recv_multipart``, as a pyzmq DEALER socket offers them (``weightd.protocol.round_trip``)."""

    def __init__(self, path: str, timeout: float):
        """Connect and send this side's greeting and READY. Nothing waits for the daemon's
        (a daemon that is busy or stopped is the next call's timeout, as with ZeroMQ)."""
        self.path = path
        self.peer_type: bytes | None = None  # ROUTER, once its READY came
        self._greeted = False
        self._buf = bytearray()
        self._messages: list[list[bytes]] = []
        self._frames: list[bytes] = []  # the message being received
        self._eof = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)  # a full listen backlog makes connect wait
            self._sock.connect(path)  # FileNotFoundError, ConnectionRefusedError...: the caller's to say
            self._sock.sendall(GREETING + _command(b"READY", {b"Socket-Type": b"DEALER"}))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    # --- what round_trip uses ---

    def send_multipart(self, frames: list[bytes]) -> None:
        """Send one message, once the handshake is done (``Connection.call`` waits for it within
        its own deadline first; here at most ``SEND_SECONDS``)."""
        if self.peer_type is None and not self.handshake(SEND_SECONDS):
            raise RequestTimeout(
                f"the daemon at {self.path} did not answer the connection in {SEND_SECONDS:g} s"
            )
        out = bytearray()
        for i, f in enumerate(frames):
            out += _frame(f, MORE if i < len(frames) - 1 else 0)
        # Whole or not at all: a request is a few hundred bytes, so only a daemon that has not
        # read for a long while leaves no room for it; half a message would garble the stream.
        self._sock.settimeout(SEND_SECONDS)
        try:
            self._sock.sendall(out)
        except (BrokenPipeError, ConnectionResetError):
            self._eof = True
            raise PeerGone(self.path) from None
        except TimeoutError:
            self._eof = True
            raise RequestTimeout(
                f"the daemon at {self.path} read no request for {SEND_SECONDS:g} s: it is stuck or stopped"
            ) from None
        finally:
            self._sock.setblocking(False)

    def poll(self, timeout_ms: float | None = None) -> bool:
        """Whether a message (or the end of the connection) is here within ``timeout_ms``."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while not (self._messages or self._eof):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([self._sock], [], [], left)[0]:
                return False
            self._receive()
        return True

    def recv_multipart(self) -> list[bytes]:
        """The next message; raises ``PeerGone`` once the daemon closed the connection."""
        self.poll()
        if self._messages:
            return self._messages.pop(0)
        raise PeerGone(self.path)

    # --- the rest ---

    def handshake(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the daemon's READY; whether it came (or the
        connection ended, which the next read raises). A message must not be sent before it:
        libzmq drops a peer whose message arrives while it is still handshaking."""
        deadline = time.monotonic() + timeout
        while self.peer_type is None and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                return False
            self._receive()
        return True

    def gone(self) -> bool:
        """Whether the daemon closed the connection (looked at now, without waiting)."""
        self.poll(0)
        return self._eof and not self._messages

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the process that accepted the connection, from the kernel."""
        pid, uid, gid = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid, uid, gid

    def close(self) -> None:
        self._sock.close()

    def _receive(self) -> None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self._eof = True
            return
        self._buf += data
        self._parse()

    def _parse(self) -> None:
        buf, pos = self._buf, 0
        if not self._greeted:
            if len(buf) < len(GREETING):
                return
            greeting = bytes(buf[: len(GREETING)])
            if greeting[0] != SIGNATURE[0] or greeting[9] != SIGNATURE[9] or greeting[10] < 3:
                raise ProtocolError(
                    f"{self.path} does not speak ZeroMQ 3 (ZMTP): is it a weightd daemon's socket?"
                )
            if greeting[12:32].rstrip(b"\0") != b"NULL":
                raise ProtocolError(f"{self.path} asks for ZeroMQ security this client does not speak")
            self._greeted = True
            pos = len(GREETING)
        while len(buf) - pos >= 2:
            flags = buf[pos]
            head = 9 if flags & LONG else 2
            if len(buf) - pos < head:
                break
            size = int.from_bytes(buf[pos + 1 : pos + head], "big")
            if len(buf) - pos - head < size:
                break
            body = bytes(buf[pos + head : pos + head + size])
            pos += head + size
            if flags & COMMAND:
                name, props = _parse_command(body)
                if name == b"READY":
                    self.peer_type = props.get(b"Socket-Type", b"")
                    if self.peer_type != b"ROUTER":
                        raise ProtocolError(
                            f"{self.path} is a ZeroMQ {self.peer_type.decode(errors='replace')}, not a ROUTER"
                        )
                elif name == b"ERROR":
                    raise ProtocolError(f"{self.path} refused the connection: {_error_reason(body)}")
                elif name == b"PING":  # body: TTL (2 bytes), then a context to echo back
                    self._send_command(b"PONG", body[7:])
                continue
            if self.peer_type is None:
                raise ProtocolError(f"{self.path} sent a message before its ZeroMQ READY")
            self._frames.append(body)
            if not flags & MORE:
                self._messages.append(self._frames)
                self._frames = []
        del buf[:pos]

    def _send_command(self, name: bytes, data: bytes) -> None:
        body = bytes([len(name)]) + name + data
        self._sock.sendall(_frame(body, COMMAND))


def _frame(body: bytes, flags: int) -> bytes:
    n = len(body)
    if n > 255:
        return bytes([flags | LONG]) + n.to_bytes(8, "big") + body
    return bytes([flags, n]) + body


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytearray([len(name)]) + name
    for key, value in properties.items():
        body += bytes([len(key)]) + key + len(value).to_bytes(4, "big") + value
    return _frame(bytes(body), COMMAND)


def _parse_command(body: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    if not body:
        return b"", {}
    name = body[1 : 1 + body[0]]
    props: dict[bytes, bytes] = {}
    if name == b"READY":
        i = 1 + body[0]
        while i < len(body):
            n = body[i]
            key = body[i + 1 : i + 1 + n]
            i += 1 + n
            size = int.from_bytes(body[i : i + 4], "big")
            props[key] = body[i + 4 : i + 4 + size]
            i += 4 + size
    return name, props


def _error_reason(body: bytes) -> str:
    rest = body[1 + body[0] :]
    return rest[1 : 1 + rest[0]].decode(errors="replace") if rest else "no reason given"

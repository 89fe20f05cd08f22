"""A connection to a weightd daemon: the transport under every client call, and the calls
that need no tensors (ping, list, stats, manifest, load, unload). torch-free, pyzmq-free.

Two connections: the read socket (everyone in the daemon's group) and, opened on the first call
that changes what is loaded, the admin socket beside it; each a ZeroMQ DEALER spoken by
``weightd.client.zmtp`` (Note [the client speaks ZMTP itself]). Each call is the kernel's one
round trip (``weightd.protocol.round_trip``) with a deadline.
"""

from __future__ import annotations

import itertools
import os
import socket as _socket
import struct
import time

from weightd import protocol, trust
from weightd.client.zmtp import Dealer, PeerGone
from weightd.errors import DaemonNotRunning, PermissionDenied, RequestTimeout, WeightdError
from weightd.manifest import Manifest

DEFAULT_TIMEOUT = 10.0
ENV_TIMEOUT = "WEIGHTD_TIMEOUT"
PROBE_SECONDS = 2.0  # while waiting, how often the socket file is also probed (connection refused?)
LOAD_TIMEOUT = 3600.0


class Connection:
    """One connection to a daemon. Not thread-safe (one request at a time on a socket)."""

    def __init__(self, socket: str | None = None, *, timeout: float | None = None):
        self.socket_path = os.path.abspath(socket or protocol.default_socket())
        self.timeout = timeout if timeout is not None else float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT))
        # Only a socket in a directory nobody else can write is the daemon's (weightd.trust);
        # it is connected by that checked, resolved path.
        trust.check_length(self.socket_path)
        real = self.socket_path
        if os.path.isdir(os.path.dirname(real)):
            real = trust.socket_path(real)
        self._real = real
        self.admin_path = protocol.admin_socket(real)
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)
        self._admin: Dealer | None = None
        self._sock: Dealer | None = None
        self._sock = self._connect(real)
        # Who the daemon runs as, from the kernel (SO_PEERCRED), not from what it says: the
        # segments it names must be that user's.
        self.daemon_uid = self._sock.peer_credentials()[1]

    def close(self) -> None:
        for sock in (self._sock, self._admin):
            if sock is not None:
                sock.close()
        self._sock = self._admin = None

    def __del__(self):
        sock = getattr(self, "_sock", None)
        if sock is not None:
            self.close()

    def _connect(self, path: str, admin: bool = False) -> Dealer:
        try:
            return Dealer(path, self.timeout)
        except OSError as e:
            raise _unreachable(path, e, admin) from None
        except PeerGone:
            raise DaemonNotRunning(
                f"the daemon at {path} closed the connection at once: it is stopping, or is not weightd"
            ) from None

    def _watch(self, path: str):
        """``alive()`` for one request: probes the socket file now and then (a daemon that went
        away without closing the connection: another one took the socket over)."""
        last_probe = [time.monotonic()]

        def alive() -> None:
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
        rid = self._prefix + next(self._ids).to_bytes(8, "little")
        timeout = self.timeout if timeout is None else timeout
        try:
            if not sock.handshake(timeout):  # a fresh connection to a daemon that answers nothing
                check_listening(path)
                raise RequestTimeout(
                    f"the daemon at {path} did not answer {op!r} within {timeout:g} s (not even the "
                    "connection's handshake): it may be busy; raise timeout= or $WEIGHTD_TIMEOUT"
                )
            return protocol.round_trip(
                sock,
                rid,
                op,
                fields,
                timeout=timeout,
                progress=progress,
                silent=lambda: check_listening(path),
                where=f"the daemon at {path}",
                alive=self._watch(path),
            )
        except PeerGone:
            raise DaemonNotRunning(
                f"the daemon at {path} went away while answering {op!r} (it stopped or died): see "
                "its log (journalctl -u weightd); what it was doing did not finish"
            ) from None

    def _socket_for(self, op: str) -> tuple[Dealer, str]:
        """The connection for ``op``; one the daemon closed since the last call (a restart) is
        made again, as a ZeroMQ socket reconnects."""
        if op in protocol.READ_OPS:
            if self._sock.gone():
                self._sock.close()
                self._sock = self._connect(self._real)
            return self._sock, self.socket_path
        if self._admin is not None and self._admin.gone():
            self._admin.close()
            self._admin = None
        if self._admin is None:
            self._admin = self._connect(self.admin_path, admin=True)
        return self._admin, self.admin_path

    # --- operations that need no tensors ---

    def ping(self) -> dict:
        """The daemon's pid, version, instance and uptime."""
        return self.call("ping")

    def list(self) -> list[dict]:
        """One summary per loaded model (name, generation, bytes, tensors, segment...)."""
        return self.call("list")["models"]

    def stats(self) -> dict:
        """Models with their attached processes and memory, /dev/shm, and the daemon's own memory."""
        return self.call("stats")

    def manifest(
        self, name: str, generation: int | None = None, *, timeout: float | None = None, full: bool = False
    ) -> Manifest:
        """What model ``name`` (the newest generation, or ``generation``) holds and where: what a
        client needs to map it, or with ``full`` all the daemon keeps (its origin, the Hugging
        Face diagnostics): what a copy of the segment must hold (ray_zerocopy's peer fills)."""
        return Manifest.from_dict(
            self.manifest_reply(name, generation, timeout=timeout, full=full)["manifest"]
        )

    def manifest_reply(
        self,
        name: str,
        generation: int | None = None,
        *,
        device: str | None = None,
        timeout: float | None = None,
        full: bool = False,
    ) -> dict:
        # The pid lets the daemon keep an older generation linked while this process maps it.
        # wait: a model still loading (a daemon just started) is waited for within this call's
        # deadline, less a margin for the daemon's "still loading" answer to arrive in time.
        return self.call(
            "manifest",
            name=name,
            generation=generation,
            pid=os.getpid(),
            device=device,
            full=full or None,
            wait=self._wait(timeout),
            timeout=timeout,
        )

    def _wait(self, timeout: float | None) -> float:
        """How long the daemon may hold a manifest request for a model still loading: this
        call's deadline, less a margin for its "still loading" answer to arrive in time."""
        t = self.timeout if timeout is None else timeout
        return max(t - min(1.0, t / 5), 0.0)

    def load(
        self,
        path: str,
        name: str | None = None,
        *,
        factory: str | None = None,
        progress=None,
        timeout: float | None = None,
        base: str | None = None,
    ) -> dict:
        """Have the daemon load a checkpoint (a new generation if ``name`` exists).

        ``base``: ``path`` is a PEFT adapter folder, served as ``name`` over the served model
        ``base`` (checked against it; attach with ``hf.attach(base, adapter=name)``).

        ``progress(done, total)`` is called with bytes as the daemon reports them. ``timeout``:
        seconds the whole load may take; past them the daemon cancels it (or never starts it)
        and this raises ``Cancelled``. Default: no limit. If the daemon stops or dies
        meanwhile this raises ``DaemonNotRunning`` within seconds.
        """
        return self._load(path, name, factory=factory, progress=progress, timeout=timeout, base=base)["model"]

    def reload_one(self, path: str, name: str, *, factory: str | None = None, progress=None):
        """(model, reused): load ``path`` as ``name`` unless the served generation already holds
        it, unchanged since it was loaded (what ``weightd reload`` does for each entry)."""
        reply = self._load(path, name, factory=factory, progress=progress, timeout=None, reuse=True)
        return reply["model"], bool(reply.get("reused"))

    def _load(self, path, name, *, factory, progress, timeout, reuse: bool = False, base=None) -> dict:
        return self.call(
            "load",
            path=os.path.abspath(path),
            name=name,
            factory=factory,
            base=base,
            deadline=timeout,
            reuse=reuse or None,
            progress=progress,
            # silence this long means the daemon is stuck; the daemon's own answer to a passed
            # deadline (Cancelled) arrives before it
            timeout=LOAD_TIMEOUT if timeout is None else timeout + 2.0,
        )

    def unload(self, name: str) -> dict:
        """Remove a model; attached workers keep working on what they mapped."""
        return self.call("unload", name=name)["model"]


def check_listening(path: str, admin: bool = False) -> int:
    """Tell 'no daemon' apart from 'slow daemon' at once, instead of after a timeout; the uid
    the daemon runs as."""
    if not os.path.exists(path):
        raise _unreachable(path, FileNotFoundError(), admin)
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return struct.unpack("3i", probe.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]
    except OSError as e:
        raise _unreachable(path, e, admin) from None
    finally:
        probe.close()


def _unreachable(path: str, e: OSError, admin: bool) -> WeightdError:
    """The typed error for a connection to ``path`` that failed with ``e``."""
    hint = (
        "start one with `weightd serve --model NAME=PATH`, or point socket= / $WEIGHTD_SOCKET at the socket "
        "of the daemon that is running"
    )
    if isinstance(e, FileNotFoundError):
        return DaemonNotRunning(f"no weightd daemon at {path} (no socket file): {hint}")
    if isinstance(e, ConnectionRefusedError):
        return DaemonNotRunning(
            f"no weightd daemon at {path} (connection refused; the daemon that made it is gone): {hint}"
        )
    if isinstance(e, PermissionError):
        who = (
            "the daemon's user or root may load, unload and publish"
            if admin
            else "run as a member of the daemon's group"
        )
        return PermissionDenied(f"may not connect to {path}: {who}")
    if isinstance(e, TimeoutError):
        return DaemonNotRunning(
            f"the daemon at {path} did not accept the connection in time (stuck?): {hint}"
        )
    return DaemonNotRunning(f"cannot reach a weightd daemon at {path} ({e.strerror}): {hint}")

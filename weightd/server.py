"""The daemon: one ROUTER socket, a loop that answers requests, loads on a worker thread.

Lifecycle (as in uvicorn): ``run`` → ``startup`` (lock the socket, adopt what a previous
daemon of this instance left, preload models, bind) → ``main_loop`` → ``shutdown``. Signal handlers only
set a flag; the loop polls it.

Daemon-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from weightd import __version__, protocol
from weightd.config import Config
from weightd.errors import AlreadyRunning, InternalError, ProtocolError, WeightdError
from weightd.store import Model, Store

log = logging.getLogger("weightd")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_MS = 100
REAP_SECONDS = 1.0  # how often retired generations are checked for processes still mapping them


def maps_segment(pid: int, name: str) -> bool:
    """Whether process ``pid`` has segment ``name`` mapped (from /proc/PID/maps)."""
    needle = "/dev/shm/" + name.lstrip("/")
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(needle in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(
            config.instance, mode=config.mode, max_bytes=config.max_bytes, allow_pickle=config.allow_pickle
        )
        self.should_exit = False
        self.started = time.time()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._lock_fd: int | None = None
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightd-load")
        self._pending: list[tuple[bytes, bytes, Future]] = []
        self._manifest_replies: dict[tuple[str, int], bytes] = {}
        self._ops = {
            "ping": self._ping,
            "list": self._list,
            "manifest": self._manifest,
            "load": self._load,
            "unload": self._unload,
            "publish_begin": self._publish_begin,
            "publish_commit": self._publish_commit,
        }

    # --- lifecycle ---

    def run(self) -> None:
        with self.capture_signals():
            self.startup()
            try:
                self.main_loop()
            finally:
                self.shutdown()

    def startup(self) -> None:
        self._acquire_lock()
        try:
            self.store.adopt()
            for spec in self.config.models:
                self.store.load(spec.path, spec.name, spec.factory)
            self._bind()
        except BaseException:
            self.shutdown()
            raise
        log.info(
            "weightd %s serving %d models on %s (pid %d)",
            __version__, len(self.store.list()), self.config.socket, os.getpid(),
        )

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_reap = time.monotonic() + REAP_SECONDS
        while not self.should_exit:
            if poller.poll(POLL_MS):
                self._drain()
            self._reap_loads()
            if time.monotonic() >= next_reap:
                self.store.reap(maps_segment)
                next_reap = time.monotonic() + REAP_SECONDS

    def shutdown(self) -> None:
        self._loads.shutdown(wait=True, cancel_futures=True)
        if self._sock is not None:
            self._reap_loads()
            self._sock.close(linger=0)
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        # By default the segments stay for the next daemon of this instance to adopt (a restart
        # costs no reload); attached workers keep their mappings either way (Note [segment
        # lifetime after unlink]). `weightd purge` frees them when no daemon runs.
        self.store.close(unlink=self.config.unlink_on_exit)
        self._release_lock()
        log.info("weightd stopped")

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle_exit(self, sig, frame) -> None:
        self.should_exit = True

    # --- socket ---

    def _acquire_lock(self) -> None:
        """One daemon per socket: an flock beside it, held for the daemon's life."""
        directory = os.path.dirname(self.config.socket)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        path = self.config.socket + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"weightd is already running on {self.config.socket} (pid {pid}): use that daemon, "
                "stop it first, or pass another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        # The lock file stays: unlinking it would let a daemon that opened it a moment ago
        # lock a file nobody else can see any more.
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> None:
        # We hold the lock, so a socket file here is a dead daemon's: replace it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REQUEST_BYTES)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(protocol.endpoint(self.config.socket))
        os.chmod(self.config.socket, 0o660)
        self._sock = sock

    def _drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(frames)

    def _send(self, identity: bytes, rid: bytes, reply: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the peer went away: nothing to do
            self._sock.send_multipart([identity, rid, reply], zmq.NOBLOCK)

    # --- requests ---

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            log.debug("dropped a message with no request id")
            return
        identity, rid = frames[0], frames[1]
        try:
            if len(rid) > protocol.MAX_REQUEST_ID_BYTES:
                rid = rid[: protocol.MAX_REQUEST_ID_BYTES]
                raise ProtocolError(f"request id is longer than {protocol.MAX_REQUEST_ID_BYTES} bytes")
            if len(frames) != 3:
                raise ProtocolError(f"a request is [request-id, header]; got {len(frames) - 1} frames")
            req = protocol.decode(frames[2], "request")
            op = protocol.field(req, "op", str)
            handler = self._ops.get(op)
            if handler is None:
                raise ProtocolError(f"unknown op {op!r:.40}; this daemon knows {', '.join(sorted(self._ops))}")
            reply = handler(req, identity, rid)
        except WeightdError as e:
            reply = protocol.error(e)
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("internal error")
            reply = protocol.error(InternalError(f"internal error in weightd: {type(e).__name__}: {e}"))
        if reply is not None:
            self._send(identity, rid, reply)

    def _ping(self, req, identity, rid) -> bytes:
        return protocol.ok(
            pid=os.getpid(),
            version=__version__,
            instance=self.config.instance,
            socket=self.config.socket,
            uptime=time.time() - self.started,
            models=len(self.store.list()),
        )

    def _list(self, req, identity, rid) -> bytes:
        return protocol.ok(models=self.store.list())

    def _manifest(self, req, identity, rid) -> bytes:
        name = protocol.field(req, "name", str)
        generation = protocol.field(req, "generation", int, required=False)
        pid = protocol.field(req, "pid", int, required=False)
        model = self.store.get(name, generation, pid)
        key = (name, model.manifest.generation)
        reply = self._manifest_replies.get(key)
        if reply is None:
            # Encoded once per generation: attach is the hot path.
            self._manifest_replies = {k: v for k, v in self._manifest_replies.items() if k[0] != name}
            reply = protocol.ok(size=model.size, manifest=model.manifest.to_dict())
            self._manifest_replies[key] = reply
        return reply

    def _load(self, req, identity, rid) -> None:
        path = protocol.field(req, "path", str)
        name = protocol.field(req, "name", str, required=False)
        factory = protocol.field(req, "factory", str, required=False)
        future = self._loads.submit(self.store.load, path, name, factory)
        self._pending.append((identity, rid, future))
        return None  # answered by _reap_loads when the load is done

    def _unload(self, req, identity, rid) -> bytes:
        model = self.store.unload(protocol.field(req, "name", str))
        return protocol.ok(model=model.summary())

    def _publish_begin(self, req, identity, rid) -> bytes:
        manifest = self.store.reserve(protocol.field(req, "name", str), protocol.field(req, "nbytes", int))
        return protocol.ok(segment=manifest.segment, generation=manifest.generation, uuid=manifest.uuid,
                           created=manifest.created, mode=self.store.mode)

    def _publish_commit(self, req, identity, rid) -> bytes:
        model = self.store.commit(protocol.field(req, "segment", str))
        return protocol.ok(model=model.summary())

    def _reap_loads(self) -> None:
        still = []
        for identity, rid, future in self._pending:
            if not future.done():
                still.append((identity, rid, future))
                continue
            try:
                model: Model = future.result()
                reply = protocol.ok(model=model.summary())
            except WeightdError as e:
                log.warning("load failed: %s", e)
                reply = protocol.error(e)
            except Exception as e:
                log.exception("internal error during a load")
                reply = protocol.error(InternalError(f"internal error while loading: {type(e).__name__}: {e}"))
            self._send(identity, rid, reply)
        self._pending = still

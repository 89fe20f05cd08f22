"""The daemon: two ROUTER sockets, a loop that answers requests, loads on a worker thread.

Lifecycle (as in uvicorn): ``run`` → ``startup`` (lock the socket, adopt what a previous
daemon of this instance left, preload models, bind, tell systemd) → ``main_loop`` →
``shutdown``. Signal handlers only set a flag; the loop polls it.

Access is filesystem permissions. The *read* socket (mode 0660, the daemon's group) serves
ping, list, stats and manifests; the *admin* socket beside it (mode 0600) serves everything,
including load, unload and publish. Whoever may connect to the admin socket may change what
is loaded: the daemon's own user, and root.

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
from dataclasses import dataclass

import zmq

from weightd import __version__, checkpoint, memory, protocol
from weightd.config import Config
from weightd.errors import AlreadyRunning, InternalError, PermissionDenied, ProtocolError, WeightdError
from weightd.notify import Notifier
from weightd.store import Model, Store, check_name, default_name

log = logging.getLogger("weightd")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_MS = 100
REAP_SECONDS = 1.0  # how often retired generations are checked for processes still mapping them
PROGRESS_SECONDS = 0.25  # how often a loading client hears how far its load is
SOCKET_CHECK_SECONDS = 1.0  # how often the daemon checks that its socket files are still its own


def maps_segment(pid: int, name: str) -> bool:
    """Whether process ``pid`` has segment ``name`` mapped (from /proc/PID/maps)."""
    needle = "/dev/shm/" + name.lstrip("/")
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(needle in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


@dataclass
class _PendingLoad:
    sock: zmq.Socket
    identity: bytes
    rid: bytes
    name: str
    future: Future
    reported: float = 0.0


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(
            config.instance, mode=config.mode, max_bytes=config.max_bytes, allow_pickle=config.allow_pickle,
            group=config.group, devices=config.devices,
        )
        self.notifier = Notifier()
        self.should_exit = False
        self._stopping = threading.Event()
        self.started = time.time()
        self._ctx: zmq.Context | None = None
        self._read: zmq.Socket | None = None
        self._admin: zmq.Socket | None = None
        self._lock_fd: int | None = None
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightd-load")
        self._pending: list[_PendingLoad] = []
        self._manifest_replies: dict[tuple[str, int], bytes] = {}
        self._ops = {
            "ping": self._ping,
            "list": self._list,
            "stats": self._stats,
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
            for model in self.store.adopt():
                self.notifier.send(STATUS=f"adopted {model.manifest.name}")
            for spec in self.config.models:
                self.store.load(spec.path, spec.name, spec.factory, progress=self._startup_progress(spec))
            self._bind()
        except BaseException:
            self.shutdown()
            raise
        status = f"serving {len(self.store.list())} models on {self.config.socket}"
        log.info("weightd %s %s (pid %d)", __version__, status, os.getpid())
        self.notifier.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._read, zmq.POLLIN)
        poller.register(self._admin, zmq.POLLIN)
        reaper = threading.Thread(target=self._reap, name="weightd-reap", daemon=True)
        reaper.start()
        next_watchdog = next_check = time.monotonic()
        while not self.should_exit:
            for sock, _ in poller.poll(POLL_MS):
                self._drain(sock)
            self._report_loads()
            now = time.monotonic()
            if now >= next_check:
                self._check_sockets()
                next_check = now + SOCKET_CHECK_SECONDS
            if self.notifier.watchdog_interval and now >= next_watchdog:
                self.notifier.send(WATCHDOG=1)
                next_watchdog = now + self.notifier.watchdog_interval

    def _reap(self) -> None:
        # Off the request loop: freeing an unmapped segment takes the kernel ~80 ms per GiB
        # inside unlink, and reading /proc/PID/maps of many workers adds up too.
        while not self._stopping.wait(REAP_SECONDS):
            try:
                self.store.reap(maps_segment)
            except Exception:
                log.exception("internal error while freeing retired generations")

    def shutdown(self) -> None:
        self._stopping.set()
        self.notifier.send(STOPPING=1, STATUS="stopping")
        self._loads.shutdown(wait=True, cancel_futures=True)
        if self._read is not None:
            self._report_loads()
        for sock in (self._read, self._admin):
            if sock is not None:
                sock.close(linger=0)
        for path in (self.config.socket, protocol.admin_socket(self.config.socket)):
            if self._read is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._read = self._admin = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        # By default the segments stay for the next daemon of this instance to adopt (a restart
        # costs no reload); attached workers keep their mappings either way (Note [segment
        # lifetime after unlink]). `weightd purge` frees them when no daemon runs.
        self.store.close(unlink=self.config.unlink_on_exit)
        self._release_lock()
        self.notifier.close()
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

    def _startup_progress(self, spec):
        name = spec.name or default_name(spec.path)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 2.0 or done == total:
                last[0] = now
                pct = 100.0 * done / total if total else 100.0
                log.info("loading %s: %.0f%% of %.1f MiB", name, pct, total / 2**20)
                self.notifier.send(STATUS=f"loading {name}: {pct:.0f}%")

        return progress

    # --- sockets ---

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
        self._ctx = zmq.Context()
        self._read = self._ctx.socket(zmq.ROUTER)
        self._admin = self._ctx.socket(zmq.ROUTER)
        self._inodes: dict[str, int] = {}
        for sock, path, mode in self._endpoints():
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REQUEST_BYTES)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._bind_one(sock, path, mode)

    def _endpoints(self):
        return [(self._read, self.config.socket, 0o660), (self._admin, protocol.admin_socket(self.config.socket), 0o600)]

    def _bind_one(self, sock: zmq.Socket, path: str, mode: int) -> None:
        # We hold the lock, so a socket file here is a dead daemon's (or stale): replace it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(protocol.endpoint(path))
        os.chmod(path, mode)
        if self.config.group is not None:
            os.chown(path, -1, self.config.group)
        self._inodes[path] = os.stat(path).st_ino

    def _check_sockets(self) -> None:
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

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(sock, frames)

    @staticmethod
    def _send(sock: zmq.Socket, identity: bytes, rid: bytes, reply: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the peer went away: nothing to do
            sock.send_multipart([identity, rid, reply], zmq.NOBLOCK)

    # --- requests ---

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
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
            if op in protocol.ADMIN_OPS and sock is not self._admin:
                raise PermissionDenied(
                    f"{op!r} changes what is loaded, so it is served on the admin socket "
                    f"{protocol.admin_socket(self.config.socket)} only: run it as the daemon's user or root"
                )
            reply = handler(req, sock, identity, rid)
        except WeightdError as e:
            reply = protocol.error(e)
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("internal error")
            reply = protocol.error(InternalError(f"internal error in weightd: {type(e).__name__}: {e}"))
        if reply is not None:
            self._send(sock, identity, rid, reply)

    def _ping(self, req, *_) -> bytes:
        return protocol.ok(
            pid=os.getpid(),
            version=__version__,
            instance=self.config.instance,
            socket=self.config.socket,
            uptime=time.time() - self.started,
            models=len(self.store.list()),
        )

    def _list(self, req, *_) -> bytes:
        return protocol.ok(models=self.store.list() + self._loading())

    def _stats(self, req, *_) -> bytes:
        models = []
        for model in self.store.segments():
            entry = model.summary()
            entry["current"] = self.store.is_current(model)
            entry["attached"] = []
            for pid in sorted(model.attached):
                use = memory.mapping_usage(pid, "/dev/shm/" + model.manifest.segment.lstrip("/"))
                if use is not None:
                    entry["attached"].append({"pid": pid, "shared": use.pss, "rss": use.rss, "private": use.private})
            models.append(entry)
        me = memory.usage()
        return protocol.ok(
            models=models,
            loading=self._loading(),
            shm=memory.shm_usage(),
            daemon={"pid": os.getpid(), "rss": me.rss, "pss": me.pss, "private": me.private,
                    "uptime": time.time() - self.started, "version": __version__},
        )

    def _manifest(self, req, *_) -> bytes:
        name = protocol.field(req, "name", str)
        generation = protocol.field(req, "generation", int, required=False)
        pid = protocol.field(req, "pid", int, required=False)
        device = protocol.field(req, "device", str, required=False)
        model = self.store.get(name, generation, pid)
        if device is not None and device in model.gpu:
            # Each export is counted by PyTorch, so it is made per request, never cached.
            return protocol.ok(size=model.size, manifest=model.manifest.to_dict(), cuda=model.gpu[device].export())
        key = (name, model.manifest.generation)
        reply = self._manifest_replies.get(key)
        if reply is None:
            # Encoded once per generation: attach is the hot path.
            if len(self._manifest_replies) > 256:
                self._manifest_replies.clear()
            reply = protocol.ok(size=model.size, manifest=model.manifest.to_dict())
            self._manifest_replies[key] = reply
        return reply

    def _load(self, req, sock, identity, rid) -> None:
        path = self._allowed(protocol.field(req, "path", str))
        name = check_name(protocol.field(req, "name", str, required=False) or default_name(path))
        factory = protocol.field(req, "factory", str, required=False)
        future = self._loads.submit(self.store.load, path, name, factory, within=self.config.model_dirs or None)
        self._pending.append(_PendingLoad(sock, identity, rid, name, future))
        return None  # answered by _report_loads: progress while it runs, then the result

    def _allowed(self, path: str) -> str:
        """With --model-dir, a load request may only name a checkpoint inside those folders
        (and every file the load reads is checked again: a shard may be a symlink)."""
        if not self.config.model_dirs:
            return path
        return checkpoint.check_within(path, self.config.model_dirs)

    def _unload(self, req, *_) -> bytes:
        model = self.store.unload(protocol.field(req, "name", str))
        return protocol.ok(model=model.summary())

    def _publish_begin(self, req, *_) -> bytes:
        manifest = self.store.reserve(protocol.field(req, "name", str), protocol.field(req, "nbytes", int))
        return protocol.ok(segment=manifest.segment, generation=manifest.generation, uuid=manifest.uuid,
                           created=manifest.created, mode=self.store.mode, owner=[os.geteuid(), self.store.gid])

    def _publish_commit(self, req, *_) -> bytes:
        model = self.store.commit(protocol.field(req, "segment", str))
        return protocol.ok(model=model.summary())

    def _loading(self) -> list[dict]:
        out = []
        for p in self._pending:
            done, total = self.store.progress(p.name)
            out.append({"name": p.name, "state": "loading", "done": done, "total": total})
        return out

    def _report_loads(self) -> None:
        still = []
        now = time.monotonic()
        for p in self._pending:
            if not p.future.done():
                done, total = self.store.progress(p.name)
                if total and now - p.reported >= PROGRESS_SECONDS:  # total is 0 until the checkpoint is read
                    self._send(p.sock, p.identity, p.rid, protocol.ok(progress={"done": done, "total": total}))
                    p.reported = now
                still.append(p)
                continue
            try:
                model: Model = p.future.result()
                # progress always ends at 100%, however quick the load was
                n = model.manifest.nbytes
                self._send(p.sock, p.identity, p.rid, protocol.ok(progress={"done": n, "total": n}))
                reply = protocol.ok(model=model.summary())
            except WeightdError as e:
                log.warning("load failed: %s", e)
                reply = protocol.error(e)
            except Exception as e:
                log.exception("internal error during a load")
                reply = protocol.error(InternalError(f"internal error while loading: {type(e).__name__}: {e}"))
            self._send(p.sock, p.identity, p.rid, reply)
        self._pending = still

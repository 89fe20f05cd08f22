"""The daemon's lifecycle: ``run`` → ``startup`` → ``main_loop`` → ``shutdown`` (as in uvicorn).

``startup`` locks the socket, adopts what a previous daemon of this instance left, preloads
models, binds and tells systemd; ``main_loop`` answers requests (``handlers``), reports loads
(``loads``), checks the socket files and pings the watchdog; ``shutdown`` undoes it. Signal
handlers only set a flag; the loop polls it. Retired generations are freed by a reaper thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import zmq

from weightd import __version__, protocol, segment
from weightd.daemon.config import Config
from weightd.daemon.endpoints import Endpoints, Peer
from weightd.daemon.handlers import Handlers
from weightd.daemon.loads import Loads
from weightd.daemon.notify import Notifier
from weightd.daemon.store import Store
from weightd.errors import WeightdError

log = logging.getLogger("weightd")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_MS = 100
REAP_SECONDS = 1.0  # how often retired generations are checked for processes still mapping them
SOCKET_CHECK_SECONDS = 1.0  # how often the daemon checks that its socket files are still its own
STARTUP_PROGRESS_SECONDS = 2.0


def maps_segment(pid: int, name: str) -> bool:
    """Whether process ``pid`` has segment ``name`` mapped (from /proc/PID/maps)."""
    needle = segment.path(name)
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(needle in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


class Server:
    def __init__(self, config: Config):
        self.config = config
        segment.use_dir(config.shm_dir)  # before the store: it reads how the folder is mounted
        self.store = Store(
            config.instance,
            mode=config.mode,
            max_bytes=config.max_bytes,
            allow_pickle=config.allow_pickle,
            group=config.group,
            devices=config.devices,
        )
        self.endpoints = Endpoints(config.socket, group=config.group)
        self.loads = Loads(self.store)
        self.handlers = Handlers(config, self.store, self.loads)
        self.metrics = None
        if config.metrics is not None:
            from weightd.daemon.metrics import Metrics  # prometheus-client only when asked for

            self.metrics = Metrics(self.store, maps_segment)
            self.store.metrics = self.loads.metrics = self.handlers.metrics = self.metrics
        self.notifier = Notifier()
        self.should_exit = False
        self._stopping = threading.Event()

    def run(self) -> None:
        with self.capture_signals():
            self.startup()
            try:
                self.main_loop()
            finally:
                self.shutdown()

    def startup(self) -> None:
        self.endpoints.acquire_lock()
        try:
            if self.metrics is not None:  # before the preloads: a long one shows in weightd_loading
                self.metrics.start(self.config.metrics, group=self.config.group)
            for model in self.store.adopt():
                self.notifier.send(STATUS=f"adopted {model.manifest.name}")
            for spec in self.config.models:
                self.store.load(
                    spec.path, spec.model_name, spec.factory, progress=self._startup_progress(spec.model_name)
                )
            self.endpoints.bind()
        except BaseException:
            self.shutdown()
            raise
        self._log_pages()
        status = f"serving {len(self.store.list())} models on {self.config.socket}"
        log.info("weightd %s %s (pid %d)", __version__, status, os.getpid())
        self.notifier.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def main_loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self.endpoints.read, self.endpoints.admin):
            poller.register(sock, zmq.POLLIN)
        reaper = threading.Thread(target=self._reap, name="weightd-reap", daemon=True)
        reaper.start()
        next_watchdog = next_check = time.monotonic()
        while not self.should_exit:
            for sock, _ in poller.poll(POLL_MS):
                self._serve(sock)
            self.loads.report(self.endpoints.send)
            now = time.monotonic()
            if now >= next_check:
                self.endpoints.check()
                next_check = now + SOCKET_CHECK_SECONDS
            if self.notifier.watchdog_interval and now >= next_watchdog:
                self.notifier.send(WATCHDOG=1)
                next_watchdog = now + self.notifier.watchdog_interval

    def _serve(self, sock: zmq.Socket) -> None:
        admin = sock is self.endpoints.admin
        for identity, frames, (pid, uid) in self.endpoints.receive(sock):
            peer = Peer(sock, identity, frames[0][: protocol.MAX_REQUEST_ID_BYTES], admin, pid, uid)
            reply = self.handlers.handle(frames, peer)
            if reply is not None:
                self.endpoints.send(peer, reply)

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
        self.loads.shutdown()
        if self.endpoints.bound:
            self.loads.report(self.endpoints.send)
        self.endpoints.close()
        if self.metrics is not None:
            self.metrics.stop()
        # By default the segments stay for the next daemon of this instance to adopt (a restart
        # costs no reload); attached workers keep their mappings either way (Note [segment
        # lifetime after unlink]). `weightd purge` frees them when no daemon runs.
        self.store.close(unlink=self.config.unlink_on_exit)
        self.endpoints.release_lock()
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

    def _log_pages(self) -> None:
        """Say which page size segments get here, read back from a scratch segment (Note [huge
        pages] in weightd.segment), and warn where huge pages were asked for but not given."""
        where, asked = segment.shm_dir(), self.store.huge_asked
        elsewhere = where != segment.SHM_DIR and segment.list_segments(self.store.prefix, segment.SHM_DIR)
        if elsewhere:
            log.warning(
                "%d segments of this instance are in %s, not in --shm-dir %s (a daemon without --shm-dir "
                "left them): they are not served; free them with `weightd purge --socket %s`",
                len(elsewhere),
                segment.SHM_DIR,
                where,
                self.config.socket,
            )
        try:
            size = segment.probe_dir(self.config.instance)
        except (OSError, WeightdError) as e:
            log.warning("could not read the page size segments get in %s: %s", where, e)
            return
        if size >= segment.HUGE_PAGE:
            log.info("segments in %s get 2 MiB pages (%s)", where, asked or "transparent huge pages")
        elif asked:
            log.warning("%s", segment.huge_page_warning(where, asked))
        else:
            log.info(
                "segments in %s get 4 KiB pages: for ~10x faster first touch in workers, serve them from a "
                "huge-page tmpfs (--shm-dir, systemd/mnt-weightd.mount)",
                where,
            )

    def _startup_progress(self, name: str):
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= STARTUP_PROGRESS_SECONDS or done == total:
                last[0] = now
                pct = 100.0 * done / total if total else 100.0
                log.info("loading %s: %.0f%% of %.1f MiB", name, pct, total / 2**20)
                self.notifier.send(STATUS=f"loading {name}: {pct:.0f}%")

        return progress

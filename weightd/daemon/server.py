"""The daemon's lifecycle: ``run`` → ``startup`` → ``main_loop`` → ``shutdown`` (as in uvicorn).

``startup`` locks the socket, adopts what a previous daemon of this instance left, binds, and
queues the preloads that the adopted segments do not already hold (Note [a preload is adopted,
not reloaded] in store.py); ``main_loop`` answers requests (``handlers``) while the preloads
run (``loads``), tells systemd READY=1 once every preload is done, checks the socket files and
pings the watchdog; ``shutdown`` cancels loads under way and undoes the rest. Signal handlers
only set a flag; the loop polls it. Retired generations are freed by a reaper thread.

A failed preload stops the daemon (exit status of its error) unless ``keep_going``: then it is
logged, shown in ``ls``/``stats`` as that model's state, and the others are served. ``check``
(``serve --check``) loads every preload and exits: 0 if all are ready, else the first failure's
status; the segments stay for the daemon that starts next to adopt.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time

import zmq

from weightd import __version__, protocol, segment
from weightd.daemon import stream
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


def maps_segment(folder: segment.Folder, pid: int, name: str) -> bool:
    """Whether process ``pid`` has segment ``name`` of ``folder`` mapped (from /proc/PID/maps)."""
    needle = folder.file(name)
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(needle in line for line in f)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


class Server:
    def __init__(self, config: Config):
        self.config = config
        # Where the segments are, and how that folder is mounted: read once, passed to the rooms
        # that touch segments (the store and its rooms, the handlers, metrics).
        self.folder = segment.Folder.probe(config.shm_dir)
        self.maps = functools.partial(maps_segment, self.folder)
        self.store = Store(
            config.instance,
            self.folder,
            mode=config.mode,
            max_bytes=config.max_bytes,
            allow_pickle=config.allow_pickle,
            group=config.group,
            devices=config.devices,
            readers=stream.Readers(config.load_readers, config.load_chunk, config.load_direct),
        )
        self.endpoints = Endpoints(config.socket, group=config.group)
        self.metrics = None
        if config.metrics is not None:
            from weightd.daemon.metrics import Metrics  # prometheus-client only when asked for

            self.metrics = Metrics(self.store, self.maps)
        # Counted where each outcome is known: loads when they end, publishes on commit, every
        # request when it is answered.
        self.loads = Loads(self.store, parallel=config.load_parallel, metrics=self.metrics)
        self.handlers = Handlers(config, self.store, self.loads, metrics=self.metrics)
        self.notifier = Notifier()
        self.should_exit = False
        # A second SIGTERM/SIGINT while stopping: stop waiting for a load that does not end (as
        # uvicorn's force_exit); the process then ends with os._exit, in the CLI.
        self.force_exit = False
        self.abandoned = False  # a load was still running when the daemon stopped (force_exit)
        self._stopping = threading.Event()
        self.preloads: dict[str, WeightdError | None] = {}  # name -> None (ready) or its error, once done
        self.failure: WeightdError | None = None  # what makes the daemon exit non-zero
        self._ready_sent = False

    def run(self) -> None:
        with self.capture_signals():
            self.startup()
            try:
                self.main_loop()
            finally:
                self.shutdown()
        if self.failure is not None:
            raise self.failure

    def startup(self) -> None:
        self.endpoints.acquire_lock()
        try:
            if self.metrics is not None:  # before the preloads: a long one shows in weightd_loading
                self.metrics.start(self.config.metrics, group=self.config.group)
            for model in self.store.adopt():
                self.notifier.send(STATUS=f"adopted {model.manifest.name}")
            # Bound before the preloads: ping, ls and attaches of served models are answered at
            # once; an attach of a model still loading waits for it (Handlers.manifest).
            self.endpoints.bind()
            for spec in self.config.models:
                name = spec.model_name
                base = getattr(spec, "base", None)  # an adapter (serve --adapter NAME=BASE:PATH)
                same = self.store.unchanged(name, spec.path, spec.factory, base)
                if same is not None:
                    log.info(
                        "%s: generation %d already holds %s, unchanged since it was loaded: not reloaded",
                        name,
                        same.manifest.generation,
                        spec.path,
                        extra={"model": name, "generation": same.manifest.generation},
                    )
                    self.preloads[name] = None
                    continue
                self.loads.submit(
                    None,
                    name,
                    spec.path,
                    factory=spec.factory,
                    base=base,
                    progress=self._startup_progress(name),
                )
            self._log_pages()
        except BaseException:
            self.shutdown()
            raise
        log.info(
            "weightd %s serving on %s (pid %d): %d models adopted or unchanged, %d to load",
            __version__,
            self.config.socket,
            os.getpid(),
            len(self.store.list()),
            self.handlers.preloading(),
        )
        self.notifier.send(MAINPID=os.getpid(), STATUS=self._status())
        self._preloads_done()

    def _status(self) -> str:
        failed = [n for n, e in self.preloads.items() if e is not None]
        pending = self.handlers.preloading()
        parts = [f"serving {len(self.store.list())} models on {self.config.socket}"]
        if pending:
            parts.append(f"{pending} loading")
        if failed:
            parts.append(f"failed: {', '.join(failed)}")
        return "; ".join(parts)

    def _preloads_done(self) -> None:
        """Once every preload is done: READY=1 (systemd's start ends), or the exit of --check."""
        if self._ready_sent or self.handlers.preloading():
            return
        self._ready_sent = True
        failed = {n: e for n, e in self.preloads.items() if e is not None}
        status = self._status()
        log.info("every preload done: %s", status)
        if self.config.check:
            if failed:
                self.failure = next(iter(failed.values()))
            self.should_exit = True
            return
        # READY=1 means every preload is done (the unit's TimeoutStartSec= covers them); those
        # that failed with --keep-going are named in STATUS=, ls and stats.
        self.notifier.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def _ended(self, ended) -> None:
        for job, _model, err in ended:
            if job.peer is not None:
                continue
            self.preloads[job.name] = err
            if err is not None and not self.config.keep_going and not self.config.check:
                log.error(
                    "preload of %s failed, so the daemon stops (serve --keep-going serves the others): %s",
                    job.name,
                    err,
                    extra={"model": job.name},
                )
                self.failure = err
                self.should_exit = True
            elif err is not None:
                log.error("preload of %s failed: %s", job.name, err, extra={"model": job.name})
            self.notifier.send(STATUS=self._status())
        if ended:
            self._preloads_done()

    def main_loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self.endpoints.read, self.endpoints.admin):
            poller.register(sock, zmq.POLLIN)
        poller.register(self.loads.wakeup_fd, zmq.POLLIN)  # a load ended: report it now
        reaper = threading.Thread(target=self._reap, name="weightd-reap", daemon=True)
        reaper.start()
        next_watchdog = next_check = time.monotonic()
        while not self.should_exit:
            for sock, _ in poller.poll(POLL_MS):
                if sock != self.loads.wakeup_fd:
                    self._serve(sock)
            self._ended(self.loads.report(self.endpoints.send))
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
        self.store.free_stale()
        while not self._stopping.wait(REAP_SECONDS):
            try:
                self.store.reap(self.maps)
            except Exception:
                log.exception("internal error while freeing retired generations")

    def shutdown(self) -> None:
        self._stopping.set()
        self.notifier.send(STOPPING=1, STATUS="stopping")
        # Loads under way are cancelled: their half-written segments go. One that does not stop
        # (an unpickle that never returns) is abandoned on a second signal: what it wrote is
        # unsealed, so the next daemon of this instance (or `weightd purge`) removes it.
        self.abandoned = not self.loads.shutdown(force=lambda: self.force_exit)
        if self.endpoints.bound:
            self.loads.report(self.endpoints.send)
        self.loads.close()
        self.endpoints.close()
        if self.metrics is not None:
            self.metrics.stop()
        # By default the segments stay for the next daemon of this instance to adopt (a restart
        # costs no reload); attached workers keep their mappings either way (Note [segment
        # lifetime after unlink]). `weightd purge` frees them when no daemon runs.
        self.store.close(unlink=self.config.unlink_on_exit)
        self.endpoints.release_lock()
        self.notifier.close()
        if self.abandoned:
            log.warning(
                "weightd stopped at once on a second signal, abandoning a load under way: its unsealed "
                "segment is removed by the next daemon of this instance, or by `weightd purge`"
            )
        else:
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
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def _log_pages(self) -> None:
        """Say which page size segments get here, read back from a scratch segment (Note [huge
        pages] in weightd.segment), and warn where huge pages were asked for but not given."""
        where, asked = self.folder.path, self.folder.huge_asked
        elsewhere = where != segment.SHM_DIR and segment.Folder().segments(self.store.prefix)
        if elsewhere:
            log.warning(
                "%d segments of this instance are in %s, not in --shm-dir %s (a daemon without --shm-dir "
                "left them): they are not served; to free them, stop this daemon and run "
                "`weightd purge --socket %s` (without --shm-dir)",
                len(elsewhere),
                segment.SHM_DIR,
                where,
                self.config.socket,
            )
        try:
            size = segment.probe_pages(self.folder, self.config.instance)
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

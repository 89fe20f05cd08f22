"""Loads, run off the request loop: the preloads of start-up and ``load`` requests.

Loader threads (``serve --load-parallel``, default one) take loads in the order they came; a
load of a name waits for the earlier loads of that name, so generations come in request order.
The bytes of every load go through the daemon's readers (``weightd.daemon.stream``). The request
loop keeps answering meanwhile (``ping``, ``ls``, attaches of models already served). A
``load`` request is answered more than once: progress replies (``{"progress": {done, total}}``)
every ``PROGRESS_SECONDS`` while the checkpoint is copied, then the result. The request loop
calls ``report`` each turn (woken by ``wakeup_fd`` when a load ends); it also answers the
attaches parked on a model still loading (``park``), when the load ends or their deadline comes.

Every load has a ``Token``: a stop request (SIGTERM) or its requester's deadline cancels it
between files and every ``layout.FILL_CHUNK`` of the copy, and ``Store.load`` removes the
half-written segment. A load whose requester's deadline passed while it waited is never started.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field

from weightd import protocol
from weightd.daemon.endpoints import Peer
from weightd.daemon.store import Model, Store
from weightd.errors import Cancelled, InternalError, StillLoading, WeightdError

log = logging.getLogger("weightd")

PROGRESS_SECONDS = 0.25  # how often a loading client hears how far its load is
WAIT_NOTICE_SECONDS = 1.0  # a stop that waits longer than this for a load says so in the log
FORCE_POLL_SECONDS = 0.1  # while a stop waits for a load: how often a second signal is looked for


class Token:
    """Whether a load should go on: ``check()`` raises ``Cancelled`` once it should not."""

    def __init__(self, name: str, deadline: float | None = None):
        self.name = name
        self.deadline = deadline  # time.monotonic() by which the requester wants it done
        self.started = False
        self._reason: str | None = None

    def cancel(self, reason: str) -> None:
        self._reason = reason

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def check(self) -> None:
        if self._reason is not None:
            raise Cancelled(f"load of {self.name!r} cancelled: {self._reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            when = "while it ran" if self.started else "before it could start (it waited behind other loads)"
            raise Cancelled(
                f"load of {self.name!r} cancelled: its requester's deadline passed {when}: "
                "give the load a longer timeout"
            )


def wait_for(future: Future, token: Token) -> None:
    """Wait for ``future`` to end, however it ends, checking ``token`` meanwhile."""
    while True:
        token.check()
        try:
            future.exception(timeout=0.05)
            return
        except FuturesTimeout:
            continue
        except CancelledError:
            return


def _failed(check: Callable[[], None]) -> Future:
    """A finished future holding the error ``check()`` raises (a cancelled load's)."""
    f = Future()
    try:
        check()
        raise Cancelled("load cancelled")
    except Cancelled as e:
        f.set_exception(e)
    return f


@dataclass
class Job:
    name: str
    path: str
    peer: Peer | None  # None: a preload of start-up
    token: Token
    future: Future | None = None
    reused: bool = False  # a reload entry whose source was unchanged: nothing loaded
    reported: float = 0.0
    received: float = field(default_factory=time.perf_counter)


@dataclass
class _Waiter:
    peer: Peer
    name: str
    deadline: float
    answer: Callable[[], bytes]


class Loads:
    def __init__(self, store: Store, parallel: int = 1, metrics=None):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="weightd-load")
        self._pending: list[Job] = []
        self._waiters: list[_Waiter] = []
        # name -> the error of its failed preload, until a load of that name succeeds: for ls.
        self.failed: dict[str, dict] = {}
        self.metrics = metrics  # weightd.daemon.metrics.Metrics with serve --metrics: counts loads
        self.wakeup_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def submit(
        self,
        peer: Peer | None,
        name: str,
        path: str,
        *,
        factory: str | None = None,
        base: str | None = None,
        within: list[str] | None = None,
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        reuse: bool = False,
    ) -> Job:
        """Queue a load. ``reuse``: keep the served generation if its source is unchanged,
        checked when the load's turn comes (a reload while the preload of the same name runs)."""
        job = Job(name, path, peer, Token(name, deadline))
        # Earlier loads of the same name end first (the pool takes jobs in order, so these were
        # taken already: waiting on them cannot starve them of a thread).
        earlier = [j.future for j in self._pending if j.name == name]

        def run() -> Model:
            for f in earlier:
                wait_for(f, job.token)
            job.token.check()  # not started at all once stopping or past the requester's deadline
            job.token.started = True
            if reuse:
                same = self.store.unchanged(name, path, factory, base)
                if same is not None:
                    job.reused = True
                    return same
            started = time.monotonic()
            model = self.store.load(
                path, name, factory, progress=progress, within=within, check=job.token.check, base=base
            )
            if self.metrics is not None:
                m = model.manifest
                self.metrics.loaded(m.format, m.nbytes, time.monotonic() - started)
            return model

        job.future = self._pool.submit(run)
        job.future.add_done_callback(lambda _: self._wake())
        self._pending.append(job)
        return job

    def preloading(self) -> int:
        """Preloads of start-up not finished yet."""
        return sum(1 for j in self._pending if j.peer is None)

    def loading(self, name: str) -> bool:
        return any(j.name == name for j in self._pending)

    def park(self, peer: Peer, name: str, wait: float, answer: Callable[[], bytes]) -> None:
        """Answer ``peer`` with ``answer()`` once ``name`` is no longer loading, or with
        ``StillLoading`` when ``wait`` seconds passed first."""
        self._waiters.append(_Waiter(peer, name, time.monotonic() + wait, answer))

    def still_loading(self, name: str) -> StillLoading:
        done, total = self.store.progress(name)
        if not total:
            how = (
                "it has not started yet (waiting behind other loads)"
                if not self._running(name)
                else ("reading the checkpoint")
            )
        else:
            how = f"{100.0 * done / total:.0f}% done ({done / 2**20:.0f} of {total / 2**20:.0f} MiB)"
        return StillLoading(
            f"model {name!r} is still loading, {how}: wait longer (a larger timeout=), or attach it once "
            "`weightd ls` shows it ready"
        )

    def states(self) -> list[dict]:
        """What ``ls`` shows besides the served models: loads under way, and failed ones."""
        out = []
        for j in self._pending:
            done, total = self.store.progress(j.name)
            # waiting: attaches the daemon holds until this load ends (Handlers.manifest's wait)
            held = sum(1 for w in self._waiters if w.name == j.name)
            out.append(
                {
                    "name": j.name,
                    "state": "loading",
                    "done": done,
                    "total": total,
                    "source": j.path,
                    "waiting": held,
                }
            )
        loading = {j.name for j in self._pending}
        for name, error in sorted(self.failed.items()):
            if name not in loading:
                out.append({"name": name, "state": "failed", "error": error})
        return out

    def report(
        self, send: Callable[[Peer, bytes], None]
    ) -> list[tuple[Job, Model | None, WeightdError | None]]:
        """Send progress of the loads under way and the result of those that ended; answer the
        parked attaches that can be. Returns the loads that ended, with their model or error."""
        self._drain()
        ended = []
        still = []
        now = time.monotonic()
        for job in self._pending:
            if job.token.expired(now) and job.future.cancel():
                # queued, never started: answered now rather than when its turn would come
                job.future = _failed(job.token.check)
            if not job.future.done():
                done, total = self.store.progress(job.name)
                # total is 0 until the checkpoint is read
                if job.peer is not None and total and now - job.reported >= PROGRESS_SECONDS:
                    send(job.peer, protocol.ok(progress={"done": done, "total": total}))
                    job.reported = now
                still.append(job)
                continue
            model, err = self._outcome(job)
            ended.append((job, model, err))
            if err is None:
                self.failed.pop(job.name, None)
            elif job.peer is None:  # a requested load's error goes to its requester instead
                self.failed[job.name] = err.to_wire()
            if job.peer is not None:
                if err is None:
                    # progress always ends at 100%, however quick the load was
                    n = model.manifest.nbytes
                    send(job.peer, protocol.ok(progress={"done": n, "total": n}))
                    reply, outcome = protocol.ok(model=model.summary(), reused=job.reused), "ok"
                else:
                    reply, outcome = protocol.error(err), err.code
                send(job.peer, reply)
                if self.metrics is not None:
                    self.metrics.request("load", outcome, time.perf_counter() - job.received)
        self._pending = still
        waiting = []
        for w in self._waiters:
            if not self.loading(w.name):
                send(w.peer, w.answer())
            elif now >= w.deadline:
                send(w.peer, protocol.error(self.still_loading(w.name)))
            else:
                waiting.append(w)
        self._waiters = waiting
        return ended

    def cancel(self, reason: str) -> None:
        """Cancel every load, queued or running (a stop): each ends within a fraction of a second."""
        for job in self._pending:
            job.token.cancel(reason)

    def cancel_name(self, name: str, reason: str) -> bool:
        """Cancel the loads of ``name`` (an unload while it loads); whether there were any."""
        jobs = [j for j in self._pending if j.name == name and not j.future.done()]
        for job in jobs:
            job.token.cancel(reason)
        return bool(jobs)

    def shutdown(self, force: Callable[[], bool] = lambda: False) -> bool:
        """Cancel every load and wait for the one running to stop at its next check, unless
        ``force()`` turns true meanwhile (a second stop signal). Returns whether the loader
        thread is done: if not, only ``os._exit`` ends this process (it is not a daemon thread)."""
        self.cancel("the daemon is stopping")
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = [j for j in self._pending if not j.future.done()]
        said = False
        while running and not force():
            if not said and not futures.wait([j.future for j in running], timeout=WAIT_NOTICE_SECONDS).done:
                log.warning(
                    "waiting for the load of %s to stop at its next check (send SIGTERM or SIGINT again to "
                    "exit at once)",
                    ", ".join(j.name for j in running),
                )
                said = True
            futures.wait([j.future for j in running], timeout=FORCE_POLL_SECONDS)
            running = [j for j in running if not j.future.done()]
        for job in self._pending:
            if job.future.cancelled():  # never started: answered as cancelled too
                job.future = _failed(job.token.check)
        return not running

    def close(self) -> None:
        for fd in (self.wakeup_fd, self._wake_w):
            os.close(fd)

    # --- internals ---

    def _outcome(self, job: Job) -> tuple[Model | None, WeightdError | None]:
        try:
            return job.future.result(), None
        except Cancelled as e:
            log.warning("%s", e, extra={"model": job.name})
            return None, e
        except WeightdError as e:
            log.warning("load failed: %s", e, extra={"model": job.name})
            return None, e
        except Exception as e:
            log.exception("internal error during a load", extra={"model": job.name})
            return None, InternalError(f"internal error while loading: {type(e).__name__}: {e}")

    def _running(self, name: str) -> bool:
        return any(j.name == name and j.token.started for j in self._pending)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop will look anyway) or closed (stopping)

    def _drain(self) -> None:
        try:
            while os.read(self.wakeup_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

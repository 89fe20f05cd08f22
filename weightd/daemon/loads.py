"""Loads requested over the socket: run off the request loop, reported while they run.

A ``load`` request is answered more than once: progress replies (``{"progress": {done,
total}}``) every ``PROGRESS_SECONDS`` while the checkpoint is copied, then the result. The
request loop calls ``report`` each turn; the work itself happens on a loader thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from weightd import protocol
from weightd.daemon.endpoints import Peer
from weightd.daemon.store import Model, Store
from weightd.errors import InternalError, WeightdError

log = logging.getLogger("weightd")

PROGRESS_SECONDS = 0.25  # how often a loading client hears how far its load is


@dataclass
class _Pending:
    peer: Peer
    name: str
    future: Future
    reported: float = 0.0
    received: float = field(default_factory=time.perf_counter)


class Loads:
    def __init__(self, store: Store):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightd-load")
        self._pending: list[_Pending] = []
        self.metrics = None  # weightd.daemon.metrics.Metrics with serve --metrics: counts each load request

    def submit(self, peer: Peer, name: str, load: Callable[[], Model]) -> None:
        self._pending.append(_Pending(peer, name, self._pool.submit(load)))

    def states(self) -> list[dict]:
        """What ``ls`` shows of loads under way."""
        out = []
        for p in self._pending:
            done, total = self.store.progress(p.name)
            out.append({"name": p.name, "state": "loading", "done": done, "total": total})
        return out

    def report(self, send: Callable[[Peer, bytes], None]) -> None:
        """Send progress of the loads under way, and the result of those that ended."""
        still = []
        now = time.monotonic()
        for p in self._pending:
            if not p.future.done():
                done, total = self.store.progress(p.name)
                if total and now - p.reported >= PROGRESS_SECONDS:  # total is 0 until the checkpoint is read
                    send(p.peer, protocol.ok(progress={"done": done, "total": total}))
                    p.reported = now
                still.append(p)
                continue
            try:
                model: Model = p.future.result()
                # progress always ends at 100%, however quick the load was
                n = model.manifest.nbytes
                send(p.peer, protocol.ok(progress={"done": n, "total": n}))
                reply, outcome = protocol.ok(model=model.summary()), "ok"
            except WeightdError as e:
                log.warning("load failed: %s", e, extra={"model": p.name})
                reply, outcome = protocol.error(e), e.code
            except Exception as e:
                log.exception("internal error during a load", extra={"model": p.name})
                err = InternalError(f"internal error while loading: {type(e).__name__}: {e}")
                reply, outcome = protocol.error(err), err.code
            send(p.peer, reply)
            if self.metrics is not None:
                self.metrics.request("load", outcome, time.perf_counter() - p.received)
        self._pending = still

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

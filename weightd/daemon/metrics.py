"""Prometheus metrics (``serve --metrics ADDRESS``): the figures of ``stats``, and counters of
what the daemon did, in the text exposition of ``prometheus-client``.

Served by a thread of its own, up to ``MAX_SCRAPES`` scrapes at once, each within
``SCRAPE_DEADLINE`` seconds: a scrape takes the store's lock only to
copy its view (``Store.view``), reads ``/proc/PID/maps`` of attached processes at most once a
``CACHE_SECONDS``, and never waits on the request loop, which only bumps counters.

Exposure. The endpoint is read-only (GET; anything else is refused) and shows nothing that a
reader of the read socket could not learn from ``ls`` and ``stats``: model names, generations,
sizes, formats and counts; no paths, no segment names, no pids. ``PORT`` alone binds
127.0.0.1 (this machine only); ``HOST:PORT`` binds where it says (``0.0.0.0:PORT``: every
interface, so fence it with a firewall or a NetworkPolicy). A TCP port can be read by every
local user. ``unix:PATH`` is a socket file with the read socket's mode and group, in a folder
that passes the read socket's trust check (``weightd.trust``), for an agent on the node.

Daemon-only; imported only when ``--metrics`` is given (prometheus-client costs ~10 MiB).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    MetricsHandler,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from weightd import memory, protocol, trust
from weightd.daemon.endpoints import READ_MODE
from weightd.daemon.store import Store
from weightd.errors import UnsafePath, WeightdError

log = logging.getLogger("weightd")

LOCALHOST = "127.0.0.1"
CACHE_SECONDS = 1.0  # how long a process's "maps this segment" answer is reused
SCRAPE_TIMEOUT = 5.0  # a scraper that sends nothing for this long is dropped
SCRAPE_DEADLINE = 10.0  # a whole scrape, request to reply: a scraper that trickles is cut off
MAX_SCRAPES = 8  # connections served at once; more are closed at once
REQUEST_BUCKETS = (1e-4, 2.5e-4, 1e-3, 5e-3, 0.025, 0.25, 1, 10, 60, 600)  # loads are requests too
YIELD_SECONDS = 5e-5  # a scrape lets the request loop have the GIL between metric families
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass(frozen=True)
class Address:
    """Where metrics are served: ``host``/``port`` over TCP, or ``path`` of a unix socket."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:PATH``; ValueError if not."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a path, e.g. unix:/run/weightd/metrics.sock")
        return Address(path=os.path.abspath(path))
    host, sep, port = text.rpartition(":")
    if not sep:
        host = LOCALHOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(
            f"{text!r} names no host: write PORT or 127.0.0.1:PORT for this machine only, "
            "0.0.0.0:PORT for every interface, or unix:PATH"
        )
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"{text!r}: the port must be a number from 0 to 65535 (HOST:PORT, PORT or unix:PATH)"
        )
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"{text!r}: cannot resolve host {host!r} ({e.strerror})") from None
    return Address(host=host, port=int(port))


class Metrics:
    """The daemon's registry. The request loop and the store call ``request``/``loaded``/
    ``published``; ``start`` serves it at an address."""

    def __init__(self, store: Store, maps: Callable[[int, str], bool]):
        disable_created_metrics()  # *_created series double what is stored and nobody graphs them
        self.registry = _Registry()
        ProcessCollector(registry=self.registry)
        self._load_seconds = Histogram(
            "weightd_load_seconds",
            "Seconds a successful load took, by checkpoint format.",
            ["format"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self._load_bytes = Counter(
            "weightd_load_bytes", "Tensor bytes loaded into shared memory.", registry=self.registry
        )
        self._publishes = Counter(
            "weightd_publish",
            "Generations published by clients, by model.",
            ["model"],
            registry=self.registry,
        )
        self._requests = _Requests()
        self.registry.register(self._requests)
        self.registry.register(_Accounting(store, maps))
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self._path: str | None = None

    # --- events (request loop, loader thread) ---

    def request(self, op: str, outcome: str, seconds: float) -> None:
        """One request answered (called by the request loop only)."""
        self._requests.count(op, outcome, seconds)

    def loaded(self, format: str, nbytes: int, seconds: float) -> None:
        self._load_seconds.labels(format).observe(seconds)
        self._load_bytes.inc(nbytes)

    def published(self, model: str) -> None:
        self._publishes.labels(model).inc()

    # --- serving ---

    def start(self, where: str, group: int | None = None) -> str:
        """Serve the exposition at ``where`` (see ``parse_address``) from a thread; returns its URL."""
        try:
            address = parse_address(where)
        except ValueError as e:
            raise WeightdError(f"bad --metrics address: {e}") from None
        handler = MetricsHandler.factory(self.registry)
        handler = type("Handler", (_Deadline, handler), {"timeout": SCRAPE_TIMEOUT})
        try:
            if address.path is not None:
                try:
                    path = trust.socket_path(address.path)  # the read socket's folder trust
                except UnsafePath as e:
                    raise UnsafePath(f"cannot serve metrics on unix:{address.path}: {e}") from None
                _remove_stale(path)
                server = _bind_unix(path, handler, group)
                self._path = path
                url = f"unix:{path}"
            else:
                family = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0][0]
                server = _TCPServer((address.host, address.port), handler, family)
                host, port = server.server_address[:2]
                url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
        except OSError as e:
            raise WeightdError(
                f"cannot serve metrics on {address}: {e.strerror or e}: pick another --metrics address"
            ) from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="weightd-metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics on %s", url)
        return url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._server = self._thread = None


class _Registry(CollectorRegistry):
    def collect(self):
        # A scrape runs on its own thread but needs the GIL, and a request arriving meanwhile
        # would wait for it up to the interpreter's switch interval (5 ms) on a ~100 us reply.
        # A short sleep after each family hands the GIL to the request loop if it wants it.
        for family in super().collect():
            yield family
            time.sleep(YIELD_SECONDS)


class _Requests:
    """Requests by op and outcome, and their latency, counted by the request loop without locks.

    prometheus-client's Counter and Histogram take four locks per request: 3-5 us on a 100 us
    round trip, measured (benchmarks/metrics.py). Here the one writer (the request loop) bumps
    plain ints; a scrape copies them, each copy atomic under the GIL.
    """

    def __init__(self):
        # every op's success count exists from the start, so that rate() sees the first request
        self._counts: dict[tuple[str, str], int] = {(op, "ok"): 0 for op in protocol.OPS}
        self._latency: dict[str, list] = {}  # op -> [count per bucket..., +Inf count, sum of seconds]

    def count(self, op: str, outcome: str, seconds: float) -> None:
        key = (op, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        h = self._latency.get(op)
        if h is None:  # made when first used: a histogram is a dozen lines of every scrape
            h = self._latency[op] = [0] * (len(REQUEST_BUCKETS) + 1) + [0.0]
        h[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def collect(self):
        total = CounterMetricFamily(
            "weightd_requests",
            "Requests answered, by op and outcome (ok or the error code).",
            labels=["op", "outcome"],
        )
        for (op, outcome), n in sorted(dict(self._counts).items()):
            total.add_metric([op, outcome], n)
        yield total
        latency = HistogramMetricFamily(
            "weightd_request_seconds", "Seconds from a request to its reply.", labels=["op"]
        )
        for op, h in sorted(dict(self._latency).items()):
            h = list(h)
            cumulative = list(itertools.accumulate(h[:-1]))
            bounds = [floatToGoString(b) for b in REQUEST_BUCKETS] + ["+Inf"]
            latency.add_metric([op], list(zip(bounds, cumulative)), h[-1])
        yield latency


class _Accounting:
    """What ``stats`` shows, as gauges, computed when scraped."""

    def __init__(self, store: Store, maps: Callable[[int, str], bool]):
        self._store, self._maps = store, maps
        self._mapped: dict[tuple[int, str], tuple[bool, float]] = {}  # (pid, segment) -> (maps it, until)

    def collect(self):
        now = time.monotonic()
        # By state, not by generation: a series per generation would grow without bound under
        # a trainer that publishes every few seconds (the generation is a value, below).
        size = GaugeMetricFamily(
            "weightd_model_bytes",
            "Bytes of the model's segments: its newest generation (current), and older ones still "
            "attached (retired).",
            labels=["model", "state"],
        )
        attached = GaugeMetricFamily(
            "weightd_model_attached_processes",
            "Processes mapping the model now (any generation).",
            labels=["model"],
        )
        newest = GaugeMetricFamily(
            "weightd_model_generation", "The newest generation of the model.", labels=["model"]
        )
        loading = GaugeMetricFamily("weightd_loading", "1 while a load of the model runs.", labels=["model"])
        ratio = GaugeMetricFamily(
            "weightd_load_progress_ratio", "Fraction of the running load's bytes copied.", labels=["model"]
        )
        pids: dict[str, set[int]] = {}
        mapped = {}
        sizes: dict[tuple[str, str], int] = {}
        for model, current, asked in self._store.view():
            m = model.manifest
            key = (m.name, "current" if current else "retired")
            sizes[key] = sizes.get(key, 0) + model.size
            if current:
                newest.add_metric([m.name], m.generation)
            seen = pids.setdefault(m.name, set())
            for pid in asked:
                key = (pid, m.segment)
                hit = self._mapped.get(key)
                if hit is None or hit[1] < now:
                    hit = (self._maps(pid, m.segment), now + CACHE_SECONDS)
                mapped[key] = hit
                if hit[0]:
                    seen.add(pid)
        self._mapped = mapped  # forget processes and segments that went away
        for (name, state), n in sorted(sizes.items()):
            size.add_metric([name, state], n)
        runs = self._store.loading()
        for name in sorted(set(pids) | set(runs)):
            loading.add_metric([name], 1 if name in runs else 0)
            if name in pids:
                attached.add_metric([name], len(pids[name]))
        for name, (done, total) in sorted(runs.items()):
            ratio.add_metric([name], done / total if total else 0.0)
        shm = memory.shm_usage(self._store.folder.path)
        yield size
        yield attached
        yield newest
        yield loading
        yield ratio
        yield GaugeMetricFamily(
            "weightd_shm_free_bytes", "Free bytes of the segments' directory.", value=shm["free"]
        )
        yield GaugeMetricFamily(
            "weightd_shm_total_bytes", "Size of the segments' directory.", value=shm["size"]
        )


class _Quiet:
    """socketserver prints a failed request's traceback to stderr, which would break a JSON log."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the scraper hung up or timed out
            log.debug("metrics: a scrape was cut off", exc_info=True)
        else:
            log.exception("internal error while serving metrics")


class _Deadline:
    """A scrape's whole request and reply get ``SCRAPE_DEADLINE`` seconds, however slowly the
    scraper sends: then its connection is shut down (``SCRAPE_TIMEOUT`` bounds each receive
    only, and a scraper sending one byte a second would hold it for ever)."""

    def setup(self) -> None:
        self._timer = threading.Timer(SCRAPE_DEADLINE, self._cut)
        self._timer.daemon = True
        self._timer.start()
        super().setup()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._timer.cancel()
        with contextlib.suppress(OSError):
            super().finish()


class _Capped(socketserver.ThreadingMixIn):
    """Scrapes served at once, each on a thread, up to ``MAX_SCRAPES``: a slow scraper never
    blocks another, and more connections than that are closed at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: %d scrapes under way; a connection was closed", MAX_SCRAPES)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _TCPServer(_Capped, _Quiet, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address, handler, family: int):
        self.address_family = family  # read by TCPServer.__init__ to make the socket: IPv6 too
        super().__init__(address, handler)


class _UnixServer(_Capped, _Quiet, socketserver.UnixStreamServer):
    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # http.server logs client_address[0]; a unix peer has none


def _bind_unix(path: str, handler, group: int | None) -> "_UnixServer":
    """A unix socket at ``path`` that has the read socket's mode and group from the moment
    it is there: bound in a fresh private folder beside it, given its mode and group through
    a descriptor of that very file (never by a path someone could swap), then renamed into
    place."""
    private = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".weightd-metrics-")
    bound = os.path.join(private, "s")
    try:
        server = _UnixServer(bound, handler)
        try:
            fd = os.open(bound, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    raise WeightdError(f"cannot serve metrics on unix:{path}: its socket was replaced")
                os.chmod(f"/proc/self/fd/{fd}", READ_MODE)  # who may use the read socket may read this
                if group is not None:
                    os.chown(f"/proc/self/fd/{fd}", -1, group)
            finally:
                os.close(fd)
            os.rename(bound, path)
        except BaseException:
            server.server_close()
            raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(bound)
        os.rmdir(private)
    return server


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody answers on (a dead daemon's); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise WeightdError(f"cannot serve metrics on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise WeightdError(
        f"cannot serve metrics on unix:{path}: something answers there already: pick another path"
    )

"""Worker processes that get a model's weights one way or another and report time and memory.

The harness behind ``weightd demo`` and ``benchmarks/``. ``run(job, n)`` starts ``n`` fresh
processes (multiprocessing "spawn": nothing inherited from the parent, as in a real fleet of
workers). Each one:

1. imports what its method needs, then waits at a start gate, so that imports are not timed
   and all ``n`` get their weights at the same moment (as workers starting together do);
2. gets the weights ``job.repeats`` times and keeps the median time (the first call pays for
   lazy imports and cold caches);
3. touches every weight byte (sums each tensor), so the pages are really resident: a mapping
   nobody reads costs nothing and would prove nothing;
4. runs ``job.forward(module)`` where there is a module and a forward check;
5. reports, then waits at a barrier: all ``n`` are alive and holding their weights while the
   parent reads each one's ``/proc/PID/smaps_rollup``.

Summing ``Pss`` over the workers counts every resident page once however many of them share
it, so it is the memory the ``n`` workers cost together; ``Pss_Shmem`` is the part in shared
memory (weightd's segments). ``daemon()`` (``weightd.bench.spawn.throwaway``) runs a
``weightd serve`` for the workers to attach to and removes every segment of its instance on
the way out.

Everything started here is stopped here, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from weightd import memory
from weightd.bench import spawn

WEIGHTD_STATE_DICT = "weightd-state_dict"
WEIGHTD_ATTACH = "weightd-attach"
TORCH_LOAD = "torch.load"
TORCH_MMAP_ASSIGN = "torch.load(mmap=True)+load_state_dict(assign=True)"
SAFETENSORS = "safetensors.load_file"
NONE = "none"  # imports torch and gets nothing: a worker's own memory, for comparison
METHODS = (WEIGHTD_STATE_DICT, WEIGHTD_ATTACH, TORCH_LOAD, TORCH_MMAP_ASSIGN, SAFETENSORS, NONE)
WEIGHTD_METHODS = (WEIGHTD_STATE_DICT, WEIGHTD_ATTACH)
MODULE_METHODS = (WEIGHTD_ATTACH, TORCH_MMAP_ASSIGN)  # give an nn.Module, not a state dict


@dataclass
class Job:
    """How every worker of one run gets its weights. Sent to the workers, so picklable."""

    method: str
    name: str = ""  # the model's name at the daemon (weightd methods)
    socket: str | None = None  # the daemon's socket (weightd methods)
    path: str = ""  # the checkpoint: a .pt for torch.load, a .safetensors for safetensors
    builder: Callable | None = None  # builds the module (weightd-attach, torch.load(mmap)+assign)
    forward: Callable | None = None  # forward(module) checks that the module works
    repeats: int = 3
    # Also time a first touch of every page (one byte per 4 KiB, before the full read): what
    # the mapping costs on first use, apart from the arithmetic a forward does anyway.
    touch_pages: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: one of {', '.join(METHODS)}")
        if self.method in MODULE_METHODS and self.builder is None:
            raise ValueError(f"{self.method} needs a builder")


@dataclass
class Result:
    """One run: ``workers`` processes, all holding their weights when measured."""

    method: str
    workers: int
    latency: float  # seconds: median over workers of each worker's median
    touch: float  # seconds: median over workers of touching every weight once
    latencies: list[float]  # each worker's median
    usages: list[memory.Usage]  # each worker's, at the barrier
    shm_used: int  # bytes in use on /dev/shm at the barrier
    nbytes: int  # weight bytes each worker holds (distinct storages)
    build: float | None = None  # weightd-attach: median skeleton build, seconds
    copies: int | None = None  # weightd-attach: weights copied instead of shared
    forward_ok: bool | None = None
    ready: float = 0.0  # seconds: median over workers of import + first get + first touch of every page
    pages: float | None = None  # seconds: median first touch of every page (Job.touch_pages)
    loop: float | None = None  # seconds: median of the same touch loop again, over resident pages
    imported: float = 0.0  # seconds: median of importing what the method needs, after torch
    extra: dict = field(default_factory=dict)

    @property
    def pss(self) -> int:
        return sum(u.pss for u in self.usages)

    @property
    def pss_shmem(self) -> int:
        return sum(u.pss_shmem for u in self.usages)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "usages"}
        d["usages"] = [u.__dict__ for u in self.usages]
        d.update(pss=self.pss, pss_shmem=self.pss_shmem)
        return d


class WorkerError(RuntimeError):
    pass


def run(job: Job, workers: int, *, timeout: float = 600.0) -> Result:
    """Start ``workers`` processes that each get the weights by ``job``; measure; stop them."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(workers):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=_worker, args=(child_end, job), daemon=True, name=f"weightd-worker-{job.method}"
            )
            p.start()
            child_end.close()  # so that a dead worker reads as EOF here, not as silence
            procs.append(p)
            conns.append(parent_end)
        for c, p in zip(conns, procs):
            _expect(c, p, "ready", deadline)
        for c in conns:
            c.send("go")  # the start gate: all at once
        reports = [_expect(c, p, "done", deadline) for c, p in zip(conns, procs)]
        # The barrier: every worker is alive and holds its weights until told to exit.
        usages = [memory.usage(p.pid) for p in procs]
        shm = memory.shm_used()
        for c in conns:
            c.send("exit")
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for c in conns:
            c.close()
    builds = [r["build"] for r in reports if r["build"] is not None]
    return Result(
        method=job.method,
        workers=workers,
        latency=statistics.median(r["latency"] for r in reports),
        touch=statistics.median(r["touch"] for r in reports),
        ready=statistics.median(r["ready"] for r in reports),
        pages=statistics.median(r["pages"] for r in reports) if job.touch_pages else None,
        loop=statistics.median(r["loop"] for r in reports) if job.touch_pages else None,
        imported=statistics.median(r["imported"] for r in reports),
        latencies=[r["latency"] for r in reports],
        usages=usages,
        shm_used=shm,
        nbytes=reports[0]["nbytes"],
        build=statistics.median(builds) if builds else None,
        copies=max(r["copies"] for r in reports) if builds else None,
        forward_ok=all(r["forward_ok"] for r in reports)
        if job.forward and job.method in MODULE_METHODS
        else None,
    )


def _expect(conn, proc, what: str, deadline: float):
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise WorkerError(f"worker {proc.pid} died (exit code {proc.exitcode}) before it said {what!r}")
        if time.monotonic() > deadline:
            raise WorkerError(f"worker {proc.pid} did not say {what!r} in time")
    try:
        kind, payload = conn.recv()
    except EOFError:
        proc.join(1)
        raise WorkerError(
            f"worker {proc.pid} died (exit code {proc.exitcode}) before it said {what!r}"
        ) from None
    if kind == "error":
        raise WorkerError(f"worker {proc.pid} failed:\n{payload}")
    assert kind == what, (kind, what)
    return payload


# --- inside a worker -----------------------------------------------------------------------


def _worker(conn, job: Job) -> None:
    try:
        import torch

        # N workers share a few cores; one thread each keeps the scheduler out of the numbers.
        torch.set_num_threads(1)
        # What a fresh worker imports to get weights by this method, after torch (which every
        # method needs anyway): part of being ready to serve, timed here, before the start gate.
        t0 = time.perf_counter()
        get = _getter(job)
        imported = time.perf_counter() - t0
        conn.send(("ready", os.getpid()))
        if conn.recv() != "go":
            return
        times, builds, weights = [], [], None
        for _ in range(job.repeats):
            weights = None  # drop the previous copy first: never hold two
            gc.collect()
            t0 = time.perf_counter()
            weights = get()
            times.append(time.perf_counter() - t0)
            if job.method == WEIGHTD_ATTACH:
                from weightd.client import info

                builds.append(info(weights).build_seconds)
        pages = loop = None
        if job.touch_pages:
            t0 = time.perf_counter()
            _touch_pages(weights)
            pages = time.perf_counter() - t0
            # The same loop over pages now resident: its own cost, which a forward does not pay.
            t0 = time.perf_counter()
            _touch_pages(weights)
            loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors, nbytes = _touch(weights)
        touch = time.perf_counter() - t0
        forward_ok = None
        if job.forward is not None and isinstance(weights, torch.nn.Module):
            with torch.no_grad():
                job.forward(weights)
            forward_ok = True
        copies = None
        if job.method == WEIGHTD_ATTACH:
            from weightd.client import info

            copies = info(weights).copies
        conn.send(
            (
                "done",
                {
                    "latency": statistics.median(times),
                    "touch": touch,
                    # ready to serve (exact with repeats=1): imported, weights got, every page of
                    # them mapped (less the touch loop's own cost)
                    "ready": imported + times[0] + (touch if pages is None else max(pages - loop, 0.0)),
                    "pages": pages,
                    "loop": loop,
                    "imported": imported,
                    "nbytes": nbytes,
                    "build": statistics.median(builds) if builds else None,
                    "copies": copies,
                    "forward_ok": forward_ok,
                },
            )
        )
        conn.recv()  # the barrier: hold the weights until the parent has measured everyone
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away or was interrupted: just go
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))


def _getter(job: Job) -> Callable[[], object]:
    """A function that gets the weights by ``job.method``; imports happen here, untimed."""
    import torch

    if job.method == WEIGHTD_STATE_DICT:
        from weightd.client import state_dict

        # One connection per worker and thread (the module-level API's), as a long-lived worker
        # holds; the first call makes it, as a fresh worker's does.
        return lambda: state_dict(job.name, socket=job.socket)
    if job.method == WEIGHTD_ATTACH:
        from weightd.client import attach

        return lambda: attach(job.name, job.builder, socket=job.socket)
    if job.method == TORCH_LOAD:
        return lambda: torch.load(job.path, map_location="cpu", weights_only=True)
    if job.method == TORCH_MMAP_ASSIGN:
        # The skeleton is built the way weightd builds one (parameters on the meta device,
        # non-persistent buffers computed for real), so this compares only where the weights
        # come from: the checkpoint's page cache versus weightd's segment.
        from weightd.client.module import params_on_meta

        def load():
            with params_on_meta():
                module = job.builder()
            sd = torch.load(job.path, map_location="cpu", weights_only=True, mmap=True)
            module.load_state_dict(sd, assign=True)
            return module

        return load
    if job.method == SAFETENSORS:
        from safetensors.torch import load_file

        return lambda: load_file(job.path)
    return lambda: {}


def _touch(weights) -> tuple[int, int]:
    """Read every byte of every weight once; returns (tensors, bytes of distinct storages)."""
    import torch

    if isinstance(weights, torch.nn.Module):
        tensors = list(weights.state_dict().values()) + list(weights.buffers())
    else:
        tensors = list(weights.values())
    storages = {}
    with torch.no_grad():
        for t in tensors:
            t.sum()  # reads every element, so every page is faulted in
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return len(tensors), sum(storages.values())


def _touch_pages(weights) -> None:
    """Read one byte of every 4 KiB page of every weight's storage, once."""
    import torch

    if isinstance(weights, torch.nn.Module):
        tensors = list(weights.state_dict().values()) + list(weights.buffers())
    else:
        tensors = list(weights.values())
    seen = set()
    with torch.no_grad():
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() in seen or not s.nbytes():
                continue
            seen.add(s.data_ptr())
            torch.empty(0, dtype=torch.uint8).set_(s)[::4096].sum()


# --- a daemon to attach to -----------------------------------------------------------------

daemon = spawn.throwaway  # ``with daemon({"name": path}) as d:``, see weightd.bench.spawn


@contextlib.contextmanager
def sigterm_exits():
    """Turn SIGTERM into SystemExit for the duration, so ``finally`` blocks clean up."""

    def handler(sig, frame):
        raise SystemExit(128 + sig)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- printing ------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def ratio(x: float, ref: float) -> str:
    return f"{x / ref:,.1f}x" if ref else "-"


def table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

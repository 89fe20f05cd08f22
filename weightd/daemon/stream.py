"""Streaming checkpoint bytes into a segment: a pool of reader threads, chunk by chunk.

Every format ends here: a load describes what goes where as ``Piece``\\s (a range of an open
checkpoint file, or a buffer transformers computed) and ``Readers.copy`` splits them into
chunks of at most ``chunk`` bytes, grouped into spans of ``SPAN`` contiguous bytes that
``readers`` threads take in turn (Note [a span per reader]), each copying its span's chunks in
order straight into the segment through its descriptor. The threads live as long as the
daemon; loads running side by side share them.

How a file's chunk travels (Note [reading a chunk]):

- *buffered*, the chunk is in the page cache: one copy from the page cache into the
  segment's pages, by ``sendfile`` into the segment's file, or on huge pages by ``preadv`` into
  a mapping of the segment (Note [one copy from the page cache]);
- *direct*, it is not: ``O_DIRECT`` reads straight into the segment's mapping where the file
  and segment offsets agree modulo 4 KiB (Note [straight into the segment]), else of the chunk's
  4 KiB-aligned span into the reader's own aligned buffer (allocated once, reused for every
  load), then one ``pwrite`` of the wanted bytes into the segment. The page cache is bypassed:
  no readahead guesswork, many requests in flight (one per reader), and the checkpoint does not
  evict what workers run on.

The daemon's memory does not grow with the model: at most ``readers`` buffers of ``chunk`` bytes
(``serve --load-readers/--load-chunk``), made on a reader's first ``O_DIRECT`` read through one (a
chunk whose offsets disagree modulo 4 KiB, or a run's edge) and reused.

Note [reading a chunk]
----------------------
Which path a chunk takes is asked of the kernel, per chunk: a buffered ``preadv`` of a few of
its pages with ``RWF_NOWAIT`` fails with EAGAIN where they are not in the page cache. A cached
chunk read with ``O_DIRECT`` would come from the disk again (slower than memory); an uncached
one read buffered goes through readahead, which with many readers on one file measured slower
than direct requests. File systems that refuse ``O_DIRECT`` (EINVAL on open or on a read:
ramfs, some network and FUSE file systems) are read buffered, and the load says so. tmpfs
answers ``RWF_NOWAIT`` with EOPNOTSUPP: always in memory, read buffered.

Note [one copy from the page cache]
-----------------------------------
A cached chunk was once read into the reader's buffer and written with ``pwrite``: two copies.
Either of two ways makes it one, and which is faster depends on the segment's page size:

- ``sendfile`` from the checkpoint into the segment's file (each window has its own
  descriptor of the segment, for its own file position): the kernel copies page cache pages
  into the segment's pages (reserved already, Note [reserving while writing] in
  weightd.segment) and nothing is mapped into the daemon;
- ``preadv`` into a shared mapping of the segment (a span's window, Note [a window per span]):
  the copy faults each page of the window into the daemon's page tables, and unmapping it costs
  again; a huge page is one fault for 2 MiB.

Measured here, 3 GiB warm, daemons of both kinds loading in turn (5 loads each, medians, quiet
machine): on 4 KiB pages (/dev/shm) ``sendfile`` 2.65 GB/s against 2.18 into the mapping; on a
huge-page tmpfs the mapping 8.9-10.4 GB/s once the VM backs the memory, ``sendfile`` 6.2-8.3.
So a folder where huge pages are asked copies through the mapping, any other by ``sendfile``
(where a file system cannot ``sendfile``, through the mapping too). Neither path maps the
checkpoint, so a checkpoint truncated under the load is a short read, never a SIGBUS; the
daemon's private memory does not grow (the pages are shmem).

Note [straight into the segment]
--------------------------------
An ``O_DIRECT`` read wants its file offset, length and memory aligned (4 KiB is enough for every
file system here; ``statx`` STATX_DIOALIGN says 512 for ext4 on this VM's disk). Where a chunk's
file offset and segment offset agree modulo 4 KiB (Note [a storage where its file has it] in
weightd.layout: a safetensors file's storages all do), its aligned middle is read straight into
the segment's mapping: the disk's DMA fills the segment's pages (the kernel pins them for the
read), and no byte is copied by a CPU. Only the unaligned edges of a run of storages (a file's
first and last block, gaps between a ``.pt``'s zip entries) go through the reader's buffer:
the block read whole into it, then ``pwrite`` of the bytes wanted, since reading the block into
the segment would write the file's neighbouring bytes over whatever lies beside the storage.
Chunks are cut at aligned file offsets, so a run's inner chunks have no edges.

Measured on this VM, 3 GiB safetensors cold, daemons of both versions loading in turn (4 each,
quiet machine): through the buffer 0.82-0.91 GB/s, straight in 1.19-1.35, at the same daemon CPU
time per GiB (0.7-0.9 s: the segment's new pages, allocated by the reservation and mapped by the
read, not the copy). The reader no longer copies between two reads, and the disk gets larger
requests: a virtio request takes at most 254 separate pages, so a buffer of scattered 4 KiB pages
makes ~1 MiB requests, where the segment's pages, allocated in order, are partly contiguous
(0.7-1.9 MiB measured) and 2 MiB pages make 4 MiB ones (raw reads into buffers of 2 MiB pages
2.2-2.9 GB/s against 1.2-1.6 into 4 KiB pages: benchmarks/load.py's ceilings).

Note [a window per span]
------------------------
A read into a mapping (buffered, or straight in) maps the segment's pages into the daemon's
page tables, and unmapping them costs ~0.15 s per GiB here. With one mapping of the whole
segment that came at the end of every load, on the clock (and on a stop's), alone: 3 GiB cold
1.25 GB/s with it, 1.43 with a window per span. A reader maps the part of the segment its span
writes (from a 2 MiB boundary, so huge pages map whole) on its first chunk from a file, and
unmaps it when the span ends, while the other readers read: nothing mapped outlives its span,
and a stop waits for at most one window per reader.

Note [a span per reader]
------------------------
Through the page cache, a cold file is read by the kernel's readahead, which follows each
sequential stream it sees. Readers that each took the next 8 MiB chunk in turn gave it four
streams that jump 32 MiB at every read. Each reader now takes the next ``SPAN`` (64 MiB) and
reads it chunk after chunk, and the file is advised ``POSIX_FADV_SEQUENTIAL`` (a larger
readahead window). Measured on this VM's disk, 2 GiB cold, 4 readers x 8 MiB, daemons of both
versions loading in turn (5-7 loads each, medians, three runs): 1.14-1.60 GB/s chunk by chunk,
1.40-1.76 span by span, and steadier (the chunk-by-chunk loads swung 1.02-1.67 in one run).
The disk alone reads 1.6 GB/s chunk by chunk against 2.0-2.1 span by span. Spans in file order
keep the copy's progress close to a prefix of the segment and behind the reservation (a span
goes to the readers once its bytes are reserved).

A stop: every reader checks the load's flag before each chunk, and the load's thread checks the
token while it waits; a stop returns once the chunks already in flight (at most one per
reader, ``chunk`` bytes) are written, and only then is the segment removed (a reader never
writes into a descriptor that was closed, or reused, under it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from weightd import segment
from weightd.errors import CheckpointError, ConfigError, OutOfSpace

log = logging.getLogger("weightd")

# Measured here, 3 GiB cold, daemons in turn (README: Loading): 4 x 8 MiB 1.86 GB/s, 16 x 8 MiB
# 2.0-2.1; warm alike. 32 x 4 MiB read faster still (1.56 against 1.36 in a slower hour), but a
# SIGTERM of an 8 GiB load then took 0.39 s (16 x 8 MiB: 0.22): 32 spans' windows to unmap at a
# stop (Note [a window per span]). At most readers x chunk = 128 MiB of buffers.
DEFAULT_READERS = 16
DEFAULT_CHUNK = 8 << 20
SPAN = 64 << 20  # contiguous bytes a reader takes at once (Note [a span per reader])
WINDOW_ALIGN = 2 << 20  # a span's mapping starts at a huge page (Note [a window per span])
MIN_CHUNK = 1 << 20
MAX_CHUNK = 256 << 20
MAX_READERS = 64
ALIGN = 4096  # O_DIRECT: file offset, length and buffer aligned to the logical block (<= 4 KiB)
DIRECT_MODES = ("auto", "always", "never")
# Measured on this VM's disk, 2 GiB cold, daemons loading in turn, four loads each (quiet
# machine), readers taking spans (Note [a span per reader]): O_DIRECT for what is not cached
# (auto) 1.30-1.40 GB/s, through the page cache 0.92-1.22. The page cache costs a new page per
# 4 KiB read on top of the segment's (twice the CPU time per byte measured here, on 2 vCPUs),
# O_DIRECT reads into a reused buffer. (With readers taking 8 MiB chunks in turn it was the
# other way round: buffered 1.11-1.54, auto 0.77-0.86.) ``never`` where readahead measures faster.
DEFAULT_DIRECT = "auto"
READER_NICE = 5  # added to the readers' nice value (Linux: per thread)
WAIT_SECONDS = 0.02  # how often a waiting load checks its token


@dataclass(frozen=True)
class Piece:
    """``nbytes`` to put at ``dst`` in the segment: from file ``fd`` at ``offset`` (``path`` names
    it in errors), or from ``data`` (a buffer: what transformers computed, a small file).
    ``shared``: the ranges of a fused tensor (Note [fused tensors are file ranges] in
    weightd/daemon/fused.py), read through the page cache, never with ``O_DIRECT``. Where the
    loader lets transformers fuse them it reads them too, and storage is read once for both. Where
    it does not (Note [the fusion not computed]) the cache still measured faster: a cold 947 MiB
    Mixtral folder 2.0 s against 2.45 with ``O_DIRECT`` (medians of 4), 1.27 against 1.58 in
    another hour: transformers still touches a page of each expert, and the read-around of that
    fault brings the expert into the cache (Note [from_pretrained reads the weights it keeps])."""

    nbytes: int
    dst: int
    fd: int = -1
    offset: int = 0
    path: str = ""
    data: object = None
    shared: bool = False


@dataclass
class Report:
    """How a load's bytes travelled: what ``ls``/``stats`` and the log show."""

    nbytes: int = 0
    seconds: float = 0.0
    readers: int = 0
    chunk: int = 0
    direct: int = 0  # bytes read with O_DIRECT
    straight: int = 0  # of which read straight into the segment (Note [straight into the segment])
    buffered: int = 0  # bytes read through the page cache
    memory: int = 0  # bytes written from memory (converted tensors, small files)
    refused: list[str] = field(default_factory=list)  # files whose file system refused O_DIRECT

    @property
    def path(self) -> str:
        files = self.direct + self.buffered
        if not files:
            return "memory"
        if not self.direct:
            return "buffered"
        if not self.buffered:
            return "direct"
        return f"mixed ({100 * self.direct / files:.0f}% direct)"

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "bytes": self.nbytes,
            "seconds": round(self.seconds, 4),
            "gbps": round(self.gbps, 3),
            "readers": self.readers,
            "chunk": self.chunk,
            "path": self.path,
            "direct_bytes": self.direct,
            "straight_bytes": self.straight,
            "buffered_bytes": self.buffered,
            "memory_bytes": self.memory,
            "direct_refused": self.refused,
        }

    def plus(self, other: "Report") -> "Report":
        """This copy and ``other`` (one load's early copy: weightd.daemon.early) as one; the
        seconds are both copies' own, which may have overlapped other work."""
        return replace(
            self,
            nbytes=self.nbytes + other.nbytes,
            seconds=self.seconds + other.seconds,
            direct=self.direct + other.direct,
            straight=self.straight + other.straight,
            buffered=self.buffered + other.buffered,
            memory=self.memory + other.memory,
            refused=sorted(set(self.refused) | set(other.refused)),
        )

    def describe(self) -> str:
        refused = f", O_DIRECT refused for {len(self.refused)} file(s)" if self.refused else ""
        straight = f" ({100 * self.straight / self.direct:.0f}% straight in)" if self.direct else ""
        return (
            f"{self.nbytes / 2**20:.1f} MiB in {self.seconds:.2f} s, {self.gbps:.2f} GB/s, "
            f"{self.readers} readers x {self.chunk >> 20} MiB chunks, {self.path}{straight}{refused}"
        )


class _Batch:
    """One load's copy: its chunks' outcome, counted under a lock."""

    def __init__(self, seg_fd: int, total: int, report: Report, written=None, huge_pages: bool = False):
        self.seg_fd = seg_fd
        self.huge_pages = huge_pages  # cached chunks through a mapping (Note [one copy from the page cache])
        self.total = total
        self.report = report
        self.lock = threading.Lock()
        self.done = 0
        self.pending = 0
        self.stop = False
        self.error: BaseException | None = None
        self.idle = threading.Event()
        self.direct_fds: dict[int, int | None] = {}  # buffered fd -> its O_DIRECT twin, None: refused
        self.opened: list[int] = []  # every O_DIRECT descriptor, closed once no reader runs
        self.written: Callable[[int, int], None] | None = written  # Hook (issue 23): see Readers.copy

    def add(self, nbytes: int, kind: str) -> None:
        with self.lock:
            self.done += nbytes
            setattr(self.report, kind, getattr(self.report, kind) + nbytes)

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e
            self.stop = True

    def finished_one(self) -> None:
        with self.lock:
            self.pending -= 1
            if self.pending == 0:
                self.idle.set()


class Readers:
    """The daemon's reader threads (started on first use); ``copy`` is thread-safe."""

    def __init__(
        self, readers: int = DEFAULT_READERS, chunk: int = DEFAULT_CHUNK, direct: str = DEFAULT_DIRECT
    ):
        self.readers = check_readers(readers)
        self.chunk = check_chunk(chunk)
        if direct not in DIRECT_MODES:
            raise ConfigError(f"direct must be one of {', '.join(DIRECT_MODES)}, not {direct!r}")
        self.direct = direct
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start = threading.Lock()

    def copy(
        self,
        seg_fd: int,
        pieces: list[Piece],
        *,
        check: Callable[[], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        reserving: Iterator[int] | None = None,
        written: Callable[[int, int], None] | None = None,
        huge_pages: bool = False,
    ) -> Report:
        """Copy every piece into the segment open as ``seg_fd``; returns how.

        ``huge_pages``: the segment's folder is meant to give it 2 MiB pages; cached chunks are
        then copied through a mapping of it, else by ``sendfile`` (Note [one copy from the page
        cache]).

        ``reserving``: the segment's reservation (``segment.reservation``), run here step by
        step; a chunk goes to the readers once its bytes are reserved (Note [reserving while
        writing] in weightd.segment).

        ``written(offset, nbytes)``: called from the reader thread once a chunk is in the
        segment (Hook, issue 23: the load's ``segment.Watermark``, Note [the watermark]).

        ``check()`` raises to stop (it is called while waiting, from this thread);
        ``progress(done, total)`` is called from this thread too. Raises the first error a
        reader met (a ``CheckpointError`` naming the file for a short read or an I/O error),
        after every chunk in flight has ended: ``seg_fd`` is no longer written to then.
        """
        self._ensure_threads()
        total = sum(p.nbytes for p in pieces)
        report = Report(readers=self.readers, chunk=self.chunk)
        batch = _Batch(seg_fd, total, report, written, huge_pages)
        started = time.perf_counter()
        spans = _spans(pieces, self.chunk, max(SPAN, self.chunk))
        _sequential(pieces)
        batch.pending = len(spans)
        if not spans:
            batch.idle.set()
        sent = 0
        last = -1

        def report_progress() -> None:
            nonlocal last
            if progress is not None and batch.done != last:
                last = batch.done
                progress(last, total)

        try:
            for end in reserving or ():
                if check is not None:
                    check()
                if batch.stop:
                    break
                while sent < len(spans) and _end(spans[sent]) <= end:
                    self._queue.put((batch, spans[sent]))
                    sent += 1
                report_progress()
            while sent < len(spans):
                self._queue.put((batch, spans[sent]))
                sent += 1
            while not batch.idle.wait(WAIT_SECONDS):
                if check is not None:
                    check()
                if batch.stop:
                    break
                report_progress()
        except BaseException as e:
            batch.fail(e)
            raise
        finally:
            with batch.lock:
                batch.stop = True  # chunks queued but not started yet are skipped
                batch.pending -= len(spans) - sent  # never queued
                if batch.pending == 0:
                    batch.idle.set()
            batch.idle.wait()
            for dfd in batch.opened:
                os.close(dfd)
        if batch.error is not None:
            raise batch.error
        if check is not None:
            check()
        report.nbytes = total
        report.seconds = time.perf_counter() - started
        if progress is not None:
            progress(total, total)
        return report

    def close(self) -> None:
        """End the threads (after the chunks queued before)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()

    # --- the reader threads ---

    def _ensure_threads(self) -> None:
        with self._start:
            if not self._threads:
                for i in range(self.readers):
                    t = threading.Thread(target=self._run, name=f"weightd-reader-{i}", daemon=True)
                    t.start()
                    self._threads.append(t)

    def _run(self) -> None:
        # A little below the request loop: a load on a busy machine must not make the daemon
        # slow to answer (ls, attaches of models already served).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)
        buffer: list = [None]  # this reader's aligned buffer, made on its first direct read
        while True:
            item = self._queue.get()
            if item is None:
                if buffer[0] is not None:
                    buffer[0].close()
                return
            batch, span = item
            window = _Window(batch.seg_fd, span)
            try:
                for piece, start, n in span:
                    if batch.stop:
                        break
                    self._chunk(batch, window, piece, start, n, buffer)
                    if batch.written is not None:  # Hook (issue 23): Note [the watermark]
                        batch.written(piece.dst + start, n)
            except BaseException as e:
                batch.fail(e)
            finally:
                window.close()  # before the load can end: no mapping outlives it
                batch.finished_one()

    def _chunk(self, batch: _Batch, window: _Window, piece: Piece, start: int, n: int, buffer: list) -> None:
        dst = piece.dst + start
        if piece.data is not None:
            view = memoryview(piece.data).cast("B")[start : start + n]
            try:
                _pwrite_all(batch.seg_fd, view, dst)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise _no_space(batch.seg_fd) from None
                raise
            batch.add(n, "memory")
            return
        src = piece.offset + start
        try:
            if (
                self.direct != "never"
                and not piece.shared
                and (self.direct == "always" or not _cached(piece.fd, src, n))
            ):
                dfd = self._direct_fd(batch, piece)
                if dfd is not None and self._read_direct(batch, window, piece, dfd, src, n, dst, buffer):
                    batch.add(n, "direct")
                    return
            self._read_buffered(batch, window, piece, src, n, dst)
            batch.add(n, "buffered")
        except CheckpointError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):  # the segment's side: full
                raise _no_space(batch.seg_fd) from None
            raise _read_failed(piece.path, e) from None

    def _direct_fd(self, batch: _Batch, piece: Piece) -> int | None:
        with batch.lock:
            if piece.fd in batch.direct_fds:
                return batch.direct_fds[piece.fd]
            # The same open file again, by its descriptor (never the path: Note [...] in
            # checkpoint.open_file), with O_DIRECT.
            try:
                dfd = os.open(f"/proc/self/fd/{piece.fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.EACCES):
                    raise
                dfd = None
                self._refused(batch, piece, e)
            batch.direct_fds[piece.fd] = dfd
            if dfd is not None:
                batch.opened.append(dfd)
            return dfd

    def _refused(self, batch: _Batch, piece: Piece, e: OSError) -> None:
        if piece.path not in batch.report.refused:
            batch.report.refused.append(piece.path)
            log.info("%s: O_DIRECT refused (%s): read through the page cache", piece.path, e.strerror)

    def _read_buffered(
        self, batch: _Batch, window: _Window, piece: Piece, src: int, n: int, dst: int
    ) -> None:
        """The chunk from the page cache into the segment, one copy (Note [one copy from the
        page cache])."""
        if not batch.huge_pages and window.send(piece, src, n, dst):
            return
        with window.at(dst, n) as into:
            _read_exactly(piece.fd, into, src, piece.path)

    def _read_direct(
        self, batch, window: _Window, piece: Piece, dfd: int, src: int, n: int, dst: int, buffer: list
    ) -> bool:
        """The chunk read with O_DIRECT, its bytes written; False where the file system refused
        (then never tried again for this file in this load). Where the file and segment offsets
        agree modulo ``ALIGN`` (Note [a storage where its file has it] in weightd.layout), the
        chunk's aligned middle is read straight into the segment's mapping (Note [straight into
        the segment]) and only its edges through the buffer; elsewhere all of it."""
        try:
            lo, hi = -(-src // ALIGN) * ALIGN, (src + n) // ALIGN * ALIGN
            if (src - dst) % ALIGN or lo >= hi:
                self._through_buffer(batch, piece, dfd, src, n, dst, buffer)
                return True
            if lo > src:
                self._through_buffer(batch, piece, dfd, src, lo - src, dst, buffer)
            with window.at(dst + lo - src, hi - lo) as into:
                _read_exactly(dfd, into, lo, piece.path)
            if src + n > hi:
                self._through_buffer(batch, piece, dfd, hi, src + n - hi, dst + hi - src, buffer)
            batch.add(hi - lo, "straight")
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            with batch.lock:
                batch.direct_fds[piece.fd] = None
            self._refused(batch, piece, e)
            return False

    def _through_buffer(
        self, batch, piece: Piece, dfd: int, src: int, n: int, dst: int, buffer: list
    ) -> None:
        """``n`` bytes at ``src``: their aligned span read with O_DIRECT into this reader's
        buffer, the bytes wanted ``pwrite``n into the segment."""
        if buffer[0] is None:
            buffer[0] = _buffer(self.chunk)
        lo = src - src % ALIGN
        hi = -(-(src + n) // ALIGN) * ALIGN
        with memoryview(buffer[0]) as buf:
            got = 0
            while got < hi - lo:
                k = os.preadv(dfd, [buf[got : hi - lo]], lo + got)
                if k == 0:
                    break
                got += k
                if got % ALIGN:  # the end of the file: O_DIRECT reads stop short of a block
                    break
            if got < src - lo + n:
                raise _short(piece.path, src + got - (src - lo), src + n)
            _pwrite_all(batch.seg_fd, buf[src - lo : src - lo + n], dst)


def _spans(pieces: list[Piece], chunk: int, span: int) -> list[list[tuple[Piece, int, int]]]:
    """The pieces' chunks (piece, start, bytes) in segment order, grouped into spans of about
    ``span`` contiguous bytes (Note [a span per reader]). Pieces back to back in a file and in
    the segment are one run, cut where the file offset is ``ALIGN``-aligned: a chunk has
    unaligned edges only where a run has (Note [straight into the segment])."""
    chunks = []
    for p in _runs(pieces):
        first = chunk - p.offset % ALIGN if p.data is None else chunk
        starts = [0, *range(first, p.nbytes, chunk)] if p.nbytes else []
        chunks.extend((p, a, min(b, p.nbytes) - a) for a, b in zip(starts, [*starts[1:], p.nbytes]))
    out: list[list[tuple[Piece, int, int]]] = []
    size = span
    for c in chunks:
        if size >= span:
            out.append([])
            size = 0
        out[-1].append(c)
        size += c[2]
    return out


class _Window:
    """The part of the segment a span writes, mapped on its first chunk from a file and
    unmapped at its end (Note [a window per span])."""

    def __init__(self, fd: int, span: list[tuple[Piece, int, int]]):
        self.fd = fd
        self.lo = span[0][0].dst + span[0][1]
        self.hi = _end(span)
        self.base = 0  # the segment offset the mapping starts at
        self.mapping: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.out = -1  # this window's own descriptor of the segment, for sendfile; -2: refused

    def send(self, piece: Piece, src: int, n: int, dst: int) -> bool:
        """``sendfile`` the piece's bytes ``[src, src + n)`` to the segment at ``dst``; False
        where the checkpoint's file system cannot (nothing written then)."""
        if self.out == -2:
            return False
        if self.out < 0:
            # A new open file of the segment (not a dup): its file position is this window's.
            self.out = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(self.out, dst, os.SEEK_SET)
        done = 0
        while done < n:
            try:
                k = os.sendfile(self.out, piece.fd, src + done, n - done)
            except OSError as e:
                if done or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.close_out()
                self.out = -2
                return False
            if k == 0:
                raise _short(piece.path, src + done, src + n)
            done += k
        return True

    def close_out(self) -> None:
        if self.out >= 0:
            os.close(self.out)
        self.out = -1

    def at(self, offset: int, n: int) -> memoryview:
        """The segment's bytes ``[offset, offset + n)``, within the span."""
        if self.view is None:
            self.base = self.lo - self.lo % WINDOW_ALIGN
            end = min(-(-self.hi // WINDOW_ALIGN) * WINDOW_ALIGN, os.fstat(self.fd).st_size)
            self.mapping = mmap.mmap(self.fd, end - self.base, flags=mmap.MAP_SHARED, offset=self.base)
            self.view = memoryview(self.mapping)
        return self.view[offset - self.base : offset - self.base + n]

    def close(self) -> None:
        self.close_out()
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


def _runs(pieces: list[Piece]) -> list[Piece]:
    """The pieces in segment order, those that follow one another both in one file and in the
    segment merged (a storage laid out where its file has it, Note [a storage where its file has
    it] in weightd.layout: a safetensors file is then one run)."""
    out: list[Piece] = []
    for p in sorted(pieces, key=lambda p: p.dst):
        q = out[-1] if out else None
        if (
            q is not None
            and p.data is None
            and q.data is None
            and p.fd == q.fd >= 0
            and p.shared == q.shared
            and q.offset + q.nbytes == p.offset
            and q.dst + q.nbytes == p.dst
        ):
            out[-1] = replace(q, nbytes=q.nbytes + p.nbytes)
        else:
            out.append(p)
    return out


def _read_exactly(fd: int, into: memoryview, at: int, path: str) -> None:
    """Fill ``into`` from ``fd`` at ``at`` (O_DIRECT or through the page cache); a file that ends
    first is a CheckpointError (a short read of a regular file is its end)."""
    got = 0
    while got < len(into):
        k = os.preadv(fd, [into[got:]], at + got)
        if k == 0 or (k % ALIGN and got + k < len(into)):
            raise _short(path, at + got + k, at + len(into))
        got += k


def _end(span: list[tuple[Piece, int, int]]) -> int:
    """Where the span's last chunk ends in the segment."""
    piece, start, n = span[-1]
    return piece.dst + start + n


def _sequential(pieces: list[Piece]) -> None:
    """Tell the kernel each file is read front to back (a larger readahead window)."""
    for fd in {p.fd for p in pieces if p.fd >= 0}:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _cached(fd: int, offset: int, n: int) -> bool:
    """Whether the chunk's first, middle and last pages are in the page cache (RWF_NOWAIT);
    True where the file system cannot say (tmpfs: memory anyway)."""
    probe = bytearray(1)
    for at in (offset, offset + n // 2, offset + n - 1):
        try:
            os.preadv(fd, [probe], at, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return True
            raise
    return True


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _short(path: str, at: int, want: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file ended at byte {at} while bytes up to {want} were being read: it shrank or was "
        "replaced during the load: load it again once it is written completely"
    )


def _no_space(seg_fd: int) -> OutOfSpace:
    """The segment's tmpfs filled up while the readers wrote (Note [reserving while writing])."""
    where = os.path.dirname(os.readlink(f"/proc/self/fd/{seg_fd}"))
    size = os.fstat(seg_fd).st_size
    return OutOfSpace(segment.Folder(where).no_space_message(size))


def _read_failed(path: str, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"{path}: reading it failed ({e.strerror or e}): check the file and the disk or file system it is on"
    )


def check_readers(n: int) -> int:
    if not (isinstance(n, int) and 1 <= n <= MAX_READERS):
        raise ConfigError(f"--load-readers must be 1 to {MAX_READERS}, not {n!r}")
    return n


def check_chunk(n: int) -> int:
    if not (isinstance(n, int) and MIN_CHUNK <= n <= MAX_CHUNK and n % ALIGN == 0):
        raise ConfigError(
            f"--load-chunk must be a multiple of 4 KiB from {MIN_CHUNK >> 20} to {MAX_CHUNK >> 20} MiB, "
            f"not {n!r}"
        )
    return n


@contextlib.contextmanager
def pool(readers: int = DEFAULT_READERS, chunk: int = DEFAULT_CHUNK, direct: str = DEFAULT_DIRECT):
    """Readers for one ``with`` block (tests, benchmarks)."""
    r = Readers(readers, chunk, direct)
    try:
        yield r
    finally:
        r.close()


def pieces(placed) -> list[Piece]:
    """``layout.write``'s blobs, each with the offset it goes to, as pieces to copy."""
    out = []
    for blob, dst in placed:
        if blob.file is not None:
            fd, offset, path = blob.file
            out.append(Piece(blob.nbytes, dst, fd=fd, offset=offset, path=path))
        elif blob.parts is not None:
            for fd, offset, nbytes, path in blob.parts:
                out.append(Piece(nbytes, dst, fd=fd, offset=offset, path=path, shared=True))
                dst += nbytes
        elif blob.data is not None:
            out.append(Piece(blob.nbytes, dst, data=blob.data))
        else:
            raise ValueError("a blob with neither a file nor a buffer cannot be streamed")
    return out


def _buffer(chunk: int) -> mmap.mmap:
    """A reader's buffer: page aligned (O_DIRECT), private anonymous memory (a plain
    ``mmap(-1)`` is MAP_SHARED, which the kernel counts as shared memory, like a segment)."""
    return mmap.mmap(-1, chunk + 2 * ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

"""A Hugging Face folder's weights copied into its segment while ``from_pretrained`` runs.

Note [copying while from_pretrained runs]
-----------------------------------------
A folder's load was the loader process's ``from_pretrained`` (0.1-0.6 s for a 517 MiB Llama),
then the daemon's copy of what it answered, one after the other: the copy is what a single
file's load costs, so the folder cost that and ``from_pretrained`` on top. Most of what
``from_pretrained`` gives back is the weight files' bytes untouched, and which those are is
known before it runs: the loader process builds the model on the meta device anyway (to count
its parameters), and sends the ranges of the tensors whose name, dtype and shape the model has
(``loader._likely_views``) before it calls ``from_pretrained``. The name is the one
transformers' own rules for the model give the file's tensor (``fused.names``:
``rename_source_key``, as ``from_pretrained`` applies them), so a checkpoint saved under its
authors' names (Dinov2's ``attention.attention.query``, nomic-bert's ``Wqkv`` that a ``Chunk``
cuts into q, k and v, views of the file's tensor) is copied early too: 7-12% of such a folder
was before, all of it now, and a 773 MiB Dinov2 folder loaded in 1.41x its one file's time
warm instead of 2.44x (1.27x against 1.81x cold). The daemon creates the segment
(unsealed, no manifest yet), lays those ranges out as ``layout.place`` would, in file order from
the data's start, and its readers copy them while ``from_pretrained`` runs.

When the answer comes, each storage it names that is one of those ranges keeps the place it was
copied to (``layout.place``'s ``fixed``); everything else (what transformers fused or cast,
the small files) is placed after them and copied as before. A guess the
answer does not name (a key the class drops) is dead: its pages are given back
(``FALLOC_FL_PUNCH_HOLE``), so the segment holds no dead bytes, only a hole no tensor points
into. Of the tensors transformers computes, those it fuses from whole file tensors (MoE
experts, Note [fused tensors are file ranges] in weightd/daemon/fused.py) are guessed too, as
the file ranges they are made of, placed after the others and read through the page cache
(``from_pretrained`` touches them too); the answer keeps one only where the loader proved it
equal to those ranges. Any other conversion is not guessed.

Note [the daemon's first guess]
-------------------------------
The loader's guess comes 0.1-0.2 s after the request: the loader forks, reads the config, builds
the model on the meta device, applies transformers' rules to every name. A 1 GiB dense folder
copies in 0.7-0.9 s here, so the copy started that much late was most of what it took over its
one file. Meanwhile the daemon knows the files' headers (a read of each, ms), and of a dense
folder every tensor is served as it lies in its file, whatever name transformers gives it (a
rename or a ``Chunk`` keeps the file's bytes). So the daemon copies first, before asking the
loader, the file tensors ``first_guess`` picks from the headers alone (``FIRST_GUESS_BYTES`` of
them at most, in file order); the loader's guess, when it comes, adds what is not placed yet, after
them. Left out of it: a quantized folder (transformers converts its tensors), a tensor not of the
dtype the config loads in (cast), an MoE expert's (``EXPERT``: stacked into a fused tensor, copied
as its range by the loader's guess), every tensor of a config that names no dtype. A first guess
the answer does not keep is dead like any other (its pages are given back); its cost is the copy,
bounded by ``FIRST_GUESS_BYTES``, never a wrong tensor. Daemons with and without it in turn, 5
rounds warm, against the one file: a 1 GiB Llama of 4 shards 1.09x against 1.21x, a 853 MiB
Mixtral 1.64x against 1.92x (its experts still wait for the loader), a Dinov2 1.83x against
1.92x (its from_pretrained, not the copy, is what it waits for).

What else transformers converted (casts, other fusions) the loader process writes into a memfd
it hands the daemon before it writes it, laid out as ``layout.place`` lays out what follows
the files' storages (``storage_alignment``); the daemon puts the memfd's bytes after the views
as they lie in it, and copies each part as the loader reports it written: its copy and the
loader's write overlap instead of following each other (a 947 MiB Mixtral, 672 MiB converted,
warm: 1.23 s -> 1.01 s against 0.42 s for its one file). The loader keeps what it had: the
memfd is its own, as before; it never holds a descriptor of the segment.

What a worker maps is still exactly the tensors ``from_pretrained`` gave: the early copy only
decides where some of them were put, and nothing is sealed before the answer. A stop meets the
copy like any other (its readers check the load's token per chunk), then the segment is removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable

from weightd import layout, segment
from weightd.daemon import fused, stream
from weightd.errors import OutOfSpace
from weightd.layout import Blob
from weightd.manifest import PAGE_ALIGN, TensorMeta, align_up

log = logging.getLogger("weightd")

FALLOC_FL_KEEP_SIZE = 1
ITEM_DTYPES = {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}
FALLOC_FL_PUNCH_HOLE = 2
# Note [the daemon's first guess]: what copies while the loader's guess comes (0.1-0.2 s, at up
# to 1.5 GB/s warm here) and what a wrong first guess may cost.
FIRST_GUESS_BYTES = 256 << 20
EXPERT = re.compile(r"experts\.\d+\.")  # one MoE expert's tensor: mlp.experts.3.down_proj.weight


def first_guess(headers: Iterable[tuple[int, int, dict]], config: dict) -> list[list[int]]:
    """The file tensors the daemon copies before the loader's guess (Note [the daemon's first
    guess]): [file index, offset, bytes, item size] in file order, ``FIRST_GUESS_BYTES`` at most.
    ``headers``: (file index, where its data starts, its header) of the safetensors weight files,
    in order, taken only as far as the guess goes."""
    if not isinstance(config, dict) or config.get("quantization_config") is not None:
        return []
    wanted = config.get("dtype") or config.get("torch_dtype")
    # the config's dtype as a header names it, and its size: ("BF16", 2) for "bfloat16"
    named = [(st, size) for st, (name, size) in fused.DTYPES.items() if name == wanted]
    if not named:
        return []
    [(st, itemsize)] = named
    out, total = [], 0
    for k, data, header in headers:
        ranges = []
        for name, v in header.items():
            # a header's value is JSON of any type: only an equal name is taken
            if name == "__metadata__" or not isinstance(v, dict) or v.get("dtype") != st:
                continue
            offsets = v.get("data_offsets")
            if (
                EXPERT.search(name)
                or not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(type(x) is int for x in offsets)
                or not 0 <= offsets[0] < offsets[1]
            ):
                continue
            ranges.append((data + offsets[0], offsets[1] - offsets[0]))
        for offset, nbytes in sorted(ranges):
            if out and out[-1][0] == k and offset < out[-1][1] + out[-1][2]:
                return []  # tensors that overlap: not a file safetensors writes; guess nothing
            if total + nbytes > FIRST_GUESS_BYTES:
                return out
            out.append([k, offset, nbytes, itemsize])
            total += nbytes
    return out


class EarlyCopy:
    """One load's copy started early: the segment, what went where, the thread copying.

    ``hf`` tells it, from the load's thread, what the loader process says before its answer:
    ``views`` (the ranges it expects to stay untouched), then ``converted`` (its memfd of
    converted tensors) and ``written`` (how far that is written); each becomes a job for one
    ``weightd-early`` thread, which hands it to the readers and waits. ``finish`` (the answer
    came) and ``abandon`` (a failure or a stop) end it."""

    def __init__(
        self,
        readers: stream.Readers,
        folder: segment.Folder,
        check: Callable[[], None],
        huge: bool,
        create: Callable[[int], segment.Segment],
    ):
        self.readers = readers
        self.folder = folder
        self.check = check
        self.huge = huge
        self._create = create  # size -> the load's segment, created (its manifest made)
        self.seg: segment.Segment | None = None
        self.offsets: dict[tuple, int] = {}  # Blob.source -> offset
        self.first: set[tuple] = set()  # those of the daemon's first guess
        self.first_kept = 0  # their bytes the answer kept (the load's report)
        self.end = segment.DATA_OFFSET  # where the early copy's bytes end
        self.reserved = 0  # the segment's bytes the early copy reserves
        self.report: stream.Report | None = None
        self._memfd = -1
        self._memfd_at = 0  # where the memfd's bytes go in the segment
        self._memfd_total = 0
        self._memfd_sent = 0  # the memfd's bytes handed to the readers
        self._error: BaseException | None = None
        self._given_up = threading.Event()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def views(self, blobs: list[tuple[Blob, int]], *, first: bool = False) -> None:
        """Copy ``blobs`` ((blob, item size), in file order), those not placed yet, after what is:
        the daemon's first guess, then the loader's (Note [the daemon's first guess]). The
        segment is created for the first ones."""
        blobs = [(b, size) for b, size in blobs if b.source not in self.offsets]
        if not blobs or self._memfd >= 0:
            return
        tensors = [
            TensorMeta(str(i), i, 0, ITEM_DTYPES[size], (b.nbytes // size,), (1,))
            for i, (b, size) in enumerate(blobs)
        ]
        start = segment.DATA_OFFSET if self.seg is None else align_up(self.end, PAGE_ALIGN)
        storages = layout.place([b for b, _ in blobs], tensors, start=start)
        end = max(s.offset + s.nbytes for s in storages)
        if self.seg is None and not self._open(end):
            return
        for (b, _), st in zip(blobs, storages):
            self.offsets[b.source] = st.offset
            if first:
                self.first.add(b.source)
        self._submit(stream.pieces([(b, st.offset) for (b, _), st in zip(blobs, storages)]), end)

    def converted(self, memfd: int, total: int) -> None:
        """The loader process's memfd of ``total`` bytes of converted tensors: its bytes go after
        the views, as they lie in it (the loader aligns them as ``layout.place`` would)."""
        at = align_up(self.end, PAGE_ALIGN)
        if self.seg is None and not self._open(at + total):
            return
        self._memfd, self._memfd_at, self._memfd_total = memfd, at, total
        self._submit([], at + total)  # the segment grows to hold them, reserved

    def written(self, upto: int) -> None:
        """The memfd's first ``upto`` bytes are written: copy what is new of them."""
        if self._memfd < 0 or not self._memfd_sent <= upto <= self._memfd_total:
            return
        piece = stream.Piece(
            upto - self._memfd_sent,
            self._memfd_at + self._memfd_sent,
            fd=self._memfd,
            offset=self._memfd_sent,
            path="the tensors the loader process converted",
        )
        self._memfd_sent = upto
        self._submit([piece], None)

    def _open(self, end: int) -> bool:
        try:
            self.seg = self._create(self.folder.rounded_size(end))
        except OutOfSpace:
            return False  # the load itself says so, with the size it needs
        self._thread = threading.Thread(target=self._run, name="weightd-early", daemon=True)
        self._thread.start()
        return True

    def _submit(self, pieces: list[stream.Piece], end: int | None) -> None:
        """Queue a copy; ``end``: the segment's bytes it needs, reserved first."""
        reserving = None
        if end is not None and end > self.end:
            size = self.folder.rounded_size(end)
            reserving = segment.reservation(self.seg.fd, size, self.folder, start=self.reserved)
            self.end, self.reserved = end, size
        self._jobs.put((pieces, reserving))

    def _run(self) -> None:
        def check() -> None:
            if self._given_up.is_set():
                raise _GivenUp()
            self.check()

        while True:
            job = self._jobs.get()
            if job is None or self._error is not None:
                if job is None:
                    return
                continue
            pieces, reserving = job
            try:
                report = self.readers.copy(
                    self.seg.fd, pieces, check=check, reserving=reserving, huge_pages=self.huge
                )
                self.report = report if self.report is None else self.report.plus(report)
            except BaseException as e:  # noqa: BLE001 - handed to the load's thread by finish()
                self._error = e

    def finish(self, kept: set[tuple[int, int, int]]) -> None:
        """Wait for the copy; raise what it met. Then place the memfd's storages where they were
        copied, and give back the pages of every guessed range the answer did not keep
        (``kept``: (fd, offset, bytes) of its storages)."""
        if self._thread is None:
            return
        self._stop_thread()
        if self._error is not None:
            raise self._error
        dead = 0
        self.first_kept = sum(_nbytes(key) for key in self.first & kept)
        for key, offset in list(self.offsets.items()):
            if key not in kept:
                del self.offsets[key]
                nbytes = _nbytes(key)
                dead += nbytes
                _punch(self.seg.fd, offset, nbytes)
        for key in kept:
            if key and key[0] == self._memfd and key[1] + key[2] <= self._memfd_sent:
                self.offsets[key] = self._memfd_at + key[1]
        if dead:
            log.info(
                "%s: %.1f MiB copied early and not kept by from_pretrained, given back",
                self.seg.name,
                dead / 2**20,
            )

    def stop(self) -> None:
        """The copy stops at its next chunk; returns once no reader reads for it (before the
        files it reads from are closed)."""
        self._given_up.set()
        self._stop_thread()

    def abandon(self) -> None:
        """A failed or stopped load: the copy stops, the segment is removed."""
        self.stop()
        if self.seg is not None and self.seg.fd >= 0:
            self.seg.destroy(wait=False)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()


class _GivenUp(Exception):
    pass


def _nbytes(source: tuple) -> int:
    """The bytes of a ``Blob.source``: (fd, offset, bytes), or a tuple of those (parts)."""
    return sum(p[2] for p in source) if isinstance(source[0], tuple) else source[2]


def _punch(fd: int, offset: int, nbytes: int) -> None:
    """Free the whole pages of [offset, offset + nbytes) (the file keeps its size)."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-offset // page) * page, (offset + nbytes) // page * page
    if hi <= lo:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, lo, hi - lo) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e, os.strerror(e))

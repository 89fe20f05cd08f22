"""A Hugging Face folder's weights copied into its segment while ``from_pretrained`` runs.

Note [copying while from_pretrained runs]
-----------------------------------------
A folder's load was the loader process's ``from_pretrained`` (0.1-0.6 s for a 517 MiB Llama),
then the daemon's copy of what it answered, one after the other: the copy is what a single
file's load costs, so the folder cost that and ``from_pretrained`` on top. Most of what
``from_pretrained`` gives back is the weight files' bytes untouched, and which those are is
known before it runs: the loader process builds the model on the meta device anyway (to count
its parameters), and sends the ranges of the tensors whose name, dtype and shape the model has
(``loader._likely_views``) before it calls ``from_pretrained``. The daemon creates the segment
(unsealed, no manifest yet), lays those ranges out as ``layout.place`` would, in file order from
the data's start, and its readers copy them while ``from_pretrained`` runs.

When the answer comes, each storage it names that is one of those ranges keeps the place it was
copied to (``layout.place``'s ``fixed``); everything else (what transformers fused or cast, a
tensor it renamed, the small files) is placed after them and copied as before. A guess the
answer does not name (a key the class drops) is dead: its pages are given back
(``FALLOC_FL_PUNCH_HOLE``), so the segment holds no dead bytes, only a hole no tensor points
into. Tensors transformers computes are never guessed (MoE experts are named per expert in the
files and fused in the model), so an MoE folder copies its other tensors early, not its experts.

What a worker maps is still exactly the tensors ``from_pretrained`` gave: the early copy only
decides where some of them were put, and nothing is sealed before the answer. A stop meets the
copy like any other (its readers check the load's token per chunk), then the segment is removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable

from weightd import layout, segment
from weightd.daemon import stream
from weightd.errors import OutOfSpace
from weightd.layout import Blob
from weightd.manifest import TensorMeta

log = logging.getLogger("weightd")

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


class EarlyCopy:
    """One load's copy started early: the segment, what went where, the thread copying."""

    def __init__(
        self, readers: stream.Readers, folder: segment.Folder, check: Callable[[], None], huge: bool
    ):
        self.readers = readers
        self.folder = folder
        self.check = check
        self.huge = huge
        self.seg: segment.Segment | None = None
        self.offsets: dict[tuple[int, int, int], int] = {}  # (fd, file offset, bytes) -> offset
        self.end = segment.DATA_OFFSET  # where the early copy's bytes end
        self.reserved = 0  # the segment's bytes the early copy reserves
        self.manifest = None  # the load's manifest, made when the copy starts (the segment's name)
        self.report: stream.Report | None = None
        self._error: BaseException | None = None
        self._given_up = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str, blobs: list[tuple[Blob, int]], mode: int, owner) -> None:
        """Create segment ``name`` and copy ``blobs`` ((blob, item size), in file order) into it."""
        if not blobs:
            return
        tensors = [
            TensorMeta(
                str(i),
                i,
                0,
                {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}[size],
                (b.nbytes // size,),
                (1,),
            )
            for i, (b, size) in enumerate(blobs)
        ]
        storages = layout.place([b for b, _ in blobs], tensors)
        end = max(s.offset + s.nbytes for s in storages)
        size = self.folder.rounded_size(end)
        try:
            self.seg = segment.Segment.create(self.folder, name, size, mode, owner, reserved=False)
        except OutOfSpace:
            return  # the load itself says so, with the size it needs
        self.end = end
        self.reserved = size
        for (b, _), st in zip(blobs, storages):
            self.offsets[(b.file[0], b.file[1], b.nbytes)] = st.offset
        pieces = stream.pieces([(b, st.offset) for (b, _), st in zip(blobs, storages)])
        self._thread = threading.Thread(
            target=self._copy, args=(pieces, size), name="weightd-early", daemon=True
        )
        self._thread.start()

    def _copy(self, pieces: list[stream.Piece], size: int) -> None:
        def check() -> None:
            if self._given_up.is_set():
                raise _GivenUp()
            self.check()

        try:
            self.report = self.readers.copy(
                self.seg.fd,
                pieces,
                check=check,
                reserving=segment.reservation(self.seg.fd, size, self.folder),
                huge_pages=self.huge,
            )
        except BaseException as e:  # noqa: BLE001 - handed to the load's thread by finish()
            self._error = e

    def finish(self, kept: set[tuple[int, int, int]]) -> None:
        """Wait for the copy; raise what it met. Then give back the pages of every range the
        answer did not keep (``kept``: (fd, file offset, bytes) of its storages)."""
        if self._thread is None:
            return
        self._thread.join()
        if self._error is not None:
            raise self._error
        dead = 0
        for key, offset in list(self.offsets.items()):
            if key not in kept:
                del self.offsets[key]
                dead += key[2]
                _punch(self.seg.fd, offset, key[2])
        if dead:
            log.info(
                "%s: %.1f MiB copied early and not kept by from_pretrained, given back",
                self.seg.name,
                dead / 2**20,
            )

    def abandon(self) -> None:
        """A failed or stopped load: the copy stops at its next chunk, the segment is removed."""
        self._given_up.set()
        if self._thread is not None:
            self._thread.join()
        if self.seg is not None and self.seg.fd >= 0:
            self.seg.destroy(wait=False)


class _GivenUp(Exception):
    pass


def _punch(fd: int, offset: int, nbytes: int) -> None:
    """Free the whole pages of [offset, offset + nbytes) (the file keeps its size)."""
    lo = -(-offset // os.sysconf("SC_PAGE_SIZE")) * os.sysconf("SC_PAGE_SIZE")
    hi = (offset + nbytes) // os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PAGE_SIZE")
    if hi <= lo:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, lo, hi - lo) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e, os.strerror(e))

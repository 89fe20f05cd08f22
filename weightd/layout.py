"""Laying tensors out by storage and writing them into a new segment, once.

Shared by the daemon (loading checkpoints) and the client (publishing a running process's
module): both describe what they have as blobs, one per storage, and tensors over them, and
``write`` turns that into a sealed segment or leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightd import segment
from weightd.errors import CheckpointError
from weightd.manifest import (
    DTYPE_SIZES,
    PAGE_ALIGN,
    Manifest,
    StorageMeta,
    TensorMeta,
    align_up,
    storage_alignment,
)

if TYPE_CHECKING:
    import torch


@dataclass
class Blob:
    """One storage's bytes: ``fill(segment, offset)`` writes exactly ``nbytes`` there.

    Where the bytes are is said too, for a writer that copies many blobs at once (the daemon's
    readers, ``write``'s ``copy``): ``file`` (descriptor, offset, path) of a checkpoint file
    holding them as they are, else ``parts``, pieces of checkpoint files that lie end to end in
    it (descriptor, offset, bytes, path: a tensor fused from whole file tensors, Note [fused
    tensors are file ranges] in weightd.daemon.fused), else ``data``, a buffer over them (or
    None: only ``fill`` knows).
    """

    nbytes: int
    fill: Callable[["segment.Segment", int], None]
    file: tuple[int, int, str] | None = None
    data: object = None
    parts: tuple[tuple[int, int, int, str], ...] | None = None

    @property
    def source(self) -> tuple | None:
        """Where its bytes are in the checkpoint's files, as a key (a copy started early finds
        its blobs again by it), or None."""
        if self.file is not None:
            return (self.file[0], self.file[1], self.nbytes)
        if self.parts is not None:
            return tuple((fd, offset, nbytes) for fd, offset, nbytes, _ in self.parts)
        return None


def from_tensors(
    tensors: "dict[str, torch.Tensor]", *, source: str
) -> tuple[list[Blob], list[TensorMeta], list]:
    """Describe CPU tensors by storage; tensors sharing memory (ties, views) share one blob.

    Returns the blobs, the tensors over them, and the storages the fills read from (keep
    them alive until the segment is written).
    """
    blobs: list[Blob] = []
    metas: list[TensorMeta] = []
    keep = []
    by_storage: dict[tuple[int, int], int] = {}
    for name, t in tensors.items():
        t = plain(t, name, source)
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            raise CheckpointError(
                f"{source}: tensor {name!r} ({type(t).__name__}) has no plain storage to share"
            ) from None
        key = (storage.data_ptr(), storage.nbytes())
        index = by_storage.get(key)
        if index is None:
            index = by_storage[key] = len(blobs)
            blobs.append(Blob(storage.nbytes(), _storage_fill(storage), data=_storage_bytes(storage)))
            keep.append(storage)
        dtype = str(t.dtype).removeprefix("torch.")
        offset = t.storage_offset() * t.element_size()
        metas.append(TensorMeta(name, index, offset, dtype, tuple(t.shape), tuple(t.stride())))
    return blobs, metas, keep


def flatten(obj: dict, source, prefix: str = "") -> "dict[str, torch.Tensor]":
    """A (nested) dict of tensors as one flat ``{"a.b": tensor}`` dict; anything else is refused."""
    import torch

    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            inner = flatten(v, source, key + ".")
        elif isinstance(v, torch.Tensor):
            inner = {key: v}
        else:
            raise CheckpointError(
                f"{source}: key {key!r} holds a {type(v).__name__}, not a tensor: save model.state_dict() "
                "(weights only) rather than a training checkpoint"
            )
        for flat, t in inner.items():
            if flat in out:
                raise CheckpointError(
                    f"{source}: two tensors would both be named {flat!r} (a nested key and a dotted one): "
                    "rename one of them"
                )
            out[flat] = t
    return out


def plain(t: "torch.Tensor", name: str, source) -> "torch.Tensor":
    """The tensor as plain strided CPU bytes, or a clear refusal."""
    import torch

    if t.is_nested:
        raise CheckpointError(
            f"{source}: tensor {name!r} is a nested tensor: unbind it or pad it to a strided tensor"
        )
    if t.layout != torch.strided:
        raise CheckpointError(
            f"{source}: tensor {name!r} has layout {t.layout}: convert it with .to_dense() first"
        )
    if t.device.type == "meta":
        raise CheckpointError(f"{source}: tensor {name!r} is on the meta device: it has no data to serve")
    if t.device.type != "cpu":
        raise CheckpointError(f"{source}: tensor {name!r} is on {t.device}: move it to the CPU first")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{source}: tensor {name!r} has dtype {dtype}, which weightd cannot store as plain bytes"
        )
    # Conjugate and negative views are lazy flags over someone else's bytes: materialise them
    # so the bytes in the segment mean what the tensor means.
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.detach()


def _storage_fill(storage: "torch.UntypedStorage"):
    def fill(seg: "segment.Segment", offset: int) -> None:
        # A single-threaded kernel copy (pwrite): torch's copy_ splits every storage across
        # its threads, which stalls when other processes hold the cores (2.7x slower measured).
        seg.write(offset, _storage_bytes(storage))

    return fill


def _storage_bytes(storage: "torch.UntypedStorage"):
    """A uint8 numpy view of the storage's bytes (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


FILL_CHUNK = 64 << 20  # progress (and a chance to cancel) at least every this many bytes


class _Watched:
    """A segment as a fill sees it: writes split into ``FILL_CHUNK`` pieces, each reported to
    ``tick(nbytes)``, which may raise to stop the load (a stop request, a passed deadline)."""

    def __init__(self, seg: "segment.Segment", tick: Callable[[int], None]):
        self._seg = seg
        self._tick = tick
        self.name, self.size = seg.name, seg.size

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), FILL_CHUNK):
            piece = view[start : start + FILL_CHUNK]
            self._seg.write(offset + start, piece)
            self._tick(len(piece))

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int) -> None:
        for start in range(0, nbytes, FILL_CHUNK):
            n = min(FILL_CHUNK, nbytes - start)
            self._seg.copy_from(src_fd, src_offset + start, n, offset + start)
            self._tick(n)


def place(
    blobs: list[Blob],
    tensors: list[TensorMeta],
    *,
    fixed: dict[int, int] | None = None,
    start: int = segment.DATA_OFFSET,
) -> list[StorageMeta]:
    """Where each blob goes in the segment (Note [a storage where its file has it]).

    ``fixed``: blob index -> an offset decided before (a copy started early: Note [copying while
    from_pretrained runs] in weightd.daemon.early); it is kept where it suits the blob's
    dtypes, and every other blob goes at ``start`` or after.

    Blobs read from a file go first, in file order, each at the first offset that agrees with its
    file offset modulo ``PAGE_ALIGN``, where that offset suits its tensors' dtypes; every other
    blob after them, 64-byte aligned, large ones page aligned.

    Note [a storage where its file has it]
    --------------------------------------
    A checkpoint's bytes not in the page cache are read with ``O_DIRECT``, which wants the file
    offset and the memory it reads into aligned alike (Note [reading a chunk] in
    weightd.daemon.stream). A segment offset congruent with the file offset modulo 4 KiB lets the
    readers read a storage's aligned middle straight into the segment (the disk's DMA fills the
    segment's pages: no copy, no buffer), and only its unaligned edges through a buffer. A
    safetensors file packs its tensors back to back from an 8-byte aligned data area, so placed in
    file order the storages lie back to back in the segment too and a whole file reads as one
    run. Such a storage is only as aligned as the file has it (each tensor still at a multiple of
    its dtype's size: a file that has one elsewhere keeps the page-aligned place, read through the
    buffer); the GPU copy and huge pages care about neither (the GPU carves its own 256-byte
    aligned offsets, Note [CUDA IPC offsets and the producer staying alive]).
    """
    itemsize = [1] * len(blobs)
    for t in tensors:
        if 0 <= t.storage < len(blobs):
            itemsize[t.storage] = max(itemsize[t.storage], DTYPE_SIZES.get(t.dtype, 1))
    files: dict[int, int] = {}  # descriptor -> its rank, in the order the blobs name them
    for b in blobs:
        if b.file is not None:
            files.setdefault(b.file[0], len(files))
    order = sorted(
        range(len(blobs)),
        key=lambda i: (0, files[blobs[i].file[0]], blobs[i].file[1]) if blobs[i].file else (1, i, 0),
    )
    storages: list[StorageMeta | None] = [None] * len(blobs)
    for i, at in (fixed or {}).items():
        if at % itemsize[i] == 0:
            storages[i] = StorageMeta(at, blobs[i].nbytes)
    offset = start
    for i in order:
        blob = blobs[i]
        if storages[i] is not None:
            continue
        if blob.file is not None and blob.file[1] % itemsize[i] == 0:
            offset += (blob.file[1] - offset) % PAGE_ALIGN
        else:
            offset = align_up(offset, storage_alignment(blob.nbytes))
        storages[i] = StorageMeta(offset, blob.nbytes)
        offset += blob.nbytes
    return storages


def write(
    manifest: Manifest,
    blobs: list[Blob],
    *,
    folder: segment.Folder,
    mode: int,
    owner: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seal: int = segment.SEALED,
    reuse: int | None = None,
    copy: Callable[["segment.Segment", list[tuple[Blob, int]], Callable[[int, int], None] | None], None]
    | None = None,
    check: Callable[[], None] | None = None,
    started: "segment.Segment | None" = None,
    fixed: dict[int, int] | None = None,
    start: int = segment.DATA_OFFSET,
) -> int:
    """Create ``manifest.segment``, fill it from ``blobs``, seal it; returns its size.

    ``seal``: publishers pass ``segment.PUBLISHED``, which only the daemon turns into SEALED.
    ``folder``: where the segment goes (a publisher passes the daemon's). ``reuse``: the
    segment exists already, unsealed, owned by this uid (a daemon's recycled pages): it is
    written again in place instead of created.

    ``manifest`` arrives with everything but its storages, which are placed here. All or
    nothing: any failure unlinks the segment (Note [segment lifetime after unlink]), also one
    that ``progress(done, total)`` raises to cancel the write (called every ``FILL_CHUNK``).

    ``copy(segment, [(blob, offset)...], progress)``: writes every blob at once (the daemon's
    parallel readers, ``weightd.daemon.stream``) instead of one ``fill`` after another, and
    reserves the whole segment (``segment.reservation``) on the way.
    ``check()`` raises to stop, also between the steps of reserving the segment's pages.

    ``started``: ``manifest.segment`` created already, unsealed, its bytes before ``start`` being
    written by a copy started early, the blobs in ``fixed`` (index -> offset) among them (Note
    [copying while from_pretrained runs] in weightd.daemon.early); it is resized here, and
    ``copy`` is told which blobs are there already by their offsets.
    """
    storages = place(blobs, manifest.tensors, fixed=fixed, start=start)
    offset = max((s.offset + s.nbytes for s in storages), default=segment.DATA_OFFSET)
    manifest_offset = align_up(offset, PAGE_ALIGN)
    manifest.storages = storages
    manifest.validate(segment.DATA_OFFSET, manifest_offset)
    encoded = manifest.to_json()
    size = folder.rounded_size(manifest_offset + len(encoded))
    if started is not None:
        seg = started
        os.ftruncate(seg.fd, size)  # reserved by ``copy`` (a smaller size frees what is past it)
        seg.size = size
    elif reuse is not None:
        seg = segment.Segment.reopen(folder, manifest.segment, size, reuse, check)
    else:
        # With ``copy``, reserved while it writes (Note [reserving while writing])
        seg = segment.Segment.create(
            folder, manifest.segment, size, mode, owner, check, reserved=copy is None
        )
    try:
        # The header and manifest first, unsealed: the layout is known before the data (Note
        # [the watermark] in weightd.segment); the seal, written last, still says it is complete.
        seg.write_manifest(encoded, manifest_offset, manifest.uuid)
        total, done = sum(b.nbytes for b in blobs), 0
        if copy is not None:
            # reserves the whole segment as it writes (Note [reserving while writing])
            copy(seg, [(b, st.offset) for b, st in zip(blobs, storages) if st.nbytes], progress)
            blobs = []  # written
        if progress is None:
            target = seg
        else:

            def tick(n: int) -> None:
                nonlocal within
                within += n
                progress(min(done + within, total), total)

            target = _Watched(seg, tick)
        for blob, st in zip(blobs, storages):
            within = 0
            if st.nbytes:
                blob.fill(target, st.offset)
            done += st.nbytes
            if progress is not None:
                progress(done, total)
        seg.seal(seal)
    except BaseException:
        seg.destroy(wait=copy is None)  # Note [freeing a segment's pages] in segment
        raise
    seg.close()
    return size

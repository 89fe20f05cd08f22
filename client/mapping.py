"""Mapping a segment into this process and rebuilding tensors over it without copying.

Note [a mapping outlives its tensors]
-------------------------------------
Every tensor rebuilt here lives on a storage made by ``torch.frombuffer`` over a
``memoryview`` of the segment's ``mmap``. ``frombuffer`` keeps a reference to that memoryview
for as long as the storage lives, and the memoryview holds an export on the mmap, which makes
``mmap.close()`` raise ``BufferError`` instead of unmapping. So the pages stay mapped exactly
as long as any tensor (or view, or slice of one) over them exists, whatever happens to the
client, its ``Mapping`` object or the daemon, and are unmapped by the last tensor's
deallocation. Nothing here ever closes the mmap by hand.

The mapping is ``MAP_PRIVATE`` over a read-only file descriptor: reads share the daemon's
pages; a stray in-place write copies that one page into this process and never reaches the
daemon or any other worker. (``PROT_READ`` alone would turn such a write into a SIGSEGV;
``MAP_SHARED`` would let one worker corrupt every other.) Pages are faulted in on first
touch, or all at once by ``populate`` (``MADV_POPULATE_READ``, which maps the shared pages
read-only, as a read fault does); never ``MAP_POPULATE`` a writable private mapping: it copies
every page.
"""

from __future__ import annotations

import mmap
import os
import warnings

import torch

from weightd import entry
from weightd.errors import SegmentError
from weightd.manifest import DTYPE_SIZES, Manifest

HUGE_PAGE = entry.HUGE_PAGE


class Mapping:
    """One private, copy-on-write mapping of a sealed segment."""

    def __init__(self, manifest: Manifest, *, owner: int | None, populate: bool = False):
        """``owner``: the daemon's uid (``Connection.daemon_uid``, from the kernel); a segment of
        anyone else is refused. None only for a segment this process has just checked itself.
        ``populate``: map every page now (``populate``)."""
        self.manifest = manifest
        # shm_open(name) is open("/dev/shm/" + name) on Linux; opening the file directly finds
        # segments in the daemon's --shm-dir (the manifest says which) or wherever a container
        # mounts them ($WEIGHTD_SHM_DIR). Note [one way into a segment] in weightd.entry.
        fd = entry.open_announced(manifest, owner)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(
                fd, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)  # the mapping holds the pages (Note [segment lifetime after unlink])
        self._view = memoryview(self._mmap)
        self._check(manifest)
        self.base = torch.frombuffer(self._view, dtype=torch.uint8, count=1).data_ptr()
        self.populated = populate and self.populate()

    def populate(self) -> bool:
        """Map every page of the segment into this process now, read-only and shared (no page is
        copied), so that the first forward pays no page faults. One ``madvise`` call: ~1 ms per
        GiB on huge pages; on 4 KiB pages it costs what touching them would (measured: slower
        than the faults it saves), hence ``attach``'s default. False where the kernel lacks
        ``MADV_POPULATE_READ`` (before 5.14): pages then come on first touch."""
        return entry.populate(self._mmap)

    def _check(self, manifest: Manifest) -> None:
        header = entry.read_header(self._view)
        if not header.sealed:
            raise SegmentError(
                f"segment {manifest.segment} is not sealed: it was never finished and is not served"
            )
        if header.uuid != manifest.uuid:
            raise SegmentError(
                f"segment {manifest.segment} holds other contents than the daemon described: attach again"
            )
        for st in manifest.storages:
            if st.offset + st.nbytes > header.manifest_offset:
                raise SegmentError(f"segment {manifest.segment}: a storage runs into the manifest")

    @property
    def view(self) -> memoryview:
        """The whole mapping as bytes (Note [a mapping outlives its tensors] holds for it too)."""
        return self._view

    def contains(self, t: torch.Tensor) -> bool:
        """Whether all of ``t``'s memory lies inside this mapping."""
        ptr = t.untyped_storage().data_ptr()
        return self.base <= ptr and ptr + t.untyped_storage().nbytes() <= self.base + self.size

    def storage_bytes(self, index: int) -> memoryview:
        """Storage ``index`` as read-only bytes (a Hugging Face folder's small files live in these)."""
        st = self.manifest.storages[index]
        return self._view[st.offset : st.offset + st.nbytes].toreadonly()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the manifest, over this mapping; shared storages stay shared."""
        return rebuild(
            self.manifest,
            [None] * len(self.manifest.storages),
            [0] * len(self.manifest.storages),
            self._first,
        )

    def _first(
        self, index: int, dtype: torch.dtype, itemsize: int
    ) -> tuple[torch.Tensor, torch.UntypedStorage]:
        """Storage ``index`` over this mapping, and an empty tensor of ``dtype`` for its first
        tensor (Note [a storage's first tensor is made over it])."""
        st = self.manifest.storages[index]
        if st.nbytes == 0:
            return _empty(dtype, "cpu"), torch.UntypedStorage(0)
        if st.nbytes % itemsize == 0 and dtype is not torch.complex32:
            # Note [a mapping outlives its tensors]
            first = torch.frombuffer(self._view, dtype=dtype, count=st.nbytes // itemsize, offset=st.offset)
            return first, first.untyped_storage()
        storage = torch.frombuffer(self._view, dtype=torch.uint8, count=st.nbytes, offset=st.offset)
        return _empty(dtype, "cpu"), storage.untyped_storage()


class DeviceCopy:
    """A model's storages carved from one allocation on a GPU (a daemon's copy, or our own)."""

    def __init__(self, manifest: Manifest, block: torch.UntypedStorage, owner: int | None = None):
        self.manifest = manifest
        self.block = block
        self.owner = owner  # the daemon's uid: the CPU segment it came from is that user's

    def contains(self, t: torch.Tensor) -> bool:
        ptr, base = t.untyped_storage().data_ptr(), self.block.data_ptr()
        return base <= ptr and ptr + t.untyped_storage().nbytes() <= base + self.block.nbytes()


def rebuild(manifest: Manifest, storages: list, bases: list[int], first=None) -> dict[str, torch.Tensor]:
    """The manifest's tensors over ``storages[i]`` starting ``bases[i]`` bytes in. A storage that
    is None is made by ``first(i, dtype, itemsize)`` -> (an empty tensor for its first tensor,
    the storage), when its first tensor comes.

    Note [a storage's first tensor is made over it]
    -----------------------------------------------
    A fresh worker makes every tensor of a model here, and that is part of being ready to serve
    (benchmarks/attach.py --ready). ``Mapping._first`` makes a storage's first tensor with
    ``torch.frombuffer`` in the tensor's own dtype, and ``set_`` lays it out over its own
    storage, instead of making the storage as bytes and then an empty tensor to point at it: one
    call fewer per tensor (244 tensors: 0.51 against 0.78 ms measured). The tensor is the same:
    not a view, its storage the whole storage (shared by every tensor over it).
    """
    out = {}
    for t in manifest.tensors:
        dtype = _dtype(t.dtype)
        itemsize = DTYPE_SIZES[t.dtype]
        offset = bases[t.storage] + t.offset
        if offset % itemsize:
            raise SegmentError(
                f"tensor {t.name!r}: offset {t.offset} is not a multiple of its {itemsize}-byte dtype"
            )
        storage = storages[t.storage]
        if storage is None:
            tensor, storage = first(t.storage, dtype, itemsize)
            storages[t.storage] = storage
        else:
            tensor = _empty(dtype, storage.device)
        out[t.name] = tensor.set_(storage, offset // itemsize, t.shape, t.stride)
    return out


def _empty(dtype: torch.dtype, device) -> torch.Tensor:
    if dtype is torch.complex32:
        # PyTorch warns that complex32 is experimental each time one is made; the bytes are fine.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.empty(0, dtype=dtype, device=device)
    return torch.empty(0, dtype=dtype, device=device)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if name in DTYPE_SIZES else None
    if not isinstance(dtype, torch.dtype):
        raise SegmentError(
            f"dtype {name!r} is not known to this PyTorch ({torch.__version__}): upgrade torch in the client"
        )
    return dtype

"""The daemon's GPU copies: one copy of a model per GPU, exported through CUDA IPC.

Imported only with ``serve --device``: nothing here is imported or initialised on a machine
without CUDA. The client's side (opening the handles) is ``weightd.client.gpu``: export and
import are a symmetric pair, as in ``torch/multiprocessing/reductions.py``
(``reduce_tensor`` / ``rebuild_cuda_tensor``), whose storage-level calls this module uses
rather than raw driver calls; what crosses the socket is plain typed fields (base64 handles,
integers), never a pickle.

Note [CUDA IPC offsets and the producer staying alive]
------------------------------------------------------
The daemon makes *one* allocation per (model, GPU) and carves every storage of the model out
of it at 256-byte aligned offsets (``offsets`` below). CUDA IPC shares whole ``cudaMalloc``
blocks: ``UntypedStorage._share_cuda_()`` returns the block's handle plus the storage's size
and byte offset inside the block, and ``_new_shared_cuda`` on the other side maps the block
(PyTorch caches one mapping per handle per process, as CUDA allows opening a handle only once)
and rebuilds the storage at that offset. Clients then carve their tensors at the same
offsets, so the manifest's (storage, offset, shape, stride) describe GPU and CPU copies alike.

The memory must outlive every client's use of it. Each export bumps a reference counter in a
small shared file (``ref_counter_handle``/``ref_counter_offset``) that the client's storage
decrements when it is freed; when the daemon drops a retired or unloaded generation, PyTorch
keeps the block in its IPC "limbo" until every counter is back to zero, and
``torch.cuda.ipc_collect()`` (called by the daemon's reaper) frees it after that. A client
that dies without freeing leaves its count behind: the block then lives until the daemon
exits. The allocation is made with the caching allocator's expandable segments switched off,
since blocks of expandable segments cannot be shared with ``cudaIpcGetMemHandle``.
"""

from __future__ import annotations

import base64
import contextlib
import mmap
import os
import warnings

import torch

from weightd import cuda, segment


class GpuCopy:
    """One model's storages in one allocation on one GPU, held by the daemon."""

    @classmethod
    def from_segment(cls, folder: segment.Folder, manifest, device: torch.device) -> "GpuCopy":
        """Copy a sealed segment's storages (in ``folder``) to ``device``, read through a
        read-only mapping."""
        fd = segment.open_entry(folder, manifest.segment, owner=os.geteuid())  # Note [one way into a segment]
        try:
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as buf, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer warns about a read-only buffer; we only read
                cpu = torch.frombuffer(buf, dtype=torch.uint8)
                copy = cls([cpu[s.offset : s.offset + s.nbytes] for s in manifest.storages], device)
                del cpu
            return copy
        finally:
            os.close(fd)

    def __init__(self, storages: list[torch.Tensor], device: torch.device):
        sizes = [t.numel() for t in storages]
        self.offsets, total = cuda.offsets(sizes)
        self.device = device
        self.uuid = cuda.device_uuid(device.index)
        with _no_expandable_segments():
            self.block = torch.empty(total, dtype=torch.uint8, device=device)
        for t, off in zip(storages, self.offsets):
            if t.numel():
                self.block[off : off + t.numel()].copy_(t, non_blocking=False)
        torch.cuda.synchronize(device)

    def export(self) -> dict:
        """One client's handle to the allocation (each export is counted; see the Note)."""
        storage = self.block.untyped_storage()
        (device, handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = (
            storage._share_cuda_()
        )
        return {
            "uuid": self.uuid,
            "handle": _b64(handle),
            "size": int(size),
            "offset": int(offset),
            "ref_counter_handle": _b64(rc_handle),
            "ref_counter_offset": int(rc_offset),
            "event_handle": _b64(event_handle) if event_handle else None,
            "event_sync_required": bool(event_sync),
            "offsets": self.offsets,
        }


@contextlib.contextmanager
def _no_expandable_segments():
    settings = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" not in settings:
        yield
        return
    torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def collect() -> None:
    """Free exported blocks whose every client has let go (Note [CUDA IPC offsets ...])."""
    if torch.cuda.is_initialized():
        torch.cuda.ipc_collect()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()

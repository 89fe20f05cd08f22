"""GPUs: one copy of a model per GPU, shared through CUDA IPC; copies from shared memory.

Imported only when a device is asked for (``serve --device``, ``attach(device=...)``): nothing
here is imported or initialised on a machine without CUDA. Export and import are a symmetric
pair, as in ``torch/multiprocessing/reductions.py`` (``reduce_tensor`` / ``rebuild_cuda_tensor``),
whose storage-level calls this module uses rather than raw driver calls; what crosses the
socket is plain typed fields (base64 handles, integers), never a pickle.

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

from weightd.errors import AttachError, SegmentError
from weightd.manifest import align_up

GPU_ALIGN = 256
# cudaHostRegisterReadOnly: pin pages without asking for write access, so pinning a
# MAP_PRIVATE mapping does not copy-on-write every page into this process.
HOST_REGISTER_READ_ONLY = 0x08


def available() -> bool:
    return torch.cuda.is_available()


def device_uuid(index: int) -> str:
    """The GPU's UUID: the same for every process, whatever CUDA_VISIBLE_DEVICES says."""
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int | None:
    """This process's device index for the GPU with ``uuid``, or None if it cannot see it."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def resolve(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise AttachError(f"device {device} is not a CUDA device")
    if not torch.cuda.is_available():
        raise AttachError("this process sees no CUDA device: check CUDA_VISIBLE_DEVICES and the driver")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise AttachError(f"{device}: this process sees only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def offsets(storage_sizes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of each storage in the one allocation, and the allocation's size."""
    out, acc = [], 0
    for n in storage_sizes:
        acc = align_up(acc, GPU_ALIGN)
        out.append(acc)
        acc += n
    return out, max(acc, 1)


# --- the daemon's side ----------------------------------------------------------------------


class GpuCopy:
    """One model's storages in one allocation on one GPU, held by the daemon."""

    @classmethod
    def from_segment(cls, manifest, device: torch.device) -> "GpuCopy":
        """Copy a sealed segment's storages to ``device`` (read through a read-only mapping)."""
        fd = os.open("/dev/shm/" + manifest.segment.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC)
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
        self.offsets, total = offsets(sizes)
        self.device = device
        self.uuid = device_uuid(device.index)
        with _no_expandable_segments():
            self.block = torch.empty(total, dtype=torch.uint8, device=device)
        for t, off in zip(storages, self.offsets):
            if t.numel():
                self.block[off : off + t.numel()].copy_(t, non_blocking=False)
        torch.cuda.synchronize(device)

    def export(self) -> dict:
        """One client's handle to the allocation (each export is counted; see the Note)."""
        storage = self.block.untyped_storage()
        (device, handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = storage._share_cuda_()
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


# --- the client's side ----------------------------------------------------------------------


def open_shared(export: dict, manifest) -> tuple[torch.UntypedStorage, list[int]]:
    """The daemon's GPU copy as this process's storages, one per manifest storage."""
    index = local_index(export["uuid"])
    if index is None:
        raise AttachError(
            f"the daemon's copy of {manifest.name!r} is on GPU {export['uuid']}, which this process cannot see: "
            "set CUDA_VISIBLE_DEVICES to include it, or attach to a GPU the daemon serves"
        )
    torch.cuda._lazy_init()
    try:
        block = torch.UntypedStorage._new_shared_cuda(
            index,
            base64.b64decode(export["handle"]),
            int(export["size"]),
            int(export["offset"]),
            base64.b64decode(export["ref_counter_handle"]),
            int(export["ref_counter_offset"]),
            base64.b64decode(export["event_handle"]) if export.get("event_handle") else b"",
            bool(export["event_sync_required"]),
        )
    except RuntimeError as e:
        raise AttachError(
            f"cannot open the daemon's CUDA IPC handle for {manifest.name!r} ({str(e).splitlines()[0]}): the client and "
            "the daemon must share the GPU and an IPC and PID namespace (docker --ipc=host --pid=host), "
            "or attach without a GPU copy (the client then copies from shared memory)"
        ) from None
    offs = [int(o) for o in export["offsets"]]
    if len(offs) != len(manifest.storages) or any(o + st.nbytes > block.nbytes() for o, st in zip(offs, manifest.storages)):
        raise SegmentError(f"the GPU copy of {manifest.name!r} does not match its manifest")
    # Every tensor is a view of the one block, which keeps the IPC mapping alive as long as any
    # of them lives (Note [CUDA IPC offsets and the producer staying alive]).
    return block, offs


def copy_to_device(mapping, device: torch.device, pin: bool) -> tuple[torch.UntypedStorage, list[int]]:
    """Copy each storage of a CPU mapping to ``device`` (one allocation), optionally pinned.

    With ``pin`` the mapping is registered with CUDA read-only for the copy and unregistered
    before this returns, so the mapping never goes while pinned.
    """
    manifest = mapping.manifest
    offs, total = offsets([s.nbytes for s in manifest.storages])
    block = torch.empty(total, dtype=torch.uint8, device=device)
    cpu = torch.frombuffer(mapping._view, dtype=torch.uint8)
    registered = False
    if pin:
        rc = torch.cuda.cudart().cudaHostRegister(cpu.data_ptr(), cpu.numel(), HOST_REGISTER_READ_ONLY)
        registered = int(rc) == 0
        if not registered:
            raise AttachError(f"could not pin the mapping of {manifest.name!r} (cudaHostRegister: {rc}): attach with pin=False")
    try:
        for st, off in zip(manifest.storages, offs):
            if st.nbytes:
                block[off : off + st.nbytes].copy_(cpu[st.offset : st.offset + st.nbytes], non_blocking=pin)
        torch.cuda.synchronize(device)
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(cpu.data_ptr())
    return block.untyped_storage(), offs


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()

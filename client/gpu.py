"""The client's side of GPUs: open the daemon's CUDA IPC handle, or copy a mapping to a GPU.

Imported only when ``attach(device=...)``/``state_dict(device=...)`` asks for a GPU. The
daemon's side is ``weightd.daemon.gpu``; see Note [CUDA IPC offsets and the producer staying
alive] there.
"""

from __future__ import annotations

import base64

import torch

from weightd import cuda
from weightd.errors import AttachError, SegmentError

# cudaHostRegisterReadOnly: pin pages without asking for write access, so pinning a
# MAP_PRIVATE mapping does not copy-on-write every page into this process.
HOST_REGISTER_READ_ONLY = 0x08


def open_shared(export: dict, manifest) -> tuple[torch.UntypedStorage, list[int]]:
    """The daemon's GPU copy as this process's storages, one per manifest storage."""
    index = cuda.local_index(export["uuid"])
    if index is None:
        raise AttachError(
            f"the daemon's copy of {manifest.name!r} is on GPU {export['uuid']}, which this process cannot "
            "see: "
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
            f"cannot open the daemon's CUDA IPC handle for {manifest.name!r} ({str(e).splitlines()[0]}): "
            "the client and "
            "the daemon must share the GPU and an IPC and PID namespace (docker --ipc=host --pid=host), "
            "or attach without a GPU copy (the client then copies from shared memory)"
        ) from None
    offs = [int(o) for o in export["offsets"]]
    if len(offs) != len(manifest.storages) or any(
        o + st.nbytes > block.nbytes() for o, st in zip(offs, manifest.storages)
    ):
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
    offs, total = cuda.offsets([s.nbytes for s in manifest.storages])
    block = torch.empty(total, dtype=torch.uint8, device=device)
    cpu = torch.frombuffer(mapping.view, dtype=torch.uint8)
    registered = False
    if pin:
        rc = torch.cuda.cudart().cudaHostRegister(cpu.data_ptr(), cpu.numel(), HOST_REGISTER_READ_ONLY)
        registered = int(rc) == 0
        if not registered:
            raise AttachError(
                f"could not pin the mapping of {manifest.name!r} (cudaHostRegister: {rc}): attach with "
                "pin=False"
            )
    try:
        for st, off in zip(manifest.storages, offs):
            if st.nbytes:
                block[off : off + st.nbytes].copy_(cpu[st.offset : st.offset + st.nbytes], non_blocking=pin)
        torch.cuda.synchronize(device)
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(cpu.data_ptr())
    return block.untyped_storage(), offs

"""CUDA device helpers both sides use: which GPU a device names, and where storages sit in
one allocation. torch is imported inside each function: only GPU paths ever call them, so a
CPU-only process never imports CUDA state through the kernel.

See Note [CUDA IPC offsets and the producer staying alive] in ``weightd.daemon.gpu``.
"""

from __future__ import annotations

from weightd.errors import AttachError
from weightd.manifest import align_up

GPU_ALIGN = 256


def device_uuid(index: int) -> str:
    """The GPU's UUID: the same for every process, whatever CUDA_VISIBLE_DEVICES says."""
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int | None:
    """This process's device index for the GPU with ``uuid``, or None if it cannot see it."""
    import torch

    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def resolve(device):
    """``device`` as a ``torch.device`` with its index, or an AttachError saying why not."""
    import torch

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

"""weightd.client: attach the node daemon's models zero-copy, in any process.

>>> from weightd.client import attach, state_dict
>>> model = attach("bert", model=build_bert)   # nn.Module over the shared pages
>>> sd = state_dict("llama")                   # {name: tensor} over the shared pages

Light to import: the names below load their module on first use (PEP 562), so ``import
weightd.client`` costs next to nothing, ``from weightd.client import attach`` what attach needs
(torch, which a worker has, the connection, the mapping), and the Hugging Face, GPU and Ray
parts load when used (``from weightd.client import ray_zerocopy``). Neither pyzmq nor
daemon-only modules are ever imported (Note [the client speaks ZMTP itself]).
"""

import importlib

# Every error a caller can meet, so that ``except weightd.client.OutOfSpace`` needs no other import.
from weightd.errors import (
    AlreadyRunning,
    AttachError,
    Cancelled,
    CheckpointError,
    ConfigError,
    DaemonNotRunning,
    InternalError,
    ModelNotFound,
    OutOfSpace,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    SegmentError,
    StillLoading,
    TransferFailed,
    UnsafePath,
    UnsupportedFormat,
    WeightdError,
)

__all__ = [
    "AlreadyRunning",
    "Attachment",
    "AttachError",
    "Cancelled",
    "CheckpointError",
    "Client",
    "ConfigError",
    "DaemonNotRunning",
    "InternalError",
    "ModelNotFound",
    "OutOfSpace",
    "PermissionDenied",
    "ProtocolError",
    "RequestTimeout",
    "SegmentError",
    "StillLoading",
    "TransferFailed",
    "UnsupportedFormat",
    "UnsafePath",
    "UnsupportedFormat",
    "WeightdError",
    "attach",
    "detach",
    "info",
    "publish",
    "refresh",
    "state_dict",
]

_LAZY = {
    "Attachment": "weightd.client.module",
    "Client": "weightd.client.client",
    "attach": "weightd.client.client",
    "detach": "weightd.client.client",
    "info": "weightd.client.client",
    "publish": "weightd.client.client",
    "refresh": "weightd.client.client",
    "state_dict": "weightd.client.client",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weightd.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""weightd.client: attach the node daemon's models zero-copy, in any process.

>>> from weightd.client import attach, state_dict
>>> model = attach("bert", model=build_bert)   # nn.Module over the shared pages
>>> sd = state_dict("llama")                   # {name: tensor} over the shared pages

Imports neither daemon-only modules nor Ray (``from weightd.client import ray_zerocopy``
does, on demand).
"""

from weightd.client.client import Client, attach, detach, info, publish, refresh, state_dict
from weightd.client.module import Attachment

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

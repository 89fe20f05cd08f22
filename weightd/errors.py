"""Typed errors shared by the daemon, the client and the CLI.

Every error has a stable machine ``code`` that travels on the wire (so a client re-raises the
same class the daemon raised) and an ``exit_code`` that only the CLI turns into a process exit
status. Messages say what to do about the problem.
"""

from __future__ import annotations

BY_CODE: dict[str, type[WeightdError]] = {}  # every error class by its code, filled as they are defined


class WeightdError(Exception):
    """Base class of every error weightd raises on purpose.

    A subclass that sets its own ``code`` is registered under it where it is defined (as pyzmq
    maps errno to class in one table), so a new error cannot be missing from the table that
    turns a wire code back into its class; two classes with one code are a bug, refused here.
    """

    code = "error"
    exit_code = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            taken = BY_CODE.setdefault(cls.code, cls)
            if taken is not cls:
                raise TypeError(f"error code {cls.code!r} of {cls.__name__} is taken by {taken.__name__}")

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class DaemonNotRunning(WeightdError):
    """Nobody answers on the socket (no socket file, connection refused, or no reply)."""

    code = "daemon_not_running"
    exit_code = 3


class AlreadyRunning(WeightdError):
    """A second daemon was started on a socket that one already serves."""

    code = "already_running"
    exit_code = 4


class RequestTimeout(WeightdError):
    """The daemon accepted the connection but did not answer in time."""

    code = "timeout"
    exit_code = 5


class ProtocolError(WeightdError):
    """A request or reply that does not follow the wire protocol."""

    code = "bad_request"
    exit_code = 6


class ModelNotFound(WeightdError):
    """No model (or no such generation) of that name is loaded."""

    code = "not_found"
    exit_code = 7


class CheckpointError(WeightdError):
    """A checkpoint that is missing, truncated, corrupt, or holds something weightd refuses."""

    code = "bad_checkpoint"
    exit_code = 8


class UnsupportedFormat(CheckpointError):
    """A checkpoint of a format weightd knows and does not serve (a quantization it cannot
    share or rebuild): refused before anything is loaded, naming the format and why."""

    code = "unsupported_format"
    exit_code = 8


class OutOfSpace(WeightdError):
    """/dev/shm (or the configured byte budget) cannot hold the model."""

    code = "no_space"
    exit_code = 9


class SegmentError(WeightdError):
    """A segment is gone, unsealed, or not what the manifest says."""

    code = "bad_segment"
    exit_code = 10


class AttachError(WeightdError):
    """The weights could not be put into the module (no skeleton, missing or extra keys...)."""

    code = "attach_failed"
    exit_code = 11


class PermissionDenied(WeightdError):
    """The caller may not do this (socket or segment permissions)."""

    code = "permission_denied"
    exit_code = 13


class UnsafePath(PermissionDenied):
    """A socket directory, lock file or segment that another user could have planted or can
    change: refused rather than trusted (README, "Security model")."""

    code = "unsafe_path"
    exit_code = 13


class StillLoading(WeightdError):
    """The model is being loaded (a preload at start-up, or a load request) and was not ready
    within the caller's deadline."""

    code = "loading"
    exit_code = 12


class Cancelled(WeightdError):
    """A load was stopped before it finished: the daemon is stopping, or the requester's
    deadline passed. Nothing of it is left in shared memory."""

    code = "cancelled"
    exit_code = 14


class ConfigError(WeightdError):
    """An option that cannot work (a socket path too long for a Unix socket...), refused
    before anything is made."""

    code = "bad_config"
    exit_code = 2


class TransferFailed(WeightdError):
    """A node's copy of a model, filled from another node through Ray, could not be finished: a
    chunk that does not match the digest made where it was read, or no node left to copy from.
    Nothing of it is served."""

    code = "transfer_failed"
    exit_code = 15


class InternalError(WeightdError):
    """A bug in weightd: the daemon survived it, but please report it."""

    code = "internal"
    exit_code = 70


BY_CODE[WeightdError.code] = WeightdError


def from_wire(error: object) -> WeightdError:
    """Rebuild the typed error a daemon sent; unknown codes become the base class."""
    if not isinstance(error, dict):
        return ProtocolError(f"daemon sent a malformed error: {error!r}")
    cls = BY_CODE.get(str(error.get("code")), WeightdError)
    return cls(str(error.get("message", "(no message)")))

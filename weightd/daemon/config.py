"""The daemon's configuration: plain values, no side effects (the CLI maps options onto it)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from weightd.daemon import stream
from weightd.daemon.checkpoint import CHECKPOINT_SUFFIXES
from weightd.errors import ConfigError
from weightd.protocol import default_socket


def default_name(path: str) -> str:
    """The name a model gets when none is given: the file's or folder's name without a
    checkpoint extension (``model.safetensors`` -> ``model``; the folder ``Qwen2.5-0.5B`` keeps
    its dots). Only the one extension weightd reads is cut: ``x.tar.pt`` -> ``x.tar``."""
    p = Path(path)
    if p.suffix in CHECKPOINT_SUFFIXES and not p.is_dir():
        return p.name[: -len(p.suffix)]
    return p.name


@dataclass
class ModelSpec:
    path: str
    name: str | None = None
    factory: str | None = None
    base: str | None = None  # a PEFT adapter over the model of that name (serve --adapter)

    @property
    def model_name(self) -> str:
        return self.name or default_name(self.path)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``[NAME=]PATH``; a NAME with '=' in it is not a valid name anyway."""
        name, sep, path = text.partition("=")
        return cls(path=path, name=name) if sep and "/" not in name else cls(path=text)


def check_unique_names(specs: list[ModelSpec]) -> None:
    """Two preloads under one name would silently make the second a new generation of the first."""
    seen: dict[str, ModelSpec] = {}
    for spec in specs:
        first = seen.setdefault(spec.model_name, spec)
        if first is not spec:
            raise ConfigError(
                f"two models to preload are both named {spec.model_name!r}: {first.path} and "
                f"{spec.path}: name them apart with NAME=PATH (--model {spec.model_name}-2={spec.path})"
            )


@dataclass
class Config:
    models: list[ModelSpec] = field(default_factory=list)
    socket: str | None = None
    instance: str | None = None  # segments are named weightd.<instance>.*; default: from the socket path
    mode: int = 0o640  # segments: readable by the daemon's group, writable by nobody else
    max_bytes: int | None = None
    allow_pickle: bool = False
    unlink_on_exit: bool = False  # default: leave segments for the next daemon to adopt
    group: int | None = None  # gid that may read segments and use the read socket
    devices: list[str] = field(default_factory=list)  # GPUs that get a copy of every model
    model_dirs: list[str] = field(default_factory=list)  # load requests must name paths inside these
    metrics: str | None = None  # where to serve Prometheus metrics (PORT, HOST:PORT, unix:PATH); None: off
    keep_going: bool = False  # a failed preload is reported and the others served; default: the daemon stops
    check: bool = False  # serve --check: load every preload, then exit (non-zero if one failed)
    shm_dir: str | None = None  # where segments live (a huge-page tmpfs); None: /dev/shm (weightd.segment)
    # How checkpoints stream into segments (weightd.daemon.stream; README: Loading, measured there)
    load_readers: int = stream.DEFAULT_READERS
    load_chunk: int = stream.DEFAULT_CHUNK
    load_direct: str = stream.DEFAULT_DIRECT  # "auto": O_DIRECT for what is not in the page cache
    load_parallel: int = 1  # loads of different names side by side (one load's readers fill one disk)

    def __post_init__(self):
        check_unique_names(self.models)
        stream.check_readers(self.load_readers)
        stream.check_chunk(self.load_chunk)
        if self.load_direct not in stream.DIRECT_MODES:
            raise ConfigError(f"--load-direct must be one of {', '.join(stream.DIRECT_MODES)}")
        if not (isinstance(self.load_parallel, int) and self.load_parallel >= 1):
            raise ConfigError(f"--load-parallel must be at least 1, not {self.load_parallel!r}")
        self.socket = os.path.abspath(self.socket or default_socket())
        if self.instance is None:
            # One daemon per socket, so the socket path names the instance; a hash keeps the
            # segment names short and free of '/'.
            self.instance = hashlib.sha1(self.socket.encode()).hexdigest()[:10]

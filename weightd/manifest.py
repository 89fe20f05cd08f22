"""What a segment holds: its storages and the tensors laid over them.

A manifest is plain JSON, shared by the daemon (which writes it into the segment header and
sends it on the wire) and the client (which rebuilds tensors from it). It is laid out by
*storage*, not by tensor: tensors that share memory in the source (tied weights, views,
slices) point into the same storage at their own byte offset, shape and stride, so shared
memory stays shared after attach and every storage is in the segment once.

Dtypes travel as torch dtype names over raw bytes; numpy never decides what a dtype is (it has
no bfloat16 or float8).
"""

from __future__ import annotations

import json
import math
from collections import namedtuple

from weightd.errors import SegmentError

# torch dtype name -> bytes per element. Everything a checkpoint can hold as plain bytes;
# quantized and sparse tensors are not plain bytes and are refused where they come in.
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,  # two 4-bit values packed per byte
}

# Where storages start in the data area: 64 bytes for vector loads, a page for large ones so
# each large storage's pages are its own (a private copy-on-write of one page never spans two).
SMALL_ALIGN = 64
PAGE_ALIGN = 4096
PAGE_ALIGN_FROM = 1 << 16


# What a client never reads of a Hugging Face model's skeleton["hf"]: the daemon's diagnostics
# of from_pretrained (weightd.daemon.hf), shown by `weightd stats` and the log. A client reads
# the rest (the class and where to import it, versions, dtype, folder, where the small files are).
HF_DIAGNOSTICS = (
    "config",
    "generation_config",
    "weight_files",
    "converted",
    "converted_bytes",
    "unexpected",
    "missing",
)


# Note [what a fresh worker's import pays for]
# --------------------------------------------
# A worker imports this module, weightd.segment and the client's on its way to its first
# state dict, and that import is part of being ready to serve (benchmarks/attach.py --ready,
# its import column): what runs at import is paid in every fresh worker. So the records here
# are ``collections.namedtuple`` (``typing.NamedTuple`` compiles each annotation of a module
# with ``from __future__ import annotations`` into a ForwardRef: ~0.15 ms more each), the
# manifest a plain class (``@dataclass`` compiles its ``__init__`` when the module loads:
# ~0.5 ms), and what only the daemon or a peer fill uses (hashlib) is imported where it is used.


class TensorMeta(namedtuple("TensorMeta", "name storage offset dtype shape stride")):
    """One tensor over a storage: ``name``; ``storage``, an index into Manifest.storages;
    ``offset``, bytes from the storage's start; ``dtype``, a torch dtype's name; ``shape`` and
    ``stride`` (in elements, like torch), tuples of ints."""

    __slots__ = ()

    def extent(self) -> int:
        """Bytes from the start of the storage to one past the tensor's last element."""
        numel = math.prod(self.shape)
        if numel == 0:
            return self.offset
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.offset + (last + 1) * DTYPE_SIZES[self.dtype]


# ``offset``: bytes from the segment's start to the storage's; ``nbytes``: its length.
StorageMeta = namedtuple("StorageMeta", "offset nbytes")


class Manifest:
    """What one segment holds (its storages and the tensors over them) and where it is: the JSON
    written into the segment after its data and sent to clients (``to_client_dict``).

    Compared by what it holds (``uuid``), never field by field; a plain class, not a dataclass
    (Note [what a fresh worker's import pays for]).
    """

    __slots__ = (
        "name",
        "generation",
        "storages",
        "tensors",
        "source",
        "format",
        "created",
        "segment",
        "uuid",
        "skeleton",
        "metadata",
        "origin",
        "directory",
        "page_size",
    )

    def __init__(
        self,
        name: str,
        generation: int,
        storages: list[StorageMeta],
        tensors: list[TensorMeta],
        source: str = "",
        format: str = "",
        created: float = 0.0,
        segment: str = "",
        uuid: str = "",
        skeleton: dict | None = None,
        metadata: dict | None = None,
        origin: dict | None = None,
        directory: str = "",
        page_size: int = 0,
    ):
        self.name = name
        self.generation = generation
        self.storages = storages
        self.tensors = tensors
        self.source = source
        self.format = format
        self.created = created
        self.segment = segment  # the POSIX shared-memory name, with its leading slash
        self.uuid = uuid  # identifies this segment's contents, so a recycled name is never mistaken
        # how to build the module: {"factory": "m:f"} or {"hf": {...}} (a folder)
        self.skeleton = skeleton
        self.metadata = {} if metadata is None else metadata
        # Where a loaded model came from, to tell at a restart or reload whether its source
        # changed (Note [a preload is adopted, not reloaded] in weightd/daemon/store.py):
        # {"path": resolved path, "files": [{"path", "size", "mtime_ns", "ino", "dev"}, ...] (each
        # file or folder the load read), "options": {"factory": ...}, "conversions": {...}}.
        # None for publishes.
        self.origin = origin
        # Where the segment's file is and which page size its memory got (set by the daemon when
        # it serves it; weightd.segment, Note [huge pages]): clients open it there and prefault
        # huge pages.
        self.directory = directory
        self.page_size = page_size  # 0: not known

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.storages)

    def __repr__(self) -> str:
        return (
            f"<Manifest {self.name!r} generation {self.generation}: {len(self.tensors)} tensors, "
            f"{self.nbytes} bytes, segment {self.segment!r}>"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "generation": self.generation,
            "source": self.source,
            "format": self.format,
            "created": self.created,
            "segment": self.segment,
            "uuid": self.uuid,
            "skeleton": self.skeleton,
            "metadata": self.metadata,
            "origin": self.origin,
            "directory": self.directory,
            "page_size": self.page_size,
            "storages": [list(s) for s in self.storages],
            "tensors": [
                [t.name, t.storage, t.offset, t.dtype, list(t.shape), list(t.stride)] for t in self.tensors
            ],
        }

    def to_client_dict(self) -> dict:
        """What an attach reply carries: what a client reads, no more. The model's origin (files'
        identities, for the daemon's adoption) and the Hugging Face diagnostics (config,
        generation config, what was converted, unexpected and missing keys: shown by ``weightd
        stats`` and the daemon's log) stay in the daemon."""
        d = self.to_dict()
        d.pop("origin")
        hf = (self.skeleton or {}).get("hf")
        if isinstance(hf, dict):
            d["skeleton"] = {**self.skeleton, "hf": {k: v for k, v in hf.items() if k not in HF_DIAGNOSTICS}}
        return d

    def layout_digest(self) -> str:
        """What the segment's bytes mean, whatever its name, generation, daemon or node: its
        storages, tensors, skeleton, metadata, source and origin (less ``via``, which says how
        a copy got there). A peer fill reserves the source's digest and the daemon checks the
        copy against it on commit (weightd.client.ray_zerocopy.fanout)."""
        import hashlib  # not at import: Note [what a fresh worker's import pays for]

        d = self.to_dict()
        what = {k: d[k] for k in ("storages", "tensors", "skeleton", "metadata", "source", "format")}
        what["origin"] = {k: v for k, v in (self.origin or {}).items() if k != "via"}
        return hashlib.sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            m = cls(
                name=str(d["name"]),
                generation=int(d["generation"]),
                source=str(d.get("source", "")),
                format=str(d.get("format", "")),
                created=float(d.get("created", 0.0)),
                segment=str(d["segment"]),
                uuid=str(d["uuid"]),
                skeleton=d.get("skeleton"),
                metadata=dict(d.get("metadata") or {}),
                origin=d.get("origin") if isinstance(d.get("origin"), dict) else None,
                directory=str(d.get("directory") or ""),
                page_size=int(d.get("page_size") or 0),
                storages=[StorageMeta(int(o), int(n)) for o, n in d["storages"]],
                tensors=[
                    TensorMeta(str(n), int(s), int(o), str(dt), tuple(shape), tuple(stride))
                    for n, s, o, dt, shape, stride in d["tensors"]
                ],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SegmentError(f"malformed manifest ({type(e).__name__}: {e})") from None
        return m

    def validate(self, data_offset: int, data_end: int) -> None:
        """Check that every storage lies in the segment and every tensor in its storage.

        The daemon runs this before sealing; a manifest that fails it is a bug, never served.
        """
        for i, s in enumerate(self.storages):
            if s.offset < data_offset or s.nbytes < 0 or s.offset + s.nbytes > data_end:
                raise SegmentError(f"storage {i} ({s.offset}+{s.nbytes}) lies outside the segment")
        for t in self.tensors:
            if t.dtype not in DTYPE_SIZES:
                raise SegmentError(f"tensor {t.name!r} has unknown dtype {t.dtype!r}")
            if not 0 <= t.storage < len(self.storages):
                raise SegmentError(f"tensor {t.name!r} names storage {t.storage} of {len(self.storages)}")
            if len(t.shape) != len(t.stride) or min(t.shape + t.stride, default=0) < 0 or t.offset < 0:
                raise SegmentError(f"tensor {t.name!r} has shape {t.shape} and stride {t.stride}")
            if t.extent() > self.storages[t.storage].nbytes:
                raise SegmentError(f"tensor {t.name!r} runs past the end of its storage")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def storage_alignment(nbytes: int) -> int:
    return PAGE_ALIGN if nbytes >= PAGE_ALIGN_FROM else SMALL_ALIGN


def contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))

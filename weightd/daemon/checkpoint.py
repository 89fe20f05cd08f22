"""Reading checkpoints: safetensors (single or sharded), PyTorch state dicts, Hugging Face folders.

A reader validates everything it can *before* the daemon creates a segment, and describes the
checkpoint as blobs (one per storage: a size and a way to write its bytes into a buffer) plus
the tensors laid over them. Bytes are copied once, from the file into shared memory.

Daemon-only: the client never imports this module.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from weightd import layout
from weightd.daemon import hf, loader
from weightd.daemon.files import check_within, folder_roots, identity, inside, open_file
from weightd.errors import CheckpointError, SegmentError
from weightd.layout import Blob
from weightd.manifest import DTYPE_SIZES, TensorMeta, contiguous_stride

# safetensors dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # the files `read` knows; default names drop them


@dataclass
class Checkpoint:
    path: str
    format: str
    blobs: list[Blob] = field(default_factory=list)
    tensors: list[TensorMeta] = field(default_factory=list)  # .storage indexes blobs
    metadata: dict = field(default_factory=dict)
    skeleton: dict | None = None
    keepalive: list = field(default_factory=list)  # objects the fills read from (mmaps, files)
    # Identity of every file (and folder) read, as ``identity`` gives it: the manifest's
    # ``origin["files"]``, compared by ``unchanged`` at a restart or reload.
    files: list[dict] = field(default_factory=list)
    # Raises if a file read changed meanwhile; called once everything is copied (a folder load).
    verify: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blobs)

    def extend(self, other: "Checkpoint") -> None:
        names = {t.name for t in self.tensors}
        base = len(self.blobs)
        for t in other.tensors:
            if t.name in names:
                raise CheckpointError(
                    f"{other.path}: tensor {t.name!r} is also in another shard of {self.path}"
                )
            self.tensors.append(t._replace(storage=t.storage + base))
        self.blobs.extend(other.blobs)
        self.files.extend(other.files)
        self.metadata.update(other.metadata)
        self.keepalive.extend(other.keepalive)


def read(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    within: list[str] | None = None,
    check: Callable[[], None] | None = None,
    factory: str | None = None,
    early: Callable | None = None,
) -> Checkpoint:
    """Open and validate a checkpoint file or folder; nothing is copied yet (but what
    ``early(blobs)`` starts copying: a Hugging Face folder's, ``hf.read_folder``).

    ``within``: folders every file read must lie in, after resolving symlinks (``--model-dir``:
    a shard in an allowed folder may be a symlink to anywhere). ``check()``, called between
    files and stages, raises to stop (``weightd.daemon.loads``: a stop, a passed deadline).
    """
    try:
        return _read(
            Path(path), allow_pickle=allow_pickle, within=within, check=check, factory=factory, early=early
        )
    except OSError as e:  # the disk, the network file system or the file itself failed a read
        raise read_failed(e.filename or path, e) from None


def read_failed(path, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"{path}: reading it failed ({e.strerror or e}): check the file and the disk or file system it is on"
    )


def _read(
    p: Path,
    *,
    allow_pickle: bool,
    within: list[str] | None,
    check: Callable[[], None] | None,
    factory: str | None = None,
    early: Callable | None = None,
) -> Checkpoint:
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder: check the path given to --model or load")
    if within is not None:
        check_within(p, within)
    if p.is_dir():
        ck = _read_folder(
            p, allow_pickle=allow_pickle, within=within, check=check, factory=factory, early=early
        )
        ck.files.append(identity(p))  # a shard added or removed changes the folder's mtime
        return ck
    try:
        mode = os.stat(p).st_mode
    except OSError:
        mode = None  # changed meanwhile (a swap under --model-dir): the reader's open decides
    if mode is not None and not stat.S_ISREG(mode):
        # Before anything opens it: a FIFO would block the loader (and every load queued behind
        # it) until someone writes to it; a device may never end.
        raise CheckpointError(
            f"{p}: not a regular file (a FIFO, device or socket): a checkpoint is a file or a folder of them"
        )
    if p.suffix == ".safetensors":
        return read_safetensors(p, within)
    if p.suffix in TORCH_SUFFIXES:
        return read_torch(p, allow_pickle=allow_pickle, within=within)
    if p.suffix == ".gguf":  # Hook (issue 24): quantized formats, weightd/daemon/quantized.py
        from weightd.daemon import quantized

        raise quantized.gguf(p)
    raise CheckpointError(
        f"{p}: unknown checkpoint type {p.suffix!r}: weightd reads .safetensors, .pt/.pth/.bin state dicts "
        "and Hugging Face model folders"
    )


def _read_text(path: Path, within: list[str] | None, files: list[dict]) -> str:
    with open_file(path, within) as f:
        files.append(identity(path, f.fileno()))
        return f.read().decode()


# --- safetensors ----------------------------------------------------------------------------


def read_safetensors(path: Path, within: list[str] | None = None) -> Checkpoint:
    """Parse and check a safetensors header: lengths, dtypes, offsets in range, no overlaps."""
    f = open_file(path, within)
    try:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(
                f"{path}: truncated: {size} bytes is shorter than the 8-byte safetensors header length"
            )
        hlen = int.from_bytes(raw, "little")
        if hlen > loader.MAX_HEADER or 8 + hlen > size:
            raise CheckpointError(
                f"{path}: bad header length {hlen} for a file of {size} bytes: the file is truncated or not "
                "safetensors"
            )
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e}): the file is corrupt") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object: the file is corrupt")
        data_start = 8 + hlen
        data_len = size - data_start
        ck = Checkpoint(path=str(path), format="safetensors", files=[identity(path, f.fileno())])
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
        ck.metadata = {str(k): str(v) for k, v in meta.items()}
        spans = []
        for name, info in header.items():
            dtype, shape, begin, end = _safetensors_entry(path, name, info)
            if end > data_len:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ends at byte {end} of a {data_len}-byte data area: the file "
                    "is truncated"
                )
            spans.append((begin, end, name))
            ck.tensors.append(TensorMeta(name, len(ck.blobs), 0, dtype, shape, contiguous_stride(shape)))
            ck.blobs.append(
                Blob(
                    end - begin,
                    _file_fill(f, data_start + begin, end - begin, path),
                    file=(f.fileno(), data_start + begin, str(path)),
                )
            )
        spans.sort()
        b0 = e0 = 0
        n0 = None
        for b1, e1, n1 in spans:
            if e1 == b1:
                continue  # zero-length tensors overlap nothing (and must not hide an overlap)
            if n0 is not None and b1 < e0:
                raise CheckpointError(
                    f"{path}: tensors {n0!r} and {n1!r} overlap (bytes {b0}-{e0} and {b1}-{e1})"
                )
            if e1 > e0:
                b0, e0, n0 = b1, e1, n1
        end = max((e for _, e, _ in spans), default=0)
        if end != data_len:
            # What the reference library refuses too: bytes no tensor covers are the sign of a
            # header length that lies by a few bytes, which would shift every tensor silently.
            raise CheckpointError(
                f"{path}: the tensors end at byte {end} of a {data_len}-byte data area: the header length "
                "is wrong or the file has trailing bytes: the file is corrupt"
            )
        ck.keepalive.append(f)
        return ck
    except BaseException:
        f.close()
        raise


def _safetensors_entry(path, name, info):
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: entry {name!r} is not an object")
    code = info.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {code!r}, which weightd does not know "
            f"(known: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r:.100}")
    if math.prod(max(n, 1) for n in shape) >= 2**63:
        # Even with no elements (a 0 in the shape), sizes and strides must fit in int64 or no
        # client can build the tensor.
        raise CheckpointError(
            f"{path}: tensor {name!r} has a shape {shape!r:.100} whose sizes overflow int64"
        )
    if (
        not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        )
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r:.100}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype} {shape}, which is {expected} bytes, "
            f"but its data_offsets span {end - begin} bytes: the file is corrupt"
        )
    return dtype, tuple(shape), begin, end


def _file_fill(f, offset: int, nbytes: int, path):
    def fill(seg, dst_offset: int) -> None:
        try:
            seg.copy_from(f.fileno(), offset, nbytes, dst_offset)
        except SegmentError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except OSError as e:
            if e.errno == errno.ENOSPC:  # the segment's side: /dev/shm is full
                raise
            raise read_failed(path, e) from None

    return fill


# --- PyTorch -------------------------------------------------------------------------------


def read_torch(path: Path, *, allow_pickle: bool = False, within: list[str] | None = None) -> Checkpoint:
    """A ``torch.save``d state dict, read with ``weights_only=True`` (no code runs).

    With ``allow_pickle`` a whole pickled ``nn.Module`` is accepted too; unpickling runs
    whatever code the file names, so it is only for files you made yourself.
    """
    import torch  # here: a daemon that serves only safetensors never pays for importing torch

    f = open_file(path, within)
    try:
        files = [identity(path, f.fileno())]
        # The file opened and checked above, by its descriptor: /proc/self/fd/N is that
        # very file whatever happens to the path meanwhile.
        obj = _torch_load(f"/proc/self/fd/{f.fileno()}", weights_only=not allow_pickle)
    except CheckpointError:
        f.close()
        raise
    except Exception as e:
        f.close()
        hint = (
            " It holds objects other than tensors: if you trust the file, load it with --allow-pickle."
            if "weights_only" in str(e) or "Unsupported global" in str(e)
            else " The file is truncated, corrupt or not a PyTorch checkpoint."
        )
        raise CheckpointError(f"{path}: torch.load failed: {str(e).splitlines()[0][:300]}.{hint}") from None
    try:
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
            )
        blobs, tensors, keep = layout.from_tensors(layout.flatten(obj, path), source=path)
        in_files(blobs, keep, [(f.fileno(), str(path))])
    except BaseException:
        f.close()
        raise
    keep.append(f)
    return Checkpoint(
        path=str(path), format="torch", blobs=blobs, tensors=tensors, keepalive=keep, files=files
    )


def in_files(blobs: list[Blob], storages: list, files: list[tuple[int, str]]) -> int:
    """Say which blobs are bytes of one of ``files`` (descriptor, path) as they are on disk, so
    the readers stream them from the file (``Blob.file``); returns how many bytes that covers.

    ``torch.load(mmap=True)`` and safetensors map the file and hand out storages inside the
    mapping: a storage's address less the mapping's start, plus the mapping's file offset, is
    where its bytes are in the file. Matched by device and inode (/proc/self/maps) to the very
    file opened. A mapping with pages written since (``Anonymous`` in smaps: copied on write,
    no longer the file's bytes) is not trusted: its blobs are copied from memory.
    """
    by_id = {}
    for fd, path in files:
        st = os.fstat(fd)
        by_id[(st.st_dev, st.st_ino)] = (fd, path)
    maps = []  # (lo, hi, file offset, fd, path)
    try:
        with open("/proc/self/smaps") as sm:
            current = None
            for line in sm:
                head = line.split(None, 1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    current = None
                    parts = line.split()
                    if len(parts) >= 6:
                        major, minor = (int(x, 16) for x in parts[3].split(":"))
                        hit = by_id.get((os.makedev(major, minor), int(parts[4])))
                        if hit is not None:
                            lo, hi = (int(x, 16) for x in parts[0].split("-"))
                            current = [lo, hi, int(parts[2], 16), *hit]
                            maps.append(current)
                elif current is not None and line.startswith("Anonymous:") and int(line.split()[1]):
                    maps.remove(current)  # written to since it was mapped
                    current = None
    except OSError:
        return 0
    covered = 0
    for blob, storage in zip(blobs, storages):
        ptr = storage.data_ptr()
        for lo, hi, pgoff, fd, path in maps:
            if lo <= ptr and ptr + blob.nbytes <= hi:
                blob.file = (fd, pgoff + ptr - lo, path)
                covered += blob.nbytes
                break
    return covered


def _torch_load(path: Path, *, weights_only: bool):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        # Files in the legacy (pre-1.6, non-zip) format cannot be memory-mapped.
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


# --- folders ------------------------------------------------------------------------------


def _read_folder(
    folder: Path,
    *,
    allow_pickle: bool,
    within: list[str] | None,
    check: Callable[[], None] | None,
    factory: str | None = None,
    early: Callable | None = None,
) -> Checkpoint:
    """A Hugging Face model folder (config.json and weights), or a folder of weight files."""
    found = hf.read_folder(folder, within=within, check=check, factory=factory, early=early)
    if found is not None:
        return Checkpoint(**found)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return _read_index(folder / index_name, allow_pickle=allow_pickle, within=within, check=check)
    files = sorted(folder.glob("*.safetensors")) or sorted(
        f for f in folder.iterdir() if f.suffix in TORCH_SUFFIXES and f.is_file()
    )
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors, *.bin, *.pt or index file in this folder")
    return _read_many(folder, files, allow_pickle=allow_pickle, within=within, check=check)


def _read_index(
    index: Path, *, allow_pickle: bool, within: list[str] | None, check: Callable[[], None] | None
) -> Checkpoint:
    files: list[dict] = []
    try:
        weight_map = json.loads(_read_text(index, within, files))["weight_map"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid index (a JSON object with a 'weight_map' object)")
    shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:
        if "/" in shard or shard.startswith(".") or not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: names shard {shard!r}, which is not a file in {index.parent}")
    ck = _read_many(
        index.parent,
        [index.parent / s for s in shards],
        allow_pickle=allow_pickle,
        within=within,
        check=check,
    )
    ck.files.extend(files)
    have = {t.name for t in ck.tensors}
    missing = [k for k in weight_map if k not in have]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} tensors in the index are in no shard, e.g. {missing[:3]}"
        )
    return ck


def _read_many(
    folder: Path,
    files: list[Path],
    *,
    allow_pickle: bool,
    within: list[str] | None,
    check: Callable[[], None] | None,
) -> Checkpoint:
    ck = Checkpoint(path=str(folder), format="safetensors" if files[0].suffix == ".safetensors" else "torch")
    roots = folder_roots(os.path.realpath(folder))
    try:
        for f in files:
            if check is not None:
                check()
            one = read(f, allow_pickle=allow_pickle, within=within)
            ck.extend(one)
            # the file opened (its descriptor's real path, in its identity) is inside the folder
            for entry in one.files:
                if not any(inside(entry["path"], r) for r in roots):
                    raise CheckpointError(
                        f"{f} is a link to {entry['path']}, outside the folder being loaded ({folder}): "
                        "weightd serves only what is inside the folder; copy the file in, or remove the link"
                    )
    except BaseException:
        close(ck)
        raise
    return ck


def close(ck: Checkpoint) -> None:
    for obj in ck.keepalive:
        if hasattr(obj, "close"):
            obj.close()
    ck.keepalive.clear()

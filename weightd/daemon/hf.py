"""Hugging Face model folders: opened here by descriptor, loaded by transformers in a loader process.

A model folder is untrusted input: whoever wrote it (a ``git clone``, a colleague's training run,
another user inside ``--model-dir``) chose its config, its links and its files. So the daemon

1. opens every file of the load once, relative to the folder's own descriptor, and checks the
   descriptor (``files.check_fd``): a regular file, inside the folder by its real path (links
   that stay inside are followed: the Hub cache's ``snapshots/<rev>/x -> ../../blobs/<hash>``),
   inside ``--model-dir``, not on /proc or /sys. ``config.json`` is read once, size-capped;
2. gives transformers only those descriptors: a private snapshot folder whose entries are
   ``/proc/self/fd/N`` links to them, and a private copy of the config bytes it parsed. Nothing
   else of the folder is there, so adapters (``adapter_config.json``), remote code and anything
   else beside the weights are not applied (Note [what a loader process sees]);
3. runs ``from_pretrained`` in a child process (``weightd.daemon.loader``) with limits on its
   memory and time taken from the size of the weight files, and kills it at once on a stop, a
   deadline or a time-out. The child answers with the tensors' layout: where a tensor is an
   untouched view of a weight file, the file and offset (the daemon copies it from its own
   descriptor); what transformers computed (fused, cast), in a memfd it hands over. So the
   daemon never imports torch or transformers for a folder;
4. checks every recorded identity again after the load, and once more after the copy.

``from_pretrained`` does more than read tensors: it renames and merges keys, drops keys the
class ignores, casts to the config's dtype and ties weights. What workers map is exactly the
tensors ``from_pretrained`` gave. The folder's small files (config, tokenizer, processor,
sentence-transformers modules) go into the same segment as byte storages.

Daemon-only: the client never imports this module (its side is ``weightd.client.hf``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from weightd.daemon import early as early_copy
from weightd.daemon import files, loader, quantized
from weightd.errors import CheckpointError
from weightd.layout import Blob
from weightd.manifest import TensorMeta

log = logging.getLogger("weightd")

EXTRA = "pip install 'weightd[hf]'"
# The folder's small files a worker may need besides the weights, by suffix. Whatever else a
# training tool left beside them (optimizer states, other checkpoints, logs) is not served.
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".spm")
# Beside the weights but not served: they would change what a worker builds (an adapter on
# top of the weights) without being part of the generation's tensors.
NOT_SERVED = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MAX_SMALL_FILE = 64 << 20
MAX_SMALL_FILES = 512 << 20
MAX_CONFIG = 4 << 20  # a config.json is a few KiB; a bigger one is not read into the daemon
MAX_INDEX = 64 << 20  # a shard index names every tensor: a few MiB for the largest models
# The daemon's first guess reads no more headers than this (a 5 GB shard's is ~100 KiB): more is
# left to the loader process (Note [the daemon's first guess] in weightd/daemon/early.py).
MAX_GUESSED_HEADERS = 4 << 20
# What the loader process may use: a base for the interpreter, torch and transformers, plus a
# multiple of the weight files' bytes (from_pretrained holds converted copies besides the
# mapped file). Its time: a base for the imports, plus the bytes at a slow disk's rate.
LOADER_MEMORY_BASE = 3 << 30
LOADER_MEMORY_PER_BYTE = 3
LOADER_SECONDS_BASE = 120.0
LOADER_BYTES_PER_SECOND = 50 << 20
POLL_SECONDS = 0.05  # how soon a stop or a deadline kills the loader process


def read_folder(
    folder: Path, *, within: list[str] | None = None, check=None, factory: str | None = None, early=None
) -> dict | None:
    """Load ``folder`` with ``from_pretrained`` in a loader process; returns the keywords of a
    ``checkpoint.Checkpoint`` (its blobs, tensors, skeleton, the open files the blobs copy
    from in ``keepalive``, the identity of every file read in ``files``), or None if the folder
    has no config.json naming a model type (then it is a plain folder of weight files).

    ``check()`` raises to stop the load (a stop, a passed deadline): the loader process is
    killed within ``POLL_SECONDS``. ``factory``: an operator-named class ("package.module:Class",
    weightd/daemon/classes.py) that the loader process imports and loads the folder with.
    ``early``: a copy started before the answer (``weightd.daemon.early.EarlyCopy``, Note
    [copying while from_pretrained runs]), told from this thread ``views(blobs)``: the weight
    files' storages the loader process expects ``from_pretrained`` to keep as they are, before it
    runs it; ``converted(memfd, bytes)`` and ``written(upto)``: its memfd of converted tensors
    and how far it has written it.
    """
    check = check or (lambda: None)
    opened = _Opened(folder, within)
    try:
        found = _config(opened)
        if found is None:
            opened.close()
            return None
        if importlib.util.find_spec("transformers") is None:
            raise CheckpointError(
                f"{folder} is a Hugging Face model folder; the daemon loads those with transformers, which "
                f"is not installed where it runs: {EXTRA}"
            )
        # Hook (issue 24): a quantized format not served is refused before any weight is read.
        quantized.check(folder, found[0])
        return _load(opened, *found, check, factory, early)
    except BaseException:
        if early is not None:
            early.stop()  # its readers read these files
        opened.close()
        raise


# --- opening the folder --------------------------------------------------------------------


class _Opened:
    """The folder's descriptor and every file of the load, open, checked and recorded."""

    def __init__(self, folder: Path, within: list[str] | None):
        self.folder = folder
        self.within = within
        self.fds: dict[str, int] = {}  # path in the folder -> descriptor
        self.identities: dict[str, dict] = {}
        self.dir_fd = -1
        try:
            self.dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot open the folder ({e.strerror})") from None
        real = files.fd_path(self.dir_fd)
        if within is not None:
            files.check_within(folder, within, real=real)
        self.roots = files.folder_roots(real)

    def open(self, rel: str, *, max_size: int | None = None) -> int:
        """Open ``rel`` (a path in the folder) once; the same descriptor on a second call."""
        fd = self.fds.get(rel)
        if fd is None:
            fd = files.open_fd(
                rel,
                dir_fd=self.dir_fd,
                shown=self.folder / rel,
                within=self.within,
                inside_of=self.roots,
                max_size=max_size,
            )
            self.fds[rel] = fd
            self.identities[rel] = files.identity(self.folder / rel, fd)
        return fd

    def read(self, rel: str, limit: int) -> bytes:
        return files.read_fd(self.open(rel, max_size=limit), self.folder / rel, limit)

    def exists(self, rel: str) -> bool:
        try:
            os.stat(rel, dir_fd=self.dir_fd)
            return True
        except OSError:
            return False

    def verify(self) -> None:
        """Every file read is still what was read: the same inode under the same name, with
        the same size, mtime and ctime. A folder rewritten during a load fails it."""
        for rel, entry in self.identities.items():
            try:
                now = os.fstat(self.fds[rel])
                named = os.stat(rel, dir_fd=self.dir_fd)
            except OSError:
                named = None
            if (
                named is None
                or not files.same(entry, now)
                or (named.st_ino, named.st_dev) != (now.st_ino, now.st_dev)
            ):
                raise CheckpointError(
                    f"{self.folder / rel} changed while the folder was being loaded: load it again once "
                    "whatever writes the folder is done"
                )

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


class _Descriptor:
    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Memfd(_Descriptor):
    """The loader's memfd of converted tensors. Its last close frees its pages (672 MiB for a
    Mixtral: 0.05-0.08 s measured, on the load's clock before the model was served), so it is
    closed on a thread of its own."""

    def close(self) -> None:
        if self.fd >= 0:
            threading.Thread(target=os.close, args=(self.fd,), name="weightd-free", daemon=True).start()
            self.fd = -1


def _config(opened: _Opened) -> tuple[dict, bytes] | None:
    """config.json parsed from its descriptor (and its bytes), if it names a model type."""
    if not opened.exists("config.json"):
        return None
    raw = opened.read("config.json", MAX_CONFIG)
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{opened.folder / 'config.json'}: not valid JSON ({e})") from None
    if not (isinstance(config, dict) and ("model_type" in config or "architectures" in config)):
        return None
    return config, raw


def _weight_files(opened: _Opened, config: dict) -> tuple[list[str], list[str]]:
    """The weight files ``from_pretrained`` reads, by its preference order, and the index files.

    The config's ``transformers_weights`` first; else model.safetensors, its index,
    pytorch_model.bin, its index. The loader process sees only these, so transformers' own
    choice is the same. Every shard an index names must be a plain name in the folder.
    """
    explicit = config.get("transformers_weights")
    names = [explicit] if isinstance(explicit, str) and explicit else []
    names += [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ]
    for name in names:
        if "/" in name or name.startswith(".") or not opened.exists(name):
            continue
        if not name.endswith(".index.json"):
            opened.open(name)
            return [name], []
        raw = opened.read(name, MAX_INDEX)
        try:
            weight_map = json.loads(raw)["weight_map"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{opened.folder / name}: not a valid index (a JSON object with a 'weight_map' object)"
            )
        shards = sorted({str(s) for s in weight_map.values()})
        for shard in shards:
            if "/" in shard or shard.startswith(".") or not opened.exists(shard):
                raise CheckpointError(
                    f"{opened.folder / name}: names shard {shard!r:.200}, which is not a file in "
                    f"{opened.folder}: copy every shard the index lists into the folder (a partial download?)"
                )
            opened.open(shard)
        return shards, [name]
    raise CheckpointError(
        f"{opened.folder}: no *.safetensors or pytorch_model.bin weights that transformers would load "
        "(model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index)"
    )


def _small_files(opened: _Opened, skip: set[str]) -> dict[str, int]:
    """The files a worker may want besides the weights, opened: path in the folder -> fd.

    Top level: configs, tokenizer and processor files (by suffix). Sub-folders: only the
    sentence-transformers modules that modules.json names (1_Pooling/, 2_Dense/...), whole.
    A link out of the folder refuses the load, naming it.
    """
    names = []
    for name in sorted(os.listdir(opened.dir_fd)):
        if (
            name.endswith(SMALL_FILE_SUFFIXES)
            and not name.endswith(".index.json")
            and name not in skip
            and name not in NOT_SERVED
            and not name.startswith(".")
        ):
            names.append(name)
    if "modules.json" in names:
        try:
            entries = json.loads(opened.read("modules.json", MAX_SMALL_FILE))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{opened.folder / 'modules.json'}: not valid JSON ({e})") from None
        for entry in entries if isinstance(entries, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(sub, str) or not sub or sub.startswith((".", "/")) or ".." in sub.split("/"):
                continue
            names += _module_files(opened, sub)
    kept, total = {}, 0
    for rel in names:
        try:
            fd = opened.open(rel)
        except CheckpointError:
            if _is_dir(opened, rel):
                continue  # a folder named like a file: nothing to serve
            raise
        size = os.fstat(fd).st_size
        if size > MAX_SMALL_FILE or total + size > MAX_SMALL_FILES:
            log.warning(
                "%s: not serving %s (%d bytes): larger than weightd serves beside the weights",
                opened.folder,
                rel,
                size,
            )
            continue
        kept[rel] = fd
        total += size
    return kept


def _module_files(opened: _Opened, sub: str) -> list[str]:
    """Every file under the module folder ``sub``, which must itself be inside the folder."""
    try:
        top = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=opened.dir_fd)
    except OSError:
        return []
    out = []
    try:
        real = files.fd_path(top)
        if not any(files.inside(real, r) for r in opened.roots):
            raise CheckpointError(
                f"{opened.folder / sub} is a link to {real}, outside the folder being loaded: weightd "
                "serves only what is inside the folder; copy the module in, or remove the link"
            )
        for dirpath, _dirs, names, _fd in os.fwalk(".", dir_fd=top):
            for name in sorted(names):
                out.append(os.path.normpath(os.path.join(sub, dirpath, name)))
    finally:
        os.close(top)
    return out


def _is_dir(opened: _Opened, rel: str) -> bool:
    try:
        import stat

        return stat.S_ISDIR(os.stat(rel, dir_fd=opened.dir_fd).st_mode)
    except OSError:
        return False


# --- the load --------------------------------------------------------------------------------


def _load(opened: _Opened, config: dict, config_bytes: bytes, check, factory: str | None, early=None) -> dict:
    folder = opened.folder
    weights, indexes = _weight_files(opened, config)
    extras = ["generation_config.json"] if opened.exists("generation_config.json") else []
    for rel in extras:
        opened.open(rel, max_size=MAX_SMALL_FILE)
    small = _small_files(opened, set(weights) | set(indexes))
    weight_bytes = sum(os.fstat(opened.fds[w]).st_size for w in weights)
    check()
    started = time.perf_counter()
    if early is not None:  # Note [the daemon's first guess] in weightd/daemon/early.py
        try:
            first = _early_blobs(
                opened, weights, early_copy.first_guess(_headers(opened, weights), config), []
            )
        except CheckpointError:  # a header that names bytes past its file's end: the loader says so
            first = []
        early.views(first, first=True)
    answer, memfd = _run_loader(
        opened, config_bytes, weights, indexes + extras, weight_bytes, check, factory, early
    )
    seconds = time.perf_counter() - started
    keep = [os.fdopen(fd, "rb", closefd=True) for fd in opened.fds.values()]
    opened.fds = {rel: f.fileno() for rel, f in zip(opened.fds, keep)}
    if memfd is not None:
        keep.append(_Memfd(memfd))
    try:
        opened.verify()
        blobs, tensors = _blobs(opened, answer, weights, memfd)
        hf = answer["hf"]
        served = {}
        for rel in sorted(small):
            data = (
                config_bytes
                if rel == "config.json"
                else files.read_fd(small[rel], folder / rel, MAX_SMALL_FILE)
            )
            served[rel] = len(blobs)
            blobs.append(Blob(len(data), _bytes_fill(data), data=data))  # streamed from the buffer
        hf.update(
            source=str(folder.resolve()),
            config=config,
            weight_files=weights,
            files=served,
        )
        stages = hf.pop("stages", None) or {}
        stages["fork and answer"] = round(seconds - sum(stages.values()), 4)
        log.info(
            "%s: %s.from_pretrained in a loader process, %.2f s (%s; transformers %s, %s): %d tensors, "
            "%d converted (%.1f MiB), %d small files",
            folder,
            hf["class"],
            seconds,
            ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
            hf["transformers"],
            hf["dtype"],
            len(tensors),
            len(hf["converted"]),
            hf["converted_bytes"] / 2**20,
            len(served),
        )
    except BaseException:
        for f in keep:
            f.close()
        opened.fds.clear()  # closed with their file objects
        raise
    keep.append(_Descriptor(opened.dir_fd))  # verify() needs it until the copy is done
    return dict(
        verify=opened.verify,
        path=str(folder),
        format="huggingface",
        blobs=blobs,
        tensors=tensors,
        skeleton={"hf": hf},
        keepalive=keep,
        files=list(opened.identities.values()),
    )


def _blobs(opened: _Opened, answer: dict, weights: list[str], memfd: int | None):
    blobs = []
    sizes = [os.fstat(opened.fds[w]).st_size for w in weights]
    memsize = os.fstat(memfd).st_size if memfd is not None else 0
    for i, b in enumerate(answer["blobs"]):
        nbytes = int(b["nbytes"])
        wrong = CheckpointError(f"{opened.folder}: the loader process described storage {i} wrongly")
        if "file" in b:
            blobs.append(_file_blob(opened, weights, sizes, int(b["file"]), int(b["offset"]), nbytes, wrong))
        elif "parts" in b:  # Note [fused tensors are file ranges] in weightd/daemon/fused.py
            blobs.append(_parts_blob(opened, weights, sizes, b["parts"], wrong))
            if blobs[-1].nbytes != nbytes:
                raise wrong
        else:
            offset = int(b["memfd"])
            if memfd is None or not (0 <= offset and offset + nbytes <= memsize):
                raise CheckpointError(f"{opened.folder}: the loader process described storage {i} wrongly")
            blobs.append(
                Blob(
                    nbytes,
                    _fd_fill(memfd, offset, nbytes, opened.folder),
                    file=(memfd, offset, f"{opened.folder} (tensors the loader process converted)"),
                )
            )
    tensors = [
        TensorMeta(t[0], int(t[1]), int(t[2]), str(t[3]), tuple(t[4]), tuple(t[5])) for t in answer["tensors"]
    ]
    for t in tensors:
        if not 0 <= t.storage < len(blobs):
            raise CheckpointError(f"{opened.folder}: the loader process described tensor {t.name!r} wrongly")
    return blobs, tensors


def _headers(opened: _Opened, weights: list[str]):
    """The headers of the safetensors weight files, read from the daemon's descriptors as they
    are asked for: (file index, where its data starts, the header), in order, their JSON
    ``MAX_GUESSED_HEADERS`` bytes at most (it is parsed on the load's clock, before the loader
    starts); up to one that does not parse (the loader process says what is wrong with it)."""
    left = MAX_GUESSED_HEADERS
    for k, rel in enumerate(weights):
        if not rel.endswith(".safetensors"):
            continue
        try:
            data, header = loader.header_at(opened.fds[rel], left)
        except (OSError, ValueError, RecursionError):
            return  # past what is read here, or not a header: the rest is the loader's
        left -= data - 8
        yield k, data, header


def _early(early, opened: _Opened, weights: list[str], message: dict, fds: list[int], memfd, memory: int):
    """One of the loader process's messages before its answer (Note [copying while
    from_pretrained runs] in weightd/daemon/early.py), checked and handed to ``early``: the
    ranges it expects to stay untouched, then its memfd of converted tensors and how far it is
    written. Returns the memfd (once received)."""
    wrong = CheckpointError(f"{opened.folder}: the loader process described its early copy wrongly")
    if early is None:  # not asked for
        for fd in fds:
            os.close(fd)
        raise wrong
    if "converted" in message:
        total = message["converted"]
        if memfd is not None or len(fds) != 1 or type(total) is not int or not 0 < total <= memory:
            for fd in fds:
                os.close(fd)
            raise wrong
        memfd = fds[0]
        early.converted(memfd, total)
        return memfd
    for fd in fds:
        os.close(fd)
    if "written" in message:
        upto = message["written"]
        if memfd is None or type(upto) is not int:
            raise wrong
        early.written(upto)
    else:
        early.views(_early_blobs(opened, weights, message["early"], message.get("fused", [])))
    return memfd


def _early_blobs(opened: _Opened, weights: list[str], ranges, fused) -> list[tuple[Blob, int]]:
    """The loader process's guess of the storages kept as they are (``loader._likely_views``)
    and of those fused from whole file tensors (``fused.likely``), checked as its answer is:
    each a (blob, item size), in range of its file, none overlapping."""
    wrong = CheckpointError(f"{opened.folder}: the loader process described its early copy wrongly")
    if not isinstance(ranges, list) or not isinstance(fused, list):
        raise wrong
    out = []
    sizes = [os.fstat(opened.fds[w]).st_size for w in weights]
    left = list(sizes)  # ranges that overlap would copy a file more than once
    seen: set[tuple[int, int]] = set()

    def count(k: int, offset: int, nbytes: int) -> None:
        left[k] -= nbytes
        if nbytes <= 0 or (k, offset) in seen or left[k] < 0:
            raise wrong
        seen.add((k, offset))

    for r in ranges:
        if not (isinstance(r, list) and len(r) == 4 and all(type(x) is int for x in r)):
            raise wrong
        k, offset, nbytes, itemsize = r
        blob = _file_blob(opened, weights, sizes, k, offset, nbytes, wrong)
        count(k, offset, nbytes)
        out.append((blob, itemsize))
    for r in fused:
        if not (isinstance(r, list) and len(r) == 2 and type(r[0]) is int):
            raise wrong
        itemsize, parts = r
        blob = _parts_blob(opened, weights, sizes, parts, wrong)
        for k, offset, nbytes in parts:
            count(k, offset, nbytes)
        out.append((blob, itemsize))
    if any(itemsize not in (1, 2, 4, 8) for _, itemsize in out):
        raise wrong
    return out


def _parts_blob(opened: _Opened, weights: list[str], sizes: list[int], parts, wrong: Exception) -> Blob:
    """A tensor fused from whole file tensors: ``parts`` ([file index, offset, bytes]) of the
    weight files end to end (Note [fused tensors are file ranges] in weightd/daemon/fused.py)."""
    if not (isinstance(parts, list) and parts):
        raise wrong
    pieces = []
    for p in parts:
        if not (isinstance(p, list) and len(p) == 3 and all(type(x) is int for x in p)):
            raise wrong
        fd, offset, _ = _file_blob(opened, weights, sizes, *p, wrong).file
        pieces.append((fd, offset, p[2], str(opened.folder / weights[p[0]])))
    nbytes = sum(p[2] for p in pieces)
    return Blob(nbytes, _parts_fill(pieces), parts=tuple(pieces))


def _file_blob(
    opened: _Opened, weights: list[str], sizes: list[int], k: int, offset: int, nbytes: int, wrong: Exception
) -> Blob:
    """``nbytes`` at ``offset`` of weight file ``k`` (of sizes ``sizes``), as the loader process
    named them: streamed by the daemon's readers from its own descriptor (weightd.daemon.stream);
    ``wrong`` raised where they are not inside the file."""
    if not (0 <= k < len(weights) and 0 <= offset and 0 <= nbytes and offset + nbytes <= sizes[k]):
        raise wrong
    fd, shown = opened.fds[weights[k]], opened.folder / weights[k]
    return Blob(nbytes, _fd_fill(fd, offset, nbytes, shown), file=(fd, offset, str(shown)))


def _fd_fill(fd: int, offset: int, nbytes: int, shown):
    def fill(seg, dst_offset: int) -> None:
        try:
            seg.copy_from(fd, offset, nbytes, dst_offset)
        except OSError as e:
            import errno

            if e.errno == errno.ENOSPC:
                raise
            raise CheckpointError(f"{shown}: reading it failed ({e.strerror or e})") from None

    return fill


def _parts_fill(pieces: list):
    def fill(seg, dst_offset: int) -> None:
        for fd, offset, nbytes, path in pieces:
            _fd_fill(fd, offset, nbytes, path)(seg, dst_offset)
            dst_offset += nbytes

    return fill


def _bytes_fill(data: bytes):
    def fill(seg, offset: int) -> None:
        seg.write(offset, data)

    return fill


# --- the loader process ----------------------------------------------------------------------


def limits(weight_bytes: int) -> tuple[int, float]:
    """The loader process's memory (bytes of private data) and wall-clock seconds."""
    memory = LOADER_MEMORY_BASE + LOADER_MEMORY_PER_BYTE * weight_bytes
    seconds = LOADER_SECONDS_BASE + weight_bytes / LOADER_BYTES_PER_SECOND
    return memory, seconds


def _run_loader(
    opened: _Opened,
    config_bytes: bytes,
    weights: list[str],
    others: list[str],
    weight_bytes: int,
    check,
    factory: str | None,
    early=None,
) -> tuple[dict, int | None]:
    """Run one load in a fork of the loader process; its answer and memfd.

    Note [what a loader process sees]: a fresh private folder (0700) that the daemon makes (and
    removes, also after killing the child) and the child fills,
    holding a copy of the config bytes the daemon parsed and, for each weight, index and
    generation-config file, a link to ``/proc/self/fd/N``, the descriptor the daemon opened
    and checked and handed over. Opening such a link opens that very file, whatever its path
    names now. Nothing else of the folder is there: no adapter, no code, no tokenizer.
    """
    memory, seconds = limits(weight_bytes)
    deadline = time.monotonic() + seconds
    memfd = None  # the converted tensors' memfd, if the loader process sent it early
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stderr = tempfile.TemporaryFile()
    snapshot = tempfile.mkdtemp(prefix="weightd-load-")  # filled by the child, removed here
    pidfd = None
    try:
        job = {
            "folder": str(opened.folder),
            "config": config_bytes.decode("utf-8", errors="replace"),
            "weights": weights,
            "files": weights + others,
            "factory": factory,
            "snapshot": snapshot,
            "memory": memory,
            "cpu_seconds": int(seconds) + 1,
            "early": early is not None,
        }
        fds = [theirs.fileno(), stderr.fileno(), *(opened.fds[rel] for rel in weights + others)]
        pidfd = _LOADER.start(job, fds, lambda: _wait_check(check, deadline, opened, weight_bytes, seconds))
        theirs.close()

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

        while True:
            try:
                _wait_check(check, deadline, opened, weight_bytes, seconds)
            except BaseException:
                kill()
                raise
            ready, _, _ = select.select([mine], [], [], POLL_SECONDS)
            if not ready:
                continue
            try:
                answer, fds = loader.receive(mine)
            except (OSError, ValueError, EOFError):
                kill()
                raise _died(opened.folder, pidfd, stderr, memory) from None
            if not ({"early", "converted", "written"} & set(answer)):
                break
            try:
                memfd = _early(early, opened, weights, answer, fds, memfd, memory)
            except BaseException:
                kill()
                raise
        if "error" in answer:
            for fd in fds:
                os.close(fd)
            raise CheckpointError(answer["error"])
        if memfd is not None:  # received early: the copy started from it names it so
            for fd in fds:
                os.close(fd)
            return answer, memfd
        return answer, fds[0] if fds else None
    except BaseException:
        if memfd is not None:
            early.stop()  # its readers read the memfd
            os.close(memfd)
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
        mine.close()
        if theirs.fileno() >= 0:
            theirs.close()
        stderr.close()
        shutil.rmtree(snapshot, ignore_errors=True)


def _wait_check(check, deadline: float, opened: _Opened, weight_bytes: int, seconds: float) -> None:
    check()
    if time.monotonic() > deadline:
        raise CheckpointError(
            f"{opened.folder}: from_pretrained took longer than the {seconds:.0f} s weightd allows for "
            f"{weight_bytes / 2**20:.1f} MiB of weights; the loader process was stopped (does the config "
            "describe a much larger model than its files?)"
        )


class _Loader:
    """The loader process (``python -m weightd.daemon.loader``), started at the first folder
    load and again whenever it ended (Note [one fork per load] in loader.py)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None

    def start(self, job: dict, fds: list[int], check) -> int:
        """Fork a child of the loader for ``job``; its pidfd. ``check()`` raises to give up."""
        with self._lock:
            for attempt in (0, 1):
                control = self._ensure(job["folder"], check)
                try:
                    loader.send(control, job, fds)
                    answer, got = self._answer(control, check)
                    if len(got) != 1:
                        raise ValueError("no pidfd")
                    return got[0]
                except (OSError, EOFError, ValueError):
                    self._stop()
                    if attempt:
                        raise CheckpointError(
                            f"{job['folder']}: the loader process failed to start a load: see the log"
                        ) from None
                except BaseException:
                    # given up (a stop, a deadline) between the job and its answer: the answer
                    # would be read as the next job's, so this loader (and its child) goes
                    self._stop()
                    raise
            raise AssertionError("unreachable")

    def _ensure(self, folder: str, check) -> socket.socket:
        if self._proc is not None and self._proc.poll() is None:
            return self._control
        self._stop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        env.pop("PYTHONSTARTUP", None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "weightd.daemon.loader", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a terminal's ^C goes to the daemon, which decides
        )
        theirs.close()
        self._control = mine
        try:
            # {"ready": true} once torch and transformers are imported
            ready, _ = self._answer(mine, check)
        except (OSError, EOFError, ValueError):
            self._stop()
            raise CheckpointError(f"{folder}: the loader process did not start: see the log") from None
        except BaseException:
            self._stop()
            raise
        if "error" in ready:
            self._stop()
            raise CheckpointError(
                f"{folder} is a Hugging Face model folder; the daemon loads those with transformers, which "
                f"its loader process could not import ({ready['error'][:200]}): {EXTRA}"
            )
        return mine

    def _answer(self, control: socket.socket, check) -> tuple[dict, list[int]]:
        while True:
            check()
            ready, _, _ = select.select([control], [], [], POLL_SECONDS)
            if ready:
                return loader.receive(control)
            if self._proc.poll() is not None:
                raise EOFError("the loader process ended")

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None


_LOADER = _Loader()


def _died(folder: Path, pidfd: int, stderr, memory: int) -> CheckpointError:
    stderr.seek(0)
    tail = stderr.read()[-4000:].decode(errors="replace").strip().splitlines()
    last = tail[-1][:300] if tail else "no answer"
    if "MemoryError" in last or "alloc" in last.lower() or not tail:
        last += f" (its memory limit was {memory / 2**30:.1f} GiB)"
    return CheckpointError(
        f"{folder}: the loader process running from_pretrained ended without an answer: {last}"
    )

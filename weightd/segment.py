"""POSIX shared-memory segments: the self-describing format, creation and opening.

Layout of a segment (all integers little-endian)::

    0      8s  magic b"WEIGHTD\\0"
    8      I   format version
    12     I   reserved (0)
    16     Q   manifest offset
    24     Q   manifest length
    32     Q   seal: 0 while being written, SEALED once complete (written last)
    40     16s uuid of the contents (the manifest's ``uuid``), so a client checks it in O(1)
    4096   ... storages, 64-byte aligned, large ones page aligned
    M      ... manifest (UTF-8 JSON, see weightd.manifest)

The manifest sits after the data so that storage offsets are known before it is encoded. A
segment whose seal is not set was never finished (a load that failed or was killed) and is
never served: a daemon that finds one sweeps it.

Note [segment lifetime after unlink]
------------------------------------
``shm_unlink`` removes a segment's *name*, not its pages. Every process that has it mapped
keeps reading the same bytes until it unmaps; the kernel frees the pages when the last mapping
goes. That is what makes unloading, replacing a generation, or a daemon dying safe for
attached workers: the daemon unlinks freely and never waits for clients. The flip side: a
segment nobody unlinks outlives every process (it is a file in /dev/shm), so every path that
creates one must unlink it on failure, and a daemon sweeps what a killed predecessor left.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
from typing import NamedTuple

import posix_ipc

from weightd.errors import OutOfSpace, PermissionDenied, SegmentError
from weightd.manifest import Manifest

MAGIC = b"WEIGHTD\0"
FORMAT_VERSION = 2  # 2: the contents' uuid in the header
SEALED = 0x2121_4445_4C41_4553  # b"SEALED!!" read little-endian
HEADER = struct.Struct("<8sIIQQQ16s")
SEAL_OFFSET = 32
DATA_OFFSET = 4096
WRITE_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per write or sendfile call

SHM_DIR = "/dev/shm"
ENV_SHM_DIR = "WEIGHTD_SHM_DIR"
_NAME = re.compile(r"^/weightd\.[A-Za-z0-9_.\-]+\Z")


# --- names and where they live ---------------------------------------------------------------


def shm_dir() -> str:
    """Where segments are: ``$WEIGHTD_SHM_DIR`` (a container that mounts the host's shared
    memory elsewhere), else /dev/shm, which is where ``shm_open`` puts them on Linux."""
    return os.environ.get(ENV_SHM_DIR) or SHM_DIR


def prefix(instance: str) -> str:
    """The start of every segment name of a daemon instance (without the leading slash)."""
    return f"weightd.{instance}."


def is_name(name: str) -> bool:
    """Whether ``name`` (with its leading slash) can be a weightd segment's name."""
    return bool(_NAME.match(name))


def path(name: str, directory: str | None = None) -> str:
    """The file behind segment ``name``: ``shm_open(name)`` is ``open(<shm dir>/name)``."""
    return os.path.join(directory or shm_dir(), name.lstrip("/"))


def shm_free_bytes(directory: str | None = None) -> int:
    st = os.statvfs(directory or shm_dir())
    return st.f_bavail * st.f_frsize


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


class Segment:
    """A segment being written: its name and an open read-write file descriptor.

    Writes go through the descriptor (``pwrite``, ``sendfile``), not through a mapping: the
    kernel copies straight into the shared pages, with no page faults in the writer, which
    measured twice as fast as copying through a fresh mapping (benchmarks/publish.py).
    """

    def __init__(self, name: str, size: int, fd: int):
        self.name = name
        self.size = size
        self.fd = fd

    @classmethod
    def create(
        cls, name: str, size: int, mode: int = 0o600, owner: tuple[int, int] | None = None
    ) -> "Segment":
        """Create a new segment of ``size`` bytes with every page reserved.

        ``posix_fallocate`` makes tmpfs reserve the pages now, so a full /dev/shm is an error
        here, at load time, instead of a SIGBUS in whichever process first touches a page
        that cannot be backed.
        """
        free = shm_free_bytes()
        if size > free:
            raise OutOfSpace(no_space_message(size, free))
        try:
            shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError:
            raise SegmentError(
                f"segment {name} already exists: another daemon uses the same instance name"
            ) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionDenied(f"cannot create segment {name}: {e}") from None
        try:
            if owner is not None and (owner[0], owner[1]) != (os.geteuid(), os.getegid()):
                # Published by another user (root) for a daemon that must be able to unlink it
                # later and whose group must read it.
                try:
                    os.fchown(shm.fd, owner[0], owner[1])
                except PermissionError:
                    raise PermissionDenied(
                        f"cannot give segment {name} to uid {owner[0]} gid {owner[1]}: publish as the "
                        "daemon's user or root"
                    ) from None
            try:
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise OutOfSpace(no_space_message(size, shm_free_bytes())) from None
                raise
        except BaseException:
            shm.close_fd()
            unlink(name)
            raise
        return cls(name, size, shm.fd)

    def write(self, offset: int, data) -> None:
        """Write all of ``data`` (any buffer) at ``offset``."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done : done + WRITE_CHUNK]], offset + done)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int) -> None:
        """Copy ``nbytes`` of file ``src_fd`` into the segment, inside the kernel."""
        done = 0
        try:
            os.lseek(self.fd, offset, os.SEEK_SET)
            while done < nbytes:
                n = os.sendfile(self.fd, src_fd, src_offset + done, min(nbytes - done, WRITE_CHUNK))
                if n == 0:
                    raise SegmentError("the source file ended early: it shrank while it was being loaded")
                done += n
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
                raise
            while done < nbytes:  # no sendfile between these files: read and write
                chunk = os.pread(src_fd, min(nbytes - done, WRITE_CHUNK), src_offset + done)
                if not chunk:
                    raise SegmentError(
                        "the source file ended early: it shrank while it was being loaded"
                    ) from None
                self.write(offset + done, chunk)
                done += len(chunk)

    def write_manifest(self, manifest_json: bytes, manifest_offset: int, uuid: str) -> None:
        if manifest_offset + len(manifest_json) > self.size:
            raise SegmentError(f"manifest does not fit in segment {self.name}")
        self.write(manifest_offset, manifest_json)
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, 0, manifest_offset, len(manifest_json), 0, bytes.fromhex(uuid)
        )
        self.write(0, header)

    def seal(self) -> None:
        """Mark the segment complete. Written last: everything before it is in place."""
        self.write(SEAL_OFFSET, struct.pack("<Q", SEALED))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        """Close and remove the name; see Note [segment lifetime after unlink]."""
        self.close()
        unlink(self.name)


class Header(NamedTuple):
    manifest_offset: int
    manifest_length: int
    sealed: bool
    uuid: str  # hex, as in the manifest


def read_header(buf) -> Header:
    """The header of a mapped segment, checking the magic, version and bounds."""
    if len(buf) < DATA_OFFSET:
        raise SegmentError(f"segment is {len(buf)} bytes, shorter than its header")
    magic, version, _, moff, mlen, seal, uuid = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise SegmentError("segment does not start with the weightd magic")
    if version != FORMAT_VERSION:
        raise SegmentError(f"segment format {version}, this weightd reads {FORMAT_VERSION}")
    if moff < DATA_OFFSET or moff + mlen > len(buf):
        raise SegmentError("segment header points outside the segment")
    return Header(moff, mlen, seal == SEALED, uuid.hex())


def inspect(name: str):
    """(manifest or None, size, sealed) of an existing segment, read without writing to it."""
    try:
        shm = posix_ipc.SharedMemory(name, read_only=True)
    except posix_ipc.ExistentialError:
        raise SegmentError(f"segment {name} does not exist") from None
    except posix_ipc.PermissionsError:
        raise PermissionDenied(f"may not read segment {name}") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size < DATA_OFFSET:
            return None, size, False
        with mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as buf:
            moff, mlen, sealed, uuid = read_header(buf)
            if not sealed:
                return None, size, False
            try:
                manifest = Manifest.from_dict(json.loads(buf[moff : moff + mlen]))
            except ValueError as e:
                raise SegmentError(f"segment {name}: manifest is not JSON ({e})") from None
            manifest.validate(DATA_OFFSET, moff)
            if manifest.uuid != uuid:
                raise SegmentError(f"segment {name}: its header and manifest disagree on what it holds")
            return manifest, size, True
    finally:
        shm.close_fd()


def list_segments(start: str, directory: str | None = None) -> list[str]:
    """Names (with leading slash) of the segments in the shared-memory directory that start
    with ``start`` (see ``prefix``)."""
    try:
        entries = os.listdir(directory or shm_dir())
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith(start))


def unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def no_space_message(size: int, free: int) -> str:
    return (
        f"/dev/shm has {_gib(free)} free, the model needs {_gib(size)}: free space there (weightd unload, "
        "or remove stale segments), or give the machine or container more shared memory "
        "(docker run --shm-size=... or --ipc=host; a bigger tmpfs on /dev/shm)"
    )

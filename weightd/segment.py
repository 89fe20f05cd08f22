"""POSIX shared-memory segments: the self-describing format, creation and opening.

Layout of a segment (all integers little-endian)::

    0      8s  magic b"WEIGHTD\\0"
    8      I   format version
    12     I   reserved (0)
    16     Q   manifest offset
    24     Q   manifest length
    32     Q   seal: 0 while being written; PUBLISHED when a publisher finished it; SEALED once
               complete and checked by the daemon (written last)
    40     16s uuid of the contents (the manifest's ``uuid``), so a client checks it in O(1)
    4096   ... storages, 64-byte aligned, large ones page aligned
    M      ... manifest (UTF-8 JSON, see weightd.manifest)

The manifest sits after the data so that storage offsets are known before it is encoded. A
segment whose seal is not set was never finished (a load that failed or was killed) and is
never served: a daemon that finds one sweeps it. A publisher (a client) cannot seal: it
marks its segment PUBLISHED, and only the daemon, once it has checked it on commit, rewrites
that to SEALED. So a publish the daemon never checked (it died before the commit) is swept
on restart, not adopted.

The shared-memory directory is writable by every user, so anything there may be planted:
``open_entry`` opens a name without following a symlink or blocking on a FIFO and refuses
anything but a regular file; the daemon adopts and ``purge`` removes only what passes.

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

import contextlib
import errno
import json
import mmap
import os
import re
import stat
import struct
from typing import NamedTuple

import posix_ipc

from weightd.errors import OutOfSpace, PermissionDenied, SegmentError
from weightd.manifest import Manifest

MAGIC = b"WEIGHTD\0"
FORMAT_VERSION = 2  # 2: the contents' uuid in the header
SEALED = 0x2121_4445_4C41_4553  # b"SEALED!!" read little-endian
PUBLISHED = 0x214E_4554_5449_5257  # b"WRITTEN!": finished by a publisher, not yet checked
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
            # The mode is exactly what was asked, whatever the umask (umask 077 would make 0600).
            os.fchmod(shm.fd, mode)
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

    def seal(self, word: int = SEALED) -> None:
        """Mark the segment complete. Written last: everything before it is in place.

        Publishers write ``PUBLISHED``; only the daemon seals (``commit_seal``)."""
        self.write(SEAL_OFFSET, struct.pack("<Q", word))

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


class Planted(SegmentError):
    """A name in the shared-memory directory that is not a segment of this user: a symlink,
    a directory, a FIFO, or a file of another user. Skipped, never followed or removed."""


def open_entry(name: str, flags: int = os.O_RDONLY, owner: int | None = None) -> int:
    """A descriptor of segment ``name``, opened without following a symlink or blocking on a
    FIFO; anything but a regular file (owned by ``owner``, when given) is ``Planted``."""
    where = path(name)
    try:
        fd = os.open(where, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"segment {name} does not exist") from None
    except PermissionError:
        with contextlib.suppress(OSError):
            uid = os.lstat(where).st_uid
            if owner is not None and uid != owner:  # another user's file, closed to us
                raise Planted(f"{where} belongs to uid {uid}, not to uid {owner}") from None
        raise PermissionDenied(f"may not open segment {where}") from None
    except OSError as e:
        kind = "a symbolic link" if e.errno == errno.ELOOP else f"not a segment ({e.strerror})"
        raise Planted(f"{where} is {kind}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "not a file"
        )
        problem = f"{where} is {kind} (owner uid {st.st_uid})"
    elif owner is not None and st.st_uid != owner:
        problem = f"{where} belongs to uid {st.st_uid}, not to uid {owner}"
    if problem is not None:
        os.close(fd)
        raise Planted(problem)
    return fd


def inspect(name: str, *, seal: int = SEALED):
    """(manifest or None, size, sealed) of an existing segment of this user, read without
    writing to it. ``seal``: the seal word that counts as finished (``PUBLISHED`` on commit).
    Raises ``Planted`` for names that are not this user's segments."""
    fd = open_entry(name, owner=os.geteuid())
    try:
        size = os.fstat(fd).st_size
        if size < DATA_OFFSET:
            return None, size, False
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as buf:
            moff, mlen, _, uuid = read_header(buf)
            if struct.unpack_from("<Q", buf, SEAL_OFFSET)[0] != seal:
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
        os.close(fd)


def commit_seal(name: str) -> None:
    """Seal a published segment the daemon has checked (see ``PUBLISHED``)."""
    fd = open_entry(name, os.O_RDWR, owner=os.geteuid())
    try:
        os.pwrite(fd, struct.pack("<Q", SEALED), SEAL_OFFSET)
    finally:
        os.close(fd)


def list_segments(start: str, directory: str | None = None) -> list[str]:
    """Names (with leading slash) of the segments in the shared-memory directory that start
    with ``start`` (see ``prefix``)."""
    try:
        entries = os.listdir(directory or shm_dir())
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith(start))


def purge(start: str, owner: int) -> tuple[list[tuple[str, int]], list[str], int]:
    """Remove the segments of uid ``owner`` whose names start with ``start``: (removed (name,
    bytes), what was skipped as planted (``Planted``), how many this user may not remove)."""
    removed, planted, denied = [], [], 0
    for name in list_segments(start):
        try:
            fd = open_entry(name, owner=owner)
        except Planted as e:
            planted.append(str(e))
            continue
        except SegmentError:
            continue  # gone meanwhile
        except PermissionDenied:
            fd = None  # not readable to us: unlinking says whether we may remove it
        size = 0
        if fd is not None:
            size = os.fstat(fd).st_size
            os.close(fd)
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            continue
        except posix_ipc.PermissionsError:
            denied += 1
            continue
        removed.append((name, size))
    return removed, planted, denied


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

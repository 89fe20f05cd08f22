"""The way into a segment, for its readers: its name, its header, and the one trusted open.

What a worker needs to map a segment the daemon described, and nothing of how one is made:
``weightd.segment`` (the format's writer, the folder as a value, leases, page sizes) imports
it and gives every name here under its own (``segment.open_entry``), so the daemon, purge and
the integrations read the same code. A fresh worker imports this module and never
``weightd.segment`` (tests/test_light.py): a third of the size, read by every process that
attaches (Note [what a fresh worker's import pays for] in weightd.manifest).

The header's layout is in weightd.segment's docstring.

Note [one way into a segment]
-----------------------------
The shared-memory directory is writable by every user, so anything there may be planted: a
symlink to another file, a FIFO that blocks whoever opens it, a directory, or a perfect copy of
a segment with other weights, owned by someone else. Every open of a segment, by the daemon
(adoption, commit, leases, page sizes, GPU copies), a client (``weightd.client.mapping``, its
GPU and Hugging Face paths), ``purge`` and every integration, goes through ``open_entry``: no
symlink followed, no blocking on a FIFO, a regular file only, of the daemon's user only, and a
typed error out (``Planted``, an ``UnsafePath``). The daemon adopts, clients map and ``purge``
removes only what passes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections import namedtuple
from typing import TYPE_CHECKING

from weightd.errors import PermissionDenied, SegmentError, UnsafePath

if TYPE_CHECKING:
    from weightd.manifest import Manifest
    from weightd.segment import Folder

MAGIC = b"WEIGHTD\0"
FORMAT_VERSION = 2  # 2: the contents' uuid in the header
SEALED = 0x2121_4445_4C41_4553  # b"SEALED!!" read little-endian
PUBLISHED = 0x214E_4554_5449_5257  # b"WRITTEN!": finished by a publisher, not yet checked
HEADER = struct.Struct("<8sIIQQQ16s")
SEAL_OFFSET = 32
SEAL = struct.Struct("<Q")  # the seal word: written by segment.write_seal, read by read_seal, nowhere else
DATA_OFFSET = 4096
HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB granule) PMD size
SMALL_PAGE = 4096
MADV_POPULATE_READ = 22  # Linux 5.14: fault pages in, read-only, without copying a private one

SHM_DIR = "/dev/shm"
ENV_SHM_DIR = "WEIGHTD_SHM_DIR"
_NAME_START = "/weightd."
# what may follow it: letters, digits, "_", ".", "-" (a set, not a regular expression: compiling
# one is a measurable part of a fresh worker's import)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def is_name(name: str) -> bool:
    """Whether ``name`` (with its leading slash) can be a weightd segment's name."""
    rest = name[len(_NAME_START) :]
    return name.startswith(_NAME_START) and bool(rest) and _NAME_CHARS.issuperset(rest)


def file_in(directory: str, name: str) -> str:
    """The file behind segment ``name`` in ``directory``: ``shm_open(name)`` is
    ``open(/dev/shm/name)``."""
    return os.path.join(directory, name.lstrip("/"))


def announced_directory(directory: str | None) -> str:
    """Where a client finds the segments the daemon says are in ``directory``:
    ``$WEIGHTD_SHM_DIR`` wins (the same folder, mounted elsewhere here)."""
    return os.environ.get(ENV_SHM_DIR) or directory or SHM_DIR


def read_seal(buf) -> int:
    """The seal word of a segment's first bytes (a mapping, or a read of its header); the one
    place it is read."""
    if len(buf) < SEAL_OFFSET + SEAL.size:
        return 0
    return SEAL.unpack_from(buf, SEAL_OFFSET)[0]


# manifest_offset, manifest_length (bytes), sealed (bool), uuid (hex, as in the manifest); a
# collections.namedtuple: Note [what a fresh worker's import pays for] in weightd.manifest
Header = namedtuple("Header", "manifest_offset manifest_length sealed uuid")


def read_header(buf) -> Header:
    """The header of a mapped segment, checking the magic, version and bounds."""
    if len(buf) < DATA_OFFSET:
        raise SegmentError(f"segment is {len(buf)} bytes, shorter than its header")
    magic, version, _, moff, mlen, _, uuid = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise SegmentError("segment does not start with the weightd magic")
    if version != FORMAT_VERSION:
        raise SegmentError(f"segment format {version}, this weightd reads {FORMAT_VERSION}")
    if moff < DATA_OFFSET or moff + mlen > len(buf):
        raise SegmentError("segment header points outside the segment")
    return Header(moff, mlen, read_seal(buf) == SEALED, uuid.hex())


class Planted(UnsafePath, SegmentError):
    """A name in the shared-memory directory that is not a segment of the expected user: a
    symlink, a directory, a FIFO, or a file of another user. Skipped, never followed, mapped
    or removed."""


def open_entry(
    folder: Folder | str,
    name: str,
    flags: int = os.O_RDONLY,
    owner: int | None = None,
    *,
    what: str = "",
) -> int:
    """A descriptor of segment ``name`` in ``folder`` (a ``segment.Folder``, or a folder's path):
    the one way into a segment, for the daemon, clients, purge and every integration (Note [one
    way into a segment]).

    Opened without following a symlink or blocking on a FIFO; anything but a regular file, or
    a file of another user than ``owner`` (the daemon's uid; None: any), is ``Planted`` (an
    ``UnsafePath``). A name that is not there is a ``SegmentError``, one this user may not
    open ``PermissionDenied``. ``what`` (" of 'bert'") goes into the messages.
    """
    if not is_name(name):
        raise Planted(f"{name!r:.80}{what} is not a weightd segment name")
    where = file_in(folder if isinstance(folder, str) else folder.path, name)
    try:
        fd = os.open(where, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(
            f"segment {where}{what} is gone (unloaded or replaced a moment ago, or this process sees "
            "another shared-memory folder than the daemon: share the host's with --ipc=host or a mount "
            f"and ${ENV_SHM_DIR})"
        ) from None
    except PermissionError:
        with contextlib.suppress(OSError):
            uid = os.lstat(where).st_uid
            if owner is not None and uid != owner:  # another user's file, closed to us
                raise Planted(_not_owner(where, what, uid, owner)) from None
        raise PermissionDenied(
            f"may not read segment {where}{what} ({_access(where)}): run as a member of the daemon's "
            "group, and have the daemon grant its group read access (--mode 640, the default)"
        ) from None
    except OSError as e:
        kind = "a symbolic link" if e.errno == errno.ELOOP else f"not a segment ({e.strerror})"
        raise Planted(f"{where}{what} is {kind}: refusing it") from None
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
        problem = f"{where}{what} is {kind} (owner uid {st.st_uid}): refusing it"
    elif owner is not None and st.st_uid != owner:
        problem = _not_owner(where, what, st.st_uid, owner)
    if problem is not None:
        os.close(fd)
        raise Planted(problem)
    return fd


def open_announced(manifest: Manifest, owner: int | None) -> int:
    """A client's descriptor of the segment a daemon described in ``manifest``: in the folder it
    announced (``announced_directory``: the manifest's ``directory``, or ``$WEIGHTD_SHM_DIR``), a
    file of uid ``owner`` (the daemon's, from the kernel), through ``open_entry``."""
    directory = announced_directory(manifest.directory)
    return open_entry(directory, manifest.segment, owner=owner, what=f" of {manifest.name!r}")


def populate(m, start: int = 0, length: int | None = None) -> bool:
    """Fault mapping ``m``'s pages in, read-only, with ``MADV_POPULATE_READ``: a private
    mapping's pages stay the shared ones (never copied, unlike ``MAP_POPULATE``). False where the
    kernel (before 5.14) or Python does not have it: the pages then come on first touch, as
    without it."""
    try:
        m.madvise(MADV_POPULATE_READ, start, len(m) - start if length is None else length)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _not_owner(where: str, what: str, uid: int, owner: int) -> str:
    # The shared-memory folder is writable by every user.
    return (
        f"{where}{what} belongs to uid {uid}, not to the daemon's user (uid {owner}): another user put it "
        "there; refusing it"
    )


def _access(where: str) -> str:
    try:
        st = os.stat(where)
    except OSError:
        return "mode unknown"
    return (
        f"mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}, group gid {st.st_gid}, "
        f"you are uid {os.geteuid()}"
    )

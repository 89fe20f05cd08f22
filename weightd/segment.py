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
    56     Q   watermark: while a load streams, every byte of the data area below it is final
               (Note [the watermark]); 0 where nobody published one
    4096   ... storages: where a checkpoint file has them modulo 4 KiB (Note [a storage where its
               file has it] in weightd.layout), others 64-byte aligned, large ones page aligned
    M      ... manifest (UTF-8 JSON, see weightd.manifest)

The manifest sits after the data so that storage offsets are known before it is encoded. A
segment whose seal is not set was never finished (a load that failed or was killed) and is
never served: a daemon that finds one sweeps it. A publisher (a client) cannot seal: it
marks its segment PUBLISHED, and only the daemon, once it has checked it on commit, rewrites
that to SEALED. So a publish the daemon never checked (it died before the commit) is swept
on restart, not adopted.

Where segments live: /dev/shm by default, where ``shm_open`` puts them; ``serve --shm-dir``
puts them in another folder (a tmpfs mounted with ``huge=always``, see Note [huge pages]).
In /dev/shm a segment is created and unlinked with POSIX ``shm_open``/``shm_unlink``
(posix_ipc); elsewhere with what those calls are on Linux, ``open(<folder>/name, O_CREAT | O_EXCL
| O_NOFOLLOW)`` and ``unlink``. Either way it is then a file: it is opened (``open_entry``,
which must not block on a planted FIFO, something ``shm_open`` cannot promise), sized,
mapped and renamed as one. The folder is a value (``Folder``), made once and passed to every
function here that touches a file: the daemon's when it starts, a client's from what the
daemon announced (``Manifest.directory``); ``$WEIGHTD_SHM_DIR`` in a client overrides it (a
container that mounts the daemon's folder elsewhere).

Note [one way into a segment] is in weightd.entry, with ``open_entry``, the header's reader and
the segment names: what a worker needs to map a segment, imported without this module.

Note [segment lifetime after unlink]
------------------------------------
``shm_unlink`` removes a segment's *name*, not its pages. Every process that has it mapped
keeps reading the same bytes until it unmaps; the kernel frees the pages when the last mapping
goes. That is what makes unloading, replacing a generation, or a daemon dying safe for
attached workers: the daemon unlinks freely and never waits for clients. The flip side: a
segment nobody unlinks outlives every process (it is a file in /dev/shm), so every path that
creates one must unlink it on failure, and a daemon sweeps what a killed predecessor left.

Note [huge pages]
-----------------
On /dev/shm a segment is 4 KiB pages, and every worker faults each of them into its own page
table on first touch (~50-90 ms per GiB per worker measured, more than a page-cache mmap of the
file, which gets large folios). On a tmpfs mounted ``huge=always`` the pages are 2 MiB and a
read fault maps a whole one with a single page-table entry (``ShmemPmdMapped``): ~7 ms per GiB,
and ``MADV_POPULATE_READ`` maps all of them in ~1 ms. The kernel maps a huge page with one entry
only where the file offset and the address agree modulo 2 MiB: tmpfs picks such an address for
every mapping (``shmem_get_unmapped_area``), and a segment's size is rounded up to 2 MiB so that
its last page is whole too. Whether huge pages were given is read back, never assumed
(``page_size``): a fragmented machine silently falls back to 4 KiB pages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import signal
import stat
from collections.abc import Callable, Iterator

# The readers' part of the format (weightd.entry), which the writer below uses too; the daemon
# and purge reach them as segment.X.
from weightd.entry import (
    DATA_OFFSET,
    ENV_SHM_DIR,
    FORMAT_VERSION,
    HEADER,
    HUGE_PAGE,
    MAGIC,
    PUBLISHED,  # noqa: F401 (not used here: the publishers, layout and peers name it segment.PUBLISHED)
    SEAL,
    SEAL_OFFSET,
    SEALED,
    SHM_DIR,
    SMALL_PAGE,
    Planted,
    announced_directory,
    file_in,
    is_name,
    open_entry,
    populate,
    read_header,
    read_seal,
)
from weightd.errors import ConfigError, OutOfSpace, PermissionDenied, SegmentError
from weightd.manifest import Manifest

WATERMARK_OFFSET = 56  # Note [the watermark]: Watermark writes it, read_watermark reads it
WRITE_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per write or sendfile call
RESERVE_STEP = 128 << 20  # reserved between two looks at a stop request (~20-60 ms here)


# --- names and where they live ---------------------------------------------------------------


class Folder:
    """A shared-memory folder: where segments are created, found and removed, and what was read
    about it (how it is mounted). Made once and passed to every function here that touches a
    segment's file: no process has a folder of its own that these would read behind its back.

    The daemon makes its folder when it starts (``Folder.probe``: ``--shm-dir``, checked, and
    whether segments there should get huge pages); a client makes one from what the daemon
    announced (``Folder.announced``: a manifest's ``directory``, a publish's reply).
    """

    __slots__ = ("path", "huge_asked")

    def __init__(self, path: str = SHM_DIR, huge_asked: str | None = None):
        self.path = path
        self.huge_asked = huge_asked  # why segments here should get huge pages, or None

    @classmethod
    def probe(cls, directory: str | None = None) -> Folder:
        """The daemon's folder: ``directory`` (``serve --shm-dir``), checked; else
        ``$WEIGHTD_SHM_DIR`` (a container that sees the host's folder elsewhere), else /dev/shm,
        which is where ``shm_open`` puts segments on Linux. Reads how it is mounted, once."""
        if directory is not None:
            directory = os.path.abspath(directory)
            if not os.path.isdir(directory):
                raise ConfigError(
                    f"--shm-dir {directory} is not a folder: create it, or mount the huge-page tmpfs there "
                    "(systemd/mnt-weightd.mount)"
                )
            if not os.access(directory, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"--shm-dir {directory} is not writable by uid {os.geteuid()}: chown it to the "
                    "daemon's user"
                )
        path = directory or os.environ.get(ENV_SHM_DIR) or SHM_DIR
        return cls(path, huge_pages_asked(path))

    @classmethod
    def announced(cls, directory: str | None, huge_asked: str | None = None) -> Folder:
        """Where a client finds the segments the daemon says are in ``directory`` (and, for a
        publisher, whether they get huge pages there): ``$WEIGHTD_SHM_DIR`` wins (the same
        folder, mounted elsewhere here)."""
        return cls(announced_directory(directory), huge_asked)

    def __repr__(self) -> str:
        return f"Folder({self.path!r}, huge_asked={self.huge_asked!r})"

    def file(self, name: str) -> str:
        """The file behind segment ``name``: ``shm_open(name)`` is ``open(/dev/shm/name)``."""
        return file_in(self.path, name)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def segments(self, start: str) -> list[str]:
        """Names (with leading slash) of the segments here that start with ``start`` (``prefix``)."""
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted("/" + e for e in entries if e.startswith(start))

    def rounded_size(self, size: int) -> int:
        """A segment's size, rounded up so its last huge page is whole where segments get huge
        pages (Note [huge pages]); elsewhere, or smaller than a huge page, as it is."""
        if size < HUGE_PAGE or self.huge_asked is None:
            return size
        return (size + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE

    def no_space_message(self, size: int) -> str:
        free = self.free_bytes()
        if self.path == SHM_DIR:
            remedy = "(docker run --shm-size=... or --ipc=host; a bigger tmpfs on /dev/shm)"
        else:
            remedy = f"(a bigger tmpfs on {self.path}: mount -o remount,size=... {self.path})"
        return (
            f"{self.path} has {_gib(free)} free, the model needs {_gib(size)}: free space there (weightd "
            f"unload, or remove stale segments), or give the machine or container more shared memory {remedy}"
        )

    def in_dev_shm(self) -> bool:
        """Whether this is /dev/shm, where segments are made and removed with ``shm_open``."""
        return os.path.realpath(self.path) == SHM_DIR


def prefix(instance: str) -> str:
    """The start of every segment name of a daemon instance (without the leading slash)."""
    return f"weightd.{instance}."


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


class Segment:
    """A segment being written: its folder, name and an open read-write file descriptor.

    Writes go through the descriptor (``pwrite``, ``sendfile``), not through a mapping: the
    kernel copies straight into the shared pages, with no page faults in the writer, which
    measured twice as fast as copying through a fresh mapping (benchmarks/publish.py).
    """

    def __init__(self, folder: Folder, name: str, size: int, fd: int):
        self.folder = folder
        self.name = name
        self.size = size
        self.fd = fd

    @classmethod
    def create(
        cls,
        folder: Folder,
        name: str,
        size: int,
        mode: int = 0o600,
        owner: tuple[int, int] | None = None,
        check: Callable[[], None] | None = None,
        reserved: bool = True,
    ) -> "Segment":
        """Create a new segment of ``size`` bytes in ``folder`` with every page reserved
        (``reserve``; a publisher passes the daemon's folder). ``check()`` may raise between
        reservation steps to stop: nothing is left then.

        ``reserved=False``: only sized; the writer reserves it before it writes (the daemon's
        readers copy while it does: Note [reserving while writing])."""
        if size > folder.free_bytes():
            raise OutOfSpace(folder.no_space_message(size))
        if not is_name(name):
            raise SegmentError(f"{name!r:.80} is not a weightd segment name")
        try:
            fd = _shm_open_new(folder, name, mode)
        except FileExistsError:
            raise SegmentError(
                f"segment {name} already exists: another daemon uses the same instance name"
            ) from None
        except PermissionError as e:
            raise PermissionDenied(f"cannot create segment {name} in {folder.path}: {e.strerror}") from None
        try:
            # The mode is exactly what was asked, whatever the umask (umask 077 would make 0600).
            os.fchmod(fd, mode)
            if owner is not None and (owner[0], owner[1]) != (os.geteuid(), os.getegid()):
                # Published by another user (root) for a daemon that must be able to unlink it
                # later and whose group must read it.
                try:
                    os.fchown(fd, owner[0], owner[1])
                except PermissionError:
                    raise PermissionDenied(
                        f"cannot give segment {name} to uid {owner[0]} gid {owner[1]}: publish as the "
                        "daemon's user or root"
                    ) from None
            if reserved:
                reserve(fd, size, folder, check)
            else:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            unlink(folder, name)
            raise
        return cls(folder, name, size, fd)

    @classmethod
    def reopen(
        cls,
        folder: Folder,
        name: str,
        size: int,
        owner: int,
        check: Callable[[], None] | None = None,
    ) -> "Segment":
        """Open an existing, unsealed segment of uid ``owner`` to write it again (a publish into
        pages the daemon handed back: Note [reusing a segment's pages] in weightd.daemon.store)."""
        fd = open_entry(folder, name, os.O_RDWR, owner=owner)
        try:
            if read_seal(os.pread(fd, SEAL_OFFSET + SEAL.size, 0)) != 0:
                raise SegmentError(f"segment {name} is sealed: a served segment is never written again")
            reserve(fd, size, folder, check)
        except BaseException:
            os.close(fd)
            raise
        return cls(folder, name, size, fd)

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
        self.write(0, header + SEAL.pack(0))  # no watermark yet (a reused segment's old one gone)

    def seal(self, word: int = SEALED) -> None:
        """Mark the segment complete. Written last: everything before it is in place.

        Publishers write ``PUBLISHED``; only the daemon seals (``commit_seal``)."""
        write_seal(self.fd, word)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self, *, wait: bool = True) -> None:
        """Close and remove the name; see Note [segment lifetime after unlink].

        ``wait=False`` (a load stopped or failed half-way): the kernel frees the pages in a
        throwaway child process, not in this one: Note [freeing a segment's pages]."""
        unlink(self.folder, self.name)
        child = _free_elsewhere(self.fd) if not wait and self.fd >= 0 else None
        self.close()
        if child is not None:
            child.stdin.close()  # now the child's descriptor is the last one


# Note [freeing a segment's pages]
# --------------------------------
# The last close of an unlinked tmpfs file frees its pages in the closing process: 3.8 s for
# 3 GiB measured on this VM (its hypervisor takes freed pages back). A stop must not wait for
# that (SIGTERM, ``--timeout``, unload of a loading model: <= 0.3 s), and neither must the
# daemon's exit. So a half-written segment's descriptor is handed to a child (``cat``, holding
# it while its stdin is open), this process closes its own, then the child's stdin: the child
# makes the last close, exits, and frees the pages on its own time. The name is gone first.
_freeing: list = []  # children freeing pages (reaped on the next call)


def _free_elsewhere(fd: int):
    """A child holding ``fd`` until its stdin is closed, or None (then this process frees)."""
    import subprocess

    _freeing[:] = [p for p in _freeing if p.poll() is None]
    try:
        child = subprocess.Popen(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=[fd], start_new_session=True
        )
    except OSError:
        return None
    _freeing.append(child)
    return child


def reserve(fd: int, size: int, folder: Folder, check: Callable[[], None] | None = None) -> None:
    """Make the file exactly ``size`` bytes with every page reserved.

    ``posix_fallocate`` makes tmpfs reserve the pages now, so a full /dev/shm is an error here,
    at load time, instead of a SIGBUS in whichever process first touches a page that cannot be
    backed. Pages the file already has are kept (a reused segment), past ``size`` freed.

    In steps (``reservation``), calling ``check()`` (which raises to stop) before each: one
    ``posix_fallocate`` cannot be interrupted (~0.6 s for 3 GiB measured, ~27 s for 140 GB), and a
    stop must not wait for it.
    """
    for _ in reservation(fd, size, folder):
        if check is not None:
            check()


def reservation(fd: int, size: int, folder: Folder, start: int = 0) -> Iterator[int]:
    """``reserve`` step by step: sizes the file (a segment in ``folder``), then reserves
    ``RESERVE_STEP`` bytes at a time from ``start`` (what is before it is reserved already),
    yielding the offset reserved up to after each step (Note [reserving while writing])."""
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        for step in range(start, size, RESERVE_STEP):
            end = min(step + RESERVE_STEP, size)
            os.posix_fallocate(fd, step, end - step)
            yield end
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise OutOfSpace(folder.no_space_message(size)) from None
        raise


# Note [reserving while writing]
# ------------------------------
# ``posix_fallocate`` of a whole segment is one thread allocating every page (~1-3 GB/s measured
# on this busy VM, where a new page also costs the hypervisor a fault: as slow as the copy). Pages
# allocated by the writes themselves measured slower still (1.06-1.26 s against 0.67-0.98 s for
# 1 GiB, fallocate first). So the daemon reserves step by step (``reservation``) while its
# readers copy into what is reserved already: the two overlap, and a load costs about the larger
# of them rather than their sum. A full tmpfs is ENOSPC from a step (``OutOfSpace``), before the
# seal: what is sealed is wholly backed, and no worker ever meets a SIGBUS.


def clear_seal(folder: Folder, name: str, owner: int) -> None:
    """Unseal a segment the daemon is about to hand out for rewriting: never served again, and
    swept (not adopted) if the daemon dies before the publisher seals it."""
    fd = open_entry(folder, name, os.O_RDWR, owner=owner)
    try:
        write_seal(fd, 0)
    finally:
        os.close(fd)


F_SETSIG = getattr(fcntl, "F_SETSIG", 10)


def in_use(folder: Folder, name: str) -> bool:
    """Whether any process anywhere (any user, any PID namespace) has segment ``name`` open or
    mapped; True too where the kernel will not say.

    The kernel grants a write lease only on a file nobody else has open, and a mapping holds
    its file open until the last page of it is unmapped, whether or not the process closed
    its descriptor: so a granted lease proves that no process maps the segment. It is given
    back at once; its break signal is SIGURG (ignored by default), never the default SIGIO,
    which would end the daemon if a process opened the file in between.
    """
    try:
        fd = open_entry(folder, name, owner=os.geteuid())
    except SegmentError:
        return True
    try:
        fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError:  # EAGAIN: open or mapped somewhere; EINVAL etc.: leases off (fs.leases-enable)
        return True
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
    return False


def rename(folder: Folder, old: str, new: str) -> None:
    """Give segment ``old`` the name ``new`` (same folder): opens by the old name fail from now on."""
    if not (is_name(old) and is_name(new)):
        raise SegmentError(f"bad segment names {old!r:.80} -> {new!r:.80}")
    os.rename(folder.file(old), folder.file(new))


def write_seal(fd: int, word: int) -> None:
    """Set segment ``fd``'s seal word: 0 (being written), ``PUBLISHED`` or ``SEALED``; everything
    before it is in place when it is written. The one place the word is written."""
    os.pwrite(fd, SEAL.pack(word), SEAL_OFFSET)


# Note [the watermark]
# --------------------
# A load knows its segment's layout before any byte is read (the checkpoint's header says where
# every storage goes), so ``layout.write`` writes the header and the manifest first, unsealed,
# and the data after. While the daemon's readers stream the data in, ``Watermark`` publishes in
# the header how far the data area is written *contiguously* from ``DATA_OFFSET``: the readers
# finish chunks out of order, and only a prefix with no hole counts. It only grows, and every
# byte below it is final (a load never writes a byte twice; the padding between storages is
# never written and reads as zeros). That lets another node copy a model while it is still
# being read from storage (ray_zerocopy.peers, Note [a copy that starts before the seal]).
# The seal still says "complete and checked": a segment is served only sealed, and a copy of
# one is sealed only once its source was.
#
# The word in the header is a hint, not a promise, to a process that reads it through its own
# mapping. It is a plain store (``pwrite``) after the data's stores, read with a plain load
# before the data's loads. x86 keeps stores in order and loads in order, so there a reader that
# sees the word also sees the bytes below it; ARM and POWER reorder both (stores by the writer,
# and loads by the reader, which may read the data before the word), and Python has no
# release store or acquire load to pair. So a reader trusts only the daemon's answer
# (``loading`` gives ``mark``, ``Watermark.final``): each writer thread takes the Watermark's
# lock after its chunk is in, the request thread reads the mark under that lock, and the answer
# crosses ZeroMQ's queues and a socket, every hop a lock or an atomic with release/acquire
# order. What was written before the mark happens-before the reader's loads, on any CPU. The
# reader polls the mapped word (cheap) and asks the daemon once it covers what it needs: one
# round trip per chunk (ray_zerocopy.peers, ``_Mapped.wait``). A sealed segment is trusted the
# same way: its reader learned of the seal from the daemon (the model served), never from the
# mapped seal word alone.


class Watermark:
    """Publishes in segment ``fd``'s header how far its data area is written contiguously
    (Note [the watermark]), as writers report what they wrote (``written``, from any thread).

    ``pieces``: ``(offset, nbytes)`` of everything that will be written; the gaps between them
    (alignment padding) are never written and count as done."""

    def __init__(self, fd: int, pieces: list[tuple[int, int]]):
        import threading  # only a loading daemon needs it

        self._fd = fd
        self._lock = threading.Lock()
        self._pieces = sorted((o, o + n) for o, n in pieces if n > 0)
        self._next = 0  # the first piece not wholly below the mark
        self._done: dict[int, int] = {}  # start -> end of what was written above the mark
        self.mark = DATA_OFFSET
        with self._lock:
            self._advance()

    def final(self) -> int:
        """The mark, read under the lock every writer took after its bytes were in: what a
        reader in another process may trust once told (Note [the watermark])."""
        with self._lock:
            return self.mark

    def written(self, offset: int, nbytes: int) -> None:
        """``nbytes`` at ``offset`` are in the segment (a whole piece, or a chunk of one that
        starts where the piece or an earlier chunk of it ends)."""
        with self._lock:
            self._done[offset] = offset + nbytes
            self._advance()

    def _advance(self) -> None:
        mark = self.mark
        while self._next < len(self._pieces):
            start, end = self._pieces[self._next]
            mark = max(mark, start)  # the padding before a piece: never written
            if mark >= end:
                self._next += 1
                continue
            reached = self._done.pop(mark, None)
            if reached is None:
                break
            mark = reached
        if mark != self.mark:
            self.mark = mark
            # under the lock: the word only grows, whichever thread writes it
            os.pwrite(self._fd, SEAL.pack(mark), WATERMARK_OFFSET)


def read_watermark(buf) -> int:
    """How far a segment's data area is final while it is written (Note [the watermark])."""
    if len(buf) < WATERMARK_OFFSET + SEAL.size:
        return 0
    return SEAL.unpack_from(buf, WATERMARK_OFFSET)[0]


def inspect(folder: Folder, name: str, *, seal: int = SEALED):
    """(manifest or None, size, sealed) of an existing segment of this user, read without
    writing to it. ``seal``: the seal word that counts as finished (``PUBLISHED`` on commit).
    Raises ``Planted`` for names that are not this user's segments."""
    fd = open_entry(folder, name, owner=os.geteuid())
    try:
        size = os.fstat(fd).st_size
        if size < DATA_OFFSET:
            return None, size, False
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as buf:
            moff, mlen, _, uuid = read_header(buf)
            if read_seal(buf) != seal:
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


def set_access(folder: Folder, name: str, mode: int, gid: int) -> bool:
    """Give this user's segment ``name`` exactly ``mode`` and group ``gid`` (an adopted one gets
    what the new daemon was told, not what its predecessor was); True if anything changed."""
    fd = open_entry(folder, name, owner=os.geteuid())
    try:
        st = os.fstat(fd)
        changed = False
        if st.st_gid != gid:
            try:
                os.fchown(fd, -1, gid)
            except PermissionError:
                raise PermissionDenied(
                    f"cannot give segment {name} to gid {gid}: the daemon's user must be in that group"
                ) from None
            changed = True
        if stat.S_IMODE(st.st_mode) != mode or changed:  # chown may clear bits: set the mode after
            os.fchmod(fd, mode)
            changed = True
        return changed
    finally:
        os.close(fd)


def commit_seal(folder: Folder, name: str) -> None:
    """Seal a published segment the daemon has checked (see ``PUBLISHED``)."""
    fd = open_entry(folder, name, os.O_RDWR, owner=os.geteuid())
    try:
        write_seal(fd, SEALED)
    finally:
        os.close(fd)


def purge(folder: Folder, start: str, owner: int) -> tuple[list[tuple[str, int]], list[str], int]:
    """Remove the segments in ``folder`` of uid ``owner`` whose names start with ``start``:
    (removed (name, bytes), what was skipped as planted (``Planted``), how many this user may
    not remove)."""
    removed, planted, denied = [], [], 0
    for name in folder.segments(start):
        try:
            fd = open_entry(folder, name, owner=owner)
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
            os.unlink(folder.file(name))
        except FileNotFoundError:
            continue
        except PermissionError:
            denied += 1
            continue
        removed.append((name, size))
    return removed, planted, denied


def _shm_open_new(folder: Folder, name: str, mode: int) -> int:
    """A new, empty segment's descriptor (O_EXCL never follows a link)."""
    if folder.in_dev_shm():
        import posix_ipc  # here: a client that only maps segments never needs it (~0.4 ms)

        try:
            shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=mode)
        except posix_ipc.ExistentialError:
            raise FileExistsError(name) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(errno.EACCES, str(e)) from None
        fd = os.dup(shm.fd)  # ours, close-on-exec (dup's default); the object's is closed now
        shm.close_fd()
        return fd
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(folder.file(name), flags, mode)


def unlink(folder: Folder, name: str) -> None:
    """Remove segment ``name`` from ``folder`` (gone already: nothing to do); Note [segment
    lifetime after unlink]."""
    if not is_name(name):
        return
    if folder.in_dev_shm():
        import posix_ipc

        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
        except posix_ipc.PermissionsError:  # not an OSError: another user's file under our name
            raise PermissionDenied(f"may not remove {folder.file(name)}: it is not ours") from None
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder.file(name))


# --- page sizes (Note [huge pages]) ----------------------------------------------------------


def page_size(folder: Folder, name: str) -> int:
    """The page size segment ``name``'s memory got, read back from the kernel: map its first
    huge pages here, fault them in and read this process's ``smaps`` for that mapping
    (``ShmemPmdMapped``, or ``FilePmdMapped`` on a disk file system). 2 MiB or 4 KiB."""
    fd = open_entry(folder, name, owner=os.geteuid())
    try:
        size = os.fstat(fd).st_size
        if size < HUGE_PAGE:
            return SMALL_PAGE
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            probe = min(size // HUGE_PAGE, 2) * HUGE_PAGE
            if not populate(m, 0, probe):
                for i in range(0, probe, SMALL_PAGE):
                    m[i]
            pmd = _smaps_pmd(folder.file(name))
    finally:
        os.close(fd)
    return HUGE_PAGE if pmd > 0 else SMALL_PAGE


def _smaps_pmd(needle: str) -> int:
    """Bytes of this process's mappings of ``needle`` mapped by huge-page (PMD) entries."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                inside = line.rstrip().endswith(needle)
            elif inside and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
                total += int(line.split()[1]) * 1024
    return total


def probe_pages(folder: Folder, instance: str) -> int:
    """The page size a new segment in ``folder`` gets now: a scratch one of two huge pages,
    created, read back (``page_size``) and removed."""
    # A fresh random name (O_EXCL): never one another user could have planted beforehand.
    name = f"/{prefix(instance)}probe-{os.getpid()}-{os.urandom(4).hex()}"
    seg = Segment.create(folder, name, 2 * HUGE_PAGE)
    try:
        seg.close()
        return page_size(folder, name)
    finally:
        seg.destroy()


def huge_page_warning(directory: str, why: str) -> str:
    """What to say when huge pages were asked for (``why``) but segments got 4 KiB pages."""
    return (
        f"segments in {directory} got 4 KiB pages although {why}: workers pay ~10x more per first "
        "touch. The kernel found no free 2 MiB blocks (memory fragmented) or has transparent huge "
        "pages off: check /sys/kernel/mm/transparent_hugepage/shmem_enabled is not 'deny', free "
        "memory, run `echo 1 > /proc/sys/vm/compact_memory`, then reload the models; a tmpfs needs "
        "huge=always (systemd/mnt-weightd.mount)"
    )


def huge_pages_asked(directory: str) -> str | None:
    """Why segments in ``directory`` should get huge pages (a tmpfs mounted ``huge=...``, or
    shmem forced system-wide), or None where nobody asked for them (``Folder.probe``)."""
    directory = os.path.realpath(directory)
    best, options = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mount_point = fields[4].replace("\\040", " ")
                inside = directory == mount_point or directory.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, options = mount_point, line.split(" - ", 1)[-1]
    except OSError:
        return None
    huge = re.search(r"\bhuge=(\w+)", options)
    if huge and huge.group(1) in ("always", "within_size"):
        return f"{best} is mounted huge={huge.group(1)}"
    if huge and huge.group(1) == "advise":
        # Only mappings that madvise(MADV_HUGEPAGE) get them; segments are written with pwrite.
        return f"{best} is mounted huge=advise, which weightd's writes never ask for (mount it huge=always)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            if "[force]" in f.read():
                return "shmem_enabled is force"
    except OSError:
        pass
    return None

"""The files a load reads: opened once, checked on the descriptor, remembered by identity.

Both readers (``checkpoint`` for plain checkpoint files, ``hf`` for Hugging Face folders) use
these, and import nothing of each other through here (the layers contract in pyproject.toml).

Note [a file is checked on its descriptor]: a path checked and then opened again can name
another file by then (a symlink swapped in between, ``renameat2(RENAME_EXCHANGE)``). So every
file is opened once, and what is checked is the open descriptor: its type (``fstat``), its
real path (``/proc/self/fd/N``, where the kernel says what was opened), the file system it is
on (never ``/proc`` or ``/sys``, whose files say size 0 and are the daemon's own secrets), and
its size. Every byte the daemon serves, copies or hands to transformers is then read through
that descriptor (or ``/proc/self/fd/N``, the same open file).

Daemon-only.
"""

from __future__ import annotations

import os
import stat

from weightd.errors import CheckpointError, PermissionDenied

# File systems whose files are the kernel's or a process's, never a model's: a /proc file
# reports size 0 and reads the daemon's environment or memory map.
PSEUDO_ROOTS = ("/proc", "/sys")


def identity(path: str | os.PathLike, fd: int | None = None) -> dict:
    """What identifies a file's contents without reading them: resolved path, size, mtime_ns,
    ctime_ns, inode and device (of the open ``fd`` when given: the file actually read).

    ctime is in because mtime is not enough: ``touch -r`` sets a rewritten file's mtime back,
    but no user can set ctime, which every write, chmod or rename moves.
    """
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
        real = fd_path(fd) if fd is not None else os.path.realpath(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot stat it ({e.strerror})") from None
    return {"path": real, **_stamp(st)}


def _stamp(st: os.stat_result) -> dict:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


def same(entry: dict, st: os.stat_result) -> bool:
    """Whether ``st`` is the file ``entry`` (an ``identity``) recorded, contents unchanged."""
    want = {k: entry.get(k) for k in ("size", "mtime_ns", "ctime_ns", "ino", "dev")}
    return _stamp(st) == want


def unchanged(files: list[dict]) -> bool:
    """Whether every file recorded by ``identity`` is still the same (same inode, device,
    size, mtime and ctime): then its contents are taken to be what was loaded from it. A file
    rewritten in place changes its ctime (whatever its mtime says); one replaced (an atomic
    rename) changes its inode."""
    if not files:
        return False
    for f in files:
        try:
            st = os.stat(f["path"])
        except (OSError, KeyError, TypeError):
            return False
        if not same(f, st):
            return False
    return True


def fd_path(fd: int) -> str:
    """The real path of the file open as ``fd``, as the kernel knows it."""
    return os.readlink(f"/proc/self/fd/{fd}")


def real_path(path: str | os.PathLike) -> str:
    """``path`` with symlinks and ``..`` resolved; a path being changed meanwhile is refused."""
    try:
        return os.path.realpath(path)
    except OSError as e:  # a symlink turned into something else between lstat and readlink
        raise PermissionDenied(
            f"{path} changed while it was being resolved ({e.strerror}): try again"
        ) from None


def inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def folder_roots(real: str) -> list[str]:
    """Where the links of the folder at ``real`` (a resolved path) may lead: the folder itself,
    and for a Hub cache snapshot (``models--org--name/snapshots/<rev>``) the repository folder,
    whose ``blobs/`` the snapshot's files link into."""
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        repo = os.path.dirname(parent)
        if os.path.isdir(os.path.join(repo, "blobs")):
            return [real, repo]
    return [real]


def check_within(path: str | os.PathLike, roots: list[str], real: str | None = None) -> str:
    """``path`` with symlinks and ``..`` resolved (or ``real``, where it was found to be), if
    that lies inside one of ``roots``."""
    real = real_path(path) if real is None else real
    for root in roots:
        if inside(real, os.path.realpath(root)):
            return real
    raise PermissionDenied(
        f"{path} resolves to {real}, outside the folders this daemon loads from ({', '.join(roots)}): "
        "move the checkpoint there, or start the daemon with another --model-dir"
    )


def check_fd(
    fd: int,
    shown: str | os.PathLike,
    *,
    within: list[str] | None = None,
    inside_of: list[str] | None = None,
    max_size: int | None = None,
) -> os.stat_result:
    """Check the file open as ``fd`` (Note [a file is checked on its descriptor]) and return its
    ``fstat``: a regular file, not on /proc or /sys, inside ``within`` (--model-dir) and inside
    one of ``inside_of`` (the folder being loaded: a link out of it is refused, naming it), and
    no larger than ``max_size``. ``shown`` is the name the error messages give it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{shown}: not a regular file: a checkpoint is a file or a folder of them")
    real = fd_path(fd)
    if any(inside(real, p) for p in PSEUDO_ROOTS) or st.st_dev in _pseudo_devices():
        raise CheckpointError(
            f"{shown} is {real}, a file of the kernel, not a model's: weightd never reads /proc or /sys"
        )
    if within is not None:
        check_within(shown, within, real=real)
    if inside_of is not None and not any(inside(real, os.path.realpath(r)) for r in inside_of):
        raise CheckpointError(
            f"{shown} is a link to {real}, outside the folder being loaded "
            f"({', '.join(inside_of)}): weightd serves only what is inside the folder; copy the file "
            "in, or remove the link"
        )
    if max_size is not None and st.st_size > max_size:
        raise CheckpointError(
            f"{shown}: {st.st_size} bytes, more than the {max_size} bytes weightd reads for such a file"
        )
    return st


def open_fd(
    path: str | os.PathLike,
    *,
    dir_fd: int | None = None,
    shown: str | os.PathLike | None = None,
    within: list[str] | None = None,
    inside_of: list[str] | None = None,
    max_size: int | None = None,
) -> int:
    """Open ``path`` (relative to ``dir_fd`` when given) once and check the descriptor
    (``check_fd``); returns the descriptor, blocking, close-on-exec.

    Never blocks on the open: a FIFO named like a checkpoint is refused, not waited on.
    """
    shown = path if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot open ({e.strerror})") from None
    try:
        check_fd(fd, shown, within=within, inside_of=inside_of, max_size=max_size)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(path: str | os.PathLike, within: list[str] | None = None):
    """Open a checkpoint file once, for reading from that descriptor only (``open_fd``), as a
    binary file object. With ``within`` the check is of the file actually opened: a symlink or
    folder swapped in between a check and the open cannot make the daemon read a file outside
    ``--model-dir``."""
    return os.fdopen(open_fd(path, within=within), "rb")


def read_fd(fd: int, shown: str | os.PathLike, limit: int) -> bytes:
    """All of the file open as ``fd``, from its start, refusing more than ``limit`` bytes."""
    chunks, n = [], 0
    while True:
        chunk = os.pread(fd, min(1 << 20, limit + 1 - n), n)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        n += len(chunk)
        if n > limit:
            raise CheckpointError(f"{shown}: more than the {limit} bytes weightd reads for such a file")


_PSEUDO: set[int] | None = None


def _pseudo_devices() -> set[int]:
    global _PSEUDO
    if _PSEUDO is None:
        found = set()
        for p in PSEUDO_ROOTS:
            try:
                found.add(os.stat(p).st_dev)
            except OSError:
                pass
        _PSEUDO = found
    return _PSEUDO

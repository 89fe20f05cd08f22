"""Trust on a shared host: directories and files another local user cannot have planted.

Root and the daemon's own user are trusted; every other local user may be hostile. A socket is
only as trustworthy as its directory: whoever can create entries there can bind a socket of
their own where clients look, or put a symlink where the daemon writes its lock file. So the
daemon (before it binds) and every client (before it connects) check the socket's directory,
the way OpenSSH checks a path (``safe_path``) and tmux its socket directory:

- every directory from ``/`` down (symlinks resolved) is a real directory owned by root, by
  this process's user, or by a user its parent vouches for: a parent nobody but its own owner
  can write, so only that owner or root can have made the entry (``/run`` -> ``/run/weightd``,
  which systemd makes for the ``weightd`` user);
- no directory on the way can be written by group or others, except sticky ones (``/tmp``),
  where others can add entries but not rename or remove ours;
- the socket's own directory can be written by its owner only, sticky or not: in ``/tmp`` any
  user could bind ``/tmp/weightd.sock`` first.

The socket is then used by its resolved path, so no symlink is followed after the check.
"""

from __future__ import annotations

import os
import stat

from weightd.errors import ConfigError, PermissionDenied, UnsafePath

WRITE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the final NUL


def who(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def socket_path(path: str) -> str:
    """``path`` with its directory's symlinks resolved, once that directory passes the check."""
    directory = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(directory)
    check_directory(real, shown=directory)
    return os.path.join(real, os.path.basename(path))


def check_length(path: str) -> None:
    """An ``ipc://`` path must fit in a Unix socket address; say so before anything is made."""
    n = len(os.fsencode(path))
    if n > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {path} is {n} bytes long; a Unix socket's path may have at most {MAX_SOCKET_PATH}: "
            "pass a shorter --socket (or $WEIGHTD_SOCKET)"
        )


def check_directory(real: str, shown: str | None = None) -> None:
    """Raise ``UnsafePath`` unless only trusted users can create or replace entries in ``real``
    (a path without symlinks; ``shown`` is the name the user gave it)."""
    me = os.geteuid()
    parts = [p for p in real.split("/") if p]
    vouched = False  # the parent can be written by its (trusted) owner only
    for i in range(len(parts) + 1):
        path = "/" + "/".join(parts[:i])
        try:
            st = os.lstat(path)
        except PermissionError:
            raise PermissionDenied(
                f"may not reach {shown or real}: {path} is closed to uid {me}; run as a member of the "
                "daemon's group, or use a socket in a directory you can reach"
            ) from None
        last = i == len(parts)
        name = path if not last or not shown or shown == real else f"{path} (for {shown})"
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{name} is not a directory: use a socket in a directory that is yours")
        if st.st_uid not in (me, 0) and not vouched:
            raise UnsafePath(
                f"{name} belongs to {who(st.st_uid)}, in a directory others may write: anyone can "
                f"make it first to catch the daemon's clients. Have {who(st.st_uid)} or root remove it, or "
                "use a socket in a directory that is yours (--socket, $WEIGHTD_SOCKET or $XDG_RUNTIME_DIR)"
            )
        others = st.st_mode & WRITE_BY_OTHERS
        if others and (last or not st.st_mode & stat.S_ISVTX):
            by = "every user" if others & stat.S_IWOTH else "its group"
            raise UnsafePath(
                f"{name} (owner {who(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):o}) may be written by {by}, "
                f"who could put their own socket there: `chmod go-w {path}`, or use a socket in a directory "
                "only its owner writes"
            )
        vouched = not others

"""A one-file FUSE file system that fails reads at a chosen byte: a real I/O error, for tests.

    python tests/fusefs.py MOUNTPOINT BACKING NAME BAD_OFFSET

mounts a FUSE file system on MOUNTPOINT holding one read-only file, NAME, whose bytes are
BACKING's, except that every read covering byte BAD_OFFSET, where it is one of the file's, fails
with EIO (what a disk with a bad sector, or a network file system losing its server, returns). It
prints ``ready`` once mounted and serves until it is unmounted (``umount -l MOUNTPOINT``) or killed.

It speaks the kernel's FUSE protocol on /dev/fuse itself (no libfuse, no package: nothing to
install in CI), and only the few requests a reader of one file sends; the others are answered
ENOSYS, which the kernel takes as "not implemented" and stops asking. Files are opened with
FOPEN_DIRECT_IO: every read reaches this process (no page cache), so the error comes exactly
where asked, whatever the reader's chunking. Needs root (mount) and /dev/fuse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys

# opcodes (include/uapi/linux/fuse.h)
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH = 1, 2, 3, 14, 15, 17, 18, 25
INIT, OPENDIR, READDIR, RELEASEDIR, DESTROY, BATCH_FORGET = 26, 27, 28, 29, 38, 42
NO_REPLY = {FORGET, BATCH_FORGET}

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
ATTR = struct.Struct(
    "<QQQQQQIIIIIIIIII"
)  # ino size blocks a/m/ctime, nsecs, mode nlink uid gid rdev blksize flags
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (the rest unused)
FOPEN_DIRECT_IO = 1
ROOT, FILE = 1, 2
MAX_WRITE = 1 << 20


def _attr(ino: int, size: int, mode: int) -> bytes:
    return ATTR.pack(ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


class Server:
    def __init__(self, fd: int, backing: str, name: str, bad: int):
        self.fd = fd
        self.backing = os.open(backing, os.O_RDONLY)
        self.size = os.fstat(self.backing).st_size
        self.name = name.encode()
        self.bad = bad

    def serve(self) -> None:
        while True:
            try:
                req = os.read(self.fd, MAX_WRITE + 4096)
            except OSError as e:
                if e.errno == errno.ENOENT:  # a request interrupted before it was read
                    continue
                if e.errno in (errno.ENODEV, errno.EBADF):  # unmounted
                    return
                raise
            n, opcode, unique, node, *_ = IN_HEADER.unpack_from(req)
            body = req[IN_HEADER.size : n]
            if opcode in NO_REPLY:
                continue
            if opcode == DESTROY:
                self.reply(unique, b"")
                return
            error, out = self.handle(opcode, node, body)
            self.reply(unique, out, error)

    def reply(self, unique: int, out: bytes, error: int = 0) -> None:
        data = b"" if error else out
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(data), -error, unique) + data)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the request was interrupted meanwhile: nobody waits
                raise

    def entry(self, ino: int) -> bytes:
        # nodeid, generation, entry_valid, attr_valid, their nsecs, then the attributes
        return struct.pack("<QQQQII", ino, 0, 1, 1, 0, 0) + self.attributes(ino)

    def attributes(self, ino: int) -> bytes:
        if ino == ROOT:
            return _attr(ROOT, 0, stat.S_IFDIR | 0o755)
        return _attr(FILE, self.size, stat.S_IFREG | 0o444)

    def handle(self, opcode: int, node: int, body: bytes) -> tuple[int, bytes]:
        if opcode == INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            # major, minor, max_readahead, flags, max_background, congestion_threshold,
            # max_write, time_gran, max_pages, map_alignment, flags2, then reserved space
            out = struct.pack(
                "<IIIIHHIIHHI", 7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1, 256, 0, 0
            )
            return 0, out + bytes(64 - len(out))
        if opcode == LOOKUP:
            if node == ROOT and body.rstrip(b"\0") == self.name:
                return 0, self.entry(FILE)
            return errno.ENOENT, b""
        if opcode == GETATTR:
            return 0, struct.pack("<QII", 1, 0, 0) + self.attributes(node)
        if opcode in (OPEN, OPENDIR):
            return 0, struct.pack("<QIi", 0, FOPEN_DIRECT_IO if opcode == OPEN else 0, 0)
        if opcode == READ:
            _fh, offset, size, _ = READ_IN.unpack_from(body)
            # Only the file's own bytes can be bad: a read asked past the end (the kernel asks
            # whole pages, e.g. for sendfile) gets what there is, as from any file system.
            if offset <= self.bad < min(offset + size, self.size):
                return errno.EIO, b""
            return 0, os.pread(self.backing, size, offset)
        if opcode == READDIR:
            return 0, b""  # an empty listing: the test names its file
        if opcode in (RELEASE, RELEASEDIR, FLUSH):
            return 0, b""
        if opcode == STATFS:
            return 0, struct.pack("<QQQQQIIII", 0, 0, 0, 0, 0, 4096, 255, 4096, 0) + bytes(24)
        return errno.ENOSYS, b""


def mount(mountpoint: str) -> int:
    """/dev/fuse opened and mounted on ``mountpoint``; its descriptor."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},allow_other"
    MS_NOSUID, MS_NODEV = 2, 4
    if libc.mount(
        b"weightd-eio", mountpoint.encode(), b"fuse.weightd-eio", MS_NOSUID | MS_NODEV, options.encode()
    ):
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount -t fuse on {mountpoint}: {os.strerror(e)}")
    return fd


def main() -> None:
    mountpoint, backing, name, bad = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    fd = mount(mountpoint)
    server = Server(fd, backing, name, bad)
    print("ready", flush=True)
    server.serve()


if __name__ == "__main__":
    main()

"""Per-process memory accounting from /proc/PID/smaps_rollup: the proof that pages are shared.

``Pss`` charges each resident page to the processes mapping it in equal shares, so summing
Pss over processes counts every page once; ``Pss_Shmem`` is the part of it that lies in
shared memory (our segments). Shared by the daemon (stats), the demo and the benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    rss: int
    pss: int
    pss_shmem: int
    # Note [memory mapped by one process is not private]
    # Private_Clean + Private_Dirty: bytes no other process maps at the moment. Of a segment's
    # mapping that is not "private memory": the clean part is shared memory that one process
    # happens to map alone (a second one attaching shares it); only the dirty part, pages it
    # wrote (copy-on-write: anonymous pages in the mapping) is its own. Private_Dirty does not
    # tell them apart: tmpfs pages are always dirty.
    private: int
    anonymous: int = 0  # of one segment's mapping (mapping_usage): the pages it copied on write
    huge: int = 0  # of rss, mapped by huge-page entries (ShmemPmdMapped + FilePmdMapped)

    @property
    def pss_private(self) -> int:
        """Pss that is not shared memory: the process's own heap, code and private copies."""
        return self.pss - self.pss_shmem


def usage(pid: int | None = None) -> Usage:
    """Memory of one process, in bytes (``pid`` defaults to this process)."""
    fields = {}
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return Usage(
        rss=fields.get("Rss", 0),
        pss=fields.get("Pss", 0),
        pss_shmem=fields.get("Pss_Shmem", 0),
        private=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    )


def mapping_usage(pid: int, needle: str) -> Usage | None:
    """Memory of the mappings of ``pid`` whose path contains ``needle`` (one segment), or None.

    ``anonymous`` here is what the process copied on write (pages of weights it wrote into);
    the rest of ``private`` is segment pages no other process maps right now.
    """
    total = {
        "Rss": 0,
        "Pss": 0,
        "Pss_Shmem": 0,
        "Private_Clean": 0,
        "Private_Dirty": 0,
        "Anonymous": 0,
        "ShmemPmdMapped": 0,
        "FilePmdMapped": 0,
    }
    found = inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):  # a new mapping's header line
                    inside = needle in line
                    found |= inside
                elif inside:
                    key, _, rest = line.partition(":")
                    if key in total:
                        total[key] += int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not found:
        return None
    return Usage(
        rss=total["Rss"],
        pss=total["Pss"],
        pss_shmem=total["Pss_Shmem"] or total["Pss"],
        private=total["Private_Clean"] + total["Private_Dirty"],
        anonymous=total["Anonymous"],
        huge=total["ShmemPmdMapped"] + total["FilePmdMapped"],
    )


def shm_used(directory: str = "/dev/shm") -> int:
    """Bytes in use on the shared-memory filesystem."""
    st = os.statvfs(directory)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shm_usage(directory: str = "/dev/shm") -> dict:
    st = os.statvfs(directory)
    return {
        "size": st.f_blocks * st.f_frsize,
        "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
    }

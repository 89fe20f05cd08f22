"""The reaper: frees what nobody needs any more, off the request loop (the server's
``weightd-reap`` thread, every ``REAP_SECONDS``; freeing an unmapped segment takes the kernel
~80 ms per GiB inside unlink).

Retired generations no live process maps are unlinked (Note [segment lifetime after unlink]),
abandoned publishes removed, models whose segment someone deleted dropped. Every table is read
and changed under the store's lock; files are unlinked outside it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from weightd import segment

if TYPE_CHECKING:
    from weightd.daemon.publishes import Publishes
    from weightd.daemon.store import Store

log = logging.getLogger("weightd")

RETIRE_GRACE_SECONDS = 5.0  # a retired generation is kept at least this long after its last request


class Reaper:
    def __init__(self, store: Store, publishes: Publishes):
        self.store = store
        self.publishes = publishes

    def reap(self, maps: Callable[[int, str], bool]) -> None:
        """Unlink retired generations no live process maps, and abandoned publishes (their
        publisher died, or they did not commit in ``PUBLISH_SECONDS``).

        ``maps(pid, segment)`` says whether process ``pid`` still maps ``segment``.
        """
        self.drop_lost()
        now = time.monotonic()
        expired = self.publishes.expired(now)
        with self.store.lock:
            retired = list(self.store.retired.items())
            for model in self.store.models.values():
                # Only for `stats`: forget processes that are gone, or the set grows with every
                # short-lived client for as long as the generation is served.
                model.attached = {pid for pid in model.attached if os.path.exists(f"/proc/{pid}")}
        if self.store.devices:
            from weightd.daemon import gpu

            gpu.collect()  # blocks of dropped generations whose clients have all let go
        for r in expired:
            why = "its publisher died" if now <= r.deadline else "it was never committed"
            log.warning("removing the publish of %s (%s): %s", r.manifest.name, r.manifest.segment, why)
            segment.unlink(self.store.folder, r.manifest.segment)
        for s, model in retired:
            if now - model.touched < RETIRE_GRACE_SECONDS:
                continue  # a client may be between the manifest reply and its mmap
            model.attached = {pid for pid in model.attached if maps(pid, s)}
            if not model.attached:
                with self.store.lock:
                    if self.store.retired.pop(s, None) is None:
                        continue  # taken for a publish meanwhile (Note [reusing a segment's pages])
                segment.unlink(self.store.folder, s)
                log.info(
                    "freed %s generation %d: no process maps it any more",
                    model.manifest.name,
                    model.manifest.generation,
                    extra={"model": model.manifest.name, "generation": model.manifest.generation},
                )

    def drop_lost(self) -> None:
        """Stop serving models whose segment file someone removed from the shared-memory
        directory (``rm /dev/shm/weightd.*``): no client could map them any more. Attached
        workers keep what they mapped (Note [segment lifetime after unlink])."""
        with self.store.lock:
            served = list(self.store.models.items()) + list(self.store.retired.items())
        lost, folder = [], self.store.folder
        for key, model in served:
            try:
                os.lstat(folder.file(model.manifest.segment))
            except FileNotFoundError:
                lost.append((key, model))
        for key, model in lost:
            with self.store.lock:
                table = self.store.models if self.store.models.get(key) is model else self.store.retired
                if table.get(key) is not model or os.path.lexists(folder.file(model.manifest.segment)):
                    continue  # replaced or unloaded meanwhile, or back (a publish that did not reuse it)
                del table[key]
            m = model.manifest
            log.warning(
                "%s generation %d is no longer served: its segment %s was removed from %s by someone "
                "else (load it again to serve it)",
                m.name,
                m.generation,
                m.segment,
                folder.path,
                extra={"model": m.name, "generation": m.generation},
            )

"""Restart adoption: a new daemon serves the sealed segments its predecessor of the same
instance left and removes the unfinished ones (Note [a preload is adopted, not reloaded] in
store.py says why a preload is then not read again). It reads only headers and manifests:
instant, whatever the size. Segments are opened only through ``segment.open_entry`` (Note [one
way into a segment]): a name someone else planted is skipped, never followed, served or removed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from weightd import segment
from weightd.daemon.served import Model
from weightd.errors import SegmentError, WeightdError

if TYPE_CHECKING:
    from weightd.daemon.store import Store

log = logging.getLogger("weightd")


def adopt(store: Store) -> list[Model]:
    """Serve the sealed segments a previous daemon of this instance left; remove the rest."""
    found: dict[str, list[Model]] = {}
    folder = store.folder
    for name in folder.segments(store.prefix):
        try:
            manifest, size, sealed = segment.inspect(folder, name)
        except segment.Planted as e:
            # /dev/shm is writable by everyone: anybody can create a name with our prefix
            # (a file, symlink, directory, FIFO). Serving it would let its owner choose (and
            # later rewrite) what workers run; following it, read what it points at.
            log.warning("skipping %s (ignoring a name others may have planted)", e)
            continue
        except SegmentError as e:
            log.warning("removing %s: %s", name, e)
            manifest, sealed = None, False
        if not sealed or manifest.segment != name:
            log.warning("removing unfinished segment %s (a load or publish that was cut off)", name)
            segment.unlink(folder, name)
            continue
        manifest.directory = folder.path
        found.setdefault(manifest.name, []).append(Model(manifest, size))
    adopted = []
    for name, models in found.items():
        models.sort(key=lambda m: m.manifest.generation)
        newest = models[-1]
        try:
            if segment.set_access(folder, newest.manifest.segment, store.mode, store.gid):
                log.info(
                    "%s: segment %s now has mode %o and gid %d (--mode/--group changed)",
                    name,
                    newest.manifest.segment,
                    store.mode,
                    store.gid,
                    extra={"model": name},
                )
        except WeightdError as e:
            # Served with the wrong access is worse than loaded again: not adopted.
            log.warning("not adopting %s: %s", newest.manifest.segment, e, extra={"model": name})
            store.stale.extend(m.manifest.segment for m in models)
            continue
        newest.adopted = True
        store.serve(newest)
        with store.lock:
            store.generations[name] = newest.manifest.generation
        adopted.append(newest)
        # Nobody can be known to map them after a restart: freed by free_stale(), off the
        # start-up path (unlink frees the pages inside the call: ~80 ms per GiB, and the
        # sockets are not bound yet).
        store.stale.extend(old.manifest.segment for old in models[:-1])
        log.info(
            "adopted %s generation %d from %s, loaded %s (%s)",
            name,
            newest.manifest.generation,
            newest.manifest.source,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest.manifest.created)),
            newest.manifest.segment,
            extra={"model": name, "generation": newest.manifest.generation},
        )
    return adopted


def free_stale(store: Store) -> None:
    """Unlink the older generations ``adopt`` found beside each model's newest."""
    with store.lock:
        stale, store.stale = store.stale, []
    for s in stale:
        segment.unlink(store.folder, s)

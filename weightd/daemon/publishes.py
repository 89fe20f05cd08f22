"""Publishes: a client writes a segment, the daemon checks it and serves it (``begin`` →
the publisher writes it and marks it PUBLISHED → ``commit``).

A publish is *begun* (``publish_begin``): it gets a generation and a segment name, or a retired
generation's segment to write again (Note [reusing a segment's pages] in store.py), and is
pending here until the publisher commits, gives up (``abandon``), dies, or lets
``PUBLISH_SECONDS`` pass (then the reaper removes it). (To *reserve* is something else: what
``segment`` does for the pages of one file.) Every table is read and written under the store's
lock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightd import segment
from weightd.daemon.served import Model
from weightd.errors import ProtocolError, SegmentError
from weightd.manifest import Manifest
from weightd.protocol import check_name

if TYPE_CHECKING:
    from weightd.daemon.store import Store

log = logging.getLogger("weightd")

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
LAYOUT_RE = re.compile(r"^[0-9a-f]{64}\Z")
VIA_RE = re.compile(r"^peer:[\w.:-]{1,128}\Z")
PUBLISH_SECONDS = 600.0  # a publish that does not commit in this long is abandoned


@dataclass
class Pending:
    """A publish under way: the segment its publisher is writing, until it commits."""

    manifest: Manifest
    nbytes: int
    deadline: float  # time.monotonic() after which it is abandoned
    pid: int | None  # the publisher (in this daemon's namespace); its death abandons it at once
    # A copy of a model another daemon holds (a peer fill through Ray): the source manifest's
    # layout digest, which the segment must hold on commit, and where the bytes come from.
    layout: str | None = None
    via: str | None = None

    def summary(self) -> dict:
        m = self.manifest
        return {
            "name": m.name,
            "generation": m.generation,
            "segment": m.segment,
            "nbytes": self.nbytes,
            "pid": self.pid,
            "created": m.created,
            **({"via": self.via} if self.via else {}),
        }

    def abandoned(self, now: float) -> bool:
        return now > self.deadline or (self.pid is not None and not _alive(self.pid))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists; one we may not signal (EPERM) or see in /proc (hidepid)
    is alive as far as we know."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def check_factory(factory: str | None) -> str | None:
    if factory is not None and not (isinstance(factory, str) and FACTORY_RE.match(factory)):
        raise ProtocolError(f"bad factory {factory!r:.80}: write it as package.module:function")
    return factory


class Publishes:
    """The publishes under way, by segment name."""

    def __init__(self, store: Store):
        self.store = store
        self.pending: dict[str, Pending] = {}  # segment -> publish under way (store.lock)

    def summaries(self) -> list[dict]:
        """Publishes under way (``stats``): their bytes are in the shared-memory directory already."""
        with self.store.lock:
            return [p.summary() for p in self.pending.values()]

    def expired(self, now: float) -> list[Pending]:
        """Take out the publishes whose publisher died or that did not commit in time."""
        with self.store.lock:
            return [self.pending.pop(s) for s, p in list(self.pending.items()) if p.abandoned(now)]

    def close(self) -> None:
        """On stop: every publish under way is removed (never adopted: it is not sealed)."""
        with self.store.lock:
            names, self.pending = list(self.pending), {}
        for s in names:
            segment.unlink(self.store.folder, s)

    def begin(
        self,
        name: str,
        nbytes: int,
        pid: int | None = None,
        *,
        layout: str | None = None,
        via: str | None = None,
    ) -> tuple[Manifest, bool]:
        """Start a publish: a generation and a segment name the publisher (process ``pid``) will
        create (or, where the second value is True, rewrite: pages reused, Note [reusing a
        segment's pages]) and seal.

        A peer fill (a copy of what another node's daemon holds) also names the source's
        ``Manifest.layout_digest`` and ``via`` (where the bytes come from, "peer:<node>"): the
        commit then serves the segment only if it holds exactly that layout, with that ``via``
        in its origin."""
        check_name(name)
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ProtocolError(f"nbytes must be a non-negative integer, got {nbytes!r:.40}")
        if (layout is None) != (via is None):
            raise ProtocolError("a peer fill names both the source's layout digest and where it comes from")
        if layout is not None and not LAYOUT_RE.match(layout):
            raise ProtocolError(f"layout must be a sha256 hex digest, got {layout!r:.80}")
        if via is not None and not VIA_RE.match(via):
            raise ProtocolError(f"via must look like 'peer:<node id>', got {via!r:.80}")
        manifest = self.store.new_manifest(name, source="publish", format="published")
        reused = self._recycle(name, manifest.segment, nbytes)
        if not reused:
            self.store.check_space(name, nbytes)
        with self.store.lock:
            self.pending[manifest.segment] = Pending(
                manifest, nbytes, time.monotonic() + PUBLISH_SECONDS, pid or None, layout, via
            )
        return manifest, reused

    def abandon(self, segment_name: str) -> bool:
        """Give up a publish under way (a peer fill that could not finish): it is forgotten
        and its segment is removed, never served. False if no such publish is under way."""
        with self.store.lock:
            pending = self.pending.pop(segment_name, None)
        if pending is None:
            return False
        segment.unlink(self.store.folder, segment_name)
        log.info(
            "abandoned the publish of %s (%s)",
            pending.manifest.name,
            segment_name,
            extra={"model": pending.manifest.name, "generation": pending.manifest.generation},
        )
        return True

    def _recycle(self, name: str, new: str, nbytes: int) -> bool:
        """Make a retired segment of ``name`` that no process maps (one big enough to hold
        ``nbytes`` without growing much) segment ``new``, unsealed; False if there is none.
        Note [reusing a segment's pages]."""
        with self.store.lock:
            fits = sorted(
                (
                    (s, m)
                    for s, m in self.store.retired.items()
                    if m.manifest.name == name
                    and not m.gpu
                    and nbytes <= m.size <= 2 * nbytes + segment.HUGE_PAGE
                ),
                key=lambda sm: sm[1].size,
            )
        folder = self.store.folder
        for old, model in fits:
            # Under the lock: no reply names it while it moves, and _drop_lost never sees it
            # half-renamed. Renames and a lease are a few microseconds.
            with self.store.lock:
                if self.store.retired.pop(old, None) is None:
                    continue  # freed by the reaper meanwhile
                try:
                    segment.rename(folder, old, new)
                except OSError as e:
                    log.warning("could not reuse %s for a publish (%s): writing a new segment", old, e)
                    self.store.retired[old] = model
                    continue
                if segment.in_use(folder, new):  # mapped somewhere: it stays what it is, retired
                    segment.rename(folder, new, old)
                    self.store.retired[old] = model
                    continue
            segment.clear_seal(folder, new, os.geteuid())
            log.info(
                "publishing %s into the pages of generation %d (no process maps it any more)",
                name,
                model.manifest.generation,
                extra={"model": name, "generation": model.manifest.generation},
            )
            return True
        return False

    def commit(self, segment_name: str) -> Model:
        """Finish a publish: check the sealed segment against what was begun and serve it."""
        with self.store.lock:
            pending = self.pending.pop(segment_name, None)
        if pending is None:
            raise ProtocolError(
                f"no publish of segment {segment_name!r:.100} is under way (it expired, or was committed)"
            )
        begun, folder = pending.manifest, self.store.folder
        try:
            # The publisher marked it PUBLISHED; it is SEALED (adoptable) once checked here.
            manifest, size, sealed = segment.inspect(folder, segment_name, seal=segment.PUBLISHED)
            if not sealed:
                raise SegmentError(f"segment {segment_name} is not sealed: the publish did not finish")
            if (manifest.name, manifest.generation, manifest.uuid) != (
                begun.name,
                begun.generation,
                begun.uuid,
            ):
                raise SegmentError(f"segment {segment_name} does not hold the publish that reserved it")
            if pending.layout is not None and (
                manifest.layout_digest() != pending.layout
                or (manifest.origin or {}).get("via") != pending.via
            ):
                raise SegmentError(
                    f"segment {segment_name} does not hold the layout its peer fill reserved (a copy must "
                    "describe its tensors exactly as its source does): not served"
                )
            check_factory((manifest.skeleton or {}).get("factory"))
            manifest.directory = folder.path
            segment.commit_seal(folder, segment_name)
        except BaseException:
            segment.unlink(folder, segment_name)
            raise
        model = self.store.serve(Model(manifest, size))
        log.info(
            "published %s generation %d: %d tensors, %.1f MiB",
            manifest.name,
            manifest.generation,
            len(manifest.tensors),
            manifest.nbytes / 2**20,
            extra={"model": manifest.name, "generation": manifest.generation},
        )
        return model

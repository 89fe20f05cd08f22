"""The daemon's models: one sealed segment per (name, generation).

Daemon-only. Loading is all-or-nothing: the checkpoint is validated first, the segment is
created with every page reserved, filled, described, sealed, and only then published under
its name. Any failure on the way unlinks the half-made segment, and the models already served
are never touched.

Generations: loading or publishing a name that exists makes a new generation, published
atomically (the name is never empty). The generation it replaces is *retired*: still linked,
so a client may ask for it by number, until no process that attached it maps it any more;
then it is unlinked and the kernel frees its pages with the last mapping (Note [segment
lifetime after unlink]). Unload unlinks at once: the name is gone, attached workers keep
what they mapped.

Publishing again reuses pages: a new generation is written into the segment of a retired
generation of the same name that no process maps any more (Note [reusing a segment's pages]),
so repeated publishes (RL weight updates) do not pay the kernel's page allocation each time.

Note [reusing a segment's pages]
--------------------------------
``reserve`` may hand a publisher a retired generation's segment instead of a new name. Nothing
a worker maps is ever written, by this order: (1) under the lock the generation leaves
``_retired``, so no manifest reply names it any more; (2) its file is renamed to the new
generation's segment name, so no process can open it by the old name from then on (one that
tries gets "gone" and asks again, Mapping's retry); (3) ``segment.in_use`` asks the kernel for a
write lease, granted only if no process anywhere has the file open or mapped (any user, any
PID namespace, forked children included: pids the daemon saw are not enough). Only then is the
seal cleared and the name given to the publisher. If the lease is refused the file is renamed
back and stays retired, freed by ``reap`` as before. The name is unpublished until commit; an
unsealed segment is never mapped by a client (Mapping checks the seal).

Restart: segments are named ``weightd.<instance>.*`` and self-describing, so a new daemon of
the same instance adopts the sealed ones (reading only headers and manifests: instant,
whatever their size) and removes the unsealed ones a killed load left.

Note [a preload is adopted, not reloaded]
-----------------------------------------
A loaded model's manifest records its ``origin``: the resolved path it was asked for, the
load options (the factory), and the identity of every file and folder the load read (size,
mtime_ns, inode, device; ``files.identity``). A preload at start-up, or a ``reload``
entry (a load request with ``reuse``), whose path and options equal the served generation's
and whose files are all unchanged is that generation: nothing is read, no generation made,
no shared memory taken (``Store.unchanged``). A file rewritten (new mtime) or replaced (new
inode) loads a new generation as any load does. Only contents changed without touching size
or mtime (clock games, ``touch -r``) go unnoticed; a plain ``weightd load`` always loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from weightd import layout, segment
from weightd.daemon import checkpoint, files, stream
from weightd.errors import (
    ModelNotFound,
    OutOfSpace,
    PermissionDenied,
    ProtocolError,
    SegmentError,
    WeightdError,
)
from weightd.manifest import Manifest
from weightd.protocol import check_name

log = logging.getLogger("weightd")

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
LAYOUT_RE = re.compile(r"^[0-9a-f]{64}\Z")
VIA_RE = re.compile(r"^peer:[\w.:-]{1,128}\Z")
RESERVATION_SECONDS = 600.0  # a publish that does not commit in this long is abandoned
RETIRE_GRACE_SECONDS = 5.0  # a retired generation is kept at least this long after its last request


@dataclass
class Model:
    manifest: Manifest
    size: int  # bytes of the segment
    attached: set[int] = field(default_factory=set)  # pids (in the daemon's namespace) that asked for it
    # (uid, pid it announced) of clients the daemon has no pid for: in a PID namespace it cannot
    # see into. Counted for `stats`; whether they still map the segment is unknowable here.
    unseen: set[tuple[int, int]] = field(default_factory=set)
    gpu: dict = field(default_factory=dict)  # GPU uuid -> weightd.daemon.gpu.GpuCopy (serve --device)
    touched: float = field(default_factory=time.monotonic)  # when it was last asked for or retired
    adopted: bool = False  # left by a previous daemon of this instance, served without a reload
    load: dict | None = (
        None  # how its bytes came in (weightd.daemon.stream.Report), when this daemon loaded it
    )

    def summary(self) -> dict:
        m = self.manifest
        return {
            "state": "ready",
            "adopted": self.adopted,
            "name": m.name,
            "generation": m.generation,
            "segment": m.segment,
            "nbytes": m.nbytes,
            "size": self.size,
            "tensors": len(m.tensors),
            "source": m.source,
            "format": m.format,
            "created": m.created,
            "load": self.load,
            **({"via": m.origin["via"]} if (m.origin or {}).get("via") else {}),
            # a PEFT adapter: the model it goes over (weightd/daemon/adapters.py)
            **({"base": m.skeleton["adapter"]["base"]} if "adapter" in (m.skeleton or {}) else {}),
        }


def _options(factory: str | None, base: str | None = None) -> dict:
    """The load options a manifest's origin records: what must match for a reload to be skipped."""
    return {"factory": factory, **({"base": base} if base else {})}


@dataclass
class Reservation:
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


class Store:
    def __init__(
        self,
        instance: str,
        mode: int = 0o640,
        max_bytes: int | None = None,
        allow_pickle: bool = False,
        group: int | None = None,
        devices: list[str] | None = None,
        readers: stream.Readers | None = None,
    ):
        self.prefix = segment.prefix(instance)
        self.readers = readers or stream.Readers()  # the threads every load's bytes go through
        self.huge_asked = segment.huge_pages_asked()  # why segments should get huge pages, or None
        self.mode = mode
        self.gid = os.getegid() if group is None else group
        self.max_bytes = max_bytes
        self.allow_pickle = allow_pickle
        self._models: dict[str, Model] = {}  # name -> newest generation
        self._retired: dict[str, Model] = {}  # segment -> an older generation someone may map
        self._reserved: dict[str, Reservation] = {}  # segment -> publish under way
        self._generations: dict[str, int] = {}
        self._stale: list[str] = []  # older generations left by a previous daemon (adopt)
        self._progress: dict[str, tuple[int, int]] = {}  # name -> (bytes done, total) of a load
        self._lock = threading.Lock()
        self.metrics = (
            None  # weightd.daemon.metrics.Metrics with serve --metrics: told of loads and publishes
        )
        self.devices = list(devices or [])
        if self.devices:
            from weightd import cuda  # only with --device: CPU-only daemons never touch CUDA

            self._devices = [cuda.resolve(d) for d in self.devices]

    # --- queries ---

    def get(self, name: str, generation: int | None = None, pid: int | None = None) -> Model:
        with self._lock:
            model = self._models.get(name)
            if generation is not None and (model is None or model.manifest.generation != generation):
                model = next(
                    (
                        m
                        for m in self._retired.values()
                        if m.manifest.name == name and m.manifest.generation == generation
                    ),
                    None,
                )
                if model is None:
                    raise ModelNotFound(f"model {name!r} generation {generation} is not served (any more)")
            if model is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise ModelNotFound(
                    f"no model named {name!r} is loaded (loaded: {known}): load it with `weightd load PATH "
                    f"--name {name}`"
                )
            if pid is not None:
                model.attached.add(pid)
            model.touched = time.monotonic()
        return model

    def progress(self, name: str) -> tuple[int, int]:
        return self._progress.get(name, (0, 0))

    def loading(self) -> dict[str, tuple[int, int]]:
        """Loads under way (on start-up or requested): name -> (bytes done, total; 0 until read)."""
        with self._lock:
            return dict(self._progress)

    def reservations(self) -> list[dict]:
        """Publishes under way (``stats``): their bytes are in the shared-memory directory already."""
        with self._lock:
            return [r.summary() for r in self._reserved.values()]

    def is_current(self, model: Model) -> bool:
        with self._lock:
            return self._models.get(model.manifest.name) is model

    def list(self) -> list[dict]:
        with self._lock:
            return [m.summary() for _, m in sorted(self._models.items())]

    def segments(self) -> list[Model]:
        with self._lock:
            return list(self._models.values()) + list(self._retired.values())

    def view(self) -> list[tuple[Model, bool, frozenset[int]]]:
        """Every served segment, whether it is its name's newest, and the pids that asked for it:
        one consistent copy, for readers on other threads (metrics) while the loop adds pids."""
        with self._lock:
            models = list(self._models.values()) + list(self._retired.values())
            return [(m, self._models.get(m.manifest.name) is m, frozenset(m.attached)) for m in models]

    # --- loading and publishing ---

    def unchanged(
        self, name: str, path: str, factory: str | None = None, base: str | None = None
    ) -> Model | None:
        """The served generation of ``name`` if loading ``path`` with these options would load
        the same bytes again: Note [a preload is adopted, not reloaded]."""
        with self._lock:
            model = self._models.get(name)
        origin = model.manifest.origin if model is not None else None
        if not origin or origin.get("options") != _options(factory, base):
            return None
        try:
            if origin.get("path") != files.real_path(path):
                return None
        except PermissionDenied:  # changing while resolved: not known to be the same
            return None
        return model if files.unchanged(origin.get("files") or []) else None

    def load(
        self,
        path: str,
        name: str,
        factory: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        within: list[str] | None = None,
        check: Callable[[], None] | None = None,
        base: str | None = None,
    ) -> Model:
        """Load ``path`` as a new generation of ``name`` (a PEFT adapter over the served model
        ``base``, if given). ``check()`` raises to stop the load
        (between files, and every ``layout.FILL_CHUNK`` of the copy): the half-written
        segment is removed."""
        name = check_name(name)
        check_factory(factory)
        check = check or (lambda: None)
        started = time.monotonic()
        check()
        self._progress[name] = (0, 0)  # loading from now on (metrics), the total once it is read
        try:
            if base is not None:  # Hook (issue 24): PEFT adapters by name, weightd/daemon/adapters.py
                from weightd.daemon import adapters

                ck = adapters.read(path, base, self._base(name, base).manifest, within=within, check=check)
            else:
                ck = checkpoint.read(
                    path, allow_pickle=self.allow_pickle, within=within, check=check, factory=factory
                )
        except BaseException:
            self._progress.pop(name, None)
            raise
        self._progress[name] = (0, ck.nbytes)

        def tracked(done: int, total: int) -> None:
            self._progress[name] = (done, total)
            check()
            if done == total and ck.verify is not None:
                ck.verify()  # every file is still what was read, now that all is copied
            if progress is not None:
                progress(done, total)

        try:
            check()
            manifest = self._new_manifest(name, source=files.real_path(ck.path), format=ck.format)
            manifest.tensors, manifest.metadata = ck.tensors, ck.metadata
            # A Hugging Face folder keeps its description (the factory named its class: hf.py)
            hf_folder = bool(ck.skeleton and "hf" in ck.skeleton)
            manifest.skeleton = {"factory": factory} if factory and not hf_folder else ck.skeleton
            hf = (ck.skeleton or {}).get("hf") or {}
            manifest.origin = {
                "path": manifest.source,
                "files": ck.files,
                "options": _options(factory, base),
                # what the reader computed rather than copied (Hugging Face folders)
                "conversions": {k: hf[k] for k in ("transformers", "dtype", "converted_bytes") if k in hf},
            }
            self._check_space(name, ck.nbytes)
            copied: list[stream.Report] = []

            def copy(seg, placed, progress) -> None:
                # Blobs that say where their bytes are stream in parallel; the others (a fill that
                # checks something once all is copied: HF's config.json) are written after, in order.
                streamed = [(b, o) for b, o in placed if b.file is not None or b.data is not None]
                copied.append(
                    self.readers.copy(
                        seg.fd,
                        stream.pieces(streamed),
                        check=check,
                        progress=progress,
                        reserving=segment.reservation(seg.fd, seg.size),
                    )
                )
                for blob, offset in placed:
                    if blob.file is None and blob.data is None:
                        check()
                        blob.fill(seg, offset)

            size = layout.write(
                manifest,
                ck.blobs,
                mode=self.mode,
                owner=self._owner(),
                progress=tracked,
                copy=copy,
                check=check,
            )
        finally:
            checkpoint.close(ck)
            self._progress.pop(name, None)
        report = copied[0] if copied else stream.Report()
        seconds = time.monotonic() - started
        model = self._publish(
            Model(manifest, size, load=dict(report.to_dict(), total_seconds=round(seconds, 4)))
        )
        if self.metrics is not None:
            self.metrics.loaded(manifest.format, manifest.nbytes, seconds)
        log.info(
            "loaded %s generation %d from %s: %d tensors in %.2f s; copy: %s (%s)",
            name,
            manifest.generation,
            path,
            len(manifest.tensors),
            seconds,
            report.describe(),
            manifest.segment,
            extra={"model": name, "generation": manifest.generation},
        )
        return model

    def _base(self, name: str, base: str) -> Model:
        """The served model an adapter named ``name`` goes over."""
        check_name(base)
        if base == name:
            raise ProtocolError(f"adapter {name!r} cannot be its own base: name it apart from {base!r}")
        model = self.get(base)
        if "adapter" in (model.manifest.skeleton or {}):
            raise ProtocolError(f"{base!r} is itself an adapter: an adapter goes over a model")
        return model

    def reserve(
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
        manifest = self._new_manifest(name, source="publish", format="published")
        reused = self._recycle(name, manifest.segment, nbytes)
        if not reused:
            self._check_space(name, nbytes)
        with self._lock:
            self._reserved[manifest.segment] = Reservation(
                manifest, nbytes, time.monotonic() + RESERVATION_SECONDS, pid or None, layout, via
            )
        return manifest, reused

    def abandon(self, segment_name: str) -> bool:
        """Give up a publish under way (a peer fill that could not finish): its reservation goes
        and its segment is removed, never served. False if no such publish is under way."""
        with self._lock:
            reservation = self._reserved.pop(segment_name, None)
        if reservation is None:
            return False
        segment.unlink(segment_name)
        log.info(
            "abandoned the publish of %s (%s)",
            reservation.manifest.name,
            segment_name,
            extra={"model": reservation.manifest.name, "generation": reservation.manifest.generation},
        )
        return True

    def _recycle(self, name: str, new: str, nbytes: int) -> bool:
        """Make a retired segment of ``name`` that no process maps (one big enough to hold
        ``nbytes`` without growing much) segment ``new``, unsealed; False if there is none.
        Note [reusing a segment's pages]."""
        with self._lock:
            fits = sorted(
                (
                    (s, m)
                    for s, m in self._retired.items()
                    if m.manifest.name == name
                    and not m.gpu
                    and nbytes <= m.size <= 2 * nbytes + segment.HUGE_PAGE
                ),
                key=lambda sm: sm[1].size,
            )
        for old, model in fits:
            # Under the lock: no reply names it while it moves, and _drop_lost never sees it
            # half-renamed. Renames and a lease are a few microseconds.
            with self._lock:
                if self._retired.pop(old, None) is None:
                    continue  # freed by the reaper meanwhile
                try:
                    segment.rename(old, new)
                except OSError as e:
                    log.warning("could not reuse %s for a publish (%s): writing a new segment", old, e)
                    self._retired[old] = model
                    continue
                if segment.in_use(new):  # mapped somewhere: it stays what it is, retired
                    segment.rename(new, old)
                    self._retired[old] = model
                    continue
            segment.clear_seal(new, os.geteuid())
            log.info(
                "publishing %s into the pages of generation %d (no process maps it any more)",
                name,
                model.manifest.generation,
                extra={"model": name, "generation": model.manifest.generation},
            )
            return True
        return False

    def commit(self, segment_name: str) -> Model:
        """Finish a publish: check the sealed segment against its reservation and serve it."""
        with self._lock:
            reservation = self._reserved.pop(segment_name, None)
        if reservation is None:
            raise ProtocolError(
                f"no publish of segment {segment_name!r:.100} is under way (it expired, or was committed)"
            )
        reserved = reservation.manifest
        try:
            # The publisher marked it PUBLISHED; it is SEALED (adoptable) once checked here.
            manifest, size, sealed = segment.inspect(segment_name, seal=segment.PUBLISHED)
            if not sealed:
                raise SegmentError(f"segment {segment_name} is not sealed: the publish did not finish")
            if (manifest.name, manifest.generation, manifest.uuid) != (
                reserved.name,
                reserved.generation,
                reserved.uuid,
            ):
                raise SegmentError(f"segment {segment_name} does not hold the publish that reserved it")
            if reservation.layout is not None and (
                manifest.layout_digest() != reservation.layout
                or (manifest.origin or {}).get("via") != reservation.via
            ):
                raise SegmentError(
                    f"segment {segment_name} does not hold the layout its peer fill reserved (a copy must "
                    "describe its tensors exactly as its source does): not served"
                )
            check_factory((manifest.skeleton or {}).get("factory"))
            manifest.directory = segment.shm_dir()
            segment.commit_seal(segment_name)
        except BaseException:
            segment.unlink(segment_name)
            raise
        model = self._publish(Model(manifest, size))
        if self.metrics is not None:
            self.metrics.published(manifest.name)
        log.info(
            "published %s generation %d: %d tensors, %.1f MiB",
            manifest.name,
            manifest.generation,
            len(manifest.tensors),
            manifest.nbytes / 2**20,
            extra={"model": manifest.name, "generation": manifest.generation},
        )
        return model

    def unload(self, name: str) -> Model:
        with self._lock:
            model = self._models.pop(name, None)
            retired = [s for s, m in self._retired.items() if m.manifest.name == name]
            for s in retired:
                del self._retired[s]
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        # Attached workers keep their mappings: Note [segment lifetime after unlink].
        for s in [model.manifest.segment, *retired]:
            segment.unlink(s)
        log.info(
            "unloaded %s generation %d",
            name,
            model.manifest.generation,
            extra={"model": name, "generation": model.manifest.generation},
        )
        return model

    # --- housekeeping ---

    def adopt(self) -> list[Model]:
        """Serve the sealed segments a previous daemon of this instance left; remove the rest."""
        found: dict[str, list[Model]] = {}
        for name in segment.list_segments(self.prefix):
            try:
                manifest, size, sealed = segment.inspect(name)
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
                segment.unlink(name)
                continue
            manifest.directory = segment.shm_dir()
            found.setdefault(manifest.name, []).append(Model(manifest, size))
        adopted = []
        for name, models in found.items():
            models.sort(key=lambda m: m.manifest.generation)
            newest = models[-1]
            try:
                if segment.set_access(newest.manifest.segment, self.mode, self.gid):
                    log.info(
                        "%s: segment %s now has mode %o and gid %d (--mode/--group changed)",
                        name,
                        newest.manifest.segment,
                        self.mode,
                        self.gid,
                        extra={"model": name},
                    )
            except WeightdError as e:
                # Served with the wrong access is worse than loaded again: not adopted.
                log.warning("not adopting %s: %s", newest.manifest.segment, e, extra={"model": name})
                self._stale.extend(m.manifest.segment for m in models)
                continue
            newest.adopted = True
            self._publish(newest)
            with self._lock:
                self._generations[name] = newest.manifest.generation
            adopted.append(newest)
            # Nobody can be known to map them after a restart: freed by free_stale(), off the
            # start-up path (unlink frees the pages inside the call: ~80 ms per GiB, and the
            # sockets are not bound yet).
            self._stale.extend(old.manifest.segment for old in models[:-1])
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

    def free_stale(self) -> None:
        """Unlink the older generations ``adopt`` found beside each model's newest."""
        stale, self._stale = self._stale, []
        for s in stale:
            segment.unlink(s)

    def reap(self, maps: Callable[[int, str], bool]) -> None:
        """Unlink retired generations no live process maps, and abandoned publishes (their
        publisher died, or they did not commit in ``RESERVATION_SECONDS``).

        ``maps(pid, segment)`` says whether process ``pid`` still maps ``segment``.
        """
        self._drop_lost()
        now = time.monotonic()
        with self._lock:
            expired = [self._reserved.pop(s) for s, r in list(self._reserved.items()) if r.abandoned(now)]
            retired = list(self._retired.items())
            for model in self._models.values():
                # Only for `stats`: forget processes that are gone, or the set grows with every
                # short-lived client for as long as the generation is served.
                model.attached = {pid for pid in model.attached if os.path.exists(f"/proc/{pid}")}
        if self.devices:
            from weightd.daemon import gpu

            gpu.collect()  # blocks of dropped generations whose clients have all let go
        for r in expired:
            why = "its publisher died" if now <= r.deadline else "it was never committed"
            log.warning("removing the publish of %s (%s): %s", r.manifest.name, r.manifest.segment, why)
            segment.unlink(r.manifest.segment)
        for s, model in retired:
            if now - model.touched < RETIRE_GRACE_SECONDS:
                continue  # a client may be between the manifest reply and its mmap
            model.attached = {pid for pid in model.attached if maps(pid, s)}
            if not model.attached:
                with self._lock:
                    if self._retired.pop(s, None) is None:
                        continue  # taken for a publish meanwhile (Note [reusing a segment's pages])
                segment.unlink(s)
                log.info(
                    "freed %s generation %d: no process maps it any more",
                    model.manifest.name,
                    model.manifest.generation,
                    extra={"model": model.manifest.name, "generation": model.manifest.generation},
                )

    def _drop_lost(self) -> None:
        """Stop serving models whose segment file someone removed from the shared-memory
        directory (``rm /dev/shm/weightd.*``): no client could map them any more. Attached
        workers keep what they mapped (Note [segment lifetime after unlink])."""
        with self._lock:
            served = list(self._models.items()) + list(self._retired.items())
        lost = []
        for key, model in served:
            try:
                os.lstat(segment.path(model.manifest.segment))
            except FileNotFoundError:
                lost.append((key, model))
        for key, model in lost:
            with self._lock:
                table = self._models if self._models.get(key) is model else self._retired
                if table.get(key) is not model or os.path.lexists(segment.path(model.manifest.segment)):
                    continue  # replaced or unloaded meanwhile, or back (a publish that did not reuse it)
                del table[key]
            m = model.manifest
            log.warning(
                "%s generation %d is no longer served: its segment %s was removed from %s by someone "
                "else (load it again to serve it)",
                m.name,
                m.generation,
                m.segment,
                segment.shm_dir(),
                extra={"model": m.name, "generation": m.generation},
            )

    def close(self, unlink: bool) -> None:
        """On stop: keep the segments for the next daemon to adopt, or unlink them all."""
        self.free_stale()  # if the reaper did not get to them
        with self._lock:
            models = list(self._models.values()) + list(self._retired.values())
            pending = list(self._reserved)
            self._models, self._retired, self._reserved = {}, {}, {}
        for s in pending:
            segment.unlink(s)
        if unlink:
            for m in models:
                segment.unlink(m.manifest.segment)
        self.readers.close()

    # --- internals ---

    def _owner(self) -> tuple[int, int] | None:
        return None if self.gid == os.getegid() else (os.geteuid(), self.gid)

    def _new_manifest(self, name: str, *, source: str, format: str) -> Manifest:
        """A manifest with a fresh generation and segment name; storages still to place."""
        with self._lock:
            generation = self._generations.get(name, 0) + 1
            self._generations[name] = generation
        uid = uuid.uuid4().hex
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:48]
        tag = hashlib.sha1(name.encode()).hexdigest()[:6]
        return Manifest(
            name=name,
            generation=generation,
            storages=[],
            tensors=[],
            source=source,
            format=format,
            created=time.time(),
            segment=f"/{self.prefix}{slug}-{tag}.{uid[:12]}",
            uuid=uid,
            directory=segment.shm_dir(),
        )

    def _publish(self, model: Model) -> Model:
        """Make ``model`` what its name serves; the generation it replaces is retired."""
        self._read_page_size(model)
        if self.devices:
            from weightd.daemon import gpu

            for dev in self._devices:  # one copy per GPU, made before the name serves it
                copy = gpu.GpuCopy.from_segment(model.manifest, dev)
                model.gpu[copy.uuid] = copy
        name = model.manifest.name
        with self._lock:
            old = self._models.get(name)
            if old is not None and old.manifest.generation > model.manifest.generation:
                # a slower load or publish finished after a newer one: it is born retired
                self._retired[model.manifest.segment] = model
                return model
            self._models[name] = model
            if old is not None:
                old.touched = time.monotonic()
                self._retired[old.manifest.segment] = old
        return model

    def _read_page_size(self, model: Model) -> None:
        """Which page size the segment got (Note [huge pages] in weightd.segment): clients prefault
        huge pages, and a machine that was asked for them but gave 4 KiB pages says so."""
        m = model.manifest
        try:
            m.page_size = segment.page_size(m.segment)
        except (OSError, SegmentError) as e:
            log.debug("could not read the page size of %s: %s", m.segment, e)
            return
        if self.huge_asked and m.page_size < segment.HUGE_PAGE and model.size >= segment.HUGE_PAGE:
            log.warning(
                "%s generation %d: %s",
                m.name,
                m.generation,
                segment.huge_page_warning(segment.shm_dir(), self.huge_asked),
                extra={"model": m.name, "generation": m.generation},
            )

    def _check_space(self, name: str, nbytes: int) -> None:
        free = segment.shm_free_bytes()
        if nbytes > free:
            raise OutOfSpace(segment.no_space_message(nbytes, free))
        if self.max_bytes is None:
            return
        with self._lock:
            used = sum(m.size for m in list(self._models.values()) + list(self._retired.values()))
            # loads running side by side count too (their segments are being reserved)
            used += sum(total for other, (_, total) in self._progress.items() if other != name)
        if used + nbytes > self.max_bytes:
            raise OutOfSpace(
                f"{name!r} needs {nbytes} bytes but the daemon's budget (--max-bytes {self.max_bytes}) has "
                f"{max(self.max_bytes - used, 0)} left: unload a model or raise --max-bytes"
            )

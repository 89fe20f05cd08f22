"""The daemon's models: one sealed segment per (name, generation); the table of what is
served (``Store``) and the loads into it.

The rooms around the table, each with one job: ``served`` (one generation: ``Model``),
``publishes`` (a client writes a segment, the daemon checks and serves it), ``adoption`` (what a
previous daemon left, at start-up), ``reaper`` (freeing what nobody maps). They share one lock,
``Store.lock``: every table is read and written under it; files change outside it.

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
``Publishes.begin`` (publishes.py) may hand a publisher a retired generation's segment instead
of a new name. Nothing a worker maps is ever written, by this order: (1) under the lock the
generation leaves ``Store.retired``, so no manifest reply names it any more; (2) its file is
renamed to the new generation's segment name, so no process can open it by the old name from then on (one that
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

from weightd import layout, segment
from weightd.daemon import adoption, checkpoint, early, files, stream
from weightd.daemon.publishes import Publishes, check_factory
from weightd.daemon.reaper import Reaper
from weightd.daemon.served import Model
from weightd.errors import (
    ModelNotFound,
    OutOfSpace,
    PermissionDenied,
    ProtocolError,
    SegmentError,
)
from weightd.manifest import Manifest
from weightd.protocol import check_name

log = logging.getLogger("weightd")


def _options(factory: str | None, base: str | None = None) -> dict:
    """The load options a manifest's origin records: what must match for a reload to be skipped."""
    return {"factory": factory, **({"base": base} if base else {})}


class Store:
    def __init__(
        self,
        instance: str,
        folder: segment.Folder,
        mode: int = 0o640,
        max_bytes: int | None = None,
        allow_pickle: bool = False,
        group: int | None = None,
        devices: list[str] | None = None,
        readers: stream.Readers | None = None,
    ):
        self.prefix = segment.prefix(instance)
        self.folder = folder  # where the segments are (Server: Folder.probe(--shm-dir))
        self.readers = readers or stream.Readers()  # the threads every load's bytes go through
        self.mode = mode
        self.gid = os.getegid() if group is None else group
        self.max_bytes = max_bytes
        self.allow_pickle = allow_pickle
        # One lock for every table of the store and its rooms (publishes, adoption, reaper): each
        # is read and written under it; files are created, renamed and unlinked outside it.
        self.lock = threading.Lock()
        self.models: dict[str, Model] = {}  # name -> newest generation
        self.retired: dict[str, Model] = {}  # segment -> an older generation someone may map
        self.generations: dict[str, int] = {}
        self.stale: list[str] = []  # older generations left by a previous daemon (adopt)
        self._progress: dict[str, tuple[int, int]] = {}  # name -> (bytes done, total) of a load
        # name -> the manifest of its load whose segment is being written (Note [the watermark])
        self._streaming: dict[str, tuple[Manifest, segment.Watermark]] = {}
        self.publishes = Publishes(self)
        self.reaper = Reaper(self, self.publishes)
        self.devices = list(devices or [])
        if self.devices:
            from weightd import cuda  # only with --device: CPU-only daemons never touch CUDA

            self._devices = [cuda.resolve(d) for d in self.devices]

    # --- queries ---

    def get(self, name: str, generation: int | None = None, pid: int | None = None) -> Model:
        with self.lock:
            model = self.models.get(name)
            if generation is not None and (model is None or model.manifest.generation != generation):
                model = next(
                    (
                        m
                        for m in self.retired.values()
                        if m.manifest.name == name and m.manifest.generation == generation
                    ),
                    None,
                )
                if model is None:
                    raise ModelNotFound(f"model {name!r} generation {generation} is not served (any more)")
            if model is None:
                known = ", ".join(sorted(self.models)) or "none"
                raise ModelNotFound(
                    f"no model named {name!r} is loaded (loaded: {known}): load it with `weightd load PATH "
                    f"--name {name}`"
                )
            if pid is not None:
                model.attached.add(pid)
            model.touched = time.monotonic()
        return model

    def progress(self, name: str) -> tuple[int, int]:
        with self.lock:
            return self._progress.get(name, (0, 0))

    def _set_progress(self, name: str, done_total: tuple[int, int] | None) -> None:
        """Written by the loader thread, read by the request loop and metrics: under the lock."""
        with self.lock:
            if done_total is None:
                self._progress.pop(name, None)
            else:
                self._progress[name] = done_total

    def streaming(self, name: str) -> tuple[Manifest, int] | None:
        """The manifest of the load of ``name`` whose segment is being written now, unsealed,
        and its watermark: another node may copy what that covers (Note [the watermark] in
        weightd.segment)."""
        with self.lock:
            found = self._streaming.get(name)
        return None if found is None else (found[0], found[1].final())

    def loading(self) -> dict[str, tuple[int, int]]:
        """Loads under way (on start-up or requested): name -> (bytes done, total; 0 until read)."""
        with self.lock:
            return dict(self._progress)

    def is_current(self, model: Model) -> bool:
        with self.lock:
            return self.models.get(model.manifest.name) is model

    def list(self) -> list[dict]:
        with self.lock:
            return [m.summary() for _, m in sorted(self.models.items())]

    def segments(self) -> list[Model]:
        with self.lock:
            return list(self.models.values()) + list(self.retired.values())

    def view(self) -> list[tuple[Model, bool, frozenset[int]]]:
        """Every served segment, whether it is its name's newest, and the pids that asked for it:
        one consistent copy, for readers on other threads (metrics) while the loop adds pids."""
        with self.lock:
            models = list(self.models.values()) + list(self.retired.values())
            return [(m, self.models.get(m.manifest.name) is m, frozenset(m.attached)) for m in models]

    # --- the other rooms, reached through the store ---

    def begin_publish(self, name: str, nbytes: int, pid: int | None = None, **peer) -> tuple[Manifest, bool]:
        """``Publishes.begin``: a generation and a segment for a publisher to write."""
        return self.publishes.begin(name, nbytes, pid, **peer)

    def commit(self, segment_name: str) -> Model:
        return self.publishes.commit(segment_name)

    def abandon(self, segment_name: str) -> bool:
        return self.publishes.abandon(segment_name)

    def reservations(self) -> list[dict]:
        """Publishes under way (``stats``)."""
        return self.publishes.summaries()

    def adopt(self) -> list[Model]:
        return adoption.adopt(self)

    def free_stale(self) -> None:
        adoption.free_stale(self)

    def reap(self, maps: Callable[[int, str], bool]) -> None:
        self.reaper.reap(maps)

    # --- loading ---

    def unchanged(
        self, name: str, path: str, factory: str | None = None, base: str | None = None
    ) -> Model | None:
        """The served generation of ``name`` if loading ``path`` with these options would load
        the same bytes again: Note [a preload is adopted, not reloaded]."""
        with self.lock:
            model = self.models.get(name)
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
        self._set_progress(name, (0, 0))  # loading from now on (metrics), the total once it is read
        # Note [copying while from_pretrained runs] (weightd/daemon/early.py)
        early_manifest: list[Manifest] = []

        def create(size: int) -> segment.Segment:
            self.check_space(name, size, ahead.reserved)  # OutOfSpace: no early copy
            if not early_manifest:  # once, also if a first try found no space
                early_manifest.append(
                    self.new_manifest(name, source=files.real_path(path), format="huggingface")
                )
            return segment.Segment.create(
                self.folder, early_manifest[0].segment, size, self.mode, self._owner(), reserved=False
            )

        ahead = early.EarlyCopy(self.readers, self.folder, check, self.folder.huge_asked is not None, create)

        try:
            if base is not None:  # Hook (issue 24): PEFT adapters by name, weightd/daemon/adapters.py
                from weightd.daemon import adapters

                ck = adapters.read(path, base, self._base(name, base).manifest, within=within, check=check)
            else:
                ck = checkpoint.read(
                    path,
                    allow_pickle=self.allow_pickle,
                    within=within,
                    check=check,
                    factory=factory,
                    early=ahead,
                )
        except BaseException:
            ahead.abandon()
            self._set_progress(name, None)
            raise
        self._set_progress(name, (0, ck.nbytes))

        def tracked(done: int, total: int) -> None:
            self._set_progress(name, (done, total))
            check()
            if done == total and ck.verify is not None:
                ck.verify()  # every file is still what was read, now that all is copied
            if progress is not None:
                progress(done, total)

        fixed: dict[int, int] = {}
        try:
            check()
            if ahead.seg is not None:
                keys = [b.source for b in ck.blobs]
                ahead.finish(set(keys))
                fixed = {i: ahead.offsets[k] for i, k in enumerate(keys) if k in ahead.offsets}
            # made for an early copy (also one that then found no space), else now
            manifest = (
                early_manifest[0]
                if early_manifest
                else self.new_manifest(name, source=files.real_path(ck.path), format=ck.format)
            )
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
            self.check_space(name, ck.nbytes, ahead.reserved)
            copied: list[stream.Report] = []

            def copy(seg, placed, progress) -> None:
                # Blobs that say where their bytes are stream in parallel; the others (a fill that
                # checks something once all is copied: HF's config.json) are written after, in order.
                # (blobs before ``ahead.end`` are the early copy's, written already)
                streamed = [
                    (b, o)
                    for b, o in placed
                    if (b.source is not None or b.data is not None) and o >= ahead.end
                ]
                # Hook (issue 23): how far the segment is written, for peers copying it meanwhile
                mark = segment.Watermark(seg.fd, [(o, b.nbytes) for b, o in placed])
                before = 0  # the early copy's bytes: progress counts them as done
                for b, o in placed:
                    if o < ahead.end:
                        mark.written(o, b.nbytes)
                        before += b.nbytes
                with self.lock:
                    self._streaming[name] = (manifest, mark)
                copied.append(
                    self.readers.copy(
                        seg.fd,
                        stream.pieces(streamed),
                        check=check,
                        progress=progress and (lambda done, total: progress(before + done, before + total)),
                        reserving=segment.reservation(seg.fd, seg.size, self.folder, start=ahead.reserved),
                        written=mark.written,
                        huge_pages=self.folder.huge_asked is not None,
                    )
                )
                for blob, offset in placed:
                    if blob.source is None and blob.data is None:
                        check()
                        blob.fill(seg, offset)
                        mark.written(offset, blob.nbytes)

            size = layout.write(
                manifest,
                ck.blobs,
                folder=self.folder,
                mode=self.mode,
                owner=self._owner(),
                progress=tracked,
                copy=copy,
                check=check,
                started=ahead.seg,
                fixed=fixed,
                start=ahead.end,
            )
        except BaseException:
            ahead.abandon()  # the segment, if layout.write did not remove it already
            raise
        finally:
            checkpoint.close(ck)
            with self.lock:
                self._streaming.pop(name, None)
            self._set_progress(name, None)
        report = copied[0] if copied else stream.Report()
        if ahead.report is not None:
            report = report.plus(ahead.report)
        seconds = time.monotonic() - started
        model = self.serve(
            Model(
                manifest,
                size,
                load=dict(
                    report.to_dict(),
                    total_seconds=round(seconds, 4),
                    # a folder's: Note [the daemon's first guess] (weightd/daemon/early.py)
                    **({"copied_before_the_loader": ahead.first_kept} if ahead.seg is not None else {}),
                ),
            )
        )
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

    def unload(self, name: str) -> Model:
        with self.lock:
            model = self.models.pop(name, None)
            retired = [s for s, m in self.retired.items() if m.manifest.name == name]
            for s in retired:
                del self.retired[s]
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        # Attached workers keep their mappings: Note [segment lifetime after unlink].
        for s in [model.manifest.segment, *retired]:
            segment.unlink(self.folder, s)
        log.info(
            "unloaded %s generation %d",
            name,
            model.manifest.generation,
            extra={"model": name, "generation": model.manifest.generation},
        )
        return model

    # --- housekeeping ---

    def close(self, unlink: bool) -> None:
        """On stop: keep the segments for the next daemon to adopt, or unlink them all."""
        adoption.free_stale(self)  # if the reaper did not get to them
        self.publishes.close()
        with self.lock:
            models = list(self.models.values()) + list(self.retired.values())
            self.models, self.retired = {}, {}
        if unlink:
            for m in models:
                segment.unlink(self.folder, m.manifest.segment)
        self.readers.close()

    # --- internals ---

    def _owner(self) -> tuple[int, int] | None:
        return None if self.gid == os.getegid() else (os.geteuid(), self.gid)

    def new_manifest(self, name: str, *, source: str, format: str) -> Manifest:
        """A manifest with a fresh generation and segment name; storages still to place."""
        with self.lock:
            generation = self.generations.get(name, 0) + 1
            self.generations[name] = generation
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
            directory=self.folder.path,
        )

    def serve(self, model: Model) -> Model:
        """Make ``model`` what its name serves; the generation it replaces is retired."""
        self._read_page_size(model)
        if self.devices:
            from weightd.daemon import gpu

            for dev in self._devices:  # one copy per GPU, made before the name serves it
                copy = gpu.GpuCopy.from_segment(self.folder, model.manifest, dev)
                model.gpu[copy.uuid] = copy
        name = model.manifest.name
        with self.lock:
            old = self.models.get(name)
            if old is not None and old.manifest.generation > model.manifest.generation:
                # a slower load or publish finished after a newer one: it is born retired
                self.retired[model.manifest.segment] = model
                return model
            self.models[name] = model
            if old is not None:
                old.touched = time.monotonic()
                self.retired[old.manifest.segment] = old
        return model

    def _read_page_size(self, model: Model) -> None:
        """Which page size the segment got (Note [huge pages] in weightd.segment): clients prefault
        huge pages, and a machine that was asked for them but gave 4 KiB pages says so."""
        m = model.manifest
        try:
            m.page_size = segment.page_size(self.folder, m.segment)
        except (OSError, SegmentError) as e:
            log.debug("could not read the page size of %s: %s", m.segment, e)
            return
        if self.folder.huge_asked and m.page_size < segment.HUGE_PAGE and model.size >= segment.HUGE_PAGE:
            log.warning(
                "%s generation %d: %s",
                m.name,
                m.generation,
                segment.huge_page_warning(self.folder.path, self.folder.huge_asked),
                extra={"model": m.name, "generation": m.generation},
            )

    def check_space(self, name: str, nbytes: int, reserved: int = 0) -> None:
        """``reserved``: bytes of the load's own segment reserved already (its early copy)."""
        if nbytes - reserved > self.folder.free_bytes():
            raise OutOfSpace(self.folder.no_space_message(nbytes))
        if self.max_bytes is None:
            return
        with self.lock:
            used = sum(m.size for m in list(self.models.values()) + list(self.retired.values()))
            # loads running side by side count too (their segments are being reserved)
            used += sum(total for other, (_, total) in self._progress.items() if other != name)
        if used + nbytes > self.max_bytes:
            raise OutOfSpace(
                f"{name!r} needs {nbytes} bytes but the daemon's budget (--max-bytes {self.max_bytes}) has "
                f"{max(self.max_bytes - used, 0)} left: unload a model or raise --max-bytes"
            )

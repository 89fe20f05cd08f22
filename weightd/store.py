"""The daemon's loaded models: one sealed segment per (name, generation).

Daemon-only. Loading is all-or-nothing: the checkpoint is validated first, the segment is
created with every page reserved, filled, described, sealed, and only then published under
its name. Any failure on the way unlinks the half-made segment, and the models already served
are never touched.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from weightd import checkpoint, segment
from weightd.errors import ModelNotFound, OutOfSpace, ProtocolError
from weightd.manifest import PAGE_ALIGN, Manifest, StorageMeta, align_up, storage_alignment

log = logging.getLogger("weightd")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class Model:
    manifest: Manifest
    size: int  # bytes of the segment

    def summary(self) -> dict:
        m = self.manifest
        return {
            "name": m.name,
            "generation": m.generation,
            "segment": m.segment,
            "nbytes": m.nbytes,
            "size": self.size,
            "tensors": len(m.tensors),
            "source": m.source,
            "format": m.format,
            "created": m.created,
        }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError(
            f"bad model name {name!r:.80}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def default_name(path: str) -> str:
    p = Path(path)
    return p.name.split(".")[0] if p.is_file() or p.suffix else p.name


class Store:
    def __init__(self, instance: str, mode: int = 0o640, max_bytes: int | None = None, allow_pickle: bool = False):
        self.prefix = f"weightd.{instance}."
        self.mode = mode
        self.max_bytes = max_bytes
        self.allow_pickle = allow_pickle
        self._models: dict[str, Model] = {}
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- queries (the loop thread) ---

    def get(self, name: str, generation: int | None = None) -> Model:
        with self._lock:
            model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"no model named {name!r} is loaded (loaded: {known}): load it with `weightd load PATH --name {name}`")
        if generation is not None and generation != model.manifest.generation:
            raise ModelNotFound(
                f"model {name!r} is at generation {model.manifest.generation}; generation {generation} is no longer served"
            )
        return model

    def list(self) -> list[dict]:
        with self._lock:
            return [m.summary() for _, m in sorted(self._models.items())]

    # --- changes ---

    def load(
        self,
        path: str,
        name: str | None = None,
        factory: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Model:
        name = check_name(name or default_name(path))
        if factory is not None and not (isinstance(factory, str) and FACTORY_RE.match(factory)):
            raise ProtocolError(f"bad factory {factory!r:.80}: write it as package.module:function")
        started = time.monotonic()
        ck = checkpoint.read(path, allow_pickle=self.allow_pickle)
        try:
            if factory:
                ck.skeleton = {"factory": factory}
            model = self._write(name, ck, progress)
        finally:
            checkpoint.close(ck)
        seconds = time.monotonic() - started
        log.info(
            "loaded %s generation %d from %s: %d tensors, %.1f MiB in %.2f s (%s)",
            name, model.manifest.generation, path, len(model.manifest.tensors),
            model.manifest.nbytes / 2**20, seconds, model.manifest.segment,
        )
        return model

    def unload(self, name: str) -> Model:
        with self._lock:
            model = self._models.pop(name, None)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        # Attached workers keep their mappings: Note [segment lifetime after unlink].
        segment.unlink(model.manifest.segment)
        log.info("unloaded %s generation %d", name, model.manifest.generation)
        return model

    def close(self) -> None:
        """Unlink every segment this store made (on a graceful stop)."""
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for m in models:
            segment.unlink(m.manifest.segment)

    def sweep(self) -> list[str]:
        """Remove segments a previous daemon of this instance left behind (it was killed)."""
        stale = segment.list_segments(self.prefix.lstrip("/"))
        for name in stale:
            segment.unlink(name)
        if stale:
            log.warning("removed %d segments left by a previous daemon of this instance", len(stale))
        return stale

    # --- internals ---

    def _write(self, name: str, ck: checkpoint.Checkpoint, progress) -> Model:
        offset = segment.DATA_OFFSET
        storages = []
        for blob in ck.blobs:
            offset = align_up(offset, storage_alignment(blob.nbytes))
            storages.append(StorageMeta(offset, blob.nbytes))
            offset += blob.nbytes
        manifest_offset = align_up(offset, PAGE_ALIGN)
        with self._lock:
            generation = self._generations.get(name, 0) + 1
            self._generations[name] = generation
        uid = uuid.uuid4().hex
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:48]
        tag = hashlib.sha1(name.encode()).hexdigest()[:6]
        manifest = Manifest(
            name=name,
            generation=generation,
            storages=storages,
            tensors=ck.tensors,
            source=str(Path(ck.path).resolve()),
            format=ck.format,
            created=time.time(),
            segment=f"/{self.prefix}{slug}-{tag}.{uid[:12]}",
            uuid=uid,
            skeleton=ck.skeleton,
            metadata=ck.metadata,
        )
        manifest.validate(segment.DATA_OFFSET, manifest_offset)
        blob_json = manifest.to_json()
        size = manifest_offset + len(blob_json)
        self._check_budget(name, size)
        seg = segment.Segment.create(manifest.segment, size, self.mode)
        try:
            total, done = ck.nbytes, 0
            with memoryview(seg.buf) as view:
                for blob, st in zip(ck.blobs, storages):
                    blob.fill(view[st.offset : st.offset + st.nbytes])
                    done += st.nbytes
                    if progress is not None:
                        progress(done, total)
            seg.write_manifest(blob_json, manifest_offset)
            seg.seal()
        except BaseException:
            seg.destroy()
            raise
        seg.close()
        model = Model(manifest, size)
        with self._lock:
            old = self._models.get(name)
            self._models[name] = model
        if old is not None:
            # The new generation is published first, so no request ever finds the name empty.
            segment.unlink(old.manifest.segment)
        return model

    def _check_budget(self, name: str, size: int) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            used = sum(m.size for n, m in self._models.items() if n != name)
        if used + size > self.max_bytes:
            raise OutOfSpace(
                f"loading {name!r} needs {size} bytes but the daemon's budget (--max-bytes {self.max_bytes}) "
                f"has {self.max_bytes - used} left: unload a model or raise --max-bytes"
            )


"""The client: asks the daemon for manifests over ZeroMQ and maps segments zero-copy.

A worker that only attaches imports only what attach needs: the Hugging Face build
(``weightd.client.hf``), the GPU paths (``weightd.client.gpu``, ``weightd.cuda``), publishing
(``weightd.layout``) and module filling (``weightd.client.module``) load on first use.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from weightd import errors, protocol
from weightd.client.connection import LOAD_TIMEOUT, Connection  # noqa: F401 (LOAD_TIMEOUT: API)
from weightd.client.mapping import HUGE_PAGE, DeviceCopy, Mapping, rebuild
from weightd.errors import DaemonNotRunning, RequestTimeout, SegmentError, UnsafePath
from weightd.manifest import Manifest

if TYPE_CHECKING:
    from weightd.client.module import Attachment

_attachments: "weakref.WeakKeyDictionary[nn.Module, Attachment]" = weakref.WeakKeyDictionary()


class Client(Connection):
    """One connection to a weightd daemon, and the operations on it.

    >>> with Client() as c:
    ...     c.ping()["version"]
    ...     model = c.attach("bert", model=build_bert)

    Not thread-safe (a ZeroMQ socket is not); the module-level functions keep one per thread.
    Every call has a deadline (``timeout`` seconds, default ``$WEIGHTD_TIMEOUT`` or 10).
    """

    # --- operations on tensors (the rest are Connection's) ---

    def publish(
        self,
        name: str,
        obj,
        *,
        factory: str | None = None,
        metadata: dict | None = None,
        timeout: float | None = None,
    ) -> dict:
        """Put a running process's module (or dict of tensors) into a new generation of ``name``.

        The bytes are copied once, from this process's tensors into a segment this process
        creates and seals; the daemon checks it and serves it from then on. Tensors that share
        memory (tied weights, views) are stored once. ``factory`` ("pkg.module:function") tells
        clients how to build the module when they attach without ``model=``. ``timeout``
        (seconds) bounds each of its two requests, as for every call.

        >>> Client().publish("policy", policy_net)     # RL: push new weights every few minutes
        """
        from weightd import layout, segment

        source = f"publish of {name!r}"
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise errors.CheckpointError(
                f"{source}: publish an nn.Module or a dict of tensors, not {type(obj).__name__}"
            )
        blobs, tensors, keep = layout.from_tensors(layout.flatten(obj, source), source=source)
        r = self.call("publish_begin", name=name, nbytes=sum(b.nbytes for b in blobs), timeout=timeout)
        manifest = Manifest(
            name=name,
            generation=r["generation"],
            storages=[],
            tensors=tensors,
            source="publish",
            format="published",
            created=r["created"],
            segment=r["segment"],
            uuid=r["uuid"],
            skeleton={"factory": factory} if factory else None,
            metadata=dict(metadata or {}),
        )
        # PUBLISHED, not SEALED: only the daemon seals, once it has checked it (weightd.segment).
        # With "reuse" the daemon handed us a retired generation's segment nobody maps, to write
        # again in place (Note [reusing a segment's pages] in weightd.daemon.store).
        layout.write(
            manifest,
            blobs,
            folder=segment.Folder.announced(r.get("directory"), r.get("huge_pages_asked")),
            mode=r["mode"],
            owner=tuple(r["owner"]),
            seal=segment.PUBLISHED,
            reuse=r["owner"][0] if r.get("reuse") else None,
        )
        del keep
        # If this call fails the daemon removes the segment (or does when the reservation
        # expires): unlinking it here could remove a publish the daemon did commit.
        return self.call("publish_commit", segment=r["segment"], timeout=timeout)["model"]

    def refresh(self, module: nn.Module, *, generation: int | None = None) -> nn.Module:
        """Move an attached module to the newest (or the given) generation, in place.

        Parameters stay the same objects (optimizers and ties keep working); only what they
        point at changes. Returns ``module``.
        """
        a = _attachments.get(module)
        if a is None:
            raise errors.AttachError("this module was not attached by weightd: use attach() first")
        mapping, tensors = self._map(a.name, generation, a.device)
        if mapping.manifest.uuid != a.uuid:
            from weightd.client.module import refill

            copies = refill(module, tensors, mapping)
            _attachments[module] = _attachment(mapping, tensors, copies, a.build_seconds, 0.0, a.device)
        return module

    def state_dict(
        self,
        name: str,
        *,
        generation: int | None = None,
        device=None,
        pin: bool = False,
        timeout: float | None = None,
        populate: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's tensors over the shared pages, as plain tensors (zero-copy).

        With ``device="cuda:N"``: views of the daemon's copy on that GPU through CUDA IPC where
        it holds one (``serve --device``), else a copy from shared memory to the device
        (``pin=True`` pins the mapping for the copy: measured slower than unpinned on an H200,
        see the README's GPUs). ``timeout``: seconds to wait for the daemon's answer [default:
        the Client's]. ``populate`` as for ``attach``.
        """
        with _gc_paused():
            return self._map(name, generation, device, pin, timeout, populate)[1]

    def attach(
        self,
        name: str,
        model=None,
        *,
        generation: int | None = None,
        strict: bool = True,
        requires_grad: bool = False,
        device=None,
        pin: bool = False,
        config=None,
        timeout: float | None = None,
        populate: bool | None = None,
    ) -> nn.Module:
        """An ``nn.Module`` whose weights are the shared pages of model ``name``.

        ``model`` is the module to fill (built on the meta device or on the CPU), a function
        that builds one, or None to let the daemon say how (a factory or a Hugging Face config
        it was loaded with). Parameters come back with ``requires_grad=False`` unless asked;
        writes to them stay private to this process. ``device``, ``pin`` and ``timeout`` as
        for ``state_dict``.

        A Hugging Face folder comes back as ``from_pretrained(folder)`` returns it (its class, or
        the transformers class / ``AutoModelFor...`` given as ``model``, built with ``config`` if
        given; ``strict`` gives way to the class's own rules): see ``weightd.client.hf``.

        ``populate``: map every page into this process now (``MADV_POPULATE_READ``; never copies
        one), so the first forward pays no page faults. Default (None): where the segment is on
        huge pages (``serve --shm-dir`` on a huge-page tmpfs), where it costs ~1 ms per GiB and
        takes the first touch from ~7 ms per GiB to nothing; not on 4 KiB pages, where it would
        cost more than the faults it saves (measured), and attach stays milliseconds whatever
        the size for processes that touch only part of a model.
        """
        t0 = time.perf_counter()
        with _gc_paused():
            mapped = self._map(name, generation, device, pin, timeout, populate)
        return self.attach_mapped(
            mapped,
            model,
            strict=strict,
            requires_grad=requires_grad,
            config=config,
            t0=t0,
            device=None if device is None else str(device),
        )

    def prepare(self, name: str, *, populate: bool | None = None) -> tuple:
        """The first half of ``attach``: ask for the manifest and map the segment (CPU), to
        ``attach_mapped`` later; a Ray actor does it while Ray is still unpickling its
        arguments (weightd.client.ray_zerocopy), so that ``load()`` only fills the module."""
        with _gc_paused():
            return self._map(name, None, None, False, None, populate)

    def attach_mapped(
        self,
        mapped: tuple,
        model=None,
        *,
        strict: bool = True,
        requires_grad: bool = False,
        config=None,
        t0: float | None = None,
        device: str | None = None,
    ) -> nn.Module:
        """The second half of ``attach``: the module over what ``prepare`` mapped."""
        t0 = time.perf_counter() if t0 is None else t0
        mapping, tensors = mapped
        manifest = mapping.manifest
        name = manifest.name
        if _hf_wants(model, manifest.skeleton):  # a Hugging Face folder: built as from_pretrained builds it
            from weightd.client import hf

            with _gc_paused():
                module, copies, build = hf.build(
                    name, mapping, tensors, model, requires_grad=requires_grad, config=config
                )
        else:
            from weightd.client.module import build_skeleton, fill

            b0 = time.perf_counter()
            module = build_skeleton(model, manifest.skeleton, name)
            build = time.perf_counter() - b0
            with _gc_paused():
                copies = fill(module, tensors, mapping, strict=strict, requires_grad=requires_grad)
        _attachments[module] = _attachment(mapping, tensors, copies, build, time.perf_counter() - t0, device)
        return module

    def _map(
        self,
        name: str,
        generation: int | None,
        device=None,
        pin: bool = False,
        timeout: float | None = None,
        populate: bool | None = None,
    ):
        if device is not None:
            return self._map_device(name, generation, device, pin, timeout)
        # A new generation may replace (and unlink) the segment between the reply and the
        # mapping; asking again gets the new one.
        for attempt in range(3):
            manifest = self.manifest(name, generation, timeout=timeout)
            if populate is None:
                populate = manifest.page_size >= HUGE_PAGE
            try:
                mapping = Mapping(manifest, owner=self.daemon_uid, populate=populate)
            except SegmentError as e:
                if attempt == 2 or generation is not None or isinstance(e, UnsafePath):
                    raise
                continue
            return mapping, mapping.tensors()
        raise AssertionError("unreachable")

    def _map_device(self, name: str, generation: int | None, device, pin: bool, timeout: float | None):
        from weightd import cuda
        from weightd.client import gpu  # only here: nothing of CUDA is touched on CPU-only paths

        dev = cuda.resolve(device)
        reply = self.manifest_reply(name, generation, device=cuda.device_uuid(dev.index), timeout=timeout)
        manifest = Manifest.from_dict(reply["manifest"])
        if reply.get("cuda"):
            block, offsets = gpu.open_shared(reply["cuda"], manifest)
        else:
            block, offsets = gpu.copy_to_device(Mapping(manifest, owner=self.daemon_uid), dev, pin)
        return DeviceCopy(manifest, block, self.daemon_uid), rebuild(
            manifest, [block] * len(manifest.storages), offsets
        )


def _hf_wants(model, skeleton: dict | None) -> bool:
    """``weightd.client.hf.wants``, without importing it for a model that is no Hugging Face one."""
    if not (skeleton and isinstance(skeleton.get("hf"), dict)):
        return False
    from weightd.client import hf

    return hf.wants(model, skeleton)


def _attachment(mapping, tensors: dict, copies: int, build: float, seconds: float, device=None) -> Attachment:
    from weightd.client.module import Attachment

    m = mapping.manifest
    return Attachment(
        name=m.name,
        generation=m.generation,
        segment=m.segment,
        uuid=m.uuid,
        nbytes=m.nbytes,
        tensors=len(tensors),
        copies=copies,
        build_seconds=build,
        attach_seconds=seconds,
        device=device,
    )


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while a manifest becomes tensors.

    Decoding a manifest allocates a few thousand small objects; in a process that imported
    torch that is enough to set off a full collection of its whole heap, which measured 60 ms
    in the middle of a 6 ms attach. Nothing made here is cyclic garbage, so the collection can
    wait for the next allocation outside.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- module-level API: one cached Client per thread and socket ---

_local = threading.local()


def cached_client(socket: str | None) -> Client:
    """This thread's Client for ``socket`` (made on first use, made again after a fork)."""
    key = os.path.abspath(socket or protocol.default_socket())
    cache = getattr(_local, "clients", None)
    if cache is None or _local.pid != os.getpid():
        cache = _local.clients = {}
        _local.pid = os.getpid()
    client = cache.get(key)
    if client is None:
        client = cache[key] = Client(key)
    return client


def _with_client(socket, fn):
    client = cached_client(socket)
    try:
        return fn(client)
    except (DaemonNotRunning, RequestTimeout):
        # The daemon went away or was replaced: start afresh on the next call.
        _local.clients.pop(client.socket_path, None)
        client.close()
        raise


def attach(name: str, model=None, *, socket: str | None = None, **kwargs) -> nn.Module:
    """Attach model ``name`` of the node's daemon as an ``nn.Module``, zero-copy.

    >>> from weightd.client import attach
    >>> model = attach("bert", model=build_bert)   # milliseconds, whatever the size
    """
    return _with_client(socket, lambda c: c.attach(name, model, **kwargs))


def state_dict(name: str, *, socket: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Model ``name``'s tensors over the shared pages: ``{name: tensor}``, zero-copy.

    Keyword arguments as for ``Client.state_dict`` (``generation``, ``device``, ``pin``, ``timeout``).
    """
    return _with_client(socket, lambda c: c.state_dict(name, **kwargs))


def publish(name: str, obj, *, socket: str | None = None, **kwargs) -> dict:
    """Publish a module or dict of tensors as the newest generation of ``name``; keyword
    arguments as for Client.publish (``factory``, ``metadata``, ``timeout``)."""
    return _with_client(socket, lambda c: c.publish(name, obj, **kwargs))


def refresh(module: nn.Module, *, socket: str | None = None, generation: int | None = None) -> nn.Module:
    """Point an attached module at the newest generation of its model, in place."""
    return _with_client(socket, lambda c: c.refresh(module, generation=generation))


def info(module: nn.Module) -> Attachment | None:
    """What weightd knows about a module it attached (name, generation, copies, timings)."""
    return _attachments.get(module)


def detach(module: nn.Module) -> None:
    """Let go of the shared pages: every weight of ``module`` goes to the meta device.

    The mapping is unmapped once no other tensor over it is left (Note [a mapping outlives
    its tensors]); the module keeps its structure and can be attached again.
    """
    from weightd.client.module import meta_twins

    twins = meta_twins(module)  # not non-persistent buffers; tied weights stay tied
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for k, t in table.items():
                if t is not None and id(t) in twins:
                    table[k] = twins[id(t)]
    _attachments.pop(module, None)

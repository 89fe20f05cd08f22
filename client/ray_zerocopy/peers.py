"""A model read from storage once per cluster: other nodes fill their segments from peers.

Note [one storage read per cluster]
    ``load_everywhere``, ``publish_everywhere`` (so ``ModelWrapper``) and ``ensure_daemons``
    put a model into ONE node's daemon (from storage, or from the publishing process); every
    other node copies it from a node that already holds it, through Ray's object store:

    - every node has a ``NodeDaemon`` actor (ray_zerocopy.daemons; ``ensure_daemons`` starts
      one per node, also where the daemon was already running). It is the node's agent: its
      ``serve`` threads send chunks of what the node's daemon holds, its ``fill`` threads copy
      models into the node's daemon. Nothing on the way starts a Ray worker process, and none
      of it imports torch (Note [no worker starts on the way]);
    - a holder maps the sealed segment (the daemon's uid, the seal and the uuid checked, as
      ``Mapping`` does) and returns each chunk (``CHUNK`` bytes) as a numpy array, which Ray
      copies into the holder node's object store, with an xxh3-128 digest of the bytes made
      where they were read (seeded with the chunk's offset, so a chunk in the wrong place does
      not match either);
    - the receiver reserves a segment from ITS daemon for exactly the source's layout
      (``publish_begin`` with the source's ``Manifest.layout_digest`` and ``via="peer:<node>"``),
      keeps ``WINDOW`` chunks asked for, checks each digest, writes it straight into the
      segment (one ``pwrite`` from the object store's buffer) and drops its reference at once,
      so Ray frees both copies (Note [the object store's bound]). The daemon seals the segment
      only if it holds the source's layout; the manifest is the source's (names, dtypes,
      shapes, storages, ties), under this daemon's name, generation and uuid;
    - a small registry (the detached ``Peers`` actor) knows which nodes hold each model and
      hands out holders, least busy first, each serving at most ``SERVES`` transfers at a
      time: a node that finishes becomes a holder, so copies spread as a tree (1, 3, 9...
      holders), not all from the first node. A holder that fails mid-transfer (its node died,
      its daemon unloaded the model, it sent nothing for ``CHUNK_TIMEOUT``) is dropped and the
      transfer goes on from another holder, keeping the chunks already written; with no holder
      left, one receiver reads storage again (a load's path) and the others copy from it, or,
      for a publish, the publishing process sends it again (``spread``'s ``reship``);
    - every wait has a deadline: registry calls ``REGISTRY_TIMEOUT``, a chunk
      ``CHUNK_TIMEOUT``, a whole transfer ``transfer_deadline(nbytes)``; a receiver waiting for
      a chunk looks every ``HEARTBEAT`` whether the holder's node is still alive (Ray's node
      table), so a dead holder is replaced within seconds, not after ``CHUNK_TIMEOUT``. A transfer that cannot
      finish is abandoned (``publish_commit`` with ``abort``): its segment is removed and
      nothing is served.

    Whoever may use the Ray cluster can read the weights in transit, as any Ray object (and
    can run code as the daemons' user on every node anyway). The digest guards against
    corruption, not against someone who can write to the object store.

Note [a copy that starts before the seal]
    ``load_everywhere`` does not wait for the reading node's segment to be sealed: its agent
    starts the load (``Reading.start``) and hands back the manifest as soon as the daemon has
    laid the segment out (the ``loading`` op: the layout is known before the data, and
    ``layout.write`` writes the header and manifest first). The registry hands that node out
    as a *streaming* holder, and the other nodes pull chunks from it while it still reads
    storage: its agent sends a chunk once the segment's watermark (Note [the watermark] in
    weightd.segment) is past it, as the daemon says (the word in its mapping is only a hint,
    on a CPU that reorders memory accesses), so what it sends is final, with its digest made
    there. Then:

    - a receiver that has every chunk waits for the source's verdict before it commits
      (``Peers.settled``): only once the source sealed (its load returned) is the copy sealed;
      a copy is never served while its source could still fail;
    - a source whose load fails or is stopped (a bad file, an unload, a deadline) is settled
      ``failed``: every copy from it is abandoned, nothing of it is served anywhere, and
      ``load_everywhere`` raises the load's own error;
    - a source whose node (or agent) dies before it sealed is settled ``lost``: what came from
      it is dropped (it was never known complete), and the copies go on as when a holder dies
      (another holder, else one node reads storage again).

Note [the caller that goes away]
    The process that called ``load_everywhere`` (the driver) may die mid-load. The copies then
    go on and finish, as a plain ``weightd load`` goes on when its client goes: the load runs
    in the reading node's agent and the copies in the other nodes' agents (detached actors),
    and nothing they need comes from the driver. The verdict on the source (Note [a copy that
    starts before the seal]) is given by the reading node's agent when its load ends (the
    thread of ``Reading.start``, which also knows the error); a receiver waiting for it looks
    every ``HEARTBEAT`` whether the reading node is still alive and settles it ``lost`` itself
    if not. So each receiver commits (or abandons) within seconds of the load's end, not at
    its deadline, and the registry keeps the model everywhere (a node added later gets it)
    once it sealed. A driver that dies before it registered the load leaves the model served
    on the reading node alone, and nothing elsewhere.

Note [a re-load that fails]
    ``load_everywhere`` of a name the cluster already keeps (a new file, a new version) replaces
    it only once the new spread is held whole somewhere (its source sealed, or a copy of it
    committed, or a node read it again): until then the registry keeps the old one current
    (``Peers.current``), and every daemon serves the old generation (a copy being written is a
    reservation beside it; the reading daemon keeps what it served until its load seals). A
    re-load that fails abandons its copies and leaves the old one served everywhere, and a node
    added later still gets the old one.

Note [no worker starts on the way]
    Measured on one machine (benchmarks/fanout.py), a 1 GiB copy between two nodes took 7.5 s
    when a task and an actor were started for it, against ~1.1 s for Ray alone moving the
    same bytes: each new Ray worker process imported torch (this package's ``__init__``
    did), ~1.5 s on an idle core. The agents run in the ``NodeDaemon`` actors that
    ``ensure_daemons`` starts before any transfer, this module and the package import no
    torch, and the registry is started by ``ensure_daemons`` too. What is left is the
    object store's copy into the holder's store, Ray's pull between the stores, and one
    ``pwrite`` into the segment per chunk.

Note [the object store's bound]
    A chunk asked for sits in the holder's object store once made and, once pulled, in the
    receiver's too, until the receiver drops its reference after writing it. With ``WINDOW``
    chunks asked for per transfer, at most ``2 * WINDOW`` (= 4) chunks of one transfer are
    in the cluster's object stores, plus what Ray has released but not yet deleted: it deletes
    released objects in batches, every ``free_objects_period_milliseconds`` (a cluster
    setting, 1000 by default: at ~1 GB/s a second of chunks). benchmarks/fanout.py measures
    the peak with the period at 20 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import random
import threading
import time

import numpy as np
import ray
import xxhash

from weightd import entry, segment
from weightd.client.connection import Connection
from weightd.client.ray_zerocopy.daemons import ACTOR_PREFIX, NAMESPACE, agent, on_node
from weightd.errors import ModelNotFound, SegmentError, TransferFailed, WeightdError
from weightd.manifest import PAGE_ALIGN, Manifest, align_up

log = logging.getLogger("weightd")

CHUNK = 64 << 20  # bytes per object; a multiple of the page size
WINDOW = 2  # chunks asked for per transfer (Note [the object store's bound]: <= 2 * WINDOW stored)
SERVES = 2  # transfers one holder serves at once; the others wait for it or for a new holder
CHUNK_TIMEOUT = 60.0  # a holder that sends no chunk in this long is given up
HEARTBEAT = 1.0  # how often a receiver waiting for a chunk looks whether the holder's node is alive
STREAM_POLL = 0.005  # how often a holder looks at a streaming segment's watermark
LAYOUT_POLL = 0.01  # how often a reading node's agent asks its daemon whether the segment is laid out
REGISTRY_TIMEOUT = 30.0  # the registry answers every call within this (acquire: "busy" first)
LEASE_WAIT = 10.0  # how long one acquire waits for a free holder before answering "busy"
LEASE_IDLE = 2 * CHUNK_TIMEOUT  # a transfer that wrote no chunk in this long no longer holds its holder
MIN_RATE = 20e6  # bytes/s: a transfer slower than this, after START, is given up
START = 60.0
REGISTRY = "weightd-peers"
UNCLAIMED = 600.0  # a load's outcome nobody asked for in this long is dropped (its caller died)


def digest(data, offset: int) -> str:
    """The digest a chunk travels with: xxh3-128 of its bytes, seeded with where they go."""
    return xxhash.xxh3_128_hexdigest(data, seed=offset)


def transfer_deadline(nbytes: int) -> float:
    """Seconds one copy of ``nbytes`` may take, all holders and waits included."""
    return START + nbytes / MIN_RATE


def spread(
    name: str, first: str, sockets: dict[str, str], *, path: str | None = None, factory=None, reship=None
) -> dict:
    """Copy ``name``, which node ``first``'s daemon holds, into every other node's daemon of
    ``sockets`` from peers; returns ``{node: the daemon's model summary}``. ``path`` (and
    ``factory``): where to read it again if no node is left to copy from; ``reship(node)``:
    else, put it into ``node``'s daemon again from the caller (a publish), returning its
    summary. Registered even on a one-node cluster: a node added later copies it from there."""
    source = _get(agent(first).describe.remote(sockets[first], name), REGISTRY_TIMEOUT)
    key = source["uuid"]
    reg = registry()
    _get(reg.register.remote(name, key, source, path, factory), REGISTRY_TIMEOUT)
    _get(reg.hold.remote(key, first, _holding(sockets[first], source)), REGISTRY_TIMEOUT)
    others = {n: s for n, s in sockets.items() if n != first}
    nbytes = Manifest.from_dict(source).nbytes
    out, orphans = _fill_all(name, key, others, nbytes=nbytes)
    if orphans and reship is not None:  # no holder left: the publisher sends it again, once
        again = sorted(orphans)[0]
        out[again] = reship(again)
        mine = _get(agent(again).describe.remote(orphans[again], name), REGISTRY_TIMEOUT)
        _get(reg.hold.remote(key, again, _holding(orphans[again], mine)), REGISTRY_TIMEOUT)
        rest, orphans = _fill_all(name, key, {n: s for n, s in orphans.items() if n != again}, nbytes=nbytes)
        out.update(rest)
    if orphans:
        raise TransferFailed(
            f"copying {name!r} to nodes {sorted(orphans)}: no node holds it any more (every holder "
            "went away), and nothing says where to read it again: publish it again"
        )
    return out


def spread_load(name: str, first: str, sockets: dict[str, str], path: str, factory=None) -> dict:
    """Have node ``first``'s daemon read ``path`` as ``name`` and every other node of
    ``sockets`` copy it from peers while it is still read (Note [a copy that starts before
    the seal]); ``{node: the daemon's model summary}``. Raises the load's own error (every
    copy abandoned) if it fails."""
    reader = agent(first)
    try:
        started = ray.get(reader.start_load.remote(sockets[first], path, name, factory))
    except ray.exceptions.RayTaskError as e:
        raise _cause(e) from None
    source = started["manifest"]
    key, streaming = source["uuid"], started["streaming"]
    reg = registry()
    _get(reg.register.remote(name, key, source, path, factory, streaming), REGISTRY_TIMEOUT)
    _get(reg.hold.remote(key, first, _holding(sockets[first], source, streaming)), REGISTRY_TIMEOUT)
    others = {n: s for n, s in sockets.items() if n != first}
    nbytes = Manifest.from_dict(source).nbytes
    fills = _start_fills(name, key, others)
    out, failed = {}, None
    # The reading node's agent gives the verdict (Note [the caller that goes away]); this one
    # too, in case that did not reach the registry: the first stands.
    try:
        out[first] = ray.get(reader.finish_load.remote(started["token"]))
    except ray.exceptions.RayTaskError as e:  # the load failed or was stopped
        failed = _cause(e)
        _get(reg.settle.remote(key, "failed", f"{type(failed).__name__}: {failed}"), REGISTRY_TIMEOUT)
    except ray.exceptions.RayError as e:  # its node or agent died: the others go on without it
        log.warning("node %s died while it read %s (%s): the others go on without it", first, name, e)
        _get(reg.settle.remote(key, "lost"), REGISTRY_TIMEOUT)
        _get(reg.drop.remote(key, first, "its node died while it read storage"), REGISTRY_TIMEOUT)
    else:
        _get(reg.settle.remote(key, "sealed"), REGISTRY_TIMEOUT)
    try:
        rest, _ = _collect(name, fills, others, nbytes=nbytes)
    except TransferFailed:
        if failed is None:
            raise
        rest = {}  # each copy was abandoned because the load failed: its error is the one to raise
    if failed is not None:
        raise failed
    out.update(rest)
    return out


def complete(sockets: dict[str, str], held: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """Fill every node of ``sockets`` whose daemon lacks (``held``: what each serves) a model
    the cluster keeps everywhere: a node added later, a daemon replaced. Returns ``{name:
    {node: summary}}``."""
    reg = registry(create=False)
    if reg is None:
        return {}
    models = _get(reg.everywhere.remote(), REGISTRY_TIMEOUT)
    out = {}
    for name, (key, nbytes) in models.items():
        missing = {n: s for n, s in sockets.items() if name not in held.get(n, ())}
        if missing:
            out[name], orphans = _fill_all(name, key, missing, nbytes=nbytes)
            if orphans:
                log.warning("no node holds %s any more: nodes %s stay without it", name, sorted(orphans))
    return out


def forget(name: str) -> None:
    """The cluster no longer keeps ``name`` everywhere (unloaded)."""
    reg = registry(create=False)
    if reg is not None:
        _get(reg.forget.remote(name), REGISTRY_TIMEOUT)


def registry(create: bool = True):
    """The cluster's ``Peers`` actor (None if there is none and ``create`` is False)."""
    try:
        return ray.get_actor(REGISTRY, namespace=NAMESPACE)
    except ValueError:
        if not create:
            return None
    here = ray.get_runtime_context().get_node_id()
    return Peers.options(
        name=REGISTRY,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=on_node(here),
    ).remote()


def _get(ref, timeout: float):
    """``ray.get`` with a deadline: a registry or agent that does not answer is a TransferFailed."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        _cancel(ref)
        raise TransferFailed(
            f"a weightd actor of the Ray cluster did not answer in {timeout:g} s (is the cluster "
            "overloaded, or a node gone?)"
        ) from None


def _cancel(ref) -> None:
    """Cancel a call that overran its deadline, where Ray can (a running thread it cannot stop)."""
    with contextlib.suppress(Exception):
        ray.cancel(ref)


def _fill_all(name: str, key: str, sockets: dict[str, str], *, nbytes: int):
    """Copy into every node of ``sockets`` at once; ``({node: summary}, {node: socket} of the
    nodes that found no holder and nothing to read)``. Every transfer has ended (served or
    abandoned) when this returns; another failure raises (the first)."""
    return _collect(name, _start_fills(name, key, sockets), sockets, nbytes=nbytes)


def _cause(e: ray.exceptions.RayTaskError) -> BaseException:
    """The daemon's own error a remote call raised, as the caller would have had it; else ``e``."""
    return e.cause if isinstance(e.cause, WeightdError) else e


def _start_fills(name: str, key: str, sockets: dict[str, str]) -> dict:
    return {n: agent(n).fill.remote(name, key, n, s) for n, s in sockets.items()}


def _collect(name: str, refs: dict, sockets: dict[str, str], *, nbytes: int):
    """``_fill_all``'s outcome, once every fill of ``refs`` (``{node: ref}``) ended."""
    # each fill gives up by its own deadline; this one is later, for a node that died with it
    deadline = time.monotonic() + transfer_deadline(nbytes) + REGISTRY_TIMEOUT
    out, orphans, failures = {}, {}, []
    for node, ref in refs.items():
        try:
            summary = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
        except ray.exceptions.GetTimeoutError:
            _cancel(ref)
            failures.append(TransferFailed(f"copying {name!r} to node {node}: it did not end in time"))
        except ray.exceptions.RayTaskError as e:
            failures.append(_cause(e))
        except ray.exceptions.RayError as e:
            failures.append(TransferFailed(f"copying {name!r} to node {node}: {e}"))
        else:
            if summary is None:
                orphans[node] = sockets[node]
            else:
                out[node] = summary
    if failures:
        raise failures[0]
    return out, orphans


def _holding(socket: str, manifest: dict, streaming: bool = False) -> dict:
    return {
        "socket": socket,
        "name": manifest["name"],
        "generation": manifest["generation"],
        "uuid": manifest["uuid"],
        "streaming": streaming,  # still being read from storage: Note [a copy that starts before the seal]
    }


def _chunks(source: Manifest) -> list[tuple[int, int]]:
    """(offset, length) pieces of the source's data area: every storage, and the padding between."""
    end = _data_end(source)
    return [(o, min(CHUNK, end - o)) for o in range(segment.DATA_OFFSET, end, CHUNK)]


def _data_end(source: Manifest) -> int:
    """Where the source's last storage ends: its manifest is written after that."""
    return max((s.offset + s.nbytes for s in source.storages), default=segment.DATA_OFFSET)


# --- where the bytes are written: this node's daemon, a reservation for the source's layout ---


class Copy:
    """A segment of this node's daemon being filled with a copy of another daemon's model.

    Reserved for exactly the source's layout (``Store.reserve`` with ``layout`` and ``via``);
    ``commit`` has the daemon check and seal it; ``abort`` removes it. Never served unfinished.
    ``client``: a ``Connection`` (or ``Client``) to this node's daemon.
    """

    def __init__(self, client: Connection, source: Manifest, via: str):
        r = client.call(
            "publish_begin", name=source.name, nbytes=source.nbytes, layout=source.layout_digest(), via=via
        )
        self.client = client
        self.manifest = Manifest(
            name=source.name,
            generation=r["generation"],
            storages=list(source.storages),
            tensors=list(source.tensors),
            source=source.source,
            format=source.format,
            created=r["created"],
            segment=r["segment"],
            uuid=r["uuid"],
            skeleton=source.skeleton,
            metadata=dict(source.metadata),
            origin={**(source.origin or {}), "via": via},
        )
        self.folder = segment.Folder.announced(r.get("directory"), r.get("huge_pages_asked"))
        self.manifest_offset = align_up(_data_end(source), PAGE_ALIGN)
        self.encoded = self.manifest.to_json()
        size = self.folder.rounded_size(self.manifest_offset + len(self.encoded))
        try:
            if r.get("reuse"):  # a retired generation's pages (Note [reusing a segment's pages])
                self.seg = segment.Segment.reopen(self.folder, r["segment"], size, r["owner"][0])
            else:
                self.seg = segment.Segment.create(
                    self.folder, r["segment"], size, r["mode"], tuple(r["owner"])
                )
        except BaseException:
            self._abandon()
            raise

    def write(self, offset: int, data) -> None:
        self.seg.write(offset, data)

    def commit(self) -> dict:
        """Write the manifest, mark it finished; the daemon checks the layout and serves it."""
        try:
            self.seg.write_manifest(self.encoded, self.manifest_offset, self.manifest.uuid)
            self.seg.seal(segment.PUBLISHED)  # only the daemon seals (weightd.segment)
            self.seg.close()
        except BaseException:
            self.abort()
            raise
        return self.client.call("publish_commit", segment=self.manifest.segment)["model"]

    def abort(self) -> None:
        """Remove the segment and the reservation: nothing of it is served."""
        self.seg.destroy()
        self._abandon()

    def _abandon(self) -> None:
        with contextlib.suppress(WeightdError):
            self.client.call("publish_commit", segment=self.manifest.segment, abort=True)


# --- what the node's agent (its NodeDaemon actor) runs ---


class _HolderFailed(Exception):
    """The holder could not send a chunk (its node or daemon went away): use another."""


class _NoHolder(Exception):
    """No node holds the model any more and nothing says where to read it again."""


def describe(socket: str, name: str) -> dict:
    """The manifest of what this node's daemon serves as ``name``: a spread's source."""
    with Connection(socket) as c:
        return c.manifest(name, full=True).to_dict()


def load(socket: str, path: str, name: str, factory: str | None) -> dict:
    """Have this node's daemon read ``path`` (the one storage read of a ``load_everywhere``)."""
    with Connection(socket) as c:
        return c.load(path, name, factory=factory)


def unload(socket: str, name: str) -> bool:
    """Unload ``name`` from this node's daemon; whether it had it (``unload_everywhere``)."""
    try:
        with Connection(socket) as c:
            c.unload(name)
        return True
    except ModelNotFound:
        return False


class Reading:
    """The storage reads this node's agent runs for ``spread_load``, each in a thread of its
    own: ``start`` answers as soon as the daemon has laid the segment out, ``finish`` once the
    load ended (Note [a copy that starts before the seal]). The thread gives the registry the
    verdict on a load that streamed (Note [the caller that goes away])."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loads: dict[str, tuple[threading.Event, dict]] = {}

    def start(self, socket: str, path: str, name: str, factory: str | None) -> dict:
        """``{"token", "manifest", "streaming"}``: the manifest of the segment being written
        (``streaming``), or of the sealed one if the load ended before it was seen."""
        token = os.urandom(8).hex()
        done, box = threading.Event(), {}

        def run() -> None:
            try:
                box["summary"] = load(socket, path, name, factory)
            except BaseException as e:  # noqa: BLE001 - handed to finish()
                box["error"] = e
            with self._lock:
                done.set()
                box["ended"] = time.monotonic()
                key = box.get("key")  # set by start() only while the load ran: it streamed
            if key is not None:
                _settle(key, box.get("error"))

        with self._lock:
            # a load whose caller died is never finished: let go of its outcome after a while
            stale = time.monotonic() - UNCLAIMED
            for t in [t for t, (_, b) in self._loads.items() if b.get("ended", stale) < stale]:
                del self._loads[t]
            self._loads[token] = (done, box)
        threading.Thread(target=run, name=f"weightd-read-{name}", daemon=True).start()
        want = os.path.realpath(path)
        with Connection(socket) as c:
            while not done.wait(LAYOUT_POLL):
                try:
                    manifest = c.call("loading", name=name)["manifest"]
                except ModelNotFound:  # not laid out yet
                    continue
                if (manifest.get("origin") or {}).get("path") != want:  # another load's
                    continue
                with self._lock:
                    if not done.is_set():  # else it ended meanwhile: its sealed manifest below
                        box["key"] = manifest["uuid"]
                        return {"token": token, "manifest": manifest, "streaming": True}
            if "error" in box:  # ended first, and failed: finish() raises it
                self.finish(token)
            manifest = c.manifest(name, box["summary"]["generation"], full=True).to_dict()
        return {"token": token, "manifest": manifest, "streaming": False}

    def finish(self, token: str) -> dict:
        """The load's model summary, once it ended; raises its error."""
        with self._lock:
            done, box = self._loads.pop(token)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["summary"]


def _settle(key: str, error: BaseException | None) -> None:
    """Tell the registry how the load that streamed ``key`` ended (from the node that ran it)."""
    state, why = ("sealed", None) if error is None else ("failed", f"{type(error).__name__}: {error}")
    try:
        reg = registry(create=False)
        if reg is not None:
            _get(reg.settle.remote(key, state, why), REGISTRY_TIMEOUT)
    except (TransferFailed, ray.exceptions.RayError) as e:  # the caller, if alive, settles it too
        log.warning("could not tell the registry that the load of %s %s: %s", key, state, e)


def fill(name: str, key: str, node: str, socket: str) -> dict | None:
    """Copy ``name`` (spread ``key``) into this node's daemon from peers; its summary, or None
    when no node holds it any more and nothing says where to read it again."""
    reg = registry(create=False)
    if reg is None:
        raise TransferFailed(f"copying {name!r} to node {node}: the cluster's registry of holders is gone")
    entry = _get(reg.entry.remote(name, key), REGISTRY_TIMEOUT)
    if entry is None:
        raise TransferFailed(f"copying {name!r} to node {node}: it was unloaded or replaced meanwhile")
    source = Manifest.from_dict(entry["manifest"])
    deadline = time.monotonic() + transfer_deadline(source.nbytes)
    pieces = _chunks(source)
    written: set[int] = set()
    with Connection(socket) as c:
        box: list[Copy | None] = [None]  # this node's copy, once reserved (shared with _pull)

        def abandon() -> None:
            if box[0] is not None:
                copy, box[0] = box[0], None
                copy.abort()

        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferFailed(
                        f"copying {name!r} to node {node}: not done in "
                        f"{transfer_deadline(source.nbytes):.0f} s (holders too slow or too busy): "
                        "nothing of it is served; load it again"
                    )
                lease = _get(reg.acquire.remote(key, min(LEASE_WAIT, left)), REGISTRY_TIMEOUT)
                if lease["kind"] == "busy":
                    continue
                if lease["kind"] == "failed":
                    raise _source_failed(name, node, lease)
                if lease["kind"] == "storage":
                    abandon()
                    return _reload(c, reg, key, node, socket, source, lease)
                if lease["kind"] == "none":
                    abandon()
                    return None
                if lease["kind"] != "peer":
                    raise TransferFailed(
                        f"copying {name!r} to node {node}: it was unloaded or replaced meanwhile"
                    )
                holder = lease["node"]

                def reserve(holder=holder) -> Copy:
                    if box[0] is None:
                        box[0] = Copy(c, source, via=f"peer:{holder}")
                    return box[0]

                verdict = None
                try:
                    _pull(reserve, lease, pieces, written, reg, key, deadline)
                    if lease["streaming"]:  # committed only once the source sealed
                        verdict = _settled(reg, key, name, node, holder, deadline)
                except _HolderFailed as e:
                    log.warning(
                        "node %s failed while sending %s (%s): trying another holder", holder, name, e
                    )
                    if lease["streaming"]:  # a load that failed, or a node that died before its seal?
                        abandon()
                        written.clear()
                        verdict = _settled(reg, key, name, node, holder, deadline)
                        if verdict["state"] == "failed":
                            raise _source_failed(name, node, verdict) from None
                    reg.drop.remote(key, holder, str(e))
                    continue
                finally:
                    reg.release.remote(key, holder, lease["lease"])
                if verdict is not None and verdict["state"] != "sealed":
                    if verdict["state"] == "failed":
                        raise _source_failed(name, node, verdict)
                    # lost before its seal: what came from it was never known complete
                    abandon()
                    written.clear()
                    continue
                copy, box[0] = box[0], None
                holding = _holding(socket, copy.manifest.to_dict())
                summary = copy.commit()
                _get(reg.hold.remote(key, node, holding), REGISTRY_TIMEOUT)
                return summary
        except BaseException:
            abandon()
            raise


def _settled(reg, key: str, name: str, node: str, source: str, deadline: float) -> dict:
    """The verdict on a streaming source (Note [a copy that starts before the seal]): ``sealed``,
    ``failed`` (with its ``error``) or ``lost``; waits for it until ``deadline``. Looks every
    ``HEARTBEAT`` whether the reading node ``source`` is alive: if it died, it says so to the
    registry itself, whoever else could (Note [the caller that goes away])."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferFailed(
                f"copying {name!r} to node {node}: the node it was copied from did not finish reading "
                "it in time: nothing of it is served; load it again"
            )
        verdict = _get(reg.settled.remote(key, min(HEARTBEAT, left)), REGISTRY_TIMEOUT)
        if verdict["state"] != "streaming":
            return verdict
        if not _alive(source):
            _get(reg.settle.remote(key, "lost"), REGISTRY_TIMEOUT)
            _get(reg.drop.remote(key, source, "its node died while it read storage"), REGISTRY_TIMEOUT)


def _source_failed(name: str, node: str, verdict: dict) -> TransferFailed:
    return TransferFailed(
        f"copying {name!r} to node {node}: the load it was copied from failed ({verdict['error']}): "
        "nothing of it is served on any node"
    )


def _reload(c, reg, key: str, node: str, socket: str, source: Manifest, lease: dict) -> dict:
    """No node holds it any more: read storage again, here, and serve the others from here."""
    try:
        log.warning("no node holds %s any more: node %s reads %s again", source.name, node, lease["path"])
        summary = c.load(lease["path"], source.name, factory=lease["factory"])
        mine = c.manifest(source.name, summary["generation"], full=True)
        if mine.layout_digest() == source.layout_digest():  # the file did not change meanwhile
            _get(reg.hold.remote(key, node, _holding(socket, mine.to_dict())), REGISTRY_TIMEOUT)
        return summary
    finally:
        reg.reading_done.remote(key)


def _pull(reserve, lease: dict, pieces, written: set[int], reg, key: str, deadline: float) -> None:
    """Copy the pieces not written yet from ``lease``'s holder, ``WINDOW`` asked for at a time,
    into ``reserve()`` (this node's ``Copy``: reserved while the first chunks are on their way)."""
    holder = lease["node"]
    try:
        server = ray.get_actor(agent_name(holder), namespace=NAMESPACE)
    except ValueError:
        raise _HolderFailed("its agent is gone") from None
    todo = iter([p for p in pieces if p[0] not in written])
    pending: dict = {}
    args = (lease["socket"], lease["name"], lease["generation"], lease["uuid"])

    def ask() -> None:
        for offset, length in todo:
            pending[server.read.remote(*args, offset, length, lease["hook"], lease["streaming"])] = offset
            return

    def give_up(why: str):
        for ref in pending:
            _cancel(ref)
        return _HolderFailed(why)

    for _ in range(WINDOW):
        ask()
    copy = reserve()  # reserving the segment's pages takes as long as a chunk or two on the way
    last = time.monotonic()  # when the last chunk came
    while pending:
        now = time.monotonic()
        if now >= deadline or now - last >= CHUNK_TIMEOUT:
            raise give_up(f"no chunk in {now - last:.0f} s")
        # in HEARTBEAT steps: a holder whose node died is noticed now, not after CHUNK_TIMEOUT
        wait = min(HEARTBEAT, deadline - now, last + CHUNK_TIMEOUT - now)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(wait, 0.0))
        if not ready:
            if not _alive(holder):
                raise give_up("its node died")
            continue
        last = time.monotonic()
        ref = ready[0]
        del ready
        offset = pending.pop(ref)
        try:
            sent, data = ray.get(ref, timeout=CHUNK_TIMEOUT)
        except (ray.exceptions.RayError, WeightdError) as e:
            raise _HolderFailed(f"{type(e).__name__}: {str(e)[:300]}") from None
        finally:
            del ref
        ask()  # the next one is on its way while this one is checked and written
        if digest(data, offset) != sent:
            raise TransferFailed(
                f"the chunk at byte {offset} of {copy.manifest.name!r} from node {holder} does not match the "
                "digest made where it was read: the copy is discarded and nothing of it is served (retry; "
                "if it persists, check that node's memory)"
            )
        copy.write(offset, data)
        nbytes = len(data)
        del data  # the object store's buffer: freed on both nodes now that nothing refers to it
        written.add(offset)
        reg.chunk_done.remote(key, nbytes, lease["lease"])


def _alive(node: str) -> bool:
    """Whether Ray's node table (the GCS) still has ``node`` alive."""
    return any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes())


def agent_name(node: str) -> str:
    return ACTOR_PREFIX + node


class Sources:
    """The segments this node's agent sends chunks of, each mapped once (not once per chunk)
    and let go when the daemon no longer serves that copy or nobody asked for it a while."""

    IDLE = 30.0

    def __init__(self):
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}
        self._maps: dict[str, tuple[_Mapped, float]] = {}  # uuid -> (the mapping, last used)

    def read(
        self,
        socket: str,
        name: str,
        generation: int,
        uuid: str,
        offset: int,
        length: int,
        hook,
        streaming: bool = False,
    ):
        """Bytes ``offset`` to ``offset + length`` of generation ``generation`` of ``name`` in
        this node's daemon, and their digest. ``streaming``: a load still writing it (Note [a
        copy that starts before the seal]): sent once they are below its watermark."""
        with self._lock:  # one request at a time on a connection; the copy below runs unlocked
            c = self._conn(socket)
            now = time.monotonic()
            # let go of a segment nobody asked for a while, or that its daemon removed (unloaded):
            # the mapping alone would keep its pages (Note [segment lifetime after unlink])
            for u in [u for u, (src, used) in self._maps.items() if now - used > self.IDLE or src.gone()]:
                del self._maps[u]
            if streaming and uuid in self._maps:
                src = self._maps[uuid][0]  # its segment says whether it is still what was asked for
            else:
                try:
                    manifest = self._manifest(c, name, generation, streaming)
                except WeightdError:  # not served any more; or the daemon went (a new one: a new connection)
                    self._maps.pop(uuid, None)
                    self._conns.pop(socket, None)
                    c.close()
                    raise
                if manifest.uuid != uuid:
                    self._maps.pop(uuid, None)
                    raise SegmentError(
                        f"{name!r} generation {generation} here is no longer the copy asked for"
                    )
                src = (
                    self._maps[uuid][0] if uuid in self._maps else _Mapped(manifest, c.daemon_uid, streaming)
                )
            self._maps[uuid] = (src, now)
        src.wait(offset + length, name, lambda: self._final(socket, name, generation, uuid))
        data = np.frombuffer(src.view, dtype=np.uint8, count=length, offset=offset)
        made = digest(data, offset)
        if hook == "fail":  # tests: a holder that cannot send (its daemon unloaded the model)
            raise SegmentError(f"{name!r} is no longer served here (test hook)")
        if hook == "corrupt":  # tests: what a flipped bit on the way looks like
            data = data.copy()
            data[length // 2] ^= 0x10
        elif hook == "stall" and offset >= segment.DATA_OFFSET + 2 * CHUNK:  # tests: a node that hangs
            time.sleep(2 * CHUNK_TIMEOUT)
        # Ray copies the array into the object store before this returns to the caller; the
        # mapping stays while a chunk of it is on its way (the memoryview's export keeps it).
        return made, data

    def _conn(self, socket: str) -> Connection:
        """This agent's connection to the daemon at ``socket`` (made once; ``_lock`` held)."""
        return self._conns.get(socket) or self._conns.setdefault(socket, Connection(socket))

    def _final(self, socket: str, name: str, generation: int, uuid: str) -> int | None:
        """How far the daemon says segment ``uuid`` is final: its watermark while its load
        streams, None once it serves it sealed, -1 when it says neither (its load just ended:
        served in a moment, or removed, which ``_Mapped.gone`` sees). Note [the watermark] in
        weightd.segment."""
        with self._lock:
            c = self._conn(socket)
            try:
                reply = c.call("loading", name=name)
                if reply["manifest"]["uuid"] == uuid:
                    return reply["mark"]
            except ModelNotFound:
                pass  # sealed (served), or failed
            try:
                served = c.manifest(name, generation)
            except ModelNotFound:
                return -1
            if served.uuid != uuid:
                raise SegmentError(f"{name!r} generation {generation} here is no longer the copy asked for")
            return None

    @staticmethod
    def _manifest(c: Connection, name: str, generation: int, streaming: bool) -> Manifest:
        if streaming:
            try:
                return Manifest.from_dict(c.call("loading", name=name)["manifest"])
            except ModelNotFound:
                pass  # sealed meanwhile (served), or failed: the served generation says which
        return c.manifest(name, generation)


class _Mapped:
    """A read-only shared mapping of a segment of this node's daemon, checked as ``Mapping``
    checks it (the daemon's uid, the uuid), sealed or, ``streaming``, still being loaded."""

    def __init__(self, manifest: Manifest, owner: int, streaming: bool):
        self.fd = entry.open_announced(manifest, owner)
        try:
            self.mapping = mmap.mmap(
                self.fd, os.fstat(self.fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ
            )
            header = segment.read_header(self.mapping)
            if header.uuid != manifest.uuid or not (header.sealed or streaming):
                self.mapping.close()
                raise SegmentError(f"segment {manifest.segment} is not the copy the daemon described")
        except BaseException:
            os.close(self.fd)
            raise
        # trusted only as the daemon said it (Note [the watermark]): served, or not yet
        self.sealed = not streaming
        if self.sealed:
            segment.populate(self.mapping)  # its pages at once; a streaming one's come as they are read
        self.view = memoryview(self.mapping)

    def gone(self) -> bool:
        """Whether its daemon removed the segment (a load that failed or stopped, an unload)."""
        return os.fstat(self.fd).st_nlink == 0

    def wait(self, end: int, name: str, final) -> None:
        """Until every byte below ``end`` is final (sealed, or below the watermark: Note [the
        watermark] in weightd.segment). The mapped words are a hint: ``final()`` (the daemon's
        answer: the mark, or None once sealed) decides. Raises once the segment was removed:
        the load failed or was stopped, or the model was unloaded."""
        give_up, seen = time.monotonic() + CHUNK_TIMEOUT / 2, -1
        while True:
            if self.gone():
                raise SegmentError(
                    f"{name!r} is gone from this node's daemon (its load failed or was stopped, or it "
                    "was unloaded)"
                )
            if self.sealed:
                return
            mark = segment.read_watermark(self.mapping)
            if mark >= end or segment.read_seal(self.mapping) == segment.SEALED:
                told = final()
                if told is None:
                    self.sealed = True
                    return
                if told >= end:
                    return
                mark = told
            if mark != seen:
                give_up, seen = time.monotonic() + CHUNK_TIMEOUT / 2, mark
            elif time.monotonic() > give_up:
                raise SegmentError(
                    f"the load of {name!r} on this node wrote nothing for {CHUNK_TIMEOUT / 2:.0f} s"
                )
            time.sleep(STREAM_POLL)

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


@ray.remote
class Peers:
    """The cluster's registry: which nodes hold which model, and who copies from whom.

    Every method answers at once but ``acquire`` and ``settled``, which wait at most the time
    they are given. ``lease_idle``: LEASE_IDLE (tests give less)."""

    def __init__(self, lease_idle: float = LEASE_IDLE):
        # key -> {name, manifest, nbytes, path, factory}: every spread not ended or abandoned
        self.models: dict[str, dict] = {}
        # name -> the key the cluster keeps everywhere (Note [a re-load that fails]): a spread
        # becomes current once a node holds it whole, and the one it replaces is let go then
        self.current: dict[str, str] = {}
        self.holders: dict[str, dict[str, dict]] = {}  # key -> {node: holding}
        # (key, node) -> {lease: when its transfer last wrote a chunk}: the transfers it serves
        # now. A lease whose receiver went silent (its node died) stops counting after lease_idle.
        self.serving: dict[tuple[str, str], dict[int, float]] = {}
        self.lease_idle = lease_idle
        self.leases = itertools.count(1)
        self.reading: set[str] = set()  # keys whose storage is being read again
        self.hooks: dict[str, str] = {}  # node -> test hook for the transfers it serves
        self.copied: dict[str, int] = {}  # key -> bytes copied between nodes so far
        # key -> {"state": streaming | sealed | failed | lost, "error"}: Note [a copy that starts
        # before the seal]; a key not here was sealed when registered. The first verdict stands.
        self.verdicts: dict[str, dict] = {}
        self.dropped: list[tuple[str, str, str]] = []  # (key, node, why) of every holder dropped
        self.changed = None

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def register(
        self, name: str, key: str, manifest: dict, path: str | None, factory, streaming: bool = False
    ) -> None:
        async with self._cond():
            verdict = self.verdicts.get(key)
            if verdict is not None and verdict["state"] == "failed":  # settled before it was registered
                return
            self.models[key] = {
                "name": name,
                "manifest": manifest,
                "nbytes": sum(st[1] for st in manifest["storages"]),
                "path": path,
                "factory": factory,
            }
            self.holders.setdefault(key, {})
            if streaming and verdict is None:
                self.verdicts[key] = {"state": "streaming", "error": None}
            elif not streaming or verdict["state"] == "sealed":
                self._promote(key)
            self.changed.notify_all()

    def _promote(self, key: str) -> None:
        """``key`` is held whole somewhere: the cluster keeps it everywhere, instead of the
        spread of the same name it replaces."""
        model = self.models.get(key)
        if model is None:
            return
        old = self.current.get(model["name"])
        if old != key:
            self.current[model["name"]] = key
            if old is not None:
                self._retire(old)

    def _retire(self, key: str) -> None:
        self.models.pop(key, None)
        self.holders.pop(key, None)

    async def forget(self, name: str) -> None:
        async with self._cond():
            self.current.pop(name, None)
            for key in [k for k, m in self.models.items() if m["name"] == name]:
                self._retire(key)
            self.changed.notify_all()

    async def everywhere(self) -> dict[str, tuple[str, int]]:
        return {name: (key, self.models[key]["nbytes"]) for name, key in self.current.items()}

    async def entry(self, name: str, key: str) -> dict | None:
        m = self.models.get(key)
        return m if m is not None and m["name"] == name else None

    async def holding(self, key: str) -> list[str]:
        return sorted(self.holders.get(key, {}))

    async def hold(self, key: str, node: str, holding: dict) -> None:
        async with self._cond():
            if key in self.holders:
                if self.verdicts.get(key, {}).get("state", "streaming") != "streaming":
                    holding = {**holding, "streaming": False}  # settled before it got here
                self.holders[key][node] = holding
                if not holding["streaming"]:
                    self._promote(key)
            self.changed.notify_all()

    async def drop(self, key: str, node: str, why: str = "") -> None:
        async with self._cond():
            if self.holders.get(key, {}).pop(node, None) is not None:
                self.dropped.append((key, node, why))
            self.changed.notify_all()

    async def settle(self, key: str, state: str, error: str | None = None) -> None:
        """The streaming source of ``key`` ``sealed``, ``failed`` (its load's ``error``: every
        copy abandoned, what was kept before under that name stays) or was ``lost`` (its node
        died first). The first verdict stands: the reading node's agent gives it, or the
        driver, or a receiver that saw the node die (Note [the caller that goes away])."""
        async with self._cond():
            if self.verdicts.get(key, {}).get("state", "streaming") != "streaming":
                return
            self.verdicts[key] = {"state": state, "error": error}
            for holding in self.holders.get(key, {}).values():
                holding["streaming"] = False
            if state == "failed":
                self._retire(key)
            elif state == "sealed":
                self._promote(key)
            self.changed.notify_all()

    async def settled(self, key: str, wait: float) -> dict:
        """The verdict on ``key``'s streaming source; ``streaming`` if none came in ``wait`` s."""
        cond = self._cond()
        async with cond:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    cond.wait_for(lambda: self._verdict(key)["state"] != "streaming"), wait
                )
            return self._verdict(key)

    def _verdict(self, key: str) -> dict:
        return self.verdicts.get(key, {"state": "sealed", "error": None})

    async def drops(self) -> list[tuple[str, str, str]]:
        """(key, node, why) of every holder dropped so far (tests)."""
        return list(self.dropped)

    async def release(self, key: str, node: str, lease: int) -> None:
        async with self._cond():
            self.serving.get((key, node), {}).pop(lease, None)
            self.changed.notify_all()

    def _busy(self, key: str, node: str) -> tuple[int, float]:
        """How many transfers ``node`` serves for ``key``, and when the first of them lapses."""
        leases = self.serving.get((key, node), {})
        now = time.monotonic()
        for lease in [n for n, seen in leases.items() if now - seen > self.lease_idle]:
            del leases[lease]
        return len(leases), min(leases.values(), default=now) + self.lease_idle

    async def reading_done(self, key: str) -> None:
        async with self._cond():
            self.reading.discard(key)
            self.changed.notify_all()

    async def acquire(self, key: str, wait: float) -> dict:
        """A holder to copy from (the least busy with a free slot), or ``storage`` (read it
        again: no holder is left, and nobody else is reading it), or ``none`` (no holder and
        nothing to read), ``gone`` (unloaded or replaced); ``busy`` if none frees up in
        ``wait`` seconds (ask again). A lease lapses (its receiver went silent) while waiting."""
        cond = self._cond()
        end = time.monotonic() + wait
        async with cond:
            while True:
                if self._verdict(key)["state"] == "failed":
                    return {"kind": "failed", **self._verdict(key)}
                holders = self.holders.get(key)
                model = self.models.get(key)
                if holders is None or model is None:
                    return {"kind": "gone"}
                busy = {n: self._busy(key, n) for n in holders}
                free = [n for n in holders if busy[n][0] < SERVES]
                if free:
                    node = min(free, key=lambda n: (busy[n][0], random.random()))
                    lease = next(self.leases)
                    self.serving.setdefault((key, node), {})[lease] = time.monotonic()
                    return {
                        "kind": "peer",
                        "node": node,
                        "lease": lease,
                        "hook": self.hooks.get(node),
                        **holders[node],
                    }
                if not holders and key not in self.reading:
                    if model["path"] is None:
                        return {"kind": "none"}
                    self.reading.add(key)
                    return {"kind": "storage", "path": model["path"], "factory": model["factory"]}
                now = time.monotonic()
                if now >= end:
                    return {"kind": "busy"}
                lapse = min((b[1] for b in busy.values()), default=end)  # nothing tells when a lease lapses
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(cond.wait(), max(min(end, lapse) - now, 0.0))

    async def chunk_done(self, key: str, nbytes: int, lease: int) -> None:
        self.copied[key] = self.copied.get(key, 0) + nbytes
        for leases in self.serving.values():
            if lease in leases:
                leases[lease] = time.monotonic()

    async def progress(self) -> dict[str, int]:
        """Bytes copied between nodes so far, per spread (tests, benchmarks)."""
        return dict(self.copied)

    async def hook(self, node: str, what: str | None) -> None:
        """Tests: make the transfers ``node`` serves corrupt a chunk (``corrupt``), stall after
        two chunks (``stall``) or fail at once (``fail``); None: behave."""
        if what is None:
            self.hooks.pop(node, None)
        else:
            self.hooks[node] = what

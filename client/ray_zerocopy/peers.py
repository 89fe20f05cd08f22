"""A model read from storage once per cluster: other nodes fill their segments from peers.

Note [one storage read per cluster]
    ``load_everywhere``, ``publish_everywhere`` (so ``ModelWrapper``) and ``ensure_daemons``
    put a model into ONE node's daemon (from storage, or from the publishing process); every
    other node copies it from a node that already holds it, through Ray's object store:

    - a holder's ``PeerServer`` actor (one per node, threads) maps the segment through the
      client's own mapping (``Mapping``: the daemon's uid checked, the seal and uuid checked)
      and returns each chunk (``CHUNK`` bytes) as a numpy array, which Ray puts into the holder
      node's object store, with an xxh3-128 digest of the bytes made where they were read
      (seeded with the chunk's offset, so a chunk in the wrong place does not match either);
    - on the receiving node a ``_fill`` task reserves a segment from ITS daemon for exactly the
      source's layout (``publish_begin`` with the source's ``Manifest.layout_digest`` and
      ``via="peer:<node>"``), asks for at most ``WINDOW`` chunks at a time, checks each digest,
      writes it straight into the segment (one ``pwrite`` from the object store's buffer) and
      drops its reference at once, so Ray frees both copies. The daemon seals the segment only
      if it holds the source's layout; the manifest is the source's (names, dtypes, shapes,
      storages, ties), under this daemon's name, generation and uuid;
    - a small registry (the detached ``Peers`` actor) knows which nodes hold each model and
      hands out holders, least busy first, each serving at most ``SERVES`` transfers at a
      time: a node that finishes becomes a holder, so copies spread as a tree (1, 3, 9...
      holders), not all from the first node. A holder that fails mid-transfer (its node died,
      its daemon unloaded the model) is dropped and the transfer goes on from another holder,
      keeping the chunks already written; with no holder left, one receiver reads storage again
      (a load's path) and the others copy from it. A transfer that cannot finish is abandoned
      (``publish_commit`` with ``abort``): its segment is removed and nothing is served.

    Whoever may use the Ray cluster can read the weights in transit, as any Ray object (and
    can run code as the daemons' user on every node anyway). The digest guards against
    corruption, not against someone who can write to the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import numpy as np
import ray
import xxhash

from weightd import segment
from weightd.client import client as _client
from weightd.client.mapping import Mapping
from weightd.client.ray_zerocopy.daemons import NAMESPACE, on_node
from weightd.errors import SegmentError, TransferFailed, WeightdError
from weightd.manifest import PAGE_ALIGN, Manifest, align_up

log = logging.getLogger("weightd")

CHUNK = 32 << 20  # bytes per object; a multiple of the page size
WINDOW = 4  # chunks in flight per transfer: the object store holds at most this many for it
SERVES = 2  # transfers one holder serves at once; the others wait for it or for a new holder
CHUNK_TIMEOUT = 120.0  # a holder that sends no chunk in this long is given up
REGISTRY = "weightd-peers"
SERVER_PREFIX = "weightd-peer-"


def digest(data, offset: int) -> str:
    """The digest a chunk travels with: xxh3-128 of its bytes, seeded with where they go."""
    return xxhash.xxh3_128_hexdigest(data, seed=offset)


def spread(name: str, first: str, sockets: dict[str, str], *, path: str | None = None, factory=None) -> dict:
    """Copy ``name``, which node ``first``'s daemon holds, into every other node's daemon of
    ``sockets`` from peers; returns ``{node: the daemon's model summary}``. ``path`` (and
    ``factory``): where to read it again if no node is left to copy from."""
    others = {n: s for n, s in sockets.items() if n != first}
    if not others:
        return {}
    source = ray.get(_describe.options(scheduling_strategy=on_node(first)).remote(sockets[first], name))
    key = source["uuid"]
    reg = registry()
    ray.get(reg.register.remote(name, key, source, path, factory))
    ray.get(reg.hold.remote(key, first, _holding(sockets[first], source)))
    return _fill_all(name, key, others)


def complete(sockets: dict[str, str], held: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """Fill every node of ``sockets`` whose daemon lacks (``held``: what each serves) a model
    the cluster keeps everywhere: a node added later, a daemon replaced. Returns ``{name:
    {node: summary}}``."""
    reg = registry(create=False)
    if reg is None:
        return {}
    models = ray.get(reg.everywhere.remote())
    out = {}
    for name, key in models.items():
        missing = {n: s for n, s in sockets.items() if name not in held.get(n, ())}
        if missing:
            out[name] = _fill_all(name, key, missing)
    return out


def forget(name: str) -> None:
    """The cluster no longer keeps ``name`` everywhere (unloaded)."""
    reg = registry(create=False)
    if reg is not None:
        ray.get(reg.forget.remote(name))


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


def actor_names() -> list[str]:
    """The detached actors of this module (for ``shutdown_daemons``)."""
    from ray.util import list_named_actors

    return sorted(
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and (a["name"] == REGISTRY or a["name"].startswith(SERVER_PREFIX))
    )


def _fill_all(name: str, key: str, sockets: dict[str, str]) -> dict[str, dict]:
    refs = {
        n: _fill.options(scheduling_strategy=on_node(n)).remote(name, key, n, s) for n, s in sockets.items()
    }
    out, failures = {}, []
    for node, ref in refs.items():  # every transfer ends (served or abandoned) before this returns
        try:
            out[node] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            failures.append(e.cause if isinstance(e.cause, WeightdError) else e)
        except ray.exceptions.RayError as e:
            failures.append(TransferFailed(f"copying {name!r} to node {node}: {e}"))
    if failures:
        raise failures[0]
    return out


def _holding(socket: str, manifest: dict) -> dict:
    return {
        "socket": socket,
        "name": manifest["name"],
        "generation": manifest["generation"],
        "uuid": manifest["uuid"],
    }


def _chunks(source: Manifest) -> list[tuple[int, int]]:
    """(offset, length) pieces of the source's data area: every storage, and the padding between."""
    end = max((s.offset + s.nbytes for s in source.storages), default=segment.DATA_OFFSET)
    return [(o, min(CHUNK, end - o)) for o in range(segment.DATA_OFFSET, end, CHUNK)]


# --- where the bytes are written: this node's daemon, a reservation for the source's layout ---


class Copy:
    """A segment of this node's daemon being filled with a copy of another daemon's model.

    Reserved for exactly the source's layout (``Store.reserve`` with ``layout`` and ``via``);
    ``commit`` has the daemon check and seal it; ``abort`` removes it. Never served unfinished.
    """

    def __init__(self, client: _client.Client, source: Manifest, via: str):
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
        end = max((s.offset + s.nbytes for s in source.storages), default=segment.DATA_OFFSET)
        self.manifest_offset = align_up(end, PAGE_ALIGN)
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


# --- the tasks and actors ---


@ray.remote(num_cpus=0, max_retries=0)
def _describe(socket: str, name: str) -> dict:
    with _client.Client(socket) as c:
        return c.manifest(name, full=True).to_dict()


class _HolderFailed(Exception):
    """The holder could not send a chunk (its node or daemon went away): use another."""


@ray.remote(num_cpus=0, max_retries=0)
def _fill(name: str, key: str, node: str, socket: str) -> dict:
    """On the receiving node: copy ``name`` into this node's daemon from peers."""
    reg = registry(create=False)
    if reg is None:
        raise TransferFailed(f"copying {name!r} to node {node}: the cluster's registry of holders is gone")
    entry = ray.get(reg.entry.remote(name, key))
    if entry is None:
        raise TransferFailed(f"copying {name!r} to node {node}: it was unloaded or replaced meanwhile")
    source = Manifest.from_dict(entry["manifest"])
    pieces = _chunks(source)
    written: set[int] = set()
    with _client.Client(socket) as c:
        copy = None
        try:
            while True:
                lease = ray.get(reg.acquire.remote(key))
                if lease["kind"] == "storage":
                    if copy is not None:
                        copy.abort()
                        copy = None
                    return _reload(c, reg, key, node, socket, source, lease)
                if lease["kind"] != "peer":
                    raise TransferFailed(
                        f"copying {name!r} to node {node}: no node holds it any more"
                        + ("" if lease["kind"] == "none" else " (it was unloaded or replaced meanwhile)")
                    )
                holder = lease["node"]
                try:
                    if copy is None:
                        copy = Copy(c, source, via=f"peer:{holder}")
                    _pull(copy, lease, pieces, written, reg, key)
                except _HolderFailed as e:
                    log.warning(
                        "node %s failed while sending %s (%s): trying another holder", holder, name, e
                    )
                    reg.drop.remote(key, holder)
                    continue
                finally:
                    reg.release.remote(key, holder)
                holding = _holding(socket, copy.manifest.to_dict())
                summary, copy = copy.commit(), None
                ray.get(reg.hold.remote(key, node, holding))
                return summary
        except BaseException:
            if copy is not None:
                copy.abort()
            raise


def _reload(c, reg, key: str, node: str, socket: str, source: Manifest, lease: dict) -> dict:
    """No node holds it any more: read storage again, here, and serve the others from here."""
    try:
        log.warning("no node holds %s any more: node %s reads %s again", source.name, node, lease["path"])
        summary = c.load(lease["path"], source.name, factory=lease["factory"])
        mine = c.manifest(source.name, summary["generation"], full=True)
        if mine.layout_digest() == source.layout_digest():  # the file did not change meanwhile
            ray.get(reg.hold.remote(key, node, _holding(socket, mine.to_dict())))
        return summary
    finally:
        reg.reading_done.remote(key)


def _pull(copy: Copy, lease: dict, pieces, written: set[int], reg, key: str) -> None:
    """Copy the pieces not written yet from ``lease``'s holder, ``WINDOW`` at a time."""
    holder = lease["node"]
    server = _server(holder)
    todo = iter([p for p in pieces if p[0] not in written])
    pending: dict = {}

    def ask() -> None:
        for offset, length in todo:
            ref = server.read.remote(
                lease["socket"],
                lease["name"],
                lease["generation"],
                lease["uuid"],
                offset,
                length,
                lease["hook"],
            )
            pending[ref] = offset
            return

    for _ in range(WINDOW):
        ask()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=CHUNK_TIMEOUT)
        if not ready:
            raise _HolderFailed(f"no chunk in {CHUNK_TIMEOUT:g} s")
        ref = ready[0]
        del ready
        offset = pending.pop(ref)
        try:
            sent, data = ray.get(ref)
        except (ray.exceptions.RayError, WeightdError) as e:
            raise _HolderFailed(f"{type(e).__name__}: {str(e)[:300]}") from None
        finally:
            del ref
        if digest(data, offset) != sent:
            raise TransferFailed(
                f"the chunk at byte {offset} of {copy.manifest.name!r} from node {holder} does not match the "
                "digest made where it was read: the copy is discarded and nothing of it is served (retry; "
                "if it persists, check that node's memory)"
            )
        copy.write(offset, data)
        del data  # the object store's buffer: freed on both nodes now that nothing refers to it
        written.add(offset)
        reg.chunk_done.remote(key)
        ask()


def _server(node: str):
    return PeerServer.options(
        name=SERVER_PREFIX + node,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=0,
        max_concurrency=2 * WINDOW,
        scheduling_strategy=on_node(node),
    ).remote()


@ray.remote
class PeerServer:
    """Sends chunks of the segments this node's daemon holds (one per node, threaded)."""

    def read(self, socket: str, name: str, generation: int, uuid: str, offset: int, length: int, hook):
        c = _client.cached_client(socket)
        manifest = c.manifest(name, generation)
        if manifest.uuid != uuid:
            raise SegmentError(f"{name!r} generation {generation} here is no longer the copy asked for")
        # The client's own mapping: the daemon's uid, the seal and the uuid are checked. It is
        # unmapped once Ray has copied the chunk into the object store (Note [a mapping outlives
        # its tensors]: the array below keeps it until then).
        mapping = Mapping(manifest, owner=c.daemon_uid)
        data = np.frombuffer(mapping.view, dtype=np.uint8, count=length, offset=offset)
        made = digest(data, offset)
        if hook == "corrupt":  # tests: what a flipped bit on the way looks like
            data = data.copy()
            data[length // 2] ^= 0x10
        elif hook == "stall" and offset >= segment.DATA_OFFSET + 2 * CHUNK:  # tests: a slow node
            time.sleep(600)
        return made, data


@ray.remote
class Peers:
    """The cluster's registry: which nodes hold which model, and who copies from whom."""

    def __init__(self):
        self.models: dict[str, dict] = {}  # name -> {key, manifest, path, factory}
        self.holders: dict[str, dict[str, dict]] = {}  # key -> {node: holding}
        self.serving: dict[tuple[str, str], int] = {}  # (key, node) -> transfers it serves now
        self.reading: set[str] = set()  # keys whose storage is being read again
        self.hooks: dict[str, str] = {}  # node -> test hook for the transfers it serves
        self.chunks: dict[str, int] = {}  # key -> chunks written so far (tests, benchmarks)
        self.changed = None

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def register(self, name: str, key: str, manifest: dict, path: str | None, factory) -> None:
        async with self._cond():
            old = self.models.get(name)
            if old is not None and old["key"] != key:
                self.holders.pop(old["key"], None)
            self.models[name] = {"key": key, "manifest": manifest, "path": path, "factory": factory}
            self.holders.setdefault(key, {})
            self.changed.notify_all()

    async def forget(self, name: str) -> None:
        async with self._cond():
            old = self.models.pop(name, None)
            if old is not None:
                self.holders.pop(old["key"], None)
            self.changed.notify_all()

    async def everywhere(self) -> dict[str, str]:
        return {name: m["key"] for name, m in self.models.items()}

    async def entry(self, name: str, key: str) -> dict | None:
        m = self.models.get(name)
        return m if m is not None and m["key"] == key else None

    async def holding(self, key: str) -> list[str]:
        return sorted(self.holders.get(key, {}))

    async def hold(self, key: str, node: str, holding: dict) -> None:
        async with self._cond():
            if key in self.holders:
                self.holders[key][node] = holding
            self.changed.notify_all()

    async def drop(self, key: str, node: str) -> None:
        async with self._cond():
            self.holders.get(key, {}).pop(node, None)
            self.changed.notify_all()

    async def release(self, key: str, node: str) -> None:
        async with self._cond():
            n = self.serving.get((key, node), 0) - 1
            if n > 0:
                self.serving[(key, node)] = n
            else:
                self.serving.pop((key, node), None)
            self.changed.notify_all()

    async def reading_done(self, key: str) -> None:
        async with self._cond():
            self.reading.discard(key)
            self.changed.notify_all()

    async def acquire(self, key: str) -> dict:
        """A holder to copy from (the least busy with a free slot; waits for one), or
        ``storage`` (read it again: no holder is left, and nobody else is reading it), or
        ``none`` / ``gone``."""
        async with self._cond():
            while True:
                holders = self.holders.get(key)
                model = next((m for m in self.models.values() if m["key"] == key), None)
                if holders is None or model is None:
                    return {"kind": "gone"}
                free = [n for n in holders if self.serving.get((key, n), 0) < SERVES]
                if free:
                    node = min(free, key=lambda n: (self.serving.get((key, n), 0), random.random()))
                    self.serving[(key, node)] = self.serving.get((key, node), 0) + 1
                    return {"kind": "peer", "node": node, "hook": self.hooks.get(node), **holders[node]}
                if not holders and key not in self.reading:
                    if model["path"] is None:
                        return {"kind": "none"}
                    self.reading.add(key)
                    return {"kind": "storage", "path": model["path"], "factory": model["factory"]}
                await self.changed.wait()

    async def chunk_done(self, key: str) -> None:
        self.chunks[key] = self.chunks.get(key, 0) + 1

    async def progress(self) -> dict[str, int]:
        return dict(self.chunks)

    async def hook(self, node: str, what: str | None) -> None:
        """Tests: make the transfers ``node`` serves corrupt a chunk (``corrupt``) or stall
        after two chunks (``stall``); None: behave."""
        if what is None:
            self.hooks.pop(node, None)
        else:
            self.hooks[node] = what

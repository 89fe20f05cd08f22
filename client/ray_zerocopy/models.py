"""A model on every node of a Ray cluster: loaded from a path, published from this process, or
unloaded, in each node's own daemon (Note [the node-local socket] in ray_zerocopy.daemons).

Loads and publishes reach one node's daemon; the others copy from peers (Note [one storage read
per cluster] in ray_zerocopy.peers)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import ray
import torch
from torch import nn

from weightd.client import client as _client
from weightd.client.ray_zerocopy import peers
from weightd.client.ray_zerocopy.daemons import agent, ensure_daemons, node_socket, on_node, ping


def node_sockets(socket: str | None = None) -> dict[str | None, str]:
    """Where a model must go for every process of the cluster to attach it: ``{node: socket}``.

    Without Ray running, and with a daemon on this machine, that is this machine's daemon
    alone (key None). Without either, Ray is started here, as ``ray.put`` would.
    """
    if not ray.is_initialized():
        local = node_socket(socket)
        if ping(local):
            return {None: local}
        ray.init()
    return ensure_daemons(socket)


def publish_everywhere(name: str, obj, *, socket: str | None = None) -> dict[str | None, dict]:
    """Publish a module (or dict of tensors) as ``name`` in every node's daemon.

    This node's daemon gets it straight from this process's memory; every other node copies it
    from a node that holds it (Note [one storage read per cluster] in ray_zerocopy.peers).
    Returns ``{node id: the daemon's model summary}``.

    >>> ray_zerocopy.publish_everywhere("policy", policy_net)
    """
    sockets = node_sockets(socket)
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if None in sockets:  # no Ray: this machine's daemon alone
        return {None: _client.publish(name, obj, socket=sockets[None])}

    def ship(node: str) -> dict:
        if node == here:
            return _client.publish(name, obj, socket=sockets[here])
        # a driver outside the cluster's nodes, or a resend: through the object store once
        ref = ray.put(_Shipment(_tensors(obj)))
        try:
            return ray.get(
                _publish.options(scheduling_strategy=on_node(node)).remote(name, ref, sockets[node])
            )
        finally:
            del ref

    first = here if here in sockets else sorted(sockets)[0]
    out: dict[str | None, dict] = {first: ship(first)}
    # with no holder left mid-copy (every node that had it went away), this process sends it again
    out.update(peers.spread(name, first, sockets, reship=ship))
    return out


def load_everywhere(
    name: str,
    path: str,
    *,
    socket: str | None = None,
    factory: str | None = None,
    reader: str | None = None,
) -> dict[str, dict]:
    """Have every node's daemon serve the checkpoint at ``path``, read from storage once.

    One node's daemon reads ``path`` (``reader``, a node id; default: this process's node, else
    the first): every other node copies it from a node that holds it, through Ray's object
    store (Note [one storage read per cluster] in ray_zerocopy.peers). ``path`` must be
    readable where it is read: by ``reader``, and by any node that has to read it again
    because every holder died. Returns ``{node id: the daemon's model summary}``.

    >>> ray_zerocopy.load_everywhere("llama", "/shared/llama-3-8b")
    """
    sockets = node_sockets(socket)
    if None in sockets:
        return {None: _client.Client(sockets[None]).load(path, name, factory=factory)}
    here = ray.get_runtime_context().get_node_id()
    first = reader or (here if here in sockets else sorted(sockets)[0])
    if first not in sockets:
        raise ValueError(
            f"reader={first!r} is not an alive node of this cluster: pick one of {sorted(sockets)}"
        )
    # by the nodes' agents: no worker process starts for it (Note [no worker starts on the way]),
    # and the others copy it while it is read (Note [a copy that starts before the seal])
    return peers.spread_load(name, first, sockets, path, factory)


def unload_everywhere(name: str, *, socket: str | None = None) -> int:
    """Unload ``name`` from every node's daemon that has it; returns how many had it.

    Workers still attached keep working on what they mapped.
    """
    if not ray.is_initialized():
        return int(peers.unload(node_socket(socket), name))
    peers.forget(name)  # first: a node added meanwhile is not filled with it
    sockets = ensure_daemons(socket)
    # by the nodes' agents: no worker process starts for it (Note [no worker starts on the way])
    return sum(ray.get([agent(n).unload.remote(s, name) for n, s in sockets.items()]))


def _tensors(obj):
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    return obj


class _Shipment:
    """Tensors on their way to another node's daemon, with their storages shipped once.

    Ray's serializer copies each tensor on its own, so a tied weight (or two views of one
    storage) would arrive as separate copies and be published twice. Here each storage travels
    once, as a uint8 array Ray keeps zero-copy in the object store, and every tensor as
    ``(storage, offset, shape, stride, dtype)`` over it; ``tensors()`` puts them back together
    with the same sharing, which ``publish`` then lays out once.
    """

    def __init__(self, tree):
        self.storages: list = []
        index: dict[tuple[int, int], int] = {}

        def describe(t: torch.Tensor):
            if t.layout != torch.strided or t.is_nested or t.device.type != "cpu":
                return t  # as it is, for publish to store or refuse with its own message
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in index:
                index[key] = len(self.storages)
                self.storages.append(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
            return _Ref(
                index[key],
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                str(t.dtype).removeprefix("torch."),
            )

        self.tree = _map(tree, describe, torch.Tensor)

    def tensors(self):
        with warnings.catch_warnings():
            # The object store hands out read-only arrays; publish only reads them.
            warnings.simplefilter("ignore", UserWarning)
            storages = [torch.from_numpy(a).untyped_storage() for a in self.storages]

        def rebuild(r: "_Ref") -> torch.Tensor:
            return torch.empty(0, dtype=getattr(torch, r.dtype)).set_(
                storages[r.storage], r.offset, r.shape, r.stride
            )

        return _map(self.tree, rebuild, kind=_Ref)


class _Ref(NamedTuple):
    storage: int
    offset: int
    shape: tuple
    stride: tuple
    dtype: str


def _map(tree, fn, kind):
    """``tree`` (dicts at any depth) with ``fn`` applied to each leaf of type ``kind``."""
    if isinstance(tree, kind):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn, kind) for k, v in tree.items()}
    return tree


# num_cpus=0: the daemon's work, not the node's; it must not wait for a free CPU.
@ray.remote(num_cpus=0)
def _publish(name: str, shipment: _Shipment, socket: str) -> dict:
    with _client.Client(socket) as c:
        return c.publish(name, shipment.tensors())

"""weightd for Ray: attach in actors, tasks and Ray Data UDFs; a daemon and a model on every node.

>>> from weightd.client import ray_zerocopy
>>> ray.init()
>>> ray_zerocopy.ensure_daemons()                       # a weightd daemon on every node
>>> ray_zerocopy.load_everywhere("bert", "/shared/bert")  # ...holding the model

Then, in any actor, task or Ray Data UDF of the cluster, with no configuration:

>>> model = ray_zerocopy.attach("bert", model=build_bert)   # this node's daemon, zero-copy

Users of the ``ray-zerocopy`` package keep their code and change one import:

>>> from weightd.client.ray_zerocopy import ModelWrapper
>>> wrapper = ModelWrapper.from_model(pipeline, mode="actor")   # weights go to the daemons
>>> pipeline = wrapper.load()                                   # in each actor: attach

How a process finds its node's daemon: Note [the node-local socket] in
``weightd.client.ray_zerocopy.daemons`` (``socket=``, ``$WEIGHTD_SOCKET``, the daemon Ray started for this
node, the fixed per-node path). ``shutdown_daemons()`` stops the daemons Ray started and frees
their memory. Ray is needed here (``pip install 'weightd[ray]'``); ``import weightd.client``
does not import it.

Importing this package does not import torch (the attach side and ``ModelWrapper`` are
imported when first used): every Ray worker that runs a daemon actor or copies a model
between nodes imports it, and torch's import costs seconds on each (Note [one storage read
per cluster] in ray_zerocopy.peers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from weightd.client.ray_zerocopy.daemons import (
    NodeDaemon,
    alive_nodes,
    ensure_daemons,
    node_socket,
    ray_socket,
    shutdown_daemons,
)

if TYPE_CHECKING:
    from torch import nn

    from weightd.client.ray_zerocopy.models import (
        load_everywhere,
        node_sockets,
        publish_everywhere,
        unload_everywhere,
    )
    from weightd.client.ray_zerocopy.wrapper import ModelWrapper, RemoteModule

__all__ = [
    "ModelWrapper",
    "NodeDaemon",
    "RemoteModule",
    "alive_nodes",
    "attach",
    "ensure_daemons",
    "load_everywhere",
    "node_socket",
    "node_sockets",
    "publish_everywhere",
    "ray_socket",
    "shutdown_daemons",
    "state_dict",
    "unload_everywhere",
]

_LAZY = {
    "load_everywhere": "models",
    "node_sockets": "models",
    "publish_everywhere": "models",
    "unload_everywhere": "models",
    "ModelWrapper": "wrapper",
    "RemoteModule": "wrapper",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach(name: str, model=None, *, socket: str | None = None, **kwargs) -> nn.Module:
    """``weightd.client.attach`` with this Ray node's daemon found for you.

    >>> class Embed:                                   # a Ray Data UDF
    ...     def __init__(self):
    ...         self.model = ray_zerocopy.attach("bert", model=build_bert)
    """
    from weightd.client import client

    return client.attach(name, model, socket=node_socket(socket), **kwargs)


def state_dict(name: str, *, socket: str | None = None, generation: int | None = None):
    """``weightd.client.state_dict`` from this Ray node's daemon: ``{name: tensor}``, zero-copy."""
    from weightd.client import client

    return client.state_dict(name, socket=node_socket(socket), generation=generation)

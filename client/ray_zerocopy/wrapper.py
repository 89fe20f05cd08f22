"""``ModelWrapper``: the API of the ``ray-zerocopy`` package, with the weights in weightd.

``ray-zerocopy`` puts each model into the Ray object store and rebuilds it from there in every
actor. Here the weights go into each node's daemon once (``publish``), the wrapper that Ray
pickles to actors holds only model names and a weightless skeleton (ray_zerocopy.pipeline), and
``load()`` attaches: the actor's module is an ordinary ``nn.Module`` over the node's shared
pages. Differences a user of ``ray-zerocopy`` may notice, all on purpose:

- any dtype works (bf16, float8), tied weights stay tied, non-persistent buffers keep their
  values, and modules are found in nested attributes, lists and dicts;
- parameters are ordinary tensors with ``requires_grad=False`` (``load(requires_grad=True)``
  to fine-tune); in-place writes stay private to the process that makes them;
- the models stay in the daemons until ``wrapper.unload()`` or the daemons stop, so actors
  that start later (an autoscaling actor pool) or outlive the driver still find them.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import uuid
from typing import Literal

import ray
import torch
from torch import nn

from weightd.client import client as _client
from weightd.client.ray_zerocopy import pipeline as rp
from weightd.client.ray_zerocopy.daemons import node_socket
from weightd.client.ray_zerocopy.models import publish_everywhere, unload_everywhere
from weightd.errors import AttachError

Mode = Literal["task", "actor"]
PREPARED_SECONDS = 30.0  # a mapping made on unpickling serves load() this long; later, attach anew


class ModelWrapper:
    """A model or pipeline, published once per node, that actors and tasks ``load()`` zero-copy.

    Actor mode (Ray Data, long-lived actors):

    >>> wrapper = ModelWrapper.from_model(pipeline, mode="actor")
    >>> class Infer:
    ...     def __init__(self, model_wrapper):
    ...         self.pipeline = model_wrapper.load()       # attaches in milliseconds
    ...     def __call__(self, batch):
    ...         return {"y": self.pipeline(torch.as_tensor(batch["x"])).numpy()}
    >>> ds.map_batches(Infer, fn_constructor_kwargs={"model_wrapper": wrapper}, concurrency=4)

    Task mode: each call of a module (or of one of ``method_names``) runs in a Ray task that
    attaches the weights on its worker:

    >>> rewritten = ModelWrapper.for_tasks(pipeline)
    >>> rewritten(x)
    """

    def __init__(
        self,
        skeleton,
        name: str,
        paths: dict[str, str],
        *,
        is_standalone_module: bool,
        mode: Mode = "actor",
        methods: dict[str, list[str]] | None = None,
        socket: str | None = None,
    ):
        self._skeleton = skeleton
        self._name = name
        self._paths = paths  # every path that holds a module -> the holder key of that module
        self._is_standalone_module = is_standalone_module
        self._mode = mode
        self._methods = methods or {}
        self._socket = socket
        self._rewritten = None
        self._fresh = False  # the skeleton is this process's own unpickled copy, never loaded into
        self._prepared = None  # (when, client, mapping and tensors) mapped on unpickling, for load()
        self._loaded = None  # what the fresh skeleton became, to make the next skeleton from

    # --- the ray-zerocopy API ---

    @classmethod
    def from_model(
        cls,
        model_or_pipeline,
        mode: Mode = "actor",
        model_attr_names: list[str] | None = None,
        method_names: tuple | None = None,
        *,
        name: str | None = None,
        socket: str | None = None,
    ) -> "ModelWrapper":
        """Publish the modules of ``model_or_pipeline`` to every node's daemon and wrap them.

        ``model_attr_names`` limits which attributes hold the models (default: every module
        found, at any depth); other modules travel inside the skeleton, weights and all.
        ``method_names`` (task mode) are the module methods that run as Ray tasks; ``__call__``
        always does. ``name`` is the weightd model name (default: the class name and a random
        suffix); publishing under a name that exists makes a new generation of it.
        """
        if mode not in ("task", "actor"):
            raise ValueError(f"Invalid mode: {mode!r}: use mode='actor' or mode='task'")
        found = rp.find_modules(model_or_pipeline, model_attr_names)
        if not found:
            raise AttachError(
                f"found no nn.Module in the {type(model_or_pipeline).__name__}: wrap a module, or an object "
                "that holds "
                "modules in its attributes, lists or dicts (or name them with model_attr_names=)"
            )
        unique = rp.unique(found)
        standalone = list(found) == [""]
        keys = {p: rp.holder_key(p) for p in unique}
        paths = {p: keys[next(u for u, m in unique.items() if m is mod)] for p, mod in found.items()}
        name = name or _default_name(model_or_pipeline)
        published = unique[""] if standalone else nn.ModuleDict({keys[p]: m for p, m in unique.items()})
        publish_everywhere(name, published, socket=socket)
        methods = None
        if mode == "task":
            wanted = tuple(method_names) if method_names is not None else ("__call__",)
            methods = {
                keys[p]: sorted({m for m in wanted if hasattr(mod, m)} | {"__call__"})
                for p, mod in unique.items()
            }
        skeleton = rp.skeleton(model_or_pipeline, found)
        return cls(
            skeleton, name, paths, is_standalone_module=standalone, mode=mode, methods=methods, socket=socket
        )

    @classmethod
    def for_tasks(cls, model_or_pipeline, method_names: tuple | None = None, **kwargs):
        """``from_model(..., mode="task").load()``: the pipeline with its modules run as Ray tasks."""
        return cls.from_model(model_or_pipeline, mode="task", method_names=method_names, **kwargs).load()

    def load(self, device: str | torch.device | None = None, *, requires_grad: bool = False):
        """The model or pipeline, ready to use.

        Actor mode: attaches the weights from this node's daemon (in an actor, a task, or the
        driver) and returns the model (or a copy of the pipeline holding the attached models),
        in eval mode. ``device`` other than the CPU copies the weights there, as
        ``module.to(device)`` does.

        Task mode: returns the pipeline whose modules forward each call to a Ray task.
        """
        if self._mode == "task":
            return self._rewrite()
        if self._fresh:
            # The wrapper Ray unpickled in this actor holds a skeleton nobody else uses: fill it
            # instead of copying it (the first load() is the one an actor waits for).
            pipeline, self._fresh, self._loaded, self._skeleton = self._skeleton, False, self._skeleton, None
        else:
            pipeline = copy.deepcopy(self._weightless())
        target = pipeline if self._is_standalone_module else self._holder(pipeline)
        slots = rp.meta_slots(pipeline)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and time.monotonic() - prepared[0] < PREPARED_SECONDS:
            client, mapped = prepared[1], prepared[2]
            client.attach_mapped(mapped, target, requires_grad=requires_grad)
        else:
            _client.attach(self._name, target, socket=node_socket(self._socket), requires_grad=requires_grad)
        rp.retie(slots)
        for module in target.values() if isinstance(target, nn.ModuleDict) else [target]:
            module.eval()
            if device is not None and torch.device(device).type != "cpu":
                module.to(device)
        return pipeline

    def serialize(self) -> dict:
        """The wrapper's state as a dict; ``ModelWrapper.deserialize(**d)`` rebuilds it."""
        return {
            "skeleton": self._weightless(),
            "name": self._name,
            "paths": self._paths,
            "is_standalone_module": self._is_standalone_module,
            "mode": self._mode,
            "methods": self._methods,
            "socket": self._socket,
        }

    @classmethod
    def deserialize(
        cls,
        skeleton,
        name: str,
        paths: dict,
        is_standalone_module: bool = False,
        mode: Mode = "actor",
        methods: dict | None = None,
        socket: str | None = None,
    ) -> "ModelWrapper":
        return cls(
            skeleton,
            name,
            paths,
            is_standalone_module=is_standalone_module,
            mode=mode,
            methods=methods,
            socket=socket,
        )

    # --- beyond ray-zerocopy ---

    @property
    def model_name(self) -> str:
        """The weightd model that holds the weights (``weightd ls`` shows it)."""
        return self._name

    def unload(self) -> int:
        """Remove the weights from every node's daemon; attached workers keep theirs."""
        return unload_everywhere(self._name, socket=self._socket)

    # --- task mode: the wrapper is the rewritten pipeline, as in ray-zerocopy ---

    def __call__(self, *args, **kwargs):
        if self._mode != "task":
            raise TypeError(
                "this is an actor mode wrapper: call .load() in the actor, and call what it returns"
            )
        return self._rewrite()(*args, **kwargs)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._mode != "task":
            raise AttributeError(
                f"{attr!r}: this is an actor mode wrapper: call .load() in the actor and use what it returns"
            )
        return getattr(self._rewrite(), attr)

    def __getstate__(self) -> dict:
        return self.serialize()

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["skeleton"],
            state["name"],
            state["paths"],
            is_standalone_module=state["is_standalone_module"],
            mode=state["mode"],
            methods=state["methods"],
            socket=state["socket"],
        )
        self._fresh = True
        if self._mode == "actor":
            # Map the weights while Ray is still setting the actor up (as ray-zerocopy's arrays
            # arrive with the actor's arguments), so that load() only fills the skeleton. A
            # failure here is load()'s to report: it attaches afresh. Used once, and only soon
            # after (PREPARED_SECONDS): a load() much later attaches the newest generation.
            with contextlib.suppress(Exception):
                client = _client.cached_client(node_socket(self._socket))
                self._prepared = (time.monotonic(), client, client.prepare(self._name))

    def __repr__(self) -> str:
        return (
            f"ModelWrapper({self._name!r}, mode={self._mode!r}, modules={sorted(set(self._paths.values()))})"
        )

    def _weightless(self):
        """The skeleton; made anew (weights to meta) after a fresh one was loaded into."""
        if self._skeleton is None:
            self._skeleton = rp.skeleton(self._loaded, {p: rp.get_path(self._loaded, p) for p in self._paths})
            self._loaded = None
        return self._skeleton

    def _holder(self, pipeline) -> nn.ModuleDict:
        holder = nn.ModuleDict()
        for path, key in self._paths.items():
            if key not in holder:
                holder[key] = rp.get_path(pipeline, path)
        return holder

    def _rewrite(self):
        if self._rewritten is None:
            weightless = self._weightless()
            skeleton = weightless if self._is_standalone_module else self._holder(weightless)
            # One copy of the weightless skeleton in the object store, shared by every call.
            ref = ray.put(skeleton)
            shims = {
                key: RemoteModule(ref, self._name, key, self._is_standalone_module, methods, self._socket)
                for key, methods in self._methods.items()
            }
            if self._is_standalone_module:
                self._rewritten = shims["root"]
            else:
                rewritten = copy.copy(weightless)
                for path, key in self._paths.items():
                    rewritten = _replaced(rewritten, path, shims[key])
                self._rewritten = rewritten
        return self._rewritten


class RemoteModule:
    """Stands where a module was: calling it (or one of its methods) runs a Ray task that
    attaches the weights on its worker and calls the module there, under ``torch.no_grad()``."""

    def __init__(
        self, skeleton_ref, name: str, key: str, standalone: bool, methods: list[str], socket: str | None
    ):
        self._spec = (skeleton_ref, name, key, standalone, socket)
        self._methods = frozenset(methods)

    def __call__(self, *args, **kwargs):
        return self._remote("__call__", args, kwargs)

    def __getattr__(self, attr: str):
        if attr.startswith("_") or attr not in self._methods:
            raise AttributeError(
                f"{attr!r} is not a method this wrapper runs as a task (it runs {sorted(self._methods)}): "
                "pass method_names= to ModelWrapper.from_model"
            )
        return lambda *args, **kwargs: self._remote(attr, args, kwargs)

    def __getstate__(self):
        return {"_spec": self._spec, "_methods": self._methods}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _remote(self, method: str, args, kwargs):
        return ray.get(_call_module.remote(*self._spec, method, args, kwargs))


@ray.remote
def _call_module(
    skeleton, name: str, key: str, standalone: bool, socket: str | None, method: str, args, kwargs
):
    # Ray hands each call its own unpickled skeleton, so it can be filled in place.
    _client.attach(name, skeleton, socket=node_socket(socket))
    module = skeleton if standalone else skeleton[key]
    module.eval()
    with torch.no_grad():
        return getattr(module, method)(*args, **kwargs)


def _replaced(pipeline, path: str, value):
    """``pipeline`` with ``value`` at ``path``, copying the containers on the way (never the
    skeleton's own ones, which later calls of load() copy again)."""
    parts = path.split(".")
    head, rest = parts[0], ".".join(parts[1:])
    if isinstance(pipeline, (list, tuple)):
        items = list(pipeline)
        items[int(head)] = _replaced(items[int(head)], rest, value) if rest else value
        return type(pipeline)(items) if isinstance(pipeline, list) else tuple(items)
    if isinstance(pipeline, dict):
        out = dict(pipeline)
        out[head] = _replaced(out[head], rest, value) if rest else value
        return out
    out = copy.copy(pipeline)
    setattr(out, head, _replaced(getattr(pipeline, head), rest, value) if rest else value)
    return out


def _default_name(obj) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", type(obj).__name__.lower()) or "model"
    return f"{base[:100]}-{uuid.uuid4().hex[:8]}"

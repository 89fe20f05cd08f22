"""Putting mapped tensors into an ``nn.Module`` without copying a weight.

The skeleton is built with its *parameters* on the meta device (no memory, no weight
initialisation) and its buffers on the CPU, so that non-persistent buffers (rotary
frequencies, position ids: values a checkpoint does not hold) are computed by the module's own
``__init__``. Weights go in with ``load_state_dict(..., assign=True)``, which makes the
module's parameters views over the mapping instead of copying into them; ties the skeleton
had (``lm_head.weight is embed.weight``) are restored afterwards, since assigning replaces
each name's object separately.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

from weightd import dotted
from weightd.errors import AttachError

# Random initialisers have no meta kernel: PyTorch decomposes them through torch._refs, whose
# first use imports half of the compiler stack (1.5 s measured here). On a meta tensor they
# would compute nothing anyway, so skeleton building skips them.
_RANDOM_INIT = {
    getattr(torch.Tensor, n)
    for n in (
        "normal_",
        "uniform_",
        "random_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "bernoulli_",
    )
}


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INIT or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


# Note [skeletons on meta, per thread]
# A skeleton's parameters go to the meta device through torch's parameter-registration hook,
# installed once at import and switched on per thread: a thread building its own modules
# meanwhile gets real parameters. Nothing is patched (an earlier patch of
# nn.Module.register_parameter was seen by every thread), and the hook is never added or
# removed around a build (another thread registering a parameter iterates over the hooks).
# The skipped initialisers are a TorchFunctionMode, whose stack is per thread too.
_building = threading.local()


def _parameter_to_meta(module, name, param):
    if getattr(_building, "depth", 0) and param is not None and param.device.type != "meta":
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


register_module_parameter_registration_hook(_parameter_to_meta)


@contextlib.contextmanager
def params_on_meta():
    """Build modules with parameters on the meta device and buffers where they would be, in
    this thread only (Note [skeletons on meta, per thread])."""
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        with _SkipInitOnMeta():
            yield
    finally:
        _building.depth -= 1


def build_skeleton(model, skeleton: dict | None, name: str) -> nn.Module:
    """The module to fill: given, built by a callable, or described by the daemon."""
    if isinstance(model, nn.Module):
        return model
    if model is not None and not callable(model):
        raise AttachError(
            f"model= must be an nn.Module or a function that returns one, not {type(model).__name__}"
        )
    if model is None:
        model = _builder(skeleton, name)
    with params_on_meta():
        built = model()
    if not isinstance(built, nn.Module):
        raise AttachError(f"the model builder for {name!r} returned {type(built).__name__}, not an nn.Module")
    return built


def _builder(skeleton: dict | None, name: str):
    if skeleton and skeleton.get("factory"):
        try:
            obj = dotted.resolve(skeleton["factory"])
        except (ImportError, AttributeError) as e:
            raise AttachError(
                f"model {name!r} names the factory {skeleton['factory']!r}, which this process cannot "
                f"import ({e}): "
                "install that package here, or pass model= to attach"
            ) from None
        return obj
    raise AttachError(
        f"weightd does not know how to build the module for {name!r}: pass model= (an nn.Module, or a "
        "function "
        "that builds one) to attach, or load it with a factory (weightd serve --model NAME=PATH --factory "
        "NAME=pkg.module:function)"
    )


def meta_twins(module: nn.Module) -> dict[int, torch.Tensor]:
    """One meta-device twin per weight object of ``module`` (parameters and persistent
    buffers), keyed by the object's id: tied weights get one twin, so wherever the twins are
    put (in place, or as a ``copy.deepcopy`` memo) ties stay ties. Non-persistent buffers are
    values the module computes, not weights, and get none."""
    twins: dict[int, torch.Tensor] = {}
    for t in module.state_dict(keep_vars=True).values():
        if id(t) not in twins:
            meta = t.detach().to("meta")
            twins[id(t)] = (
                nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
            )
    return twins


@dataclass
class Attachment:
    """What ``weightd.client.info(module)`` says about an attached module."""

    name: str
    generation: int
    segment: str
    uuid: str
    nbytes: int
    tensors: int
    copies: int  # weights that did not end up inside the mapping (0 unless something forced a copy)
    build_seconds: float  # building the skeleton (the user's own code)
    attach_seconds: float  # everything, including the skeleton
    device: str | None = None  # where the weights are: None for the shared CPU pages


@dataclass
class _Slot:
    """One place a tensor lives in a module: ``owner._parameters[leaf]`` or ``owner._buffers[leaf]``."""

    owner: nn.Module
    leaf: str
    is_param: bool
    persistent: bool
    obj: torch.Tensor


def _slots(module: nn.Module) -> dict[str, _Slot]:
    """Every parameter and buffer by its full name, tied ones under each of their names: one walk."""
    out = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for leaf, p in m._parameters.items():
            if p is not None:
                out[dot + leaf] = _Slot(m, leaf, True, True, p)
        for leaf, b in m._buffers.items():
            if b is not None:
                out[dot + leaf] = _Slot(m, leaf, False, leaf not in m._non_persistent_buffers_set, b)
    return out


def _has_load_hooks(module: nn.Module) -> bool:
    """Whether some submodule changes how state dicts load (BatchNorm, quantized modules...)."""
    base = nn.Module._load_from_state_dict
    return any(
        type(m)._load_from_state_dict is not base
        or m._load_state_dict_pre_hooks
        or m._load_state_dict_post_hooks
        for m in module.modules()
    )


def fill(module: nn.Module, tensors: dict[str, torch.Tensor], mapping, *, strict: bool, requires_grad: bool):
    """Assign mapped tensors into ``module``; returns how many weights were copied.

    Each slot gets the mapped tensor itself (a Parameter wrapping it, for parameters): no
    copy, and one new object per skeleton object, so ties the skeleton had stay ties. Modules
    with their own state-dict loading logic go through ``load_state_dict(assign=True)``.
    """
    slots = _slots(module)
    persistent = {n for n, sl in slots.items() if sl.persistent}
    unexpected = [k for k in tensors if k not in persistent]
    if unexpected and strict:
        raise AttachError(
            f"{len(unexpected)} weights have no place in the module, e.g. {unexpected[:5]}: "
            "pass the matching model=, or strict=False to ignore them"
        )
    # a skeleton object (tied: several names) -> the mapped tensor for it, from its first name found
    source: dict[int, tuple[str, torch.Tensor]] = {}
    for n, sl in slots.items():
        if sl.persistent and n in tensors and id(sl.obj) not in source:
            t = tensors[n]
            if t.shape != sl.obj.shape:
                raise AttachError(
                    f"{n!r} is {tuple(t.shape)} in the model but {tuple(sl.obj.shape)} in the module: pass "
                    "the matching model="
                )
            source[id(sl.obj)] = (n, t)
    if _has_load_hooks(module):
        module.load_state_dict({n: t for n, t in source.values()}, strict=False, assign=True)
        loaded = {id_: _slots(module)[n].obj for id_, (n, _) in source.items()}
        # assigning replaced each name's object on its own: restore the skeleton's ties
    else:
        loaded = {}
        for id_, (n, t) in source.items():
            loaded[id_] = nn.Parameter(t, requires_grad=requires_grad) if slots[n].is_param else t
    for sl in slots.values():
        new = loaded.get(id(sl.obj))
        if new is not None:
            (sl.owner._parameters if sl.is_param else sl.owner._buffers)[sl.leaf] = new
    filled = {n for n, sl in slots.items() if id(sl.obj) in loaded}
    missing = sorted(persistent - filled)
    if missing and strict:
        raise AttachError(
            f"{len(missing)} weights of the module are not in the model, e.g. {missing[:5]}: "
            "pass the matching model=, or strict=False to keep them as they are"
        )
    on_meta = []
    for n, sl in _slots(module).items():
        if sl.is_param and sl.obj.requires_grad != requires_grad:
            sl.obj.requires_grad_(requires_grad)
        if sl.obj.is_meta:
            on_meta.append(n)
    if on_meta:
        raise AttachError(
            f"{len(on_meta)} tensors of the module are still on the meta device, e.g. {on_meta[:5]}: they "
            "are not in "
            "the model's weights. Non-persistent buffers need real values: pass a function that builds the "
            "module "
            "(weightd builds its buffers for real) or a module built on the CPU, not one built on the meta "
            "device"
        )
    copies = [
        n
        for n in filled
        if loaded[id(slots[n].obj)].numel() and not mapping.contains(loaded[id(slots[n].obj)])
    ]
    if copies:
        warnings.warn(
            f"weightd copied {len(copies)} weights instead of sharing them, e.g. {copies[:3]}", stacklevel=3
        )
    return len(copies)


def refill(module: nn.Module, tensors: dict[str, torch.Tensor], mapping) -> int:
    """Point an attached module's weights at another generation, keeping every object.

    Parameters get the new tensor as ``.data`` (so optimizers, hooks and ties, which hold the
    Parameter objects, follow along); buffers are replaced.
    """
    slots = {n: sl for n, sl in _slots(module).items() if sl.persistent}
    given = {id(sl.obj) for n, sl in slots.items() if n in tensors}
    missing = [n for n, sl in slots.items() if id(sl.obj) not in given]
    changed = [n for n, sl in slots.items() if n in tensors and tensors[n].shape != sl.obj.shape]
    if missing or changed:
        raise AttachError(
            f"the new generation does not fit this module (missing {missing[:3]}, reshaped {changed[:3]}): "
            "attach it anew"
        )
    copies = 0
    for n, sl in slots.items():
        if n not in tensors:
            continue  # a tied name: its object is set through the other name
        if sl.is_param:
            sl.obj.data = tensors[n]
        else:
            sl.owner._buffers[sl.leaf] = tensors[n]
        copies += bool(tensors[n].numel()) and not mapping.contains(tensors[n])
    return copies

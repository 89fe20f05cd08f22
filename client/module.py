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
import importlib
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from weightd.errors import AttachError

_patch_lock = threading.RLock()

# Random initialisers have no meta kernel: PyTorch decomposes them through torch._refs, whose
# first use imports half of the compiler stack (1.5 s measured here). On a meta tensor they
# would compute nothing anyway, so skeleton building skips them.
_RANDOM_INIT = {
    getattr(torch.Tensor, n)
    for n in ("normal_", "uniform_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_", "bernoulli_")
}


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INIT or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def params_on_meta():
    """Build modules with parameters on the meta device and buffers where they would be.

    This patches ``nn.Module.register_parameter`` for the duration, process-wide; a lock keeps
    concurrent attaches from interleaving, but a thread building unrelated modules at the same
    moment would get meta parameters too.
    """
    with _patch_lock:
        original = nn.Module.register_parameter

        def register_parameter(module, name, param):
            original(module, name, param)
            if param is not None and param.device.type != "meta":
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

        nn.Module.register_parameter = register_parameter
        try:
            with _SkipInitOnMeta():
                yield
        finally:
            nn.Module.register_parameter = original


def build_skeleton(model, skeleton: dict | None, name: str) -> nn.Module:
    """The module to fill: given, built by a callable, or described by the daemon."""
    if isinstance(model, nn.Module):
        return model
    if model is not None and not callable(model):
        raise AttachError(f"model= must be an nn.Module or a function that returns one, not {type(model).__name__}")
    if model is None:
        model = _builder(skeleton, name)
    with params_on_meta():
        built = model()
    if not isinstance(built, nn.Module):
        raise AttachError(f"the model builder for {name!r} returned {type(built).__name__}, not an nn.Module")
    return built


def _builder(skeleton: dict | None, name: str):
    if skeleton and skeleton.get("factory"):
        module_name, _, attr = str(skeleton["factory"]).partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise AttachError(
                f"model {name!r} names the factory {skeleton['factory']!r}, which this process cannot import ({e}): "
                "install that package here, or pass model= to attach"
            ) from None
        return obj
    if skeleton and skeleton.get("hf_config"):
        return lambda: _from_hf_config(dict(skeleton["hf_config"]), name)
    raise AttachError(
        f"weightd does not know how to build the module for {name!r}: pass model= (an nn.Module, or a function "
        "that builds one) to attach, or load it with a factory (weightd serve --model NAME=PATH --factory NAME=pkg.module:function)"
    )


def _from_hf_config(config: dict, name: str) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise AttachError(
            f"model {name!r} is a Hugging Face folder; building it needs transformers: pip install 'weightd[hf]', "
            "or pass model= to attach"
        ) from None
    model_type = config.pop("model_type", None)
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        return transformers.AutoModel.from_config(cfg)
    return cls(cfg)


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


def fill(module: nn.Module, tensors: dict[str, torch.Tensor], mapping, *, strict: bool, requires_grad: bool):
    """Assign mapped tensors into ``module``; returns how many weights were copied."""
    ties = _tied_groups(module)
    persistent = set(module.state_dict(keep_vars=True))
    unexpected = [k for k in tensors if k not in persistent]
    if unexpected and strict:
        raise AttachError(
            f"{len(unexpected)} weights have no place in the module, e.g. {unexpected[:5]}: "
            "pass the matching model=, or strict=False to ignore them"
        )
    loadable = {k: v for k, v in tensors.items() if k in persistent}
    module.load_state_dict(loadable, strict=False, assign=True)
    for group in ties:
        source = next((n for n in group if n in loadable), None)
        if source is not None:
            obj = _get(module, source)
            for n in group:
                _set(module, n, obj)
            loadable.update({n: loadable[source] for n in group})
    missing = sorted(persistent - set(loadable))
    if missing and strict:
        raise AttachError(
            f"{len(missing)} weights of the module are not in the model, e.g. {missing[:5]}: "
            "pass the matching model=, or strict=False to keep them as they are"
        )
    for p in module.parameters():
        p.requires_grad_(requires_grad)
    on_meta = [n for n, t in _named_tensors(module) if t.is_meta]
    if on_meta:
        raise AttachError(
            f"{len(on_meta)} tensors of the module are still on the meta device, e.g. {on_meta[:5]}: they are not in "
            "the model's weights. Non-persistent buffers need real values: pass a function that builds the module "
            "(weightd builds its buffers for real) or a module built on the CPU, not one built on the meta device"
        )
    copies = _copied(module, loadable, mapping)
    if copies:
        warnings.warn(f"weightd copied {len(copies)} weights instead of sharing them, e.g. {copies[:3]}", stacklevel=3)
    return len(copies)


def refill(module: nn.Module, tensors: dict[str, torch.Tensor], mapping) -> int:
    """Point an attached module's weights at another generation, keeping every object.

    Parameters get the new tensor as ``.data`` (so optimizers, hooks and ties, which hold the
    Parameter objects, follow along); buffers are replaced.
    """
    persistent = module.state_dict(keep_vars=True)
    tied = {n for g in _tied_groups(module) for n in g if any(m in tensors for m in g)}
    missing = [n for n in persistent if n not in tensors and n not in tied]
    changed = [n for n, t in persistent.items() if n in tensors and tensors[n].shape != t.shape]
    if missing or changed:
        raise AttachError(
            f"the new generation does not fit this module (missing {missing[:3]}, reshaped {changed[:3]}): attach it anew"
        )
    for n, t in persistent.items():
        if n not in tensors:
            continue
        if isinstance(t, nn.Parameter):
            t.data = tensors[n]
        else:
            _set(module, n, tensors[n])
    return len(_copied(module, tensors, mapping))


def _copied(module: nn.Module, names, mapping) -> list[str]:
    """Names of the module's weights (among ``names``) whose memory is not in the mapping."""
    now = module.state_dict(keep_vars=True)  # one walk of the module, not one per name
    return [n for n in names if n in now and now[n].numel() and not mapping.contains(now[n])]


def _named_tensors(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names that are one object in the skeleton (tied weights), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for n, t in _named_tensors(module):
        groups.setdefault(id(t), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _owner(module: nn.Module, name: str):
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(module, name)
    return getattr(owner, leaf)


def _set(module: nn.Module, name: str, obj: torch.Tensor) -> None:
    owner, leaf = _owner(module, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = obj
    else:
        owner._buffers[leaf] = obj


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0

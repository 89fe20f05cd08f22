"""Pipelines: the ``nn.Module``s an object holds, and a weightless skeleton of that object.

A *pipeline* is whatever the user wraps: one ``nn.Module``, or any object that holds modules
in attributes, lists, tuples and dicts, at any depth (``pipe.stages[1].encoder``). A module
held in two places is one module (it is published and attached once, and comes back held in
both places); a module's own submodules belong to it and are not looked into.

The skeleton is a deep copy of the pipeline in which every parameter and persistent buffer of
the found modules is on the meta device, and everything else is as it was: non-persistent
buffers (rotary frequencies, position ids) stay real, because no checkpoint holds their
values and attach cannot make them up. Tensors that were one object (tied weights) are one
meta object in the skeleton, so attach restores the tie.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from weightd.client.module import meta_twins
from weightd.errors import AttachError

# How deep to look for modules in plain objects: a pipeline is a few levels of containers,
# not an object graph to crawl.
MAX_DEPTH = 8


def find_modules(pipeline, attr_names: list[str] | None = None) -> dict[str, nn.Module]:
    """``{path: module}`` for the modules ``pipeline`` holds, at every path they are held.

    ``path`` is "" for a pipeline that is itself a module, else dotted attribute names, list
    indices and dict keys (``"stages.1.encoder"``). With ``attr_names``, only those
    attributes of ``pipeline`` are taken, each of which must hold a module (or containers of
    modules).
    """
    if isinstance(pipeline, nn.Module):
        if attr_names:
            return _only(pipeline, attr_names)
        return {"": pipeline}
    if attr_names is not None:
        return _only(pipeline, attr_names)
    found: dict[str, nn.Module] = {}
    _walk(pipeline, "", found, set(), 0)
    return found


def skeleton(pipeline, modules: dict[str, nn.Module]):
    """A deep copy of ``pipeline`` whose modules' weights are on the meta device."""
    memo: dict[int, object] = {}
    for module in modules.values():
        memo.update(meta_twins(module))
    try:
        return copy.deepcopy(pipeline, memo)
    except Exception as e:  # deepcopy raises whatever the object's own __deepcopy__ raises
        raise AttachError(
            f"cannot make a weightless copy of the {type(pipeline).__name__} ({type(e).__name__}: {e}): "
            "wrap the modules themselves, or an object that copy.deepcopy can copy"
        ) from e


def meta_slots(pipeline) -> dict[int, list[tuple[dict, str]]]:
    """Where each meta tensor of the pipeline's modules is held: ``{id: [(table, key)]}``.

    A tensor tied between a published module and one that is not (``model_attr_names``)
    is meta in both places of the skeleton; attach fills only the published place.
    """
    slots: dict[int, list[tuple[dict, str]]] = {}
    seen: set[int] = set()
    for top in find_modules(pipeline).values():
        for module in top.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is not None and t.is_meta:
                        slots.setdefault(id(t), []).append((table, key))
    return slots


def retie(slots: dict[int, list[tuple[dict, str]]]) -> None:
    """After attach: every place that held a meta tensor gets what attach put in its first place."""
    for places in slots.values():
        real = next((table[key] for table, key in places if not table[key].is_meta), None)
        if real is None:
            table, key = places[0]
            raise AttachError(
                f"a weight ({key!r}) of the pipeline is on the meta device after attach: it is held by no "
                "module "
                "the wrapper published; add that module's attribute to model_attr_names"
            )
        for table, key in places:
            if table[key].is_meta:
                table[key] = real


def get_path(pipeline, path: str):
    obj = pipeline
    for part in _parts(path):
        obj = obj[part] if isinstance(obj, (list, tuple, dict)) else getattr(obj, part)
    return obj


def holder_key(path: str) -> str:
    """A ModuleDict key for a module path (keys may not contain '.')."""
    return path.replace(".", ":") or "root"


def _parts(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")] if path else []


def _only(pipeline, attr_names: list[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for attr in attr_names:
        if not hasattr(pipeline, attr):
            raise AttachError(
                f"model_attr_names names {attr!r}, which the {type(pipeline).__name__} does not have"
            )
        value = getattr(pipeline, attr)
        before = len(found)
        if isinstance(value, nn.Module):
            found[attr] = value
        else:
            _walk(value, attr, found, set(), 1)
        if len(found) == before and not any(m is value for m in found.values()):
            raise AttachError(
                f"model_attr_names names {attr!r}, which holds a {type(value).__name__}, not an nn.Module"
            )
    return found


def unique(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The first path of each module (a module held twice is one module)."""
    out: dict[str, nn.Module] = {}
    for path, m in modules.items():
        if not any(o is m for o in out.values()):
            out[path] = m
    return out


def _walk(obj, path: str, found: dict, seen: set, depth: int) -> None:
    if depth > MAX_DEPTH or id(obj) in seen:
        return
    if isinstance(obj, nn.Module):
        found[path] = obj
        return
    if isinstance(
        obj,
        (
            str,
            bytes,
            int,
            float,
            bool,
            type(None),
            torch.Tensor,
            type,
            types.ModuleType,
            types.FunctionType,
            types.MethodType,
            types.BuiltinFunctionType,
        ),
    ):
        return
    seen.add(id(obj))
    prefix = f"{path}." if path else ""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}{i}", found, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k and "." not in k and not k.isdigit():
                _walk(v, prefix + k, found, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _walk(v, prefix + k, found, seen, depth + 1)

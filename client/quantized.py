"""A quantized Hugging Face folder the daemon serves, built as ``from_pretrained(folder)`` builds it.

The daemon loaded the folder with transformers (bitsandbytes, torchao: see
``weightd/daemon/quantized.py``) and stored its state dict, tensor subclasses as their plain
inner tensors (Note [tensor subclasses as plain tensors] there). Here the subclass tensors
are rebuilt over the mapped ones (``__tensor_unflatten__``: no copy), and the module is made by
transformers' own quantized loading, ``from_pretrained(None, config=..., state_dict=...)``:
the library's own layer replacement and deserialisation (bitsandbytes' ``Params4bit`` over
the packed bytes, torchao's tensors assigned), so the result is what ``from_pretrained(folder)``
gives. What that loading still copies (a few bytes of bitsandbytes' packed quantization state,
which it unpacks into small tensors) is counted in ``info(model).copies``.
"""

from __future__ import annotations

import json
import os
import time

import torch

from weightd import dotted
from weightd.errors import AttachError

SEP = ":"  # NAME:ATTR, as the daemon stores an inner tensor of the subclass tensor NAME


def build(name: str, mapping, tensors: dict, cls, hf: dict, folder: str, transformers, config=None):
    """``(module, copies, build_seconds)``: the quantized module over the mapped tensors."""
    t0 = time.perf_counter()
    quant = hf["quantized"]
    state = {k: t for k, t in tensors.items() if SEP not in k}
    subclasses = quant.get("subclasses") or {}
    for key in subclasses:
        if SEP not in key:  # inner subclass tensors are rebuilt by their outer one
            state[key] = _rebuild(name, key, subclasses, tensors)
    if config is None:
        config = cls.config_class.from_pretrained(folder)
    try:
        module = cls.from_pretrained(None, config=config, state_dict=state, device_map="cpu")
    except Exception as e:
        raise AttachError(
            f"model {name!r} is a {quant.get('method')} quantized model, and building it with "
            f"{cls.__name__}.from_pretrained failed here: {type(e).__name__}: {str(e)[:300]}: install the "
            f"versions the daemon used (transformers {hf.get('transformers')}, and the quantization library)"
        ) from None
    generation = os.path.join(folder, "generation_config.json")
    if module.can_generate() and os.path.exists(generation):
        module.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    module.eval()
    # the module's own memory: its parameters and buffers (state_dict() would count what the
    # libraries compute when asked, bitsandbytes' format bytes and packed quantization state)
    held = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    # what the daemon stored (non-persistent buffers, rotary tables, are computed as from_pretrained does)
    copies = [
        n
        for n, t in held
        if n in state
        for inner in _plain(t)
        if inner.numel() and not mapping.contains(inner)
    ]
    return module, len(copies), time.perf_counter() - t0


def _rebuild(name: str, key: str, subclasses: dict, tensors: dict):
    spec = subclasses[key]
    where = str(spec.get("class", ""))
    try:
        obj = dotted.resolve(where)
    except Exception as e:
        raise AttachError(
            f"model {name!r}: tensor {key!r} is a {where}, which this process cannot import ({e}): install "
            "the quantization library the daemon used"
        ) from None
    inner = {}
    for a in spec["inner"]:
        full = f"{key}{SEP}{a}"
        inner[a] = _rebuild(name, full, subclasses, tensors) if full in subclasses else tensors[full]
    ctx = _decode(spec.get("ctx"))
    return obj.__tensor_unflatten__(inner, ctx, torch.Size(spec["size"]), tuple(spec["stride"]))


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"dtype"}:
            return getattr(torch, value["dtype"])
        if set(value) == {"tuple"}:
            return tuple(_decode(v) for v in value["tuple"])
        if set(value) == {"dict"}:
            return {k: _decode(v) for k, v in value["dict"].items()}
        raise AttachError(f"unknown tensor metadata {json.dumps(value)[:100]}")
    return value


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s memory (itself, or a subclass's inner tensors)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    out = []
    for a in t.__tensor_flatten__()[0]:
        out += _plain(getattr(t, a))
    return out

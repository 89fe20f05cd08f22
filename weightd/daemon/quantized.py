"""Quantized Hugging Face folders: which formats are served, and tensor subclasses as plain tensors.

A folder whose config.json holds a ``quantization_config`` loads in the daemon with
transformers' own ``from_pretrained`` (on the CPU), as any folder does. What its
``state_dict()`` then holds depends on the library:

- bitsandbytes (8-bit and 4-bit): plain tensors, the packed weights and the quantization
  state beside them (absmax, quant_map, the packed ``quant_state`` entry), as
  ``save_pretrained`` writes them;
- torchao: tensor subclasses (``Int8Tensor``...), whose memory is their inner plain tensors
  (``qdata``, ``scale``...). They are stored as those plain tensors plus what rebuilds them:
  the class's import path and its ``__tensor_flatten__`` context (JSON: numbers, strings,
  lists, dtypes), never a pickle (Note [tensor subclasses as plain tensors]).

A worker rebuilds the module with transformers' own quantized loading over the mapped
tensors (``weightd.client.quantized``). Formats not tried here are refused with
``UnsupportedFormat`` naming the format and why, before anything is loaded: never served
and then unusable.

Note [tensor subclasses as plain tensors]
-----------------------------------------
A traceable wrapper subclass (``__tensor_flatten__``/``__tensor_unflatten__``, PyTorch's
protocol for subclasses the compiler can take apart) owns no storage of its own: its bytes
are its inner tensors'. The segment stores each inner tensor under ``NAME:ATTR`` (a colon
never occurs in a state-dict key), recursively, and the skeleton records per subclass tensor
its class (``module:qualname``), the context, the outer size and stride. The client imports
the class and calls ``__tensor_unflatten__`` over the mapped inner tensors: the rebuilt
tensor's memory is the segment's, no byte copied. A context holding anything but JSON values
and dtypes is refused (storing an arbitrary object would mean a pickle).

Daemon-only.
"""

from __future__ import annotations

from pathlib import Path

from weightd.errors import UnsupportedFormat

# quant_method -> what transformers keeps at load, for the refusal of formats not served
SERVED = ("bitsandbytes", "torchao")
NOT_SERVED = {
    "fp8": "FP8 (transformers' FineGrainedFP8) needs a GPU or XPU to load in transformers",
    "compressed-tensors": "compressed-tensors replaces Linear layers by its own compressed modules at "
    "load; weightd does not rebuild them yet",
    "gptq": "GPTQ needs a GPU kernel package (gptqmodel) to load in transformers",
    "awq": "AWQ needs a GPU kernel package to load in transformers",
    "hqq": "HQQ replaces Linear layers by its own modules at load; weightd does not rebuild them yet",
}
SEP = ":"  # NAME:ATTR, an inner tensor of the subclass tensor NAME


def method(config: dict) -> str | None:
    """The folder's quantization method (``quantization_config.quant_method``), or None."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return None
    m = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(m) if m else "unknown"


def check(folder: Path, config: dict) -> str | None:
    """Refuse a quantized folder of a format weightd does not serve; the method if it does."""
    m = method(config)
    if m is None or m in SERVED:
        return m
    why = NOT_SERVED.get(m, f"weightd has not been tried with {m!r} checkpoints")
    raise UnsupportedFormat(
        f"{folder}: a {m} quantized checkpoint (config.json quantization_config), which weightd does not "
        f"serve: {why}. Served quantized formats: {', '.join(SERVED)}. Load it with from_pretrained in "
        "the worker, or serve a dequantized copy (model.dequantize(), then save_pretrained)"
    )


def gguf(path: Path) -> UnsupportedFormat:
    return UnsupportedFormat(
        f"{path}: a GGUF file, which weightd does not serve: transformers loads GGUF by dequantizing every "
        "tensor to full precision (there are no packed weights left to share). Load it once with "
        "from_pretrained(folder, gguf_file=...) and save_pretrained the result, then serve that folder"
    )


def flatten(state: dict, folder: Path) -> tuple[dict, dict]:
    """``state`` with every tensor subclass replaced by its inner plain tensors (``NAME:ATTR``),
    and what rebuilds each: Note [tensor subclasses as plain tensors]."""
    import torch

    plain: dict = {}
    subclasses: dict = {}

    def visit(name: str, t) -> None:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            plain[name] = t
            return
        if not hasattr(t, "__tensor_flatten__"):
            raise UnsupportedFormat(
                f"{folder}: tensor {name!r} is a {type(t).__name__}, which has no plain tensors to store "
                "(no __tensor_flatten__)"
            )
        attrs, ctx = t.__tensor_flatten__()
        cls = type(t)
        subclasses[name] = {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "ctx": _encode(ctx, name, folder),
            "size": list(t.shape),
            "stride": list(t.stride()),
            "inner": list(attrs),
        }
        for attr in attrs:
            visit(f"{name}{SEP}{attr}", getattr(t, attr))

    for name, t in state.items():
        visit(name, t)
    return plain, subclasses


def _encode(value, name: str, folder: Path):
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, name, folder) for v in value]}
    if isinstance(value, list):
        return [_encode(v, name, folder) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, name, folder) for k, v in value.items()}}
    raise UnsupportedFormat(
        f"{folder}: tensor {name!r} carries a {type(value).__name__} in its metadata, which weightd cannot "
        "store without a pickle: this torchao configuration is not served"
    )

"""PEFT adapters the daemon serves by name, put over an attached base with PEFT's own loading.

>>> from weightd.client import hf
>>> model = hf.attach("llama", adapter="sql")              # PeftModel.from_pretrained(base, sql_dir)
>>> model = hf.attach("llama", adapter=["sql", "chat"])    # several: PEFT's own switching
>>> model.set_adapter("chat")
>>> adapters.add(model, "summarize")                      # one more, later

The base is attached as always (zero-copy); each adapter's segment is mapped, and PEFT builds
its layers: ``PeftModel.from_pretrained`` for the first adapter, ``load_adapter`` for the
others, with ``low_cpu_mem_usage=True`` (layers made on the meta device, then the weights
assigned, not copied). The weights PEFT reads are the mapped tensors instead of the folder's
file (its ``load_peft_weights`` is swapped for the mapping while PEFT runs, under a lock), and
its config comes from the daemon's copy of ``adapter_config.json``. So every worker shares
one copy of each adapter, and of the base. Adapter names in the PeftModel are the names the
daemon serves them under.

``merge_and_unload()`` in a worker writes the merged weights into that worker's pages only
(``MAP_PRIVATE``: copy-on-write), never into the segment other workers map.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import weakref

import torch
from torch import nn

from weightd.errors import AttachError

_lock = threading.RLock()  # PEFT's weight reader is swapped process-wide while an adapter loads
_copied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PeftModel -> {adapter: copies}
_bases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PeftModel -> its base's served name


def apply(base_name: str, model: nn.Module, adapters, *, socket: str | None = None, is_trainable=False):
    """``model`` (the attached base ``base_name``) with the served adapters ``adapters`` (a name
    or a list of names), the first one active: a ``PeftModel``."""
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise AttachError("adapter=: name at least one adapter the daemon serves")
    try:
        import peft
        import peft.peft_model as peft_model
    except ImportError:
        raise AttachError(f"attaching adapters {names} needs PEFT here: pip install peft") from None
    from weightd.client.client import _with_client

    out = model
    wrapped = isinstance(model, peft.PeftModel)  # adapters added to one attached before
    for i, name in enumerate(names):
        mapping, tensors = _with_client(socket, lambda c, n=name: c._map(n, None))
        spec = (mapping.manifest.skeleton or {}).get("adapter")
        if not isinstance(spec, dict):
            raise AttachError(
                f"{name!r} is not a PEFT adapter: load one with weightd load PATH --name {name} "
                f"--base {base_name}"
            )
        if spec.get("base") != base_name:
            raise AttachError(
                f"adapter {name!r} goes over {spec.get('base')!r}, not {base_name!r}: attach it with "
                f"hf.attach({spec.get('base')!r}, adapter={name!r})"
            )
        with _lock, _config_folder(mapping, spec) as folder, _reading(peft_model, tensors):
            try:
                if (i > 0 or wrapped) and not is_trainable:
                    made = _add_further(out, name, folder, tensors)
                    if made is not None:
                        _copied.setdefault(out, {})[name] = made
                        continue
                if i == 0 and not wrapped:
                    out = peft.PeftModel.from_pretrained(
                        model, folder, adapter_name=name, is_trainable=is_trainable, low_cpu_mem_usage=True
                    )
                else:
                    out.load_adapter(
                        folder, adapter_name=name, is_trainable=is_trainable, low_cpu_mem_usage=True
                    )
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                raise AttachError(
                    f"adapter {name!r} does not fit model {base_name!r} as served now (PEFT: "
                    f"{type(e).__name__}: {str(e)[:300]}): load the adapter again against the current base"
                ) from None
        pairs = _from_file(out, name, tensors)
        _share_back(pairs)
        # PEFT casts an adapter to its base layer's dtype where that changes values: a copy then,
        # as PEFT's own loading makes; counted, never hidden
        _copied.setdefault(out, {})[name] = sum(1 for p, _ in pairs if p.numel() and not mapping.contains(p))
    _bases[out] = base_name
    return out


def add(model: nn.Module, adapters, *, socket: str | None = None, is_trainable=False):
    """Load more served adapters into a ``PeftModel`` that ``hf.attach(base, adapter=...)`` (or
    ``add``) gave, over the mapped weights: made directly in the layers earlier adapters made
    (Note [a further adapter in O(its own size)]), else ``load_adapter`` (benchmarks/adapters.py).
    ``model`` may also be a base the worker attached (``hf.attach(base)``): it is wrapped and
    changed in place, as ``PeftModel.from_pretrained(model, dir)`` wraps and changes it."""
    base = _bases.get(model)
    if base is None:
        from weightd.client.client import info

        attached = info(model)
        if attached is None:
            raise AttachError(
                "add(): pass a model hf.attach(base) returned, or the PeftModel hf.attach(base, "
                "adapter=...) or add() returned"
            )
        base = attached.name  # the worker's own attached base: wrapped, as PeftModel.from_pretrained does
    return apply(base, model, adapters, socket=socket, is_trainable=is_trainable)


# Note [a further adapter in O(its own size)]
# PEFT's load_adapter walks the whole model several times (named_modules for injection, requires-grad
# snapshots, set_adapter, the state-dict remap, eval(), the dtype cast), and inside each LoRA layer
# update_layer and the device move loop over every adapter the layer holds: the 100th adapter over
# a base costs several times the 2nd. And per layer, update_layer builds lora_A and lora_B on the
# meta device and initialises them (kaiming, on meta), all to be replaced by the loaded weights:
# ~0.7 ms a layer, 10 ms for an adapter on q/k/v/o of 4 layers. When the new adapter is plain LoRA
# (no variant) and goes only where plain LoRA Linear layers already are (each of its modules a
# peft.tuners.lora.Linear over a dense weight on the CPU, made by an adapter loaded before) and
# nothing model-wide is involved, the entries update_layer, load_state_dict(assign=True), the
# device move, the upcast and eval() leave in each layer's stores are made directly: lora_A/lora_B
# as nn.Linear over the mapped tensors (requires_grad off, eval), the dropout module, r, alpha,
# scaling (rsLoRA too), use_rslora, use_dora, lora_bias; a weight PEFT would cast to the base's
# dtype and back up to float32 is cast the same way, and stays the mapped tensor where that gives
# the same values (Note [a weight PEFT copied goes back to the segment]). Only when every layer's
# entries are made are they put in the real layers, the only change a running forward can see (an
# adapter that is not active). Anything else (a new target module, a variant such as DoRA,
# modules_to_save, trainable tokens, a layer holding stores this code does not know, MoE weight
# conversions, tensor parallelism, a model in train mode, is_trainable, weights missing or of
# another shape) takes PEFT's load_adapter whole, and with it PEFT's own errors.
# tests/test_adapters.py holds the two paths equal: parameters with their dtype and requires_grad,
# modules' classes and training flags, the layers' stores, the config, outputs under PEFT's
# switching, deletion and merging.

_ALLOWED = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
# the stores of a peft.tuners.lora.Linear that the quick path fills (the others stay empty)
_STORES = (
    ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
    ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias"),
)


def _add_further(model, name: str, folder: str, tensors: dict) -> int | None:
    """Adapter ``name`` added to the PeftModel ``model``, its layers' entries made directly over
    the mapped weights (Note [a further adapter in O(its own size)]): the number of its weights
    that are copies, or None (nothing changed) where PEFT's load_adapter must run whole."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear, LoraModel
    from peft.utils.other import get_pattern_key

    tuner = model.base_model
    if type(tuner) is not LoraModel or model.training or name in model.peft_config or name in "lora_":
        return None
    if getattr(model, "hf_device_map", None) is not None or _converts_weights(tuner.model):
        return None
    if getattr(tuner.model, "_tp_size", None) not in (None, 1) or any(
        _model_wide(c) for c in model.peft_config.values()
    ):
        return None
    config = LoraConfig.from_pretrained(folder)
    if type(config) is not LoraConfig or _model_wide(config):
        return None
    # the layers this adapter goes in, from its weights' names: each one a plain LoRA Linear already
    layers: dict[str, tuple] = {}  # owner -> (layer, {"A.weight": tensor, ...})
    for key, tensor in tensors.items():
        owner, _, rest = key.rpartition(".lora_")
        if "lora_" + rest not in _ALLOWED or not owner.startswith("base_model.model."):
            return None
        if owner not in layers:
            try:
                layer = model.get_submodule(owner)
            except AttributeError:
                return None
            if type(layer) is not Linear or (layer.adapter_layer_names, layer.other_param_names) != _STORES:
                return None
            base = layer.get_base_layer()
            weight = getattr(base, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.is_meta:
                return None
            if getattr(base, "_hf_tp_plan", None) is not None or hasattr(base, "compute_dtype"):
                return None
            layers[owner] = (layer, {})
        layers[owner][1][rest] = tensor
    if not layers or next(iter(layers.values()))[0].resolve_lora_variant(config=config) is not None:
        return None
    config.inference_mode = True  # load_adapter(is_trainable=False)
    model._check_new_adapter_config(config, is_trainable=False)
    model.peft_config[name] = config  # where add_adapter puts it, before the tuner's checks
    try:
        tuner._check_new_adapter_config(config)
        config = tuner._prepare_adapter_config(config, tuner.get_model_config(tuner.model))
        made = {}
        for owner, (layer, weights) in layers.items():
            key = owner.removeprefix("base_model.model.")
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
            alpha = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha
            )
            entries = _entries(layer, r, alpha, config, weights, tensors, owner)
            if entries is None:
                return _undo(model, name)
            made[owner] = entries
    except BaseException:
        _undo(model, name)
        raise
    for owner, entries in made.items():  # the only change a running forward sees
        layer = layers[owner][0]
        for store_name, value in entries.items():
            getattr(layer, store_name)[name] = value
    names = [o.removeprefix("base_model.model.") for o in layers]
    seen = set(tuner.targeted_module_names)
    tuner.targeted_module_names.extend(n for n in names if n not in seen)
    mapped = {t.data_ptr() for t in tensors.values()}
    return sum(
        1
        for e in made.values()
        for m in (e["lora_A"], e["lora_B"])
        for p in m.parameters()
        if p.data_ptr() not in mapped
    )


def _entries(layer, r: int, alpha, config, weights: dict, tensors: dict, owner: str) -> dict | None:
    """What PEFT's update_layer, load_state_dict(assign=True), device move, upcast and eval()
    put in a plain LoRA Linear's stores for one adapter, over the mapped ``weights`` ("A.weight",
    "B.weight", "B.bias"); None where they do not fit (PEFT's loading then says why)."""
    import math

    a, b, bias = weights.get("A.weight"), weights.get("B.weight"), weights.get("B.bias")
    if r <= 0 or a is None or b is None or (bias is not None) != bool(config.lora_bias):
        return None
    if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
        return None
    if bias is not None and tuple(bias.shape) != (layer.out_features,):
        return None
    dtype = layer.get_base_layer().weight.dtype
    return {
        "lora_A": _linear(a, None, dtype, tensors),
        "lora_B": _linear(b, bias, dtype, tensors),
        "lora_dropout": (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        ).eval(),
        "r": r,
        "lora_alpha": alpha,
        "scaling": alpha / math.sqrt(r) if config.use_rslora else alpha / r,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
    }


def _linear(weight, bias, base_dtype, tensors: dict) -> nn.Linear:
    """An nn.Linear in eval mode over ``weight`` (and ``bias``), frozen, as PEFT leaves a loaded
    adapter's matrix: moved to the base's float dtype, then low-precision floats up to float32
    (_move_adapter_to_device_of_base_layer, cast_adapter_dtype); where that gives the mapped
    tensor's dtype and values, the mapped tensor itself. No init: nothing is there to overwrite."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    linear.weight = nn.Parameter(_as_peft_casts(weight, base_dtype), requires_grad=False)
    linear.bias = (
        None if bias is None else nn.Parameter(_as_peft_casts(bias, base_dtype), requires_grad=False)
    )
    linear.training = False
    return linear


def _as_peft_casts(t, base_dtype):
    from peft.utils import UPCAST_DTYPES

    out = t
    if (base_dtype.is_floating_point or base_dtype.is_complex) and (t.is_floating_point() or t.is_complex()):
        out = out.to(dtype=base_dtype)
    if out.dtype in (torch.float16, torch.bfloat16) or any(
        getattr(torch, n, None) == out.dtype for n in UPCAST_DTYPES
    ):
        out = out.to(torch.float32)
    return t if _equal_copy(out, t) else out  # Note [a weight PEFT copied goes back to the segment]


# Note [a weight PEFT copied goes back to the segment]
# PEFT moves each adapter to its base layer's dtype and then, autocast_adapter_dtype, back up to
# float32 (_move_adapter_to_device_of_base_layer, cast_adapter_dtype): over a bf16 or fp16 base
# (the common case: LoRA weights are saved in float32) every mapped weight comes out a private
# copy in every worker, holding the values of the file. Where such a copy has the dtype, shape
# and every value of its mapped tensor, the parameter is pointed back at the mapped tensor
# (``param.data = mapped``): the same values, dtype and requires_grad, PEFT's result unchanged,
# the copy freed. A copy that differs (a real cast) stays and is counted by copied().


def _equal_copy(copy, mapped) -> bool:
    """``copy`` is another tensor than ``mapped`` with its dtype, shape, device and every value."""
    return (
        copy.data_ptr() != mapped.data_ptr()
        and (copy.dtype, copy.shape, copy.device) == (mapped.dtype, mapped.shape, mapped.device)
        and torch.equal(copy, mapped)
    )


def _share_back(pairs) -> None:
    """Point each parameter that is a copy equal to its mapped tensor back at that tensor.
    ``pairs``: (parameter, mapped tensor) (Note [a weight PEFT copied goes back to the segment])."""
    for p, t in pairs:
        if _equal_copy(p, t):
            p.data = t


def _from_file(model, name: str, tensors: dict) -> list:
    """(parameter, mapped tensor) for every weight of adapter ``name``'s file that PEFT put in
    ``model``, found by the key PEFT saves it under: the parameter's name without the adapter's
    name (``q_proj.lora_A.sql.weight``: ``q_proj.lora_A.weight``; ``lora_E.sql``: ``lora_E``),
    without ``modules_to_save`` for a head it saves whole (``score.weight``), as it is for a base
    layer's own bias (``bias="lora_only"``); a prompt-learning method's embedding is saved as
    ``prompt_embeddings``. Parameters PEFT makes itself (AdaLoRA's ranknum) are not the file's."""
    out = []
    for n, p in model.named_parameters():
        key = n[: -len(name) - 1] if n.endswith(f".{name}") else n.replace(f".{name}.", ".", 1)
        t = tensors.get(key)
        if t is None and ".modules_to_save." in key:
            t = tensors.get(key.replace(".modules_to_save.", ".", 1))
        if t is not None:
            out.append((p, t))
    prompt = getattr(model, "prompt_encoder", None)
    embedding = getattr(prompt[name], "embedding", None) if prompt is not None and name in prompt else None
    if isinstance(embedding, nn.Embedding) and "prompt_embeddings" in tensors:
        out.append((embedding.weight, tensors["prompt_embeddings"]))
    return out


def _undo(model, name: str) -> None:
    """Nothing of adapter ``name`` was put in the model's layers yet: forget its config."""
    del model.peft_config[name]


def _model_wide(config) -> bool:
    """A LoRA config whose loading touches more than its own layers (or rewrites its config)."""
    targets = config.target_modules
    return bool(
        getattr(config, "modules_to_save", None)
        or getattr(config, "trainable_token_indices", None)
        or getattr(config, "layer_replication", None)
        or getattr(config, "ensure_weight_tying", False)
        or getattr(config, "target_parameters", None)
        or getattr(config, "use_dora", False)
        or not isinstance(config.init_lora_weights, bool)
        or isinstance(targets, str)  # a regex or "all-linear": matched against the whole model
        or (targets is not None and len(targets) >= 20)  # PEFT condenses long lists, rewriting the config
    )


def _converts_weights(model) -> bool:
    """transformers v5 renames this architecture's weights (MoE layers): PEFT converts the
    adapter's config and keys model-wide."""
    from peft.utils import transformers_weight_conversion as conversion

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type is not None and conversion.get_checkpoint_conversion_mapping(model_type) is not None


def copied(model: nn.Module) -> dict[str, int]:
    """Per adapter of ``model`` (from ``hf.attach(..., adapter=)``), how many of the weights of
    its file are not in its segment: 0 unless PEFT cast them (a base of another dtype)."""
    return dict(_copied.get(model, {}))


@contextlib.contextmanager
def _reading(peft_model, tensors: dict):
    """PEFT reads ``tensors`` (the mapped adapter weights) instead of the folder's file."""
    original = peft_model.load_peft_weights

    def load_peft_weights(model_id, device=None, **kwargs):
        return dict(tensors)

    peft_model.load_peft_weights = load_peft_weights
    try:
        yield
    finally:
        peft_model.load_peft_weights = original


@contextlib.contextmanager
def _config_folder(mapping, spec: dict):
    """A private folder (0700) holding the adapter's config as the daemon read it, for PEFT to
    read while it loads the adapter, removed right after: a folder kept for the process's life
    stays behind whenever a worker dies by a signal (no atexit runs then)."""
    with tempfile.TemporaryDirectory(prefix=f"weightd-adapter-{mapping.manifest.name[:40]}-") as path:
        for rel, index in (spec.get("files") or {}).items():
            if "/" in rel or rel.startswith("."):
                raise AttachError(f"adapter {mapping.manifest.name!r} names a file {rel!r:.80}")
            with open(os.path.join(path, rel), "wb") as f:
                f.write(mapping.storage_bytes(index))
        yield path

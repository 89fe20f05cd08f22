"""PEFT adapters the daemon serves by name, put over an attached base with PEFT's own loading.

>>> from weightd.client import hf
>>> model = hf.attach("llama", adapter="sql")              # PeftModel.from_pretrained(base, sql_dir)
>>> model = hf.attach("llama", adapter=["sql", "chat"])    # several: PEFT's own switching
>>> model.set_adapter("chat")
>>> adapters.add(model, "summarize")                      # one more, later: load_adapter

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

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import weakref

from torch import nn

from weightd.errors import AttachError

_lock = threading.RLock()  # PEFT's weight reader is swapped process-wide while an adapter loads
_dirs: dict[str, str] = {}  # segment uuid -> private folder holding its adapter_config.json
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
        folder = _config_dir(mapping, spec)
        with _lock, _reading(peft_model, tensors):
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
        _share_back(
            ((n.rpartition(f".{name}.")[::2], p) for n, p in out.named_parameters() if f".{name}." in n),
            tensors,
        )
        _check_shared(out, name, mapping)
    _bases[out] = base_name
    return out


def add(model: nn.Module, adapters, *, socket: str | None = None, is_trainable=False):
    """Load more served adapters into a ``PeftModel`` that ``hf.attach(base, adapter=...)`` gave,
    over the mapped weights: PEFT's steps on the adapter's own layers where earlier adapters made
    them (Note [a further adapter in O(its own size)]), else ``load_adapter`` (benchmarks/adapters.py)."""
    base = _bases.get(model)
    if base is None:
        raise AttachError("add(): pass a PeftModel that hf.attach(base, adapter=...) returned")
    return apply(base, model, adapters, socket=socket, is_trainable=is_trainable)


# Note [a further adapter in O(its own size)]
# PEFT's load_adapter walks the whole model several times (named_modules for injection, requires-grad
# snapshots, set_adapter, the state-dict remap, eval(), the dtype cast), and inside each LoRA layer
# update_layer and the device move loop over every adapter the layer holds: the 100th adapter over
# a base costs several times the 2nd. When the new adapter only goes where LoRA layers already are
# (each of its modules is a LoraLayer of an adapter loaded before) and nothing model-wide is
# involved, PEFT's own steps are taken on a *shadow* of each of those layers: a shallow copy whose
# per-adapter stores (lora_A, lora_B, r, scaling, ...: adapter_layer_names + other_param_names +
# lora_variant) are empty. On the shadow, PEFT's _create_and_replace (update_layer) makes the
# adapter on the meta device, the mapped tensors are assigned as load_state_dict(assign=True)
# assigns them, PEFT's device/dtype move and upcast run, the new modules are put in eval; then the
# new entries are inserted into the real layer's stores, which is the only change a running
# forward can see (an adapter that is not active). Everything else (a new target module, DoRA and
# other variants, modules_to_save, trainable tokens, MoE weight conversions, tensor parallelism, a
# model in train mode, is_trainable) takes PEFT's load_adapter whole. tests/test_adapters.py holds
# the two paths equal: parameters with their dtype and requires_grad, modules' training flags, the
# layers' stores, the config, outputs under PEFT's switching.

_ALLOWED = ("lora_A.weight", "lora_B.weight", "lora_B.bias")


def _add_further(model, name: str, folder: str, tensors: dict) -> int | None:
    """Adapter ``name`` added to the PeftModel ``model`` with PEFT's steps taken on shadows of its
    own layers (Note [a further adapter in O(its own size)]): the number of its weights that are
    copies, or None (nothing changed) where PEFT's load_adapter must run whole."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from peft.utils.integrations import init_empty_weights
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
    # the layers this adapter goes in, from its weights' names: each one a LoRA layer already
    layers: dict[str, nn.Module] = {}
    for key in tensors:
        owner, _, rest = key.rpartition(".lora_")
        if "lora_" + rest not in _ALLOWED or not owner.startswith("base_model.model."):
            return None
        if owner not in layers:
            try:
                layer = model.get_submodule(owner)
            except AttributeError:
                return None
            if type(layer).__name__ == "ParamWrapper" or not isinstance(layer, LoraLayer):
                return None
            if getattr(layer.get_base_layer(), "_hf_tp_plan", None) is not None:
                return None
            layers[owner] = layer
    if not layers:
        return None
    config.inference_mode = True  # load_adapter(is_trainable=False)
    model._check_new_adapter_config(config, is_trainable=False)
    model.peft_config[name] = config  # where add_adapter puts it, before the tuner's checks
    try:
        tuner._check_new_adapter_config(config)
        config = tuner._prepare_adapter_config(config, tuner.get_model_config(tuner.model))
        shadows = {}
        with init_empty_weights():
            for owner, layer in layers.items():
                shadow = shadows[owner] = _shadow(layer)
                # what LoraModel._create_and_replace does for a layer that is a LoraLayer already
                key = owner.removeprefix("base_model.model.")
                r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
                alpha_key = get_pattern_key(config.alpha_pattern.keys(), key)
                alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
                shadow.update_layer(name, r, lora_alpha=alpha, target_name=key, config=config)
                if shadow.lora_variant:
                    return _undo(model, name)  # DoRA, aLoRA, Arrow: their own state beside lora_A/B
        placed = []  # (key, the module holding it, its attribute)
        for key, tensor in tensors.items():  # as load_state_dict(assign=True) assigns
            owner, _, rest = key.rpartition(".lora_")
            sub, _, attr = rest.partition(".")
            linear = getattr(shadows[owner], "lora_" + sub)[name]
            placed.append((key, getattr(shadows[owner], "lora_" + sub), attr))
            old = getattr(linear, attr)
            if old is None or tuple(old.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"size mismatch for {key}: copying a param with shape {tuple(tensor.shape)}, the "
                    f"model has {None if old is None else tuple(old.shape)}"
                )
            setattr(linear, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
        for owner, shadow in shadows.items():
            new = _new_parameters(shadow)
            if any(p.is_meta for p in new):
                raise ValueError(f"the adapter holds no weights for some of {owner}")
            shadow._move_adapter_to_device_of_base_layer(name)
            if any(p.dtype != torch.float32 for p in new):  # else PEFT's upcast changes nothing
                cast_adapter_dtype(shadow, name, autocast_adapter_dtype=True)
            for store in _stores(shadow).values():
                if isinstance(store, nn.Module):
                    for m in store.modules():
                        m.training = False  # model.eval(), on what is new
        # the move and upcast may have replaced the modules: look them up again by name
        _share_back((((k, None), getattr(d[name], a)) for k, d, a in placed), tensors)
    except BaseException:
        _undo(model, name)
        raise
    for owner, shadow in shadows.items():  # the only change a running forward sees
        real = _stores(layers[owner])
        for store_name, store in _stores(shadow).items():
            for k, v in store.items():
                real[store_name][k] = v
    names = [o.removeprefix("base_model.model.") for o in layers]
    seen = set(tuner.targeted_module_names)
    tuner.targeted_module_names.extend(n for n in names if n not in seen)
    mapped = {t.data_ptr() for t in tensors.values()}
    return sum(1 for s in shadows.values() for p in _new_parameters(s) if p.data_ptr() not in mapped)


# Note [a weight PEFT copied goes back to the segment]
# PEFT moves each adapter to its base layer's dtype and then, autocast_adapter_dtype, back up to
# float32 (_move_adapter_to_device_of_base_layer, cast_adapter_dtype): over a bf16 or fp16 base
# (the common case: LoRA weights are saved in float32) every mapped weight comes out a private
# copy in every worker, holding the values of the file. Where such a copy has the dtype, shape
# and every value of its mapped tensor, the parameter is pointed back at the mapped tensor
# (``param.data = mapped``): the same values, dtype and requires_grad, PEFT's result unchanged,
# the copy freed. A copy that differs (a real cast) stays and is counted by copied().


def _share_back(params, tensors: dict) -> int:
    """Point each parameter that is a copy equal to its mapped tensor back at that tensor.
    ``params``: ((head, tail), parameter) with the weight's key head + "." + tail, or (key, None).
    Returns how many were shared again (Note [a weight PEFT copied goes back to the segment])."""
    import torch

    shared = 0
    for (head, tail), p in params:
        t = tensors.get(head if tail is None else f"{head}.{tail}")
        if t is None or p.data_ptr() == t.data_ptr() or p.dtype != t.dtype or p.shape != t.shape:
            continue
        if p.device == t.device and torch.equal(p, t):
            p.data = t
            shared += 1
    return shared


def _undo(model, name: str) -> None:
    """Nothing of adapter ``name`` was put in the model's layers yet: forget its config."""
    del model.peft_config[name]


def _stores(layer) -> dict:
    """A LoRA layer's per-adapter stores (adapter name -> module, parameter or value)."""
    out = {}
    for store_name in (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant"):
        store = getattr(layer, store_name, None)
        if hasattr(store, "keys"):  # dict, ModuleDict, ParameterDict, BufferDict
            out[store_name] = store
    return out


def _new_parameters(shadow) -> list:
    """The parameters in a shadow's stores: the new adapter's."""
    return [
        p for store in _stores(shadow).values() if isinstance(store, nn.Module) for p in store.parameters()
    ]


def _shadow(layer):
    """A shallow copy of ``layer`` sharing its base layer, hooks and flags, with empty stores."""
    shadow = object.__new__(type(layer))
    shadow.__dict__.update(layer.__dict__)
    shadow._modules = dict(layer._modules)
    shadow._parameters = dict(layer._parameters)
    shadow._buffers = dict(layer._buffers)
    for store_name, store in _stores(layer).items():
        empty = type(store)()
        if isinstance(store, nn.Module):
            shadow._modules[store_name] = empty.train(store.training)
        else:
            shadow.__dict__[store_name] = empty
    return shadow


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


def copies(model: nn.Module, name: str, mapping) -> list[str]:
    """The weights of adapter ``name`` in ``model`` that do not lie in its mapping."""
    return [
        n
        for n, p in model.named_parameters()
        if f".{name}." in n or n.endswith(f".{name}")
        if p.numel() and not mapping.contains(p)
    ]


def copied(model: nn.Module) -> dict[str, int]:
    """Per adapter of ``model`` (from ``hf.attach(..., adapter=)``), how many of its weights
    are not in its segment: 0 unless PEFT cast them (a base of another dtype)."""
    return dict(_copied.get(model, {}))


def _check_shared(model: nn.Module, name: str, mapping) -> None:
    # PEFT moves an adapter to the dtype of its base layer (a bf16 base casts fp32 LoRA weights):
    # a copy then, as PEFT's own loading makes; counted, never hidden.
    _copied.setdefault(model, {})[name] = len(copies(model, name, mapping))


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


def _config_dir(mapping, spec: dict) -> str:
    """A private folder (0700) holding the adapter's config as the daemon read it."""
    uuid = mapping.manifest.uuid
    with _lock:
        path = _dirs.get(uuid)
        if path is not None and os.path.isdir(path):
            return path
        path = tempfile.mkdtemp(prefix=f"weightd-adapter-{mapping.manifest.name[:40]}-")
        try:
            for rel, index in (spec.get("files") or {}).items():
                if "/" in rel or rel.startswith("."):
                    raise AttachError(f"adapter {mapping.manifest.name!r} names a file {rel!r:.80}")
                with open(os.path.join(path, rel), "wb") as f:
                    f.write(mapping.storage_bytes(index))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if not _dirs:
            atexit.register(_remove, os.getpid())
        _dirs[uuid] = path
        return path


def _remove(pid: int) -> None:
    if os.getpid() == pid:
        for path in _dirs.values():
            shutil.rmtree(path, ignore_errors=True)


os.register_at_fork(after_in_child=_dirs.clear)

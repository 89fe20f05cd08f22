"""weightd.client.hf: a Hugging Face model folder the daemon serves, as ``from_pretrained`` gives it.

>>> from weightd.client import attach, hf
>>> model = attach("llama")                    # == LlamaForCausalLM.from_pretrained(folder), zero-copy
>>> model, tok = hf.pretrained("llama")        # and its tokenizer, from the daemon's copy of the files
>>> st = hf.sentence_transformer("minilm")     # a SentenceTransformer over the shared weights

The daemon loaded the folder with ``from_pretrained`` and serves the resulting state dict
(every load-time conversion applied) plus the folder's small files. Here the module is built
the way ``from_pretrained`` builds it, with transformers' own pieces: the config from the
folder's config.json, the dtype by its ``"auto"`` rule, the class created on the meta device
in its init context, then the mapped tensors assigned (no copy), then its own finishing step
(non-persistent buffers, missing keys, ties, the loading report), ``eval()`` and the
generation config. Differences from ``from_pretrained``: parameters come with
``requires_grad=False`` unless asked (writes stay private to the process either way).

transformers is imported only when an HF model is attached; never at import of this module.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import stat
import tempfile
import threading
import time

import torch
from torch import nn

from weightd.errors import AttachError

EXTRA = "pip install 'weightd[hf]'"
_files_dirs: dict[str, str] = {}  # segment uuid -> the files folder of that generation (shared)
_lock = threading.RLock()


# --- public helpers --------------------------------------------------------------------------


def attach(name: str, cls=None, *, socket: str | None = None, adapter=None, **kwargs) -> nn.Module:
    """``cls.from_pretrained(folder)`` for the folder the daemon serves as ``name``, zero-copy.

    ``cls``: a transformers class or ``AutoModelFor...``, or a package's own class; by default
    the class the daemon loaded the folder with: the one its config names
    (``architectures[0]``), or the one the operator named (``--factory NAME=pkg.module:Class``),
    imported from where the manifest says, as ``weightd.client.attach(name)`` does.

    ``adapter``: the name of a PEFT adapter the daemon serves over ``name`` (``weightd load
    DIR --name sql --base llama``), or a list of them: the ``PeftModel`` that
    ``PeftModel.from_pretrained(model, dir)`` (then ``load_adapter`` for the others) gives,
    the first adapter active, every adapter's weights shared (``weightd.client.adapters``).
    """
    from weightd.client.client import attach as _attach

    model = _attach(name, cls, socket=socket, **kwargs)
    if adapter is None:
        return model
    # Hook (issue 24): PEFT adapters the daemon serves by name, weightd/client/adapters.py
    from weightd.client import adapters

    return adapters.apply(name, model, adapter, socket=socket)


def files(name: str, *, socket: str | None = None) -> dict[str, bytes]:
    """The folder's small files (config, tokenizer, processor, sentence-transformers modules)."""
    mapping = _mapping(name, socket)
    return {rel: bytes(mapping.storage_bytes(i)) for rel, i in _skeleton(mapping.manifest)["files"].items()}


def files_dir(name: str, *, socket: str | None = None) -> str:
    """A folder holding the small files, for ``AutoTokenizer.from_pretrained(path)`` and the like.

    One per user and model generation, shared by that user's workers (Note [one files folder
    per user and generation]); treat it as read-only. It is removed once its generation is gone.
    """
    return _files_dir(_mapping(name, socket))


def tokenizer(name: str, *, socket: str | None = None, **kwargs):
    """``AutoTokenizer.from_pretrained(folder, **kwargs)``, from the daemon's copy of the files."""
    transformers = _transformers(name)
    return transformers.AutoTokenizer.from_pretrained(files_dir(name, socket=socket), **kwargs)


def processor(name: str, *, socket: str | None = None, **kwargs):
    """``AutoProcessor.from_pretrained(folder, **kwargs)`` (image, audio and multimodal models)."""
    transformers = _transformers(name)
    return transformers.AutoProcessor.from_pretrained(files_dir(name, socket=socket), **kwargs)


def pretrained(name: str, cls=None, *, socket: str | None = None, **kwargs):
    """``(model, tokenizer)``: the model as ``attach`` gives it, and its tokenizer (None if none)."""
    model = attach(name, cls, socket=socket, **kwargs)
    names = set(files(name, socket=socket))
    has_tokenizer = any(
        n.startswith(("tokenizer", "vocab", "merges", "spiece", "sentencepiece")) for n in names
    )
    return model, tokenizer(name, socket=socket) if has_tokenizer else None


def sentence_transformer(name: str, *, socket: str | None = None, **kwargs):
    """A ``SentenceTransformer`` from the folder's modules.json, its transformer over the shared weights.

    Needs the ``sentence-transformers`` package. Keyword arguments go to ``SentenceTransformer``.
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import transformer as st_transformer
    except ImportError:
        raise AttachError(
            f"model {name!r}: sentence_transformer() needs sentence-transformers: pip install "
            "sentence-transformers"
        ) from None
    folder = files_dir(name, socket=socket)
    if not os.path.exists(os.path.join(folder, "modules.json")):
        raise AttachError(
            f"model {name!r} is not a sentence-transformers folder (it has no modules.json): use attach()"
        )

    def load_model(
        self, model_name_or_path, transformer_task, config, backend, is_peft_model, **model_kwargs
    ):
        if backend != "torch" or is_peft_model:
            raise AttachError(
                f"model {name!r}: weightd serves torch weights, not {backend!r} or PEFT adapters"
            )
        auto = st_transformer.TRANSFORMER_TASK_TO_AUTO_MODEL.get(transformer_task)
        return attach(name, auto, socket=socket, config=config)

    with _lock:  # the patch is process-wide while the modules are built
        original = st_transformer.Transformer._load_model
        st_transformer.Transformer._load_model = load_model
        try:
            return SentenceTransformer(folder, local_files_only=True, **{"device": "cpu", **kwargs})
        finally:
            st_transformer.Transformer._load_model = original


# --- what weightd.client.attach uses ---------------------------------------------------------


def wants(model, skeleton: dict | None) -> bool:
    """Whether attach should build this model the ``from_pretrained`` way."""
    if not (skeleton and isinstance(skeleton.get("hf"), dict)):
        return False
    return model is None or (isinstance(model, type) and _is_transformers_class(model))


def build(
    name: str,
    mapping,
    tensors: dict[str, torch.Tensor],
    cls=None,
    *,
    requires_grad: bool = False,
    config=None,
) -> tuple[nn.Module, int, float]:
    """The module ``cls.from_pretrained(folder)`` returns, over the mapped tensors.

    Returns ``(module, copies, build_seconds)``.
    """
    hf = _skeleton(mapping.manifest)
    transformers = _transformers(name)
    from weightd.client import transformers_adapter as adapter

    t0 = time.perf_counter()
    same_version = hf.get("transformers") == transformers.__version__
    folder = _files_dir(mapping)
    if hf.get("quantized"):  # Hook (issue 24): quantized folders, weightd/client/quantized.py
        from weightd.client import quantized

        cls, config = _class_and_config(transformers, adapter, name, hf, cls, config, folder)
        return quantized.build(name, mapping, tensors, cls, hf, folder, transformers, config)
    with _stage(lambda: f"building {getattr(cls, '__name__', cls)}", name, hf, transformers, same_version):
        cls, config = _class_and_config(transformers, adapter, name, hf, cls, config, folder)
        config.name_or_path = hf.get("source", "")
        config, dtype = adapter.dtype_for(config, tensors)
        with adapter.init_context(cls, dtype, config):
            module = cls(config)
        adapter.patch_outputs(module)
    build_seconds = time.perf_counter() - t0
    info, assigned = _assign(adapter, module, tensors, requires_grad)
    if info.mismatched_keys:
        k, have, want = sorted(info.mismatched_keys)[0]
        raise _version_error(
            name,
            hf,
            transformers,
            f"{len(info.mismatched_keys)} weights have another shape than "
            f"{cls.__name__} wants, e.g. {k!r} is {tuple(have)}, the module wants {tuple(want)}",
            same_version,
        )
    if not same_version and (info.unexpected_keys or info.missing_keys - set(module.all_tied_weights_keys)):
        odd = sorted(info.unexpected_keys)[:3] or sorted(info.missing_keys)[:3]
        raise _version_error(
            name, hf, transformers, f"its weights do not match {cls.__name__} here (e.g. {odd})"
        )
    with _stage(lambda: f"finishing {cls.__name__}", name, hf, transformers, same_version):
        adapter.finish(cls, module, source=hf.get("source"), dtype=dtype, info=info)
    # After the class's own rules (ties, _keys_to_ignore_on_load_missing): a weight the module
    # has and the segment lacks would be random, not loaded. from_pretrained warns; attach refuses.
    if info.missing_keys:
        missing = sorted(info.missing_keys)
        raise AttachError(
            f"model {name!r}: {cls.__name__} has {len(missing)} weights the served model does not hold "
            f"(e.g. {missing[:3]}); they would be random: attach with the class the folder was saved "
            "with (or none), or serve a folder that holds them"
        )
    with _stage(lambda: f"finishing {cls.__name__}", name, hf, transformers, same_version):
        module.eval()
        module.set_use_kernels(False)
        adapter.adjust_generation(module, folder)
    final = dict(module.state_dict(keep_vars=True))
    copies = [n for n in assigned if n in final and final[n].numel() and not mapping.contains(final[n])]
    if copies:
        copies = _reshare(module, final, assigned, copies)
    on_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if on_meta:
        raise AttachError(
            f"model {name!r}: {len(on_meta)} tensors are still on the meta device, e.g. {on_meta[:3]}"
        )
    return module, len(copies), build_seconds


# --- internals ----------------------------------------------------------------------------


def _transformers(name: str):
    try:
        import transformers
    except ImportError:
        raise AttachError(
            f"model {name!r} is a Hugging Face model; building it needs transformers here: {EXTRA}, "
            "or pass model= to attach"
        ) from None
    return transformers


def _is_transformers_class(obj) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in getattr(obj, "__mro__", ()))


def _skeleton(manifest) -> dict:
    hf = (manifest.skeleton or {}).get("hf")
    if not isinstance(hf, dict):
        raise AttachError(f"model {manifest.name!r} was not loaded from a Hugging Face model folder")
    return hf


def _mapping(name: str, socket: str | None):
    from weightd.client.client import _with_client

    return _with_client(socket, lambda c: c._map(name, None)[0])


def _files_dir(mapping) -> str:
    """The folder of the generation's small files, shared by every process of this user.

    Note [one files folder per user and generation]: ``<root>/<segment>-<uuid>``, where root
    is ``$XDG_RUNTIME_DIR/weightd-files`` or ``/tmp/weightd-files-<uid>`` (0700, checked to be
    this user's own). It is made once, atomically (written under a temporary name, then
    renamed), and reused by every worker of this user; it is removed by whichever worker
    finds its segment gone (a new generation replaced it, the daemon unloaded it). So workers
    that end by a signal leave nothing behind that outlives their generation.
    """
    from weightd import entry

    manifest = mapping.manifest
    with _lock:
        path = _files_dirs.get(manifest.uuid)
        if path is not None and os.path.isdir(path):
            return path
        if not hasattr(mapping, "storage_bytes"):  # a copy on a GPU: the files are in the CPU segment
            from weightd.client.mapping import Mapping

            mapping = Mapping(manifest, owner=mapping.owner)  # the daemon's user's segment only
        root = _files_root()
        _sweep(root)
        seg = manifest.segment.lstrip("/")
        path = os.path.join(root, f"{seg}-{manifest.uuid[:16]}")
        if not os.path.isdir(path):
            making = tempfile.mkdtemp(dir=root, prefix=".making-")
            try:
                for rel, index in _skeleton(manifest)["files"].items():
                    target = os.path.join(making, rel)
                    if os.path.isabs(rel) or ".." in rel.split("/") or rel == _SEGMENT_FILE:
                        raise AttachError(
                            f"model {manifest.name!r} names a file {rel!r:.80} outside its folder"
                        )
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(mapping.storage_bytes(index))
                with open(os.path.join(making, _SEGMENT_FILE), "w") as f:
                    f.write(entry.file_in(entry.announced_directory(manifest.directory), seg))
                try:
                    os.rename(making, path)
                except OSError:
                    if not os.path.isdir(path):  # not another worker's folder that won the race
                        raise
            finally:
                shutil.rmtree(making, ignore_errors=True)
        _files_dirs[manifest.uuid] = path
        return path


_SEGMENT_FILE = ".weightd-segment"  # in each files folder: the segment whose files it holds
MAKING_SECONDS = 3600  # a folder still being made after this long belongs to a process that died


def _files_root() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.geteuid()
    root = (
        os.path.join(runtime, "weightd-files")
        if runtime
        else os.path.join(tempfile.gettempdir(), f"weightd-files-{uid}")
    )
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise AttachError(
            f"{root} is not a private folder of uid {uid} (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): someone else made it; remove it, or set XDG_RUNTIME_DIR"
        )
    return root


def _sweep(root: str) -> None:
    """Remove the files folders whose segment is gone, and half-made ones of dead processes."""
    now = time.time()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        try:
            if entry.startswith(".making-"):
                if now - os.lstat(path).st_mtime > MAKING_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            with open(os.path.join(path, _SEGMENT_FILE)) as f:
                gone = not os.path.exists(f.read())
        except OSError:
            continue
        if gone:
            shutil.rmtree(path, ignore_errors=True)


def _class_and_config(transformers, adapter, name: str, hf: dict, cls, config, folder: str):
    """The concrete class and its config, as ``cls.from_pretrained(folder)`` would pick them."""
    if cls is None:
        cls = getattr(transformers, hf.get("class", ""), None)
        if cls is None and hf.get("import") and not str(hf["import"]).startswith("transformers."):
            # Hook (issue 24): a class the operator named (--factory), weightd/client/classes.py.
            from weightd.client import classes

            cls = classes.load(name, hf["import"], transformers)
        if cls is None:
            raise AttachError(
                f"model {name!r} is a {hf.get('class')!r}, which transformers {transformers.__version__} "
                f"here does not ship (the daemon loaded it with {hf.get('transformers')}): install that "
                "version, or pass model="
            )
    if adapter.is_auto_class(cls):
        if config is None:
            config = transformers.AutoConfig.from_pretrained(folder)
        else:
            config = copy.deepcopy(config)
        if type(config) not in cls._model_mapping:
            raise AttachError(f"model {name!r}: {cls.__name__} has no class for a {type(config).__name__}")
        return adapter.concrete_class(cls, config), config
    if config is None:
        config = cls.config_class.from_pretrained(folder)
    else:
        config = copy.deepcopy(config)
    return cls, config


def _assign(adapter, module: nn.Module, tensors: dict[str, torch.Tensor], requires_grad: bool):
    """Put the mapped tensors in place, as from_pretrained's loading loop does; nothing is copied.

    Keys follow from_pretrained's prefix rule (a base model's weights into a model with a head,
    and back); what has no place is unexpected, what gets none is missing: both then go to
    the class's own rules in ``_finalize_model_loading``.
    """
    expected = module.state_dict()
    info = adapter.loading_info(set(expected))
    prefix = getattr(module, "base_model_prefix", None) or None
    renamed = {
        (key if key in expected else adapter.renamed_key(key, prefix, expected)): t
        for key, t in tensors.items()
    }
    # Tied names are left to tie_weights, as when save_pretrained dropped them from the files:
    # given both, transformers would compare them byte for byte (reading a whole embedding).
    tied = getattr(module, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        a, b = renamed.get(target), renamed.get(source)
        if a is not None and b is not None and _same_place(a, b):
            del renamed[target]
    assigned: dict[str, torch.Tensor] = {}
    owners: dict[str, nn.Module] = {}
    for target, t in renamed.items():
        want = expected.get(target)
        if want is None:
            info.unexpected_keys.add(target)
            continue
        if t.shape != want.shape:
            info.mismatched_keys.add((target, tuple(t.shape), tuple(want.shape)))
            continue
        path, _, leaf = target.rpartition(".")
        owner = owners.get(path)
        if owner is None:
            owner = owners[path] = module.get_submodule(path) if path else module
        if leaf in owner._parameters:
            value = nn.Parameter(t, requires_grad=requires_grad and t.is_floating_point())
            value._is_hf_initialized = True
            owner._parameters[leaf] = value
        elif leaf in owner._buffers:
            t._is_hf_initialized = True
            owner._buffers[leaf] = t
        else:
            info.unexpected_keys.add(target)
            continue
        info.missing_keys.discard(target)
        assigned[target] = t
    return info, assigned


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _reshare(module: nn.Module, final: dict, assigned: dict, copies: list[str]) -> list[str]:
    """Point weights that transformers' finishing replaced by an equal copy back at the mapping.

    Tying an output embedding pads its bias (``_adjust_bias``), which copies it even when
    there is nothing to pad: the values stay the mapped ones, so the mapped tensor can stand
    in for the copy (``.data`` keeps the Parameter object, and with it every tie).
    """
    left = []
    for n in copies:
        have, mapped = final[n], assigned[n]
        if have.shape == mapped.shape and have.dtype == mapped.dtype and _same_bytes(have, mapped):
            if isinstance(have, nn.Parameter):
                have.data = mapped
            else:
                path, _, leaf = n.rpartition(".")
                (module.get_submodule(path) if path else module)._buffers[leaf] = mapped
        else:
            left.append(n)
    return left


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)) if a.numel() else True


@contextlib.contextmanager
def _stage(what, name: str, hf: dict, transformers, same_version: bool):
    """Run one stage of building the module; a failure of transformers' own code there becomes
    the AttachError that names the versions (``what()`` says which stage, read when it fails)."""
    try:
        yield
    except AttachError:
        raise
    except Exception as e:
        raise _version_error(name, hf, transformers, f"{what()} failed: {e}", same_version) from None


def _version_error(name: str, hf: dict, transformers, what: str, same_version: bool = False) -> AttachError:
    if same_version:
        return AttachError(f"model {name!r}: {what}: pass the class the folder was saved with, or none")
    return AttachError(
        f"model {name!r} was converted by transformers {hf.get('transformers')} in the daemon, this "
        f"process has {transformers.__version__}, and {what}: install "
        f"transformers=={hf.get('transformers')} here, or reload the model in a daemon with this version"
    )

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
        _check_shared(out, name, mapping)
    _bases[out] = base_name
    return out


def add(model: nn.Module, adapters, *, socket: str | None = None, is_trainable=False):
    """Load more served adapters into a ``PeftModel`` that ``hf.attach(base, adapter=...)`` gave:
    ``load_adapter`` over the mapped weights (milliseconds: benchmarks/adapters.py)."""
    base = _bases.get(model)
    if base is None:
        raise AttachError("add(): pass a PeftModel that hf.attach(base, adapter=...) returned")
    return apply(base, model, adapters, socket=socket, is_trainable=is_trainable)


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

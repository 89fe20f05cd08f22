"""Hugging Face model folders: loaded with transformers' own ``from_pretrained``, served converted.

``from_pretrained`` does more than read tensors: it picks the weight files (safetensors over
``.bin``, index files for shards), renames and merges keys (per-expert MoE weights fused into
one tensor, legacy prefixes, ``gamma``/``beta``), drops keys the class ignores, casts to the
config's dtype and ties weights. Rather than re-implement any of that, the daemon runs it once,
on the CPU, and lays the resulting ``state_dict()`` out in the segment: what workers map is
exactly the tensors ``from_pretrained`` would have given them. Tensors that share memory (ties)
stay one storage. The folder's small files (config, tokenizer, processor, sentence-transformers
modules) go into the same segment as byte storages, so a worker needs no copy of the folder.

Daemon-only: the client never imports this module (its side is ``weightd.client.hf``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from weightd import layout
from weightd.daemon import classes
from weightd.errors import CheckpointError
from weightd.layout import Blob

log = logging.getLogger("weightd")

EXTRA = "pip install 'weightd[hf]'"
# The folder's small files a worker may need besides the weights, by suffix. Whatever else a
# training tool left beside them (optimizer states, other checkpoints, logs) is not served.
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".spm")
MAX_SMALL_FILE = 64 << 20
MAX_SMALL_FILES = 512 << 20


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` is a transformers model folder: a config.json naming a model type."""
    config = _config(folder)
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def read_folder(folder: Path, *, within: list[str] | None = None, check=None, factory: str | None = None):
    """Load ``folder`` with ``from_pretrained`` and describe its state dict as a Checkpoint.

    ``check()`` (raises to stop the load) is called between the stages: ``from_pretrained``
    itself cannot be interrupted, so a stop waits for it at most. The identity of every file
    read (config, weights, small files) goes into the checkpoint's ``files``.
    """
    from weightd.daemon.checkpoint import Checkpoint, check_within, identity

    check = check or (lambda: None)
    config = _config(folder)
    try:
        import torch
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{folder} is a Hugging Face model folder (model type {config.get('model_type', '?')!r}); the "
            f"daemon loads those with transformers, which is not installed where it runs: {EXTRA}"
        ) from None
    if within is not None:
        check_within(folder / "config.json", within)
    # Hook (issue 24): an operator-named class (--factory) loads the folder, weightd/daemon/classes.py.
    cls = (
        classes.resolve(factory, folder, transformers)
        if factory
        else _model_class(transformers, folder, config)
    )
    weight_files = _weight_files(folder, config)
    for f in weight_files:
        if within is not None:
            check_within(f, within)
    # Taken before from_pretrained reads them: a file rewritten meanwhile then counts as changed.
    read = [identity(folder / "config.json")] + [identity(f) for f in weight_files]
    check()
    started = time.perf_counter()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except CheckpointError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, RuntimeError, KeyError...
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{folder}: transformers {transformers.__version__} could not load it with "
            f"{cls.__name__}.from_pretrained: {first}"
        ) from None
    seconds = time.perf_counter() - started
    check()
    state = model.state_dict()
    blobs, tensors, keep = layout.from_tensors(state, source=str(folder))
    keep.append(model)
    converted = _converted(state, weight_files)
    files = {}
    for rel, path in _small_files(folder, set(weight_files)).items():
        if within is not None:
            check_within(path, within)
        check()
        entry = identity(path)
        data = path.read_bytes()
        if entry["path"] not in {f["path"] for f in read}:
            read.append(entry)
        files[rel] = len(blobs)
        blobs.append(Blob(len(data), _bytes_fill(data)))
    converted_bytes = sum(state[k].untyped_storage().nbytes() for k in converted)
    dtype = str(model.dtype).removeprefix("torch.")
    skeleton = {
        "hf": {
            "class": type(model).__name__,
            "import": classes.import_name(type(model)),  # where workers import it from
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "dtype": dtype,
            "source": str(folder.resolve()),
            "config": config,
            "weight_files": [os.path.relpath(f, folder) for f in weight_files],
            "files": files,
            "generation_config": model.generation_config.to_diff_dict()
            if getattr(model, "generation_config", None) is not None and model.can_generate()
            else None,
            # tensors transformers computed (fused, cast...), not taken from the files as they are
            "converted": converted,
            "converted_bytes": converted_bytes,
            # what from_pretrained reported after its class's rules: keys it dropped, keys it initialized
            "unexpected": sorted(info.get("unexpected_keys") or ()),
            "missing": sorted(info.get("missing_keys") or ()),
        }
    }
    log.info(
        "%s: %s.from_pretrained in %.2f s (transformers %s, %s): %d tensors, %d converted (%.1f MiB), "
        "%d small files",
        folder,
        type(model).__name__,
        seconds,
        transformers.__version__,
        dtype,
        len(tensors),
        len(converted),
        converted_bytes / 2**20,
        len(files),
    )
    return Checkpoint(
        path=str(folder),
        format="huggingface",
        blobs=blobs,
        tensors=tensors,
        skeleton=skeleton,
        keepalive=keep,
        files=read,
    )


# --- which class, which files --------------------------------------------------------------


def _config(folder: Path):
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _model_class(transformers, folder: Path, config: dict):
    """The class ``from_pretrained`` gets called on: config.architectures[0], else AutoModel."""
    archs = config.get("architectures") or []
    if not archs:
        return transformers.AutoModel
    name = archs[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(
            f"{folder}: config.json names the architecture {name!r:.80}, which transformers "
            f"{transformers.__version__} does not ship (weightd never runs a folder's own code): if a "
            f"package you trust defines it, {classes.REMEDY}; else upgrade transformers, or fix architectures"
        )
    return cls


def _weight_files(folder: Path, config: dict) -> list[Path]:
    """The files ``from_pretrained`` will read, resolved by transformers' own rules.

    Its preference order (model.safetensors, its index, pytorch_model.bin, its index), its
    index parsing and the config's ``transformers_weights`` all come from transformers; weightd
    adds only the checks that each named file is a file inside the folder.
    """
    from transformers import modeling_utils

    try:
        files, _ = modeling_utils._get_resolved_checkpoint_files(
            pretrained_model_name_or_path=str(folder),
            variant=None,
            gguf_file=None,
            use_safetensors=None,
            user_agent={"file_type": "model", "framework": "pytorch"},
            is_remote_code=False,
            transformers_explicit_filename=config.get("transformers_weights"),
            download_kwargs={"local_files_only": True},
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{folder}: no *.safetensors or pytorch_model.bin weights that transformers would load "
            "(model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index): "
            f"{str(e)[:300]}"
        ) from None
    out = []
    root = os.path.realpath(folder)
    for f in files or []:
        p = Path(f)
        inside = os.path.realpath(p.parent) == root or os.path.abspath(p.parent) == os.path.abspath(folder)
        if not inside:
            raise CheckpointError(
                f"{folder}: its index names shard {str(p)!r:.200}, which is not a file in {folder}"
            )
        if not p.is_file():
            raise CheckpointError(
                f"{folder}: its index names shard {p.name!r}, which is missing: copy every shard the "
                "index lists into the folder (a partial download?)"
            )
        out.append(p)
    return out


def _small_files(folder: Path, weights: set[Path]) -> dict[str, Path]:
    """The files a worker may want besides the weights, by their path in the folder.

    Top level: configs, tokenizer and processor files (by suffix). Sub-folders: only the
    sentence-transformers modules that modules.json names (1_Pooling/, 2_Dense/...), whole.
    """
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if (
            p.is_file()
            and p.suffix in SMALL_FILE_SUFFIXES
            and not p.name.endswith(".index.json")
            and p not in weights
        ):
            out[p.name] = p
    modules = out.get("modules.json")
    if modules is not None:
        try:
            entries = json.loads(modules.read_text())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{modules}: not valid JSON ({e})") from None
        for entry in entries if isinstance(entries, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(sub, str) or not sub or sub.startswith((".", "/")) or ".." in sub.split("/"):
                continue
            base = folder / sub
            if base.is_dir():
                for p in sorted(base.rglob("*")):
                    if p.is_file():
                        out[str(p.relative_to(folder))] = p
    kept, total = {}, 0
    for rel, p in out.items():
        size = p.stat().st_size
        if size > MAX_SMALL_FILE or total + size > MAX_SMALL_FILES:
            log.warning(
                "%s: not serving %s (%d bytes): larger than weightd serves beside the weights",
                folder,
                rel,
                size,
            )
            continue
        kept[rel] = p
        total += size
    return kept


def _bytes_fill(data: bytes):
    def fill(seg, offset: int) -> None:
        seg.write(offset, data)

    return fill


def _converted(state: dict, weight_files: list[Path]) -> list[str]:
    """Tensors that are not untouched views of a weight file: what transformers computed.

    A tensor that ``from_pretrained`` took as it is lies inside the file's memory map; one it
    fused, permuted or cast lives in memory of its own. Read from /proc/self/maps.
    """
    names = {os.path.realpath(f) for f in weight_files}
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in names:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    out = []
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and not any(lo <= ptr < hi for lo, hi in ranges):
            out.append(name)
    return out

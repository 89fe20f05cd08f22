"""PEFT adapters served by name over a base model the daemon serves.

``weightd load PATH --name sql --base llama`` (or ``serve --adapter sql=llama:PATH``) reads a
folder written by PEFT's ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``, or ``adapter_model.bin`` as a weights-only state dict) into a
segment of its own, a model like any other: it has generations, ``load`` again replaces it,
``unload`` removes it, and the base it names is untouched. Its tensors are the file's, as PEFT
saved them; its config is served as a small file beside them. Workers attach the base with
the adapter (``hf.attach("llama", adapter="sql")``): PEFT's own loading over the mapped
tensors (``weightd.client.adapters``), so every worker shares one copy of each adapter.

The config is checked against the base it names, before anything is copied: the base must
be served and be a Hugging Face model; every module the adapter's weights target must have a
weight in the base, of the shape the adapter's matrices imply (LoRA's ``A`` is r x in,
``B`` out x r). An adapter trained for another base is refused naming a module that does not
fit, never served to fail in every worker.

Daemon-only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from weightd.daemon import checkpoint, files
from weightd.errors import CheckpointError, UnsupportedFormat
from weightd.layout import Blob
from weightd.manifest import Manifest

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG = 4 << 20
PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's keys
# PEFT methods whose loading reads more than the folder's config and weights file
REFUSED = {
    "XLORA": (
        "X-LoRA loads the LoRA adapters it mixes from their own folders, by path, in every worker; "
        "serve each of them by name (load DIR --name NAME --base BASE) and attach them together "
        "(hf.attach(base, adapter=[...])), or load the X-LoRA folder with PEFT in the worker"
    ),
}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def read(
    path: str | os.PathLike,
    base_name: str,
    base: Manifest,
    *,
    within: list[str] | None = None,
    check=None,
) -> checkpoint.Checkpoint:
    """The adapter folder at ``path`` as a Checkpoint, checked against ``base`` (served as
    ``base_name``)."""
    folder = Path(path)
    check = check or (lambda: None)
    if not folder.is_dir() or not is_adapter_folder(folder):
        raise CheckpointError(
            f"{folder}: not a PEFT adapter folder (no {CONFIG}): give the folder PEFT's save_pretrained "
            "wrote, or load it without --base"
        )
    hf = (base.skeleton or {}).get("hf")
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"{folder}: its base {base_name!r} is not a Hugging Face model folder: adapters go over a model "
            "loaded from a transformers folder"
        )
    f = files.open_file(folder / CONFIG, within)
    try:
        identity = files.identity(folder / CONFIG, f.fileno())
        raw = files.read_fd(f.fileno(), folder / CONFIG, MAX_CONFIG)
    finally:
        f.close()
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise CheckpointError(f"{folder / CONFIG}: no peft_type: not a config PEFT wrote")
    if config["peft_type"] in REFUSED:
        raise UnsupportedFormat(
            f"{folder}: PEFT method {config['peft_type']}: {REFUSED[config['peft_type']]}"
        )
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS)} beside {CONFIG}")
    check()
    if weights.suffix == ".safetensors":
        ck = checkpoint.read_safetensors(weights, within)
    else:
        ck = checkpoint.read_torch(weights, allow_pickle=False, within=within)
    try:
        _check_against_base(folder, config, ck, base_name, base)
        ck.files.insert(0, identity)
        ck.format = "peft"
        ck.path = str(folder)
        ck.blobs.append(Blob(len(raw), _bytes_fill(raw)))
        ck.skeleton = {
            "adapter": {
                "base": base_name,
                "base_generation": base.generation,
                "peft_type": config["peft_type"],
                "r": config.get("r"),
                "task_type": config.get("task_type"),
                "base_model_name_or_path": config.get("base_model_name_or_path"),
                "files": {CONFIG: len(ck.blobs) - 1},
            }
        }
    except BaseException:
        checkpoint.close(ck)
        raise
    return ck


def _check_against_base(folder: Path, config: dict, ck, base_name: str, base: Manifest) -> None:
    """Every module the adapter's weights name has a weight in the base that fits them."""
    shapes = {t.name: t.shape for t in base.tensors}
    if not ck.tensors:
        raise CheckpointError(f"{folder}: the adapter holds no weights")
    for t in ck.tensors:
        key = t.name.removeprefix(PREFIX)
        for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude"):
            if part in key:
                module = key.split(part)[0]
                break
        else:
            continue  # other PEFT methods, modules_to_save: PEFT checks them at attach
        want = shapes.get(f"{module}.weight")
        if want is None:
            raise CheckpointError(
                f"{folder}: the adapter targets {module!r}, which base {base_name!r} has no weight for: "
                f"this adapter was trained for another model ({config.get('base_model_name_or_path')!r})"
            )
        got = tuple(t.shape)
        fits = True
        if ".lora_A." in key and len(got) == 2 and len(want) == 2:
            fits = got[1] == want[1]
        elif ".lora_B." in key and len(got) == 2 and len(want) == 2:
            fits = got[0] == want[0]
        if not fits:
            raise CheckpointError(
                f"{folder}: {t.name} is {got}, which does not fit {module}.weight {tuple(want)} of base "
                f"{base_name!r}: this adapter was trained for another model "
                f"({config.get('base_model_name_or_path')!r})"
            )


def _bytes_fill(data: bytes):
    def fill(seg, offset: int) -> None:
        seg.write(offset, data)

    return fill

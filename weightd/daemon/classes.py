"""Operator-named model classes: ``--factory NAME=pkg.module:Class`` for a Hugging Face folder.

Many trained checkpoints name an architecture defined in the package that ships them (a
``BertPreTrainedModel`` subclass with its own heads); their users call
``TheirClass.from_pretrained(folder)``. The daemon never runs code a folder brings
(``trust_remote_code`` stays off), but the operator may name code they trust, as they already
do with ``--factory`` for plain checkpoints: for a folder, the factory names the class, and the
daemon loads the folder with that class's ``from_pretrained``. The manifest records where the
class is importable (``module:qualname``) so that workers that can import it attach without
naming it (``weightd.client.hf``).

Daemon-only.
"""

from __future__ import annotations

from pathlib import Path

from weightd import dotted
from weightd.errors import CheckpointError

REMEDY = (
    "serve it with the class its package defines: weightd serve --model NAME=FOLDER --factory "
    "NAME=package.module:Class (or weightd load FOLDER --factory package.module:Class), the package "
    "installed where the daemon runs"
)


def resolve(factory: str, folder: Path, transformers) -> type:
    """The class ``factory`` ("package.module:Class") names, if it is a transformers model class."""
    try:
        obj = dotted.resolve(factory)
    except Exception as e:  # ImportError, AttributeError, or whatever the module raises on import
        raise CheckpointError(
            f"{folder}: --factory names {factory!r}, which the daemon cannot import "
            f"({type(e).__name__}: {str(e)[:200]}): install that package where the daemon runs"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{folder} is a Hugging Face model folder, and --factory {factory!r} names a "
            f"{type(obj).__name__}, not a transformers model class: for a folder, name the class whose "
            "from_pretrained loads it (a PreTrainedModel subclass, package.module:Class)"
        )
    return obj


def import_name(cls: type) -> str:
    """Where ``cls`` is importable from: what the manifest records, what workers import."""
    return f"{cls.__module__}:{cls.__qualname__}"

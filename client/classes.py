"""The model class a daemon's manifest names by import path (``--factory NAME=pkg.module:Class``).

The daemon loaded the folder with ``Class.from_pretrained`` and recorded where the class is
importable; a worker that has the package attaches with ``hf.attach(name)`` and gets that
class, as ``Class.from_pretrained(folder)`` gives it, or passes the class itself
(``hf.attach(name, cls=Class)``). Importing it runs the package's code in this process, as
importing it yourself would: the name comes from the daemon you chose to trust, never from
the folder.
"""

from __future__ import annotations

from weightd import dotted
from weightd.errors import AttachError


def load(name: str, where: str, transformers) -> type:
    """The class at ``where`` ("package.module:Class"), a transformers model class."""
    module_name, _, attr = str(where).partition(":")
    try:
        obj = dotted.resolve(where)
    except Exception as e:  # ImportError, AttributeError, or whatever the module raises on import
        raise AttachError(
            f"model {name!r} is a {attr!r} from {module_name!r}, which this process cannot import "
            f"({type(e).__name__}: {str(e)[:200]}): install that package here, or pass its class "
            "(hf.attach(name, cls=Class))"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)):
        raise AttachError(
            f"model {name!r}: {where!r} is a {type(obj).__name__} here, not a transformers model class: "
            "pass the class the daemon loaded it with (hf.attach(name, cls=Class))"
        )
    return obj

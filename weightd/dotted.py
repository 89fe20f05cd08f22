"""Names of trusted code given as ``package.module:attr.path`` (``--factory``, a manifest's class).

The one way both wings turn such a name into the object: each caller wraps what it raises
(ImportError, AttributeError, or whatever the module raises on import) in its own typed error.
"""

from __future__ import annotations

import importlib


def resolve(where: str):
    """The object ``where`` (``"package.module:Attr.sub"``) names; imports the module."""
    module_name, _, attr = str(where).partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj

"""Tensors transformers fuses from whole file tensors (MoE experts), found as file ranges.

Runs in the loader process (weightd/daemon/loader.py), which has transformers imported.

Note [fused tensors are file ranges]
------------------------------------
An MoE folder saves each expert's projections as tensors of their own
(``experts.3.w1.weight``); transformers 5 fuses them on load into one tensor per layer
(``experts.gate_up_proj`` of shape [experts, 2 x intermediate, hidden]) by stacking the experts
(``MergeModulelist(dim=0)``) and, where two projections make one, concatenating them along the
next dimension (``Concatenate(dim=1)``). Both only put whole contiguous tensors end to end: the
fused tensor's bytes are the file ranges of its sources, expert after expert, and within an
expert the sources in the converter's order. So its bytes are known before ``from_pretrained``
runs, and the daemon's readers can copy them from the files early, like the tensors kept as they
are (Note [copying while from_pretrained runs] in weightd/daemon/early.py), instead of after it
from a memfd the loader writes them into: a load no longer holds its experts twice (a 947 MiB
Mixtral fuses 672 MiB; the peak shared memory of its load went from 1525 MiB to 853, its one
file's). On 2 vCPUs its time stayed within noise: the readers' copy, which followed the memfd's
write, now runs beside the fusion and takes its CPU.

Which tensors fuse so is read from transformers' own conversion mapping for the model
(``get_model_conversion_mapping``, ``rename_source_key``): only converters whose operations are
exactly those two, with those dimensions, are taken; the sources' dtype and the model's must
agree (no cast), and the shapes must make the model's. The guess decides nothing about what
is served: after ``from_pretrained`` the loader compares the tensor it fused with those ranges,
byte for byte (``same``), and only one that is equal is answered as the ranges; any other goes
through the memfd as before, and the pages copied for the guess are given back. Where
transformers' names or operations change, nothing is guessed: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import mmap

# safetensors dtype -> (torch dtype, item size): the dtypes a guess takes
DTYPES = {"F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8)}


def prepare() -> None:
    """Build transformers' table of checkpoint conversions, which it builds on first use (0.18 s
    here, in ``from_pretrained`` and in ``likely`` alike): called in the loader process before it
    forks, so that each load's fork has it."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    except Exception:  # noqa: BLE001 - transformers without it: each fork builds what it uses
        pass


def likely(model, meta: dict, headers: dict, wanted: str | None) -> dict[str, list]:
    """The model's tensors fused from whole file tensors: name -> [item size, [[file index,
    offset, bytes], ...]] in the order their bytes lie in the fused tensor. ``model``: built on
    the meta device, ``meta`` its state dict's names -> (dtype, shape) (``loader._implied``);
    ``headers``: ``loader._headers``; ``wanted``: the config's dtype, if any."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - transformers without these names: nothing is guessed
        return {}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming) and not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    kinds = {}  # converter -> "stack" or "stack, cat"
    for c in converters:
        ops = list(getattr(c, "operations", None) or ())
        if (
            len(ops) == 1
            and type(ops[0]) is MergeModulelist
            and ops[0].dim == 0
            and len(c.source_patterns) == 1
        ):
            kinds[id(c)] = "stack"
        elif (
            len(ops) == 2
            and type(ops[0]) is MergeModulelist
            and ops[0].dim == 0
            and type(ops[1]) is Concatenate
            and ops[1].dim == 1
        ):
            kinds[id(c)] = "stack, cat"
    if not kinds:
        return {}
    by_pattern = {p: c for c in converters if id(c) in kinds for p in c.source_patterns}
    groups: dict[str, dict[str, list]] = {}  # target -> source pattern -> its sources
    for k, (data, header) in headers.items():
        for name, v in header.items():
            if name == "__metadata__" or not isinstance(v, dict) or v.get("dtype") not in DTYPES:
                continue
            try:
                # (transformers asks its meta state dict only which names it has)
                target, pattern = rename_source_key(
                    name, renamings, converters, model.base_model_prefix, meta
                )
            except Exception:  # noqa: BLE001 - a key transformers' rules do not take
                continue
            if pattern not in by_pattern or target not in meta:
                continue
            begin, end = v["data_offsets"]
            source = (dot_natural_key(name), k, data + begin, end - begin, v["dtype"], list(v["shape"]))
            groups.setdefault(target, {}).setdefault(pattern, []).append(source)
    out = {}
    for target, sources in groups.items():
        converter = by_pattern[next(iter(sources))]
        patterns = list(converter.source_patterns)
        if set(sources) != set(patterns):
            continue
        lists = [sorted(sources[p]) for p in patterns]  # experts in transformers' order: natural keys
        experts = len(lists[0])
        dtypes = {s[4] for one in lists for s in one}
        if any(len(one) != experts for one in lists) or len(dtypes) != 1:
            continue
        dtype, itemsize = DTYPES[dtypes.pop()]
        if dtype != (wanted or meta[target][0]):
            continue  # cast on load (to the config's dtype; the meta model is in the default one)
        shapes = [one[0][5] for one in lists]
        if any(s[5] != shapes[p] for p, one in enumerate(lists) for s in one) or not all(shapes):
            continue
        if kinds[id(converter)] == "stack":
            shape = [experts, *shapes[0]]
        elif all(s[1:] == shapes[0][1:] for s in shapes):
            shape = [experts, sum(s[0] for s in shapes), *shapes[0][1:]]
        else:
            continue
        if meta[target][1] != shape:
            continue
        out[target] = [
            itemsize,
            [[s[1], s[2], s[3]] for e in range(experts) for s in (one[e] for one in lists)],
        ]
    return out


class Files:
    """The weight files a load's fused tensors come from, each mapped once, read-only and shared
    (page cache, not the loader's memory: its ``RLIMIT_DATA``), for ``same`` from many threads."""

    def __init__(self, fds: list[int], fusions: dict[str, list]):
        import numpy  # the address of a read-only map (ctypes takes only writable buffers)

        self._maps: dict[int, mmap.mmap] = {}
        self._views: dict[int, numpy.ndarray] = {}  # over each map: released before it is closed
        for _, parts in fusions.values():
            for k, _, _ in parts:
                if k not in self._maps:
                    self._maps[k] = mmap.mmap(fds[k], 0, prot=mmap.PROT_READ)
                    self._views[k] = numpy.frombuffer(self._maps[k], dtype=numpy.uint8)
        self._memcmp = ctypes.CDLL(None).memcmp
        self._memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def same(self, ptr: int, parts: list) -> bool:
        """Whether the bytes at address ``ptr`` (a tensor transformers fused, in this process)
        equal ``parts`` ([file index, offset, bytes]) of the files, end to end (``memcmp`` lets
        go of the GIL)."""
        for k, offset, nbytes in parts:
            if offset + nbytes > len(self._maps[k]) or self._memcmp(
                ptr, self._views[k].ctypes.data + offset, nbytes
            ):
                return False
            ptr += nbytes
        return True

    def close(self) -> None:
        self._views.clear()
        for m in self._maps.values():
            m.close()

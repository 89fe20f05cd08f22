"""Tensors transformers fuses from whole file tensors (MoE experts), found as file ranges.

Runs in the loader process (weightd/daemon/loader.py), which has transformers imported.

Note [fused tensors are file ranges]
------------------------------------
An MoE folder saves each expert's projections as tensors of their own (``experts.3.w1.weight``);
transformers 5 fuses them on load into one tensor per layer (``experts.gate_up_proj`` of shape
[experts, 2 x intermediate, hidden]) by stacking the experts (``MergeModulelist(dim=0)``) and,
where two projections make one, concatenating them along the next dimension
(``Concatenate(dim=1)``). Both only put whole contiguous tensors end to end: the fused tensor's
bytes are the file ranges of its sources, expert after expert, and within an expert the sources
in the converter's order. (``Concatenate(dim=0)`` alone does the same with one tensor per
source: OLMo-Hybrid's q, k and v convolutions, MiniMax-M3's gate and up.) So its bytes are known
before ``from_pretrained`` runs, and the daemon's readers can copy them from the files early,
like the tensors kept as they are (Note [copying while from_pretrained runs] in
weightd/daemon/early.py), instead of after it from a memfd the loader writes them into: a load
no longer holds its experts twice (a 947 MiB Mixtral fuses 672 MiB; the peak shared memory of
its load went from 1525 MiB to 853, its one file's). On 2 vCPUs its time stayed within noise:
the readers' copy, which followed the memfd's write, now runs beside the fusion and takes its
CPU.

Which tensors fuse so is read from transformers' own conversion mapping for the model
(``get_model_conversion_mapping``, ``rename_source_key``): only converters whose operations are
exactly those, with those dimensions, are taken; the sources' dtype and the model's must
agree (no cast), and the shapes must make the model's. The guess decides nothing about what
is served: after ``from_pretrained`` the loader compares the tensor it fused with those ranges,
byte for byte (``same``), and only one that is equal is answered as the ranges; any other goes
through the memfd as before, and the pages copied for the guess are given back. Where
transformers' names or operations change, nothing is guessed: slower, never wrong. Most guesses
are now proven without the fusion being computed at all (Note [the fusion not computed], below);
the comparison is for the rest.
"""

from __future__ import annotations

import ctypes
import mmap
import os

# safetensors dtype -> (torch dtype, item size): the dtypes a guess takes
DTYPES = {"F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8)}


def prepare() -> None:
    """Build transformers' table of checkpoint conversions, which it builds on first use (0.18 s
    here, in ``from_pretrained`` and in ``names`` alike): called in the loader process before it
    forks, so that each load's fork has it."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    except Exception:  # noqa: BLE001 - transformers without it: each fork builds what it uses
        pass


def names(model, meta: dict, headers: dict) -> dict[tuple[int, str], tuple[str, object, str]] | None:
    """What transformers' rules for the model make of each weight file tensor, as
    ``from_pretrained`` applies them (``rename_source_key``, names in its order): (file index,
    name) -> (the model's name for it, the converter that takes it and the source pattern it
    matched, or None, None). ``model``: built on the meta device, ``meta`` its state dict's
    names -> (dtype, shape) (``loader._implied``); ``headers``: ``loader._headers``. None where
    transformers lacks these rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(model)  # (a copy of its own: renaming may keep state)
    except Exception:  # noqa: BLE001 - transformers without these names
        return None
    renamings = [m for m in mapping if isinstance(m, WeightRenaming) and not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    keys = [
        (k, name)
        for k, (_, header) in headers.items()
        for name, v in header.items()
        if name != "__metadata__" and isinstance(v, dict)
    ]
    out = {}
    prefix = model.base_model_prefix
    for k, name in sorted(keys, key=lambda key: dot_natural_key(key[1])):
        try:
            # (transformers asks its meta state dict only which names it has)
            target, pattern = rename_source_key(name, renamings, converters, prefix, meta)
            if target not in meta and name in meta:  # as from_pretrained does: the prefix only
                target, pattern = rename_source_key(name, [], [], prefix, meta)
        except Exception:  # noqa: BLE001 - a key transformers' rules do not take
            continue
        out[(k, name)] = (target, by_pattern.get(pattern) if pattern is not None else None, pattern)
    return out


def likely(named: dict | None, meta: dict, headers: dict, wanted: str | None) -> dict[str, list]:
    """The model's tensors fused from whole file tensors: name -> [item size, [[file index,
    offset, bytes], ...]] in the order their bytes lie in the fused tensor. ``named``: what
    ``names`` gave (in transformers' order, which is the experts'); ``meta``, ``headers``: as for
    ``names``; ``wanted``: the config's dtype, if any."""
    groups: dict[str, dict[str, list]] = {}  # target -> source pattern -> its sources, in order
    patterns_of: dict[str, object] = {}  # target -> its converter
    kinds: dict[int, str | None] = {}
    for (k, name), (target, converter, pattern) in (named or {}).items():
        v = headers[k][1][name]
        if converter is None or target not in meta or v.get("dtype") not in DTYPES:
            continue
        if id(converter) not in kinds:
            kinds[id(converter)] = _kind(converter)
        if kinds[id(converter)] is None:
            continue
        begin, end = v["data_offsets"]
        data = headers[k][0]
        source = (k, data + begin, end - begin, v["dtype"], list(v["shape"]))
        groups.setdefault(target, {}).setdefault(pattern, []).append(source)
        patterns_of[target] = converter
    out = {}
    for target, sources in groups.items():
        converter = patterns_of[target]
        patterns = list(converter.source_patterns)
        if set(sources) != set(patterns):
            continue
        lists = [sources[p] for p in patterns]
        experts = len(lists[0])
        dtypes = {s[3] for one in lists for s in one}
        if any(len(one) != experts for one in lists) or len(dtypes) != 1:
            continue
        dtype, itemsize = DTYPES[dtypes.pop()]
        if dtype != (wanted or meta[target][0]):
            continue  # cast on load (to the config's dtype; the meta model is in the default one)
        shapes = [one[0][4] for one in lists]
        if any(s[4] != shapes[p] for p, one in enumerate(lists) for s in one) or not all(shapes):
            continue
        kind = kinds[id(converter)]
        if kind == "stack":
            shape = [experts, *shapes[0]]
        elif not all(s[1:] == shapes[0][1:] for s in shapes):
            continue
        elif kind == "stack, cat":
            shape = [experts, sum(s[0] for s in shapes), *shapes[0][1:]]
        elif experts == 1:  # "cat": one tensor per source pattern
            shape = [sum(s[0] for s in shapes), *shapes[0][1:]]
        else:
            continue
        if meta[target][1] != shape:
            continue
        out[target] = [
            itemsize,
            [[s[0], s[1], s[2]] for e in range(experts) for s in (one[e] for one in lists)],
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


class Unfused:
    """Note [the fusion not computed]
    ------------------------------
    Comparing what transformers fused with the files (``Files.same``) proves a guess, but only
    after transformers has stacked every expert into the loader's memory and the comparison has
    read it again: on 2 vCPUs, beside the daemon's readers copying the same ranges, that was most
    of an MoE folder's load (from_pretrained 1.2-1.35 s of 1.6 for a 947 MiB Mixtral, its one
    file 0.65). Where the guess is right the loader needs none of those bytes: it answers ranges.

    So, for the duration of ``from_pretrained``, ``WeightConverter.convert`` is wrapped. For a
    guessed target whose converter is exactly ``MergeModulelist(dim=0)`` [+ ``Concatenate(dim=1)``],
    or ``Concatenate(dim=0)`` alone (whole tensors end to end: OLMo-Hybrid's q, k and v
    convolutions, MiniMax-M3's gate and up), and has no quantizer, the wrapper takes the tensors
    transformers collected for it and asks where they are: each must be a whole, contiguous view of
    a weight file's map in this process (its bytes are the file's), and end to end in transformers'
    own order (the lists it collected, the source patterns in its order) they must be exactly the
    guessed ranges. What the operations make of such inputs is proven each time on small numbered
    tensors by transformers' own operations (``_proven``): the output's bytes are the inputs',
    expert after expert. Then the target is set to a stand-in of its shape and dtype over memory
    that cannot be touched (``PROT_NONE``: not the loader's private memory, and any read or write of
    it kills the load, never a wrong answer), and the daemon's copy of the ranges is what is served.
    After ``from_pretrained`` the loader serves a range answer only where the model still holds that
    very stand-in (``placed``); a stand-in transformers replaced has had a value computed from it,
    and the load is done again without this wrapper. Anything not so is left to transformers: its
    fusion runs, and the byte comparison decides as before.

    Measured, that Mixtral folder warm, one daemon, 4 loads each way (medians): from_pretrained
    0.41-0.52 s against 1.19-1.35, the load 0.99 s against 1.60 (its one file 0.62-0.66 s), and
    the loader no longer holds the 672 MiB of experts (the stand-ins are not writable memory: not
    in its ``RLIMIT_DATA``).
    """

    def __init__(self, fusions: dict[str, list], locate):
        self._fusions = fusions
        self._locate = locate  # (address, bytes) -> (file index, offset) | None, in this process
        self._stand_ins: dict[str, tuple[int, int]] = {}  # target -> (address, bytes)
        self._proofs: dict[tuple, bool] = {}  # _proven, per kind of converter (one per layer)
        self._original = None

    def __enter__(self) -> Unfused:
        try:
            from transformers.core_model_loading import WeightConverter
        except Exception:  # noqa: BLE001 - transformers without it: nothing is skipped
            return self
        original = self._original = WeightConverter.convert

        def convert(converter, layer_name, *args, **kwargs):
            out = self._stand_in(converter, layer_name, kwargs)
            return out if out is not None else original(converter, layer_name, *args, **kwargs)

        WeightConverter.convert = convert
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            from transformers.core_model_loading import WeightConverter

            WeightConverter.convert = self._original

    def placed(self, state: dict) -> tuple[set[str], bool]:
        """The names of ``state`` that hold their stand-in, and whether every stand-in made is
        held so (else the load must run again without this wrapper)."""
        held = set()
        for name, (address, nbytes) in self._stand_ins.items():
            t = state.get(name)
            if t is not None and t.untyped_storage().data_ptr() == address and t.nbytes == nbytes:
                held.add(name)
        return held, len(held) == len(self._stand_ins)

    def _proven(self, converter) -> bool:
        """``_proven``, once for the converters of each layer alike: transformers copies one
        converter per layer, with the same operations and source patterns."""
        key = (
            tuple((type(op), getattr(op, "dim", None)) for op in converter.operations),
            tuple(converter.source_patterns),
            tuple(converter.target_patterns),
        )
        if key not in self._proofs:
            self._proofs[key] = _proven(converter)
        return self._proofs[key]

    def _stand_in(self, converter, target: str, kwargs: dict):
        guess = self._fusions.get(target)
        if (
            guess is None
            or kwargs.get("hf_quantizer") is not None
            or getattr(converter, "quantization_operation", None) is not None
            or _kind(converter) is None
            or not self._proven(converter)
        ):
            return None
        import torch

        collected = converter.materialize_tensors()
        lists = [collected.get(p) or [] for p in converter.source_patterns]
        try:
            ref = kwargs["model"].get_parameter(target)  # on the meta device: its shape and dtype
        except (KeyError, AttributeError):
            ref = None
        ranges = []
        if ref is not None and lists[0] and all(len(one) == len(lists[0]) for one in lists):
            for t in (one[e] for e in range(len(lists[0])) for one in lists):  # the bytes' order
                where = (
                    self._locate(t.data_ptr(), t.nbytes)
                    if isinstance(t, torch.Tensor) and t.is_contiguous() and t.dtype == ref.dtype
                    else None
                )
                if where is None:
                    break
                ranges.append([where[0], where[1], t.nbytes])
        nbytes = sum(r[2] for r in ranges)
        if ref is None or ranges != guess[1] or nbytes != ref.numel() * ref.element_size():
            # transformers' own fusion runs on what it collected
            converter.collected_tensors = {p: [lambda t=t: t for t in ts] for p, ts in collected.items()}
            return None
        address = _untouchable(nbytes)
        buffer = (ctypes.c_byte * nbytes).from_address(address)
        stand_in = torch.frombuffer(buffer, dtype=torch.uint8).view(ref.dtype).view(ref.shape)
        self._stand_ins[target] = (address, nbytes)
        return {target: stand_in}


def cut(converter, shape: list, target: list) -> bool:
    """Whether ``converter`` only cuts a tensor of ``shape`` along its first dimension into parts
    of which one has the shape ``target`` (``Chunk`` or ``Split``, dim 0, alone): each part is
    then a view of the file's tensor, and the file's range is what is served for all of them."""
    try:
        from transformers.core_model_loading import Chunk, Split
    except ImportError:
        return False
    ops = list(getattr(converter, "operations", None) or ())
    return (
        len(ops) == 1
        and type(ops[0]) in (Chunk, Split)
        and ops[0].dim == 0
        and isinstance(shape, list)
        and len(shape) == len(target) >= 1
        and shape[1:] == target[1:]
        and 0 < target[0] <= shape[0]
    )


def _kind(converter) -> str | None:
    """The fusion a converter makes where its operations are exactly those taken: "stack" or
    "stack, cat"; else None."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", None) or ())
    if ops and type(ops[0]) is MergeModulelist and ops[0].dim == 0:
        if len(ops) == 1 and len(converter.source_patterns) == 1:
            return "stack"
        if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim == 1:
            return "stack, cat"
    if len(ops) == 1 and type(ops[0]) is Concatenate and ops[0].dim == 0:
        return "cat"  # whole tensors end to end (q, k and v into one)
    return None


def _proven(converter) -> bool:
    """Whether the converter's operations, run by transformers on numbered tensors (3 experts, a
    shape per source pattern; one tensor per pattern for a "cat"), put the inputs' bytes end to
    end, expert after expert and within one the patterns in order: what ``Unfused`` serves for
    them."""
    import copy

    import torch

    patterns = list(converter.source_patterns)
    inputs = {p: [] for p in patterns}
    expected, n = [], 0
    for _ in range(1 if _kind(converter) == "cat" else 3):  # experts
        for i, p in enumerate(patterns):
            t = torch.arange(n, n + (i + 2) * 5, dtype=torch.float32).view(i + 2, 5)
            n += t.numel()
            inputs[p].append(t)
            expected.append(t.flatten())
    try:
        out = dict(inputs)
        for op in copy.deepcopy(list(converter.operations)):
            out = op.convert(
                out,
                source_patterns=patterns,
                target_patterns=list(converter.target_patterns),
                full_layer_name="",
                model=None,
                config=None,
                missing_keys=None,
            )
    except Exception:  # noqa: BLE001 - whatever fails here is left to transformers
        return False
    if len(out) != 1:
        return False
    (result,) = out.values()
    return (
        isinstance(result, torch.Tensor)
        and result.is_contiguous()
        and torch.equal(result.flatten(), torch.cat(expected))
    )


PROT_NONE = 0


def _untouchable(nbytes: int) -> int:
    """The address of ``nbytes`` of address space nothing may read or write (``PROT_NONE``,
    anonymous): never unmapped, the loader's fork exits after its one load."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # (no write: no memory is committed for it)
    address = libc.mmap(None, max(nbytes, 1), PROT_NONE, flags, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(os.strerror(ctypes.get_errno()))
    return address

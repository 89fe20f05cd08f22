"""The loader process: ``from_pretrained`` on a Hugging Face folder, away from the daemon.

``python -m weightd.daemon.loader FD`` is started by ``weightd.daemon.hf`` with a socket on
``FD``; each load is a fork of it (Note [one fork per load]) given the folder's files already
open (Note [what a loader process sees] in hf.py). A load

1. sets its own limits (private memory, CPU seconds) before importing torch;
2. builds the config from the daemon's copy of config.json and counts the parameters it
   implies on the meta device, against the elements in the weight files: a config that
   describes a far larger model than its files hold (random weights, unbounded cost) is
   refused before anything is allocated;
3. runs ``cls.from_pretrained`` on the snapshot folder, no remote code, offline; a weight the
   class needs that the files lack is refused, naming both counts;
4. answers with the state dict's layout: each storage is either an untouched view of a weight
   file (file and offset: the daemon copies it from its own descriptor), or fused by
   transformers from whole file tensors and equal to their bytes end to end (the files' ranges:
   Note [fused tensors are file ranges] in fused.py; most not computed at all: Note [the fusion
   not computed] there), or else computed by transformers (cast, other conversions), copied
   into one memfd handed over with the answer. Then exits.

The daemon kills it (SIGKILL, its whole process group) on a stop, a deadline or a time-out.
Only this module's ``main`` imports torch and transformers; ``send``/``receive`` (the framing)
are stdlib, for the daemon's side.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import struct
import sys
import time

from weightd.daemon import classes, fused, quantized
from weightd.errors import CheckpointError

MAX_ANSWER = 1 << 30
WRITTEN_STEP = 32 << 20  # converted bytes written between two reports to the daemon
# Elements the config may imply beyond those in the weight files (buffers the files need not
# hold, such as position ids) before the gap is "a config describing another model".
SLACK_ELEMENTS = 1 << 20
SLACK_RATIO = 1.10


FDS_PER_MESSAGE = 200  # SCM_RIGHTS carries at most 253 descriptors a message


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    """One message: its length and descriptor count, JSON, then the descriptors (SCM_RIGHTS,
    on one marker byte each batch)."""
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<QI", len(data), len(fds)) + data)
    fds = list(fds)
    for i in range(0, len(fds), FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], fds[i : i + FDS_PER_MESSAGE])


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    head = _exactly(sock, 12)
    n, nfds = struct.unpack("<QI", head)
    if n > MAX_ANSWER or nfds > 1 << 16:
        raise ValueError(f"a message of {n} bytes and {nfds} descriptors")
    message = json.loads(_exactly(sock, n))
    fds: list[int] = []
    while len(fds) < nfds:
        _, got, _, _ = socket.recv_fds(sock, 1, FDS_PER_MESSAGE)
        if not got:
            raise EOFError("the loader process hung up")
        fds += got
    return message, fds


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the loader process hung up")
        buf += chunk
    return bytes(buf)


class Refused(Exception):
    """What the folder asks for is not loaded; the message goes to the daemon's CheckpointError."""


def main() -> None:
    """The loader: import torch and transformers once, then fork one child per load.

    Note [one fork per load]: importing torch and transformers takes seconds, a load of a
    small folder a fraction of one. So this process imports them once and forks a child for
    each load, which starts with them imported, runs the one load with its own limits and
    exits; the daemon kills that child (by the pidfd it gets) without touching the others.
    This process ends when the daemon hangs up or dies (its control socket ends), or after
    ``IDLE_SECONDS`` without a load (it holds a few hundred MiB).
    """
    # No PR_SET_PDEATHSIG here: it fires when the *thread* that started this process ends,
    # and the daemon's threads come and go; the control socket's end (EOF) says the daemon is gone.
    control = socket.socket(fileno=int(sys.argv[1]))
    try:
        import torch  # noqa: F401  (imported once, here, for every child)
        import transformers  # noqa: F401
        from transformers import modeling_utils  # noqa: F401
    except ImportError as e:
        send(control, {"error": f"{type(e).__name__}: {e}"})
        return
    import signal

    fused.prepare()
    signal.signal(signal.SIGCHLD, lambda *_: _reap())  # a killed child leaves no zombie
    send(control, {"ready": True})
    while True:
        _reap()
        ready, _, _ = select.select([control], [], [], IDLE_SECONDS)
        if not ready:
            return
        try:
            job, fds = receive(control)
        except (EOFError, OSError, ValueError):
            return
        _import_class(transformers, job)
        # SIGCHLD held until the pidfd is open: a child that dies at once is not reaped first
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            control.close()
            code = 1
            try:
                _child(job, fds)
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        send(control, {"pid": pid}, [pidfd])
        os.close(pidfd)


IDLE_SECONDS = 120.0


def _import_class(transformers, job: dict) -> None:
    """Import the module of the class the folder names here, before the fork: transformers
    imports a model's module on first use (0.1 s measured for Llama, most of a small load's
    time in the child), and a child's imports die with it; this process's stay for every later
    load of that architecture. Only transformers' own classes (``getattr`` on the package, as
    ``_model_class``); anything wrong is left for the child to refuse."""
    if job.get("factory"):
        return
    try:
        _model_class(transformers, job["folder"], json.loads(job["config"]))
    except Exception:  # noqa: BLE001 - the child meets the same error and says it
        pass


def _die_with_parent() -> None:
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(job: dict, fds: list[int]) -> None:
    """One load, in a fresh fork: ``fds`` are its answer socket, its stderr, then the files."""
    import shutil

    _die_with_parent()
    sock = socket.socket(fileno=fds[0])
    os.dup2(fds[1], 2)
    os.dup2(fds[1], 1)
    _limit(job["memory"], job["cpu_seconds"])
    # 0700, made by the daemon, which removes it also when it kills this process
    snapshot = job["snapshot"]  # Note [what a loader process sees]
    try:
        with open(os.path.join(snapshot, "config.json"), "w", encoding="utf-8") as f:
            f.write(job["config"])
        for rel, fd in zip(job["files"], fds[2:]):
            os.symlink(f"/proc/self/fd/{fd}", os.path.join(snapshot, rel))
        job["weight_fds"] = fds[2 : 2 + len(job["weights"])]
        job["sock"] = sock
        try:
            answer, out = _load(job)
        except Refused as e:
            send(sock, {"error": str(e)})
            return
        except CheckpointError as e:  # an operator-named class that is not one
            send(sock, {"error": e.message})
            return
        except MemoryError:
            send(
                sock,
                {"error": f"{job['folder']}: from_pretrained ran out of its {job['memory'] >> 20} MiB"},
            )
            return
        except Exception as e:  # transformers raises OSError, ValueError, RuntimeError, KeyError...
            import transformers

            first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
            try:  # a quantized folder says which format transformers failed on
                quant = quantized.method(json.loads(job["config"]))
            except ValueError:
                quant = None
            what = f" (a {quant} quantized checkpoint)" if quant else ""
            send(
                sock,
                {
                    "error": f"{job['folder']}{what}: transformers {transformers.__version__} failed on it: "
                    f"{first}"
                },
            )
            return
        send(sock, answer, out)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def _limit(memory: int, cpu_seconds: int) -> None:
    # RLIMIT_DATA (private writable memory: the heap, anonymous maps) rather than RLIMIT_AS:
    # torch reserves far more address space than it uses, and the weight files' read-only
    # maps are page cache, not the loader's.
    for which, value in ((resource.RLIMIT_DATA, memory), (resource.RLIMIT_CPU, cpu_seconds)):
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, hard))


def _load(job: dict) -> tuple[dict, list[int]]:
    import torch
    import transformers

    from weightd import layout
    from weightd.manifest import align_up, storage_alignment

    folder, snapshot = job["folder"], job["snapshot"]
    stages: dict[str, float] = {}  # seconds of each step: the daemon logs them (where time goes)
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 4)
        clock[0] = now

    raw = json.loads(job["config"])
    # Hook (issue 24): an operator-named class (--factory) loads the folder, weightd/daemon/classes.py.
    cls = (
        classes.resolve(job["factory"], folder, transformers)
        if job.get("factory")
        else _model_class(transformers, folder, raw)
    )
    if issubclass(cls, transformers.PreTrainedModel):  # its own config class, as its from_pretrained reads it
        config = cls.config_class.from_pretrained(snapshot)
    else:
        config = transformers.AutoConfig.from_pretrained(snapshot, trust_remote_code=False)
    stage("config")
    implied, meta, meta_model = _implied(torch, transformers, cls, config)
    headers = _headers(snapshot, job["weights"])
    in_files = _in_files(torch, snapshot, job["weights"], headers)
    stage("count")
    views: list[list[int]] = []
    fusions: dict[str, list] = {}
    quant = quantized.method(raw)  # packed weights hold fewer elements than the config implies
    if job.get("early") and quant is None:
        # Note [copying while from_pretrained runs] in weightd/daemon/early.py
        named = fused.names(meta_model, meta, headers)  # transformers' rules for the file names
        views = _likely_views(headers, meta, config, cls, named)
        for k, offset, _, _ in views:  # Note [from_pretrained reads the weights it keeps]
            os.posix_fadvise(job["weight_fds"][k], offset, 1, os.POSIX_FADV_WILLNEED)
        # Note [fused tensors are file ranges] in weightd/daemon/fused.py
        fusions = fused.likely(named, meta, headers, _config_dtype(config))
        send(job["sock"], {"early": views, "fused": list(fusions.values())})
    del meta_model
    if quant is None and implied > in_files * SLACK_RATIO + SLACK_ELEMENTS:
        raise Refused(
            f"{folder}: its config.json describes a {cls.__name__} of {implied:,} parameters, but its weight "
            f"files hold {in_files:,}: loading it would initialize the rest at random. Fix the config "
            "(num_hidden_layers, sizes) or add the missing weights"
        )

    def from_pretrained(unfused: fused.Unfused | None):
        skipping = unfused or contextlib.nullcontext()
        with _no_readaround(transformers, snapshot, job["weights"], views), skipping:
            return cls.from_pretrained(
                snapshot,
                config=config,
                local_files_only=True,
                output_loading_info=True,
                trust_remote_code=False,
            )

    # Note [the fusion not computed] in fused.py
    unfused = fused.Unfused(fusions, _Locate(job["weight_fds"])) if fusions else None
    model, info = from_pretrained(unfused)
    state = model.state_dict()
    held, whole = unfused.placed(state) if unfused is not None else (set(), True)
    if not whole:  # a stand-in replaced: a value was computed from it, so all is done again
        del model, info, state
        model, info = from_pretrained(None)
        state = model.state_dict()
        held = set()
    stage("from_pretrained")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise Refused(
            f"{folder}: {cls.__name__} needs {len(missing)} weights its files lack (e.g. {missing[:3]}); "
            f"the config implies {implied:,} parameters, the files hold {in_files:,}: add the missing "
            "weights, or load the folder with the class it was saved from"
        )
    subclasses: dict = {}
    if quant is not None:  # Hook (issue 24): Note [tensor subclasses as plain tensors] in quantized.py
        state, subclasses = quantized.flatten(state, folder)
    maps = _file_maps(job["weight_fds"])
    as_guessed = held | _fused_as_guessed(
        state, {n: f for n, f in fusions.items() if n not in held}, job["weight_fds"]
    )
    # by storage: a stand-in has no bytes to copy under any name (Note [the fusion not computed])
    parts_at = {state[n].untyped_storage().data_ptr(): fusions[n][1] for n in as_guessed}
    guessed = {(k, offset, nbytes) for k, offset, nbytes, _ in views}
    blobs, tensors, converted, converted_bytes, from_files, early = [], [], [], 0, 0, 0
    memfd, mem_size = None, 0
    to_write = []  # (memfd offset, the storage's bytes)
    by_storage: dict[tuple[int, int], int] = {}
    for name, t in state.items():
        t = layout.plain(t, name, folder)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        index = by_storage.get(key)
        if index is None:
            index = by_storage[key] = len(blobs)
            where = _in_map(maps, storage.data_ptr(), storage.nbytes())
            if where is not None:
                blobs.append({"nbytes": storage.nbytes(), "file": where[0], "offset": where[1]})
                early += storage.nbytes() if (*where, storage.nbytes()) in guessed else 0
            elif key[0] in parts_at:
                # Note [fused tensors are file ranges]: the daemon copied these ranges early
                blobs.append({"nbytes": storage.nbytes(), "parts": parts_at[key[0]]})
                converted_bytes += storage.nbytes()
                from_files += storage.nbytes()
                early += storage.nbytes()
            else:
                # aligned as layout.place aligns what it places after the files' storages: the
                # daemon may put the memfd's bytes into the segment as they lie here
                offset = align_up(mem_size, storage_alignment(storage.nbytes()))
                to_write.append((offset, torch.empty(0, dtype=torch.uint8).set_(storage).numpy()))
                mem_size = offset + storage.nbytes()
                blobs.append({"nbytes": storage.nbytes(), "memfd": offset})
                converted_bytes += storage.nbytes()
        if "file" not in blobs[index] and t.numel():
            converted.append(name)
        dtype = str(t.dtype).removeprefix("torch.")
        tensors.append(
            [name, index, t.storage_offset() * t.element_size(), dtype, list(t.shape), list(t.stride())]
        )
    if to_write:
        memfd = os.memfd_create("weightd-converted", os.MFD_CLOEXEC)
        if job.get("early"):  # the daemon copies each as it is written: Note [copying while ...]
            send(job["sock"], {"converted": mem_size}, [memfd])
        told = 0
        for i, (offset, data) in enumerate(to_write):
            _pwrite_all(memfd, memoryview(data).cast("B"), offset)
            upto = offset + data.nbytes
            if job.get("early") and (upto - told >= WRITTEN_STEP or i == len(to_write) - 1):
                send(job["sock"], {"written": upto})
                told = upto
    stage("layout")  # where each storage is: a file's bytes, or copied into the memfd
    generation = (
        model.generation_config.to_diff_dict()
        if getattr(model, "generation_config", None) is not None and model.can_generate()
        else None
    )
    hf = {
        "class": type(model).__name__,
        "import": classes.import_name(type(model)),  # where workers import it from
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "dtype": str(model.dtype).removeprefix("torch."),
        "generation_config": generation,
        # tensors transformers computed (fused, cast...), not taken from the files as they are
        "converted": converted,
        "converted_bytes": converted_bytes,
        # of those, fused by stacking whole file tensors: copied from the files (fused.py)
        "fused_from_files": from_files,
        # of those, never computed by transformers (Note [the fusion not computed] in fused.py)
        "fusion_skipped": sum(state[n].nbytes for n in held),
        # of the bytes served from the files, those the daemon began copying before the answer
        # (Note [copying while from_pretrained runs] in early.py)
        "copied_early": early,
        # what from_pretrained reported after its class's rules: keys it dropped, keys it initialized
        "unexpected": sorted(info.get("unexpected_keys") or ()),
        "missing": missing,
        "parameters": {"implied": implied, "in_files": in_files},
        # a quantized folder: its method, and the tensor subclasses to rebuild (quantized.py)
        "quantized": {"method": quant, "subclasses": subclasses} if quant else None,
        "stages": stages,
    }
    return {"blobs": blobs, "tensors": tensors, "hf": hf}, [memfd] if memfd is not None else []


@contextlib.contextmanager
def _no_readaround(transformers, snapshot: str, weights: list[str], views: list[list[int]]):
    """Note [from_pretrained reads the weights it keeps]: transformers maps each safetensors
    file (``safe_open``, backend mmap) and touches a page of every tensor it takes from it, also
    of those it keeps as untouched views. Each such fault in a cold file reads the kernel's
    read-around window (``read_ahead_kb``, 8 MiB here) around it: measured, a cold 517 MiB Llama's
    ``from_pretrained`` read its layers whole (files 100% in the page cache after it, 0.59-0.65 s
    against 0.11 s warm), bytes the daemon then read again into the segment. So the ranges the
    daemon copies itself (``views``) are advised ``MADV_RANDOM`` in this process's mapping as it
    is made (0.21-0.24 s cold, 3% of the files read); what transformers fuses or casts keeps the
    read-around (advised random too, a cold MoE's experts took 7 s, page by page). Experts whose
    fusion is not computed (Note [the fusion not computed] in fused.py) keep it too: advised
    random, a cold 947 MiB Mixtral folder loaded in 1.50 s against 1.27 (medians of 5), since
    the read-around of the page transformers touches in each expert fills the page cache the
    daemon's readers copy them from (``stream.Piece.shared``). The page it
    touches is each tensor's first: asked for (``POSIX_FADV_WILLNEED``) before the daemon's
    readers fill the disk's queue, else each fault waits behind their 8 MiB reads. Where
    transformers does not open the files through ``modeling_utils.safe_open`` any more, nothing
    is advised: slower, never wrong."""
    import ctypes

    mu = getattr(transformers, "modeling_utils", None)
    original = getattr(mu, "safe_open", None)
    if not views or original is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    by_file: dict[str, list[tuple[int, int]]] = {}
    for k, offset, nbytes, _ in views:
        by_file.setdefault(os.path.join(snapshot, weights[k]), []).append((offset, nbytes))

    def advised(filename, *args, **kwargs):
        handle = original(filename, *args, **kwargs)
        ranges = by_file.get(os.fspath(filename))
        if ranges:
            st = os.stat(filename)
            with open("/proc/self/maps") as f:
                maps = [line.split() for line in f]
            for parts in maps:
                if len(parts) < 6 or parts[4] != str(st.st_ino) or parts[2] != "00000000":
                    continue
                base = int(parts[0].split("-")[0], 16)
                for offset, nbytes in ranges:
                    lo = -(-(base + offset) // page) * page
                    hi = (base + offset + nbytes) // page * page
                    if hi > lo:
                        libc.madvise(lo, hi - lo, MADV_RANDOM)
        return handle

    mu.safe_open = advised
    try:
        yield
    finally:
        mu.safe_open = original


MADV_RANDOM = 1


def _model_class(transformers, folder: str, config: dict):
    """The class ``from_pretrained`` gets called on: config.architectures[0], else AutoModel."""
    archs = config.get("architectures") or []
    if not archs:
        return transformers.AutoModel
    name = archs[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise Refused(
            f"{folder}: config.json names the architecture {name!r:.80}, which transformers "
            f"{transformers.__version__} does not ship (weightd never runs a folder's own code): if a "
            f"package you trust defines it, {classes.REMEDY}; else upgrade transformers, or fix architectures"
        )
    return cls


def _implied(torch, transformers, cls, config) -> tuple[int, dict, object]:
    """Parameters and persistent buffers the config implies, counted on the meta device (no
    memory), ties counted once; the model's state dict there, name -> (dtype, shape); and that
    model. Built as ``from_pretrained`` builds it, without initializing the weights
    (``no_init_weights``): on the meta device that is only time (Dinov2 of 800 MB: 0.05 s
    against 0.09-0.12), and it is on the load's clock before the early copy can start."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: its initialization runs
        no_init_weights = contextlib.nullcontext
    with no_init_weights(), torch.device("meta"):
        if issubclass(cls, transformers.PreTrainedModel):
            model = cls(config)
        else:  # an Auto class: public from_config picks the concrete class
            model = cls.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    state = model.state_dict()
    n = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # ties once
        if name in state and name not in tied:
            n += t.numel()
    meta = {name: (str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in state.items()}
    return n, meta, model


def _fused_as_guessed(state: dict, fusions: dict, fds: list[int]) -> set[str]:
    """The names of ``state`` that are the whole storage ``fused.likely`` guessed, byte for
    byte: compared on as many threads as this process may use (the comparison is on the load's
    clock, after from_pretrained)."""
    from concurrent.futures import ThreadPoolExecutor

    names = [n for n in fusions if n in state]
    if not names:
        return set()
    files = fused.Files(fds, fusions)

    def equal(name: str) -> bool:
        t, parts = state[name], fusions[name][1]
        storage = t.untyped_storage()
        whole = t.storage_offset() == 0 and t.nbytes == storage.nbytes() == sum(p[2] for p in parts)
        return whole and files.same(storage.data_ptr(), parts)

    try:
        with ThreadPoolExecutor(min(len(names), len(os.sched_getaffinity(0)))) as pool:
            return {n for n, ok in zip(names, pool.map(equal, names)) if ok}
    finally:
        files.close()


def _config_dtype(config) -> str | None:
    """The dtype the config asks weights to be loaded in (they are cast to it), if any."""
    wanted = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(wanted).removeprefix("torch.") if wanted is not None else None


def _likely_views(headers: dict, meta: dict, config, cls, named: dict | None) -> list[list[int]]:
    """The weight files' ranges ``from_pretrained`` will most likely keep as untouched views, as
    [file index, offset, bytes, item size]: each tensor that transformers' rules for the model
    (``named``: ``fused.names``) name as a tensor of the model built on the meta device
    (``_implied``), renamed or not, with its dtype and shape; or that one ``Chunk``/``Split``
    along the first dimension cuts into such tensors (a fused qkv into q, k and v: views of the
    file's tensor, ``fused.cut``). A guess the daemon starts copying on (Note [copying while
    from_pretrained runs] in weightd/daemon/early.py): tensors transformers fuses (MoE experts:
    ``fused.likely``) or casts are left out; a wrong guess costs copied bytes, never a wrong
    tensor. Where transformers has no such rules (``named`` None), a tensor's own name (with or
    without the base model's prefix) is the model's."""
    wanted = _config_dtype(config)
    prefix = (getattr(cls, "base_model_prefix", "") or "") + "."
    out = []
    for k, (data, header) in headers.items():
        for name, v in header.items():
            if name == "__metadata__" or not isinstance(v, dict):
                continue
            dtype, itemsize = fused.DTYPES.get(v.get("dtype"), (None, 0))
            if named is not None:
                target, converter, _ = named.get((k, name), (None, None, None))
                found = meta.get(target)
                shaped = found is not None and (
                    found[1] == v.get("shape")
                    if converter is None
                    else fused.cut(converter, v.get("shape"), found[1])
                )
            else:
                found = meta.get(name) or meta.get(prefix + name) or meta.get(name.removeprefix(prefix))
                shaped = found is not None and found[1] == v.get("shape")
            if dtype is None or not shaped:
                continue
            if dtype != (wanted or found[0]):
                continue  # cast on load (to the config's dtype)
            begin, end = v["data_offsets"]
            out.append([k, data + begin, end - begin, itemsize])
    return out


def _headers(snapshot: str, weights: list[str]) -> dict[int, tuple[int, dict]]:
    """Each safetensors weight file's header, read once: file index -> (where its data starts,
    the header)."""
    out = {}
    for k, w in enumerate(weights):
        if w.endswith(".safetensors"):
            with open(os.path.join(snapshot, w), "rb") as f:
                out[k] = header_at(f.fileno(), MAX_HEADER)
    return out


# A safetensors header larger than this is not a checkpoint's (the reference library uses 100 MB): for
# a file's load (checkpoint.read_safetensors) and a folder's (here) alike.
MAX_HEADER = 100_000_000


def header_at(fd: int, limit: int) -> tuple[int, dict]:
    """The safetensors header of the file ``fd``: (where its data starts, the header); a
    ValueError where it is no such header of at most ``limit`` bytes. For this process and the
    daemon's first guess alike (Note [the daemon's first guess] in early.py)."""
    head = os.pread(fd, 8, 0)
    hlen = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < hlen <= limit:
        raise ValueError(f"a safetensors header of {hlen} bytes")
    raw = os.pread(fd, hlen, 8)
    header = json.loads(raw) if len(raw) == hlen else None
    if not isinstance(header, dict):
        raise ValueError("a safetensors header that is not a JSON object")
    return 8 + hlen, header


def _in_files(torch, snapshot: str, weights: list[str], headers: dict) -> int:
    """Elements in the weight files, from their headers (safetensors, ``_headers``) or a mapped
    load."""
    n = 0
    for i, w in enumerate(weights):
        path = os.path.join(snapshot, w)
        if i in headers:
            for k, v in headers[i][1].items():
                if k != "__metadata__" and isinstance(v, dict):
                    size = 1
                    for d in v.get("shape") or []:
                        size *= int(d)
                    n += size
        else:
            try:
                state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (pre-1.6, non-zip) format cannot be mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="meta", weights_only=True)
            n += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return n


def _file_maps(fds: list[int]) -> list[tuple[int, int, int, int]]:
    """This process's maps of the weight files: (file index, start, end, file offset), the
    pieces of one mapping that advice split (``_no_readaround``) joined again."""
    ids = {}
    for k, fd in enumerate(fds):
        st = os.fstat(fd)
        ids[(st.st_dev, st.st_ino)] = k
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or parts[4] == "0":
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            k = ids.get((os.makedev(major, minor), int(parts[4])))
            if k is None:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            offset = int(parts[2], 16)
            if out and out[-1][0] == k and out[-1][2] == lo and out[-1][3] + (lo - out[-1][1]) == offset:
                # one mapping split by advice (``_no_readaround``): contiguous, one map again
                out[-1] = (k, out[-1][1], hi, out[-1][3])
            else:
                out.append((k, lo, hi, offset))
    return out


class _Locate:
    """Where a tensor's bytes are in the weight files, by its address in this process: the maps
    read once (every file is mapped before transformers converts), again where one is missed."""

    def __init__(self, fds: list[int]):
        self._fds = fds
        self._maps = None

    def __call__(self, ptr: int, nbytes: int) -> tuple[int, int] | None:
        if self._maps is not None:
            where = _in_map(self._maps, ptr, nbytes)
            if where is not None:
                return where
        self._maps = _file_maps(self._fds)
        return _in_map(self._maps, ptr, nbytes)


def _in_map(maps, ptr: int, nbytes: int) -> tuple[int, int] | None:
    for k, lo, hi, offset in maps:
        if lo <= ptr and ptr + nbytes <= hi:
            return k, offset + ptr - lo
    return None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + (64 << 20)], offset + done)


if __name__ == "__main__":
    main()

"""Hostile input and load for weightd: shared by tests/test_reliability.py and benchmarks/stress.py.

- ``build_corpus(dir)``: corrupt safetensors, ``.pt`` and Hugging Face folders, each with the
  problem its refusal must name;
- ``write_model`` / ``digests``: checkpoints with known bytes, to check reads bit-exact;
- ``run_load``: N client processes (forked from a forkserver that has torch imported, so 64 of
  them cost neither 64 torch imports nor 64 x 200 MiB) doing attach/detach cycles;
- ``fuzz``: a hypothesis property that throws raw ZeroMQ messages at both sockets;
- ``kill_sweep``: SIGKILL a daemon at random points of loads, publishes and unloads, restart,
  and check what the next daemon serves;
- ``Daemon``: a ``weightd serve`` process for the stress script (tests use ``make_daemon``).

Nothing here is collected by pytest (no ``test_`` names).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import signal
import struct
import subprocess
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
from safetensors.torch import save_file

from weightd import protocol, segment
from weightd.bench import spawn
from weightd.errors import BY_CODE

SHM = Path("/dev/shm")
TYPED_CODES = frozenset(BY_CODE) - {"internal"}  # "internal" is typed too, but it means a bug


# --- models with known bytes ---------------------------------------------------------------


def model_tensors(seed: int, kib: int = 256) -> dict[str, torch.Tensor]:
    """Deterministic tensors of several dtypes, about ``kib`` KiB in all (no 0-dim ones)."""
    g = torch.Generator().manual_seed(seed)
    n = max(kib * 1024 // 4 // 4, 16)
    return {
        "f32": torch.randn(n, generator=g),
        "bf16": torch.randn(n, generator=g).to(torch.bfloat16),
        "f16": torch.randn(n // 2, 2, generator=g).to(torch.float16),
        "i8": torch.randint(-128, 128, (n // 2,), generator=g, dtype=torch.int8),
        "i64": torch.randint(-(2**62), 2**62, (n // 16,), generator=g, dtype=torch.int64),
        "mask": torch.rand(n // 4, generator=g) > 0.5,
    }


def digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: digest(v) for k, v in sd.items()}


def write_model(path: Path, seed: int, kib: int = 256) -> dict[str, str]:
    """A safetensors file of ``model_tensors(seed, kib)``; returns its digests."""
    tensors = model_tensors(seed, kib)
    save_file(tensors, str(path))
    return digests(tensors)


def load_models(folder: Path, kib: int, dim: int) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """The load scenario's checkpoints: models a..x, and a ``Linear(dim, dim)`` "lin" that
    clients attach as a module. Returns the files, every model's digests (with "c", which the
    scenario publishes rather than loads) and the ``serve`` arguments for a, b, lin and x."""
    files, expected = {}, {}
    for i, name in enumerate(["a", "b", "c", "d", "x"]):
        files[name] = folder / f"{name}.safetensors"
        expected[name] = write_model(files[name], seed=10 + i, kib=kib)
    lin = torch.nn.Linear(dim, dim)
    files["lin"] = folder / "lin.safetensors"
    save_file(lin.state_dict(), str(files["lin"]))
    expected["lin"] = digests(lin.state_dict())
    expected["c"] = digests(model_tensors(12, kib))
    args = [a for n in ("a", "b", "lin", "x") for a in ("--model", f"{n}={files[n]}")]
    return files, expected, args


def big_model(path: Path, mib: int) -> dict[str, str]:
    g = torch.Generator().manual_seed(mib)
    tensors = {f"t{i}": torch.randn(mib // 8, 1 << 18, generator=g) for i in range(8)}
    save_file(tensors, str(path))
    return digests(tensors)


def shm_sha(segment_name: str) -> str:
    """Hash of a whole segment's bytes, read through /dev/shm."""
    h = hashlib.blake2b(digest_size=16)
    with open(SHM / segment_name.lstrip("/"), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def segments(instance: str) -> list[str]:
    """File names (no leading slash) of an instance's segments in the shared-memory directory."""
    return [n.lstrip("/") for n in segment.Folder().segments(segment.prefix(instance))]


def remove_segments(instance: str) -> list[str]:
    left = segments(instance)
    for name in left:
        segment.unlink(segment.Folder(), "/" + name)
    return left


def private_dirty(pid: int) -> int:
    """Private_Dirty of a process: its heap and other pages nobody else has; unlike Pss and
    Private it does not move when other processes start or stop mapping the same libraries."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def daemon_memory(pid: int) -> dict:
    from weightd import memory

    u = memory.usage(pid)
    return {"pss": u.pss, "private": u.private, "private_dirty": private_dirty(pid), "rss": u.rss}


# --- the corpus of corrupt checkpoints -----------------------------------------------------


@dataclass
class Case:
    id: str
    path: Path
    problem: str  # a regex the CheckpointError's message must match (besides naming the path)


def _st(path: Path, header, data: bytes = b"", header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len % 2**64))
        f.write(raw)
        f.write(data)


class _Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def build_corpus(root: Path, marker: Path) -> list[Case]:
    """Every corrupt checkpoint, written under ``root``. A pickle that ran would create ``marker``."""
    import builtins

    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(id_: str, path: Path, problem: str) -> None:
        cases.append(Case(id_, path, problem))

    # safetensors, truncated at every 1/16 of the file (the header is ~1/30 of it)
    good = {
        "a": torch.randn(48, 48),
        "b": torch.arange(100),
        "c": torch.randn(33).to(torch.bfloat16),
        "e": torch.zeros(0),
    }
    save_file(good, str(root / "good.safetensors"))
    blob = (root / "good.safetensors").read_bytes()
    hlen = struct.unpack("<Q", blob[:8])[0]
    header, data = blob[8 : 8 + hlen], blob[8 + hlen :]
    cut_points = sorted({len(blob) * k // 16 for k in range(16)} | {4, 8, 8 + hlen // 2, 8 + hlen})
    for cut in cut_points:
        p = root / f"trunc-{cut}.safetensors"
        p.write_bytes(blob[:cut])
        add(f"safetensors truncated at byte {cut} of {len(blob)}", p, "truncated")

    # header lengths that lie
    for what, n, problem in [
        ("one short (into the padding)", hlen - 1, "header length is wrong"),
        ("into the JSON", hlen - 9, "not valid JSON"),
        ("runs into the data", hlen + 16, "not valid JSON"),
        ("zero", 0, "not valid JSON"),
        ("past the end", len(blob), "bad header length"),
        ("2**64-1", 2**64 - 1, "bad header length"),
        ("over the 100 MB limit", 100_000_001, "bad header length"),
    ]:
        p = root / f"hlen-{what.replace(' ', '_')}.safetensors"
        _st(p, header, data, header_len=n)
        add(f"safetensors header length {what}", p, problem)

    f32 = lambda shape, off: {"dtype": "F32", "shape": shape, "data_offsets": off}  # noqa: E731
    headers = {
        "header is a JSON array": (b"[1, 2]", 16, "not a JSON object"),
        "header nests 100000 deep": (b"[" * 100_000 + b"]" * 100_000, 0, "not valid JSON"),
        "header is not UTF-8": (b'{"w\xff": 1}', 0, "not valid JSON"),
        "__metadata__ is a list": ({"__metadata__": [1], "w": f32([4], [0, 16])}, 16, "__metadata__"),
        "entry is a number": ({"w": 5}, 16, "not an object"),
        "dtype missing": ({"w": {"shape": [4], "data_offsets": [0, 16]}}, 16, "dtype None"),
        "dtype is a list": (
            {"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}},
            16,
            "does not know",
        ),
        "unknown dtype F4": (
            {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}},
            16,
            "does not know",
        ),
        "shape of floats": ({"w": f32([2.0, 2.0], [0, 16])}, 16, "bad shape"),
        "shape of bools": ({"w": f32([True, 4], [0, 16])}, 16, "bad shape"),
        "shape is a string": ({"w": f32("4", [0, 16])}, 16, "bad shape"),
        "shape product overflows int64": (
            {"w": f32([2**33, 2**33], [0, 16])},
            16,
            "overflow|data_offsets span",
        ),
        "zero-size shape with a 2**70 dim": ({"w": f32([0, 2**70], [0, 0])}, 0, "overflow"),
        "zero-size shape, strides overflow": ({"w": f32([0, 2**40, 2**40], [0, 0])}, 0, "overflow"),
        "F64 over 16 bytes of 4 elements": (
            {"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}},
            16,
            "data_offsets span",
        ),
        "BF16 over 16 bytes of 4 elements": (
            {"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}},
            16,
            "data_offsets span",
        ),
        "BOOL over 16 bytes of 4 elements": (
            {"w": {"dtype": "BOOL", "shape": [4], "data_offsets": [0, 16]}},
            16,
            "data_offsets span",
        ),
        "offsets reversed": ({"w": f32([4], [16, 0])}, 16, "bad data_offsets"),
        "offsets negative": ({"w": f32([4], [-16, 0])}, 16, "bad data_offsets"),
        "offsets are floats": ({"w": f32([4], [0.0, 16.0])}, 16, "bad data_offsets"),
        "three offsets": ({"w": f32([4], [0, 16, 32])}, 32, "bad data_offsets"),
        "offsets past the data": ({"w": f32([4], [1000, 1016])}, 16, "truncated"),
        "bytes after the last tensor": ({"w": f32([4], [0, 16])}, 32, "trailing bytes"),
        "offsets past 2**64": ({"w": f32([4], [2**64, 2**64 + 16])}, 16, "truncated"),
        "overlap: partial": ({"a": f32([4], [0, 16]), "b": f32([4], [8, 24])}, 24, "overlap"),
        "overlap: identical": ({"a": f32([4], [0, 16]), "b": f32([4], [0, 16])}, 16, "overlap"),
        "overlap: contained": ({"a": f32([16], [0, 64]), "b": f32([2], [16, 24])}, 64, "overlap"),
        "overlap hidden behind an empty tensor": (
            {"a": f32([16], [0, 64]), "e": f32([0], [8, 8]), "c": f32([2], [16, 24])},
            64,
            "overlap",
        ),
    }
    for i, (what, (h, nbytes, problem)) in enumerate(headers.items()):
        p = root / f"hdr-{i}.safetensors"
        _st(p, h, bytes(nbytes))
        add(f"safetensors {what}", p, problem)

    # PyTorch files: truncated zip and legacy formats, missing records, code in the pickle
    torch.save({"a": torch.randn(64, 64), "b": torch.arange(10)}, root / "good.pt")
    zblob = (root / "good.pt").read_bytes()
    for k in range(1, 16):
        p = root / f"trunc-{k}.pt"
        p.write_bytes(zblob[: len(zblob) * k // 16])
        add(f"torch zip truncated at {k}/16", p, "torch.load failed")
    torch.save({"a": torch.randn(64, 64)}, root / "legacy.pt", _use_new_zipfile_serialization=False)
    lblob = (root / "legacy.pt").read_bytes()
    for k in (1, 4, 8, 12, 15):
        p = root / f"legacy-trunc-{k}.pt"
        p.write_bytes(lblob[: len(lblob) * k // 16])
        add(f"torch legacy format truncated at {k}/16", p, "torch.load failed")
    with (
        zipfile.ZipFile(root / "good.pt") as zin,
        zipfile.ZipFile(root / "no-record.pt", "w", zipfile.ZIP_STORED) as zout,
    ):
        for item in zin.infolist():
            if not item.filename.endswith("/data/0"):
                zout.writestr(item, zin.read(item.filename))
    add("torch zip missing a storage record", root / "no-record.pt", "torch.load failed")
    torch.save(torch.ones(3), root / "bare-tensor.pt")
    add("torch file holding a bare tensor", root / "bare-tensor.pt", "not a state dict")
    torch.save({"w": torch.ones(3), "lr": [0.1, 0.2]}, root / "with-list.pt")
    add("torch state dict holding a list", root / "with-list.pt", "holds a list")

    cmd = f"touch {marker}"
    payloads = {
        "os.system": _Evil(os.system, (cmd,)),
        "subprocess.call": _Evil(subprocess.call, (["touch", str(marker)],)),
        "builtins.exec": _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "builtins.eval": _Evil(builtins.eval, (f"__import__('os').system({cmd!r})",)),
    }
    for what, evil in payloads.items():
        p = root / f"evil-{what}.pt"
        torch.save({"w": torch.ones(2), "x": evil}, p)
        add(f"torch zip whose pickle calls {what}", p, "--allow-pickle")
        p = root / f"evil-legacy-{what}.bin"
        with open(p, "wb") as f:
            pickle.dump({"w": evil}, f, protocol=2)
        add(f"raw pickle (.bin) that calls {what}", p, "--allow-pickle|torch.load failed")

    # Hugging Face folders
    def folder(name: str, files: dict[str, object]) -> Path:
        d = root / name
        d.mkdir()
        for fname, content in files.items():
            if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
                save_file(content, str(d / fname))
            elif content is None:
                (d / fname).mkdir()
            else:
                (d / fname).write_bytes(
                    content if isinstance(content, bytes) else json.dumps(content).encode()
                )
        return d

    one, two = {"a": torch.ones(4)}, {"b": torch.ones(4)}
    idx = "model.safetensors.index.json"
    hf = [
        (
            "index names a shard in the parent",
            {"s1.safetensors": one, idx: {"weight_map": {"a": "../s1.safetensors"}}},
            "names shard",
        ),
        (
            "index names an absolute shard",
            {"s1.safetensors": one, idx: {"weight_map": {"a": "/etc/passwd"}}},
            "names shard",
        ),
        (
            "index names a folder as a shard",
            {"s1.safetensors": one, "sub": None, idx: {"weight_map": {"a": "s1.safetensors", "b": "sub"}}},
            "names shard",
        ),
        (
            "index names a hidden shard",
            {".s.safetensors": one, idx: {"weight_map": {"a": ".s.safetensors"}}},
            "names shard",
        ),
        ("index is not JSON", {"s1.safetensors": one, idx: b"{nope"}, "not a valid index"),
        (
            "index weight_map is a list",
            {"s1.safetensors": one, idx: {"weight_map": ["s1.safetensors"]}},
            "not a valid index",
        ),
        (
            "index nests 100000 deep",
            {"s1.safetensors": one, idx: b"[" * 100_000 + b"]" * 100_000},
            "not a valid index",
        ),
        (
            "index lists a tensor no shard has",
            {"s1.safetensors": one, idx: {"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}},
            "in no shard",
        ),
        (
            "two shards hold the same tensor",
            {
                "s1.safetensors": one,
                "s2.safetensors": one,
                idx: {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
            },
            "also in another shard",
        ),
        (
            "a .bin index names a missing shard",
            {"pytorch_model.bin.index.json": {"weight_map": {"a": "pytorch_model-1.bin"}}},
            "names shard",
        ),
        (
            "config.json is not JSON",
            {"model.safetensors": one, "config.json": b"{nope"},
            "config.json: not valid JSON",
        ),
        (
            "config.json nests 100000 deep",
            {"model.safetensors": one, "config.json": b"[" * 100_000 + b"]" * 100_000},
            "config.json: not valid JSON",
        ),
        ("no weights at all", {"config.json": {"model_type": "bert"}}, "no \\*.safetensors"),
        (
            "one good shard and one truncated",
            {
                "s1.safetensors": one,
                "s2.safetensors": b"\x10\x00\x00",
                idx: {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
            },
            "s2.safetensors: truncated",
        ),
        (
            "unindexed shards that overlap by name",
            {"a.safetensors": one, "b.safetensors": one},
            "also in another shard",
        ),
    ]
    for i, (what, files, problem) in enumerate(hf):
        add(f"HF folder: {what}", folder(f"hf-{i}", files), problem)
    del two
    return cases


# --- raw wire access -----------------------------------------------------------------------


def dealer(path: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(protocol.endpoint(path))
    return s


def raw_request(path: str, frames: list[bytes], timeout_ms: int = 5000) -> list[bytes] | None:
    s = dealer(path)
    try:
        s.send_multipart(frames)
        return s.recv_multipart() if s.poll(timeout_ms) else None
    finally:
        s.close(linger=0)


# --- load: many client processes attaching and detaching -----------------------------------


def _load_client(args: dict, ready, go, results) -> None:
    """One client process: ``cycles`` attach/detach cycles, every read checked bit-exact."""
    out = {
        "pid": os.getpid(),
        "ok": Counter(),
        "typed": Counter(),
        "bad": [],
        "latencies": [],
        "untyped": None,
        "left_mapped": 0,
        "modules": 0,
    }
    try:
        from torch import nn

        from weightd.client import Client, detach
        from weightd.errors import WeightdError

        torch.set_num_threads(1)
        rng = random.Random(args["seed"])
        expected = args["expected"]
        client = Client(args["socket"], timeout=args["timeout"])
        ready.put(os.getpid())
        go.wait(120)
        for _ in range(args["cycles"]):
            name = rng.choice(args["names"])
            as_module = name == args.get("module_name") and rng.random() < 0.5
            t0 = time.perf_counter()
            try:
                if as_module:
                    n = args["module_dim"]
                    got = client.attach(name, model=lambda n=n: nn.Linear(n, n))
                else:
                    got = client.state_dict(name)
            except WeightdError as e:
                out["typed"][e.code] += 1
                if e.code == "timeout":  # never reuse a socket that may have a late reply queued
                    client.close()
                    client = Client(args["socket"], timeout=args["timeout"])
                continue
            out["latencies"].append(time.perf_counter() - t0)
            if as_module:
                sd = got.state_dict()
                out["modules"] += 1
            else:
                sd = got
            if digests(sd) != expected.get(name):
                out["bad"].append(name)
            out["ok"][name] += 1
            if as_module:
                detach(got)
            del sd, got  # the mapping goes with the last tensor over it
        gc.collect()
        with open("/proc/self/maps") as f:
            out["left_mapped"] = sum(f"weightd.{args['instance']}." in line for line in f)
        client.close()
    except BaseException:
        out["untyped"] = traceback.format_exc()
    out["ok"], out["typed"] = dict(out["ok"]), dict(out["typed"])
    results.put(out)


_forkserver = None


def forkserver():
    """A multiprocessing context whose children fork from a process with torch and the client
    already imported: each costs milliseconds and a few MiB, not seconds and 200 MiB."""
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(["torch", "weightd.client", "hostile"])
    return _forkserver


@dataclass
class LoadResult:
    clients: int
    cycles: int
    seconds: float
    attaches: int
    ok: Counter
    typed: Counter
    bad: list
    untyped: list
    hung: list[int]
    latencies: list[float]
    left_mapped: int
    modules: int
    during: dict = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return (self.attaches + sum(self.typed.values())) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


def run_load(
    socket: str,
    instance: str,
    expected: dict,
    *,
    clients: int,
    cycles: int,
    names: list[str],
    during=None,
    timeout: float = 30.0,
    deadline: float = 300.0,
    seed: int = 0,
    module_name: str | None = None,
    module_dim: int = 0,
) -> LoadResult:
    """``clients`` processes, each doing ``cycles`` attaches of random ``names``; ``during()``
    runs in this process once they all started. Stragglers past ``deadline`` are killed and
    reported as hung."""
    ctx = forkserver()
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = []
    outs = []
    end = time.monotonic() + deadline
    try:
        for i in range(clients):
            args = {
                "socket": socket,
                "instance": instance,
                "expected": expected,
                "cycles": cycles,
                "names": names,
                "seed": seed * 100_003 + i,
                "timeout": timeout,
                "module_name": module_name,
                "module_dim": module_dim,
            }
            p = ctx.Process(target=_load_client, args=(args, ready, go, results), daemon=True)
            p.start()
            procs.append(p)
        for _ in procs:
            ready.get(timeout=60)
        t0 = time.perf_counter()
        go.set()
        extra = during() if during is not None else {}
        while len(outs) < len(procs) and time.monotonic() < end:
            with contextlib.suppress(Exception):
                outs.append(results.get(timeout=0.5))
            if len(outs) < len(procs) and not any(p.is_alive() for p in procs) and results.empty():
                break
        seconds = time.perf_counter() - t0
    finally:
        hung = [p.pid for p in procs if p.is_alive() and p.pid not in {o["pid"] for o in outs}]
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    ok, typed = Counter(), Counter()
    for o in outs:
        ok.update(o["ok"])
        typed.update(o["typed"])
    missing = len(procs) - len(outs)
    untyped = [o["untyped"] for o in outs if o["untyped"]] + [
        f"{missing} clients died without a report"
    ] * bool(missing)
    return LoadResult(
        clients=clients,
        cycles=cycles,
        seconds=seconds,
        attaches=sum(ok.values()),
        ok=ok,
        typed=typed,
        bad=[b for o in outs for b in o["bad"]],
        untyped=untyped,
        hung=hung,
        latencies=[x for o in outs for x in o["latencies"]],
        left_mapped=sum(o["left_mapped"] for o in outs),
        modules=sum(o["modules"] for o in outs),
        during=extra or {},
    )


# --- fuzzing the wire protocol ----------------------------------------------------------------

# every field a handler reads (protocol.field in weightd/daemon/handlers.py), but the ones that only
# make a request wait (wait, deadline): those are bounded by their own tests
FIELDS = (
    "name",
    "path",
    "generation",
    "pid",
    "device",
    "nbytes",
    "segment",
    "factory",
    "base",  # load: a PEFT adapter over that served model
    "layout",  # publish_begin: a peer fill's layout digest
    "via",  # publish_begin: where a peer fill's bytes come from
    "v",
    "op",
)
OPS = sorted(protocol.READ_OPS | protocol.ADMIN_OPS | {"stats"})


def fuzz(read_sock: str, paths: list[str], max_examples: int, stats: Counter, *, protect: str = "good"):
    """The property: whatever arrives, every reply is well-formed and typed (never 'internal'),
    messages with a request id and a header are answered, nothing hangs. Returns a function
    that runs hypothesis when called. ``paths`` are checkpoints to try loading (good and bad, inside
    and outside the daemon's --model-dir); ``protect`` is a model name the fuzzer never unloads."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    admin = protocol.admin_socket(read_sock)
    nasty_strings = st.sampled_from(
        [
            "",
            ".",
            "..",
            "../..",
            "/",
            "a/b",
            "../../../../etc/passwd",
            "/etc/passwd",
            "/etc/shadow",
            "/dev/zero",
            "/proc/self/mem",
            "/dev/shm/x",
            "a\x00b",
            "\x00",
            "\ud800",
            "x" * 5000,
            "weightd",
            "good/../good",
            "os:system",
            "builtins:exec",
            "/weightd.x.y",
            "/../../etc/passwd",
            "cuda:0",
            "cpu",
            "ok-name",
            "g2\n",
            "🦀",
            "\n\r\t",
            "%s%n",
            "${HOME}",
            *paths,
            *(p + "\x00.txt" for p in paths),
        ]
    )
    json_leaf = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=40)
        | nasty_strings
    )
    json_value = st.recursive(
        json_leaf,
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
        max_leaves=12,
    )
    request = st.fixed_dictionaries(
        {
            "v": st.just(1) | st.just(1.0) | json_leaf,
            "op": st.sampled_from(OPS) | st.text(max_size=20) | json_leaf,
        },
        optional={k: json_value for k in FIELDS if k not in ("v", "op")},
    )

    def encode(req: dict) -> bytes:
        if req.get("name") == protect:
            req["name"] = protect + "-not"
        return json.dumps(req, allow_nan=True).encode("utf-8", "surrogatepass")

    header = st.one_of(
        request.map(encode),
        st.binary(max_size=300),
        st.integers(1, 200_000).map(lambda n: b'{"v":1,"op":"ping","x":' + b"[" * n + b"]" * n + b"}"),
        st.integers(1, 200_000).map(lambda n: b"{" * n),
        st.integers(0, 900_000).map(lambda n: b'{"v":1,"op":"manifest","name":"' + b"n" * n + b'"}'),
        st.integers(1, 6000).map(
            lambda n: b'{"v":1,"op":"manifest","name":"good","generation":' + b"9" * n + b"}"
        ),
    )
    rid = st.sampled_from([b"r1", b"r2", b"", b"\x00" * 64]) | st.binary(max_size=100)
    message = st.tuples(
        st.integers(0, 24),
        st.one_of(
            st.tuples(rid, header).map(list),  # the usual shape (request id pool: replays)
            st.lists(st.binary(max_size=200), min_size=1, max_size=6),  # any frames
            st.tuples(rid, header, st.binary(max_size=50)).map(list),  # an extra frame
        ),
    ).map(lambda t: "oversized" if t[0] == 0 else t[1])  # 1 in 25: one frame over ZMQ_MAXMSGSIZE

    @settings(
        max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(batch=st.lists(message, min_size=1, max_size=5), to_admin=st.booleans())
    def prop(batch, to_admin):
        s = dealer(admin if to_admin else read_sock)
        try:
            answerable = 0
            cut = False  # a frame over ZMQ_MAXMSGSIZE: ZeroMQ drops the connection
            sent_rids = set()
            for msg in batch:
                if msg == "oversized":
                    msg = [b"big", b"x" * (protocol.MAX_REQUEST_BYTES + 1)]
                    cut = True
                if len(msg) > 2 or sum(map(len, msg)) > protocol.MAX_REQUEST_BYTES:
                    # over a request's bounds: dropped unanswered (an oversized frame takes the
                    # connection with what followed)
                    stats["oversized"] += 1
                else:
                    answerable += 1  # even a lone frame is answered: it is read as a request id
                s.send_multipart(msg)
                stats["messages"] += 1
                sent_rids.add(msg[0][: protocol.MAX_REQUEST_ID_BYTES])
            stats["batches"] += 1
            # A ping closes the batch: the daemon reads a connection's messages in order and
            # answers or drops each as it reads it, so once the ping's reply is here every
            # message before it has had its one final reply or been dropped (loads answer later,
            # also counted: they send progress first). A cut connection answers nothing more:
            # what arrives in a short while is checked, and nothing is counted.
            end = b"end of batch"
            while end in sent_rids:
                end += b"."
            if not cut:
                s.send_multipart([end, protocol.request("ping")])
            finals, ended = 0, cut
            while (finals < answerable or not ended) and s.poll(200 if cut else 10_000):
                frames = s.recv_multipart()
                assert len(frames) == 2, frames
                body = json.loads(frames[1])
                assert body["v"] == protocol.PROTOCOL_VERSION
                if frames[0] == end:
                    assert body.get("ok"), body
                    ended = True
                    continue
                assert frames[0] in sent_rids, (frames[0], sent_rids)
                if body.get("ok"):
                    if "progress" in body:
                        continue
                    stats["ok"] += 1
                else:
                    code = body["error"]["code"]
                    assert code in TYPED_CODES, body
                    assert body["error"]["message"]
                    stats[code] += 1
                finals += 1
            if not cut:
                assert ended, "the ping after the batch got no reply"
                assert finals == answerable, f"{answerable} requests got {finals} final replies"
        finally:
            s.close(linger=0)

    return prop


# --- SIGKILL at random points of loads, publishes and unloads ---------------------------------


def _publisher(socket: str, name: str, seed: int, kib: int, go) -> None:
    from weightd.client import Client

    try:
        tensors = model_tensors(seed, kib)
        go.wait(60)
        with Client(socket, timeout=2.0) as c:
            c.publish(name, tensors)
    except BaseException:
        pass  # the daemon was killed under us: that is the point


def kill_sweep(start, files: dict, rounds: int, rng: random.Random, log=print) -> dict:
    """SIGKILL the daemon at a random moment of a load, a publish or an unload, ``rounds`` times.

    ``start()`` starts a daemon that keeps its segments (returns an object with .socket, .proc,
    .instance and .output()); ``files`` has "base" and "unload" (small safetensors), "big" (a
    load that takes a while) with their digests under ``files["digests"][name]``. After each kill
    a new daemon adopts what is sealed and sweeps the rest; every model it serves must be
    bit-exact, and the segments in /dev/shm must be exactly those it serves.
    """
    from weightd.client import Client

    expected = dict(files["digests"])  # model name -> digests (every generation has the same bytes)
    expected["P"] = digests(model_tensors(7, files["publish_kib"]))
    tally = Counter()
    d = start()
    with Client(d.socket, timeout=60) as c:
        c.load(files["base"], "base")
    ctx = forkserver()
    # How long each operation takes here, so the kills land inside it
    windows = {"load": 0.0, "publish": 0.0, "unload": 0.02}
    with Client(d.socket, timeout=60) as c:
        t0 = time.perf_counter()
        c.load(files["big"], "L")
        windows["load"] = (time.perf_counter() - t0) * 1.3
        t0 = time.perf_counter()
        c.publish("P", model_tensors(7, files["publish_kib"]))
        windows["publish"] = (time.perf_counter() - t0) * 1.3 + 0.05
    problems = []
    for r in range(rounds):
        op = ("load", "publish", "unload")[r % 3]
        with Client(d.socket, timeout=60) as c:
            if op == "unload" and "U" not in {m["name"] for m in c.list()}:
                c.load(files["unload"], "U")
        delay = rng.uniform(0, windows[op])
        pub = None
        s = None
        if op == "publish":
            go = ctx.Event()
            pub = ctx.Process(
                target=_publisher, args=(d.socket, "P", 7, files["publish_kib"], go), daemon=True
            )
            pub.start()
            time.sleep(0.05)
            go.set()
        else:
            s = dealer(protocol.admin_socket(d.socket))
            req = {
                "load": {"op": "load", "path": files["big"], "name": "L"},
                "unload": {"op": "unload", "name": "U"},
            }[op]
            s.send_multipart([b"k", protocol.request(req.pop("op"), **req)])
        time.sleep(delay)
        d.proc.kill()
        d.proc.wait()
        assert d.proc.returncode == -signal.SIGKILL
        if s is not None:
            s.close(linger=0)
        if pub is not None:
            pub.join(30)  # its commit fails (no daemon) or it finished before the kill
            if pub.is_alive():
                pub.kill()
                pub.join()
        tally[op] += 1
        d = start()
        out = d.output()
        tally["unfinished segments swept"] += out.count("unfinished segment")
        with Client(d.socket, timeout=60) as c:
            served = c.list()
            for m in served:
                got = digests(c.state_dict(m["name"]))
                if got != expected.get(m["name"]):
                    problems.append(
                        f"round {r} ({op}, killed after {delay * 1e3:.0f} ms): {m['name']} "
                        f"generation {m['generation']} is not bit-exact"
                    )
            tally["models checked bit-exact"] += len(served)
            on_disk = set(segments(d.instance))
            listed = {m["segment"].lstrip("/") for m in served}
            if on_disk != listed:
                problems.append(
                    f"round {r} ({op}): segments {sorted(on_disk - listed)} are not served, "
                    f"{sorted(listed - on_disk)} are served but missing"
                )
        names = ", ".join(f"{m['name']}@{m['generation']}" for m in served)
        log(f"  kill round {r + 1}/{rounds}: {op}, SIGKILL after {delay * 1e3:.0f} ms -> serving {names}")
    tally["rounds"] = rounds
    return {"daemon": d, "problems": problems, "tally": tally, "windows": windows}


# --- a daemon for the stress script ------------------------------------------------------------


class Daemon(spawn.Daemon):
    """``weightd serve`` on a socket for use outside pytest (the one shared launcher)."""

    def __init__(self, socket: str, instance: str, args: list[str], log_dir: str):
        super().__init__(socket, instance, args, log_dir=log_dir)

"""Cold start at the storage limit: checkpoints into segments, against the machine's ceilings.

    python benchmarks/load.py                 # 1, 3 and 8 GiB files, HF folders (~10 min, 8 GiB shm)
    python benchmarks/load.py --sizes 1       # one size (~3 min)
    python benchmarks/load.py --quick         # 256 MiB files, small folders (~1 min)

One run, side by side, each row with the page cache dropped (``echo 3 >
/proc/sys/vm/drop_caches``, as root; skipped with the reason where not allowed) and warm:

- ``weightd load`` of a safetensors file and of the same bytes as a torch ``.pt``: request to
  ready, timed by the client, with the daemon's own report (readers, direct or buffered);
  its private memory (Pss less shared memory, sampled every 10 ms) growth;
- runai-model-streamer (PyPI) ``SafetensorsStreamer`` into CPU memory (each tensor cloned out
  of its ring), default concurrency and ``RUNAI_STREAMER_CONCURRENCY=16``;
- ``safetensors.load_file`` + copy into a new /dev/shm file (what a user would script);
- ``torch.load(mmap=True)`` of the ``.pt`` + touching every page (what a worker pays);
- ceilings, in the same run: raw ``O_DIRECT`` reads at 1, 4 and 16 streams, buffered reads
  with the cache dropped at 1 and 4 (readahead: faster than ``O_DIRECT`` on some disks); page cache ->
  shared memory (``preadv`` into an already-faulted mapping, 64 MiB chunks, 1 and 2 threads), and
  into a new shm file whose pages are allocated on the clock (what every new segment pays), through
  a mapping and by ``sendfile``.

Then Hugging Face folders (a Llama sharded in 4, a Dinov2 whose weights transformers renames
and cuts on load, and a Mixtral MoE) against the same bytes as one safetensors file, and
stops: SIGTERM and ``unload`` while a 3 and 8 GiB load runs.

Targets, as ratios: warm >= 0.7x the page cache -> shm ceiling; cold >= 0.9x the best raw read
and >= 1.0x runai; dense folder <= 1.2x its single file, MoE <= 2x; a stop <= 0.3 s; daemon
private growth <= 256 MiB. Writes benchmarks/out/load.json and load.png. Every file, segment and
process it makes is removed, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

from weightd import memory
from weightd.bench import spawn
from weightd.client import Client

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
GiB = 1 << 30
MiB = 1 << 20
TENSOR = 256 * MiB  # tensors of a real checkpoint's size (a 7B model's largest are ~250 MiB)


# --- files ---------------------------------------------------------------------------------


def random_block() -> bytes:
    return os.urandom(64 * MiB)


def make_safetensors(path: Path, nbytes: int, block: bytes) -> Path:
    """Float16 tensors of ``TENSOR`` bytes (the last smaller) of incompressible bytes."""
    sizes = [min(TENSOR, nbytes - o) for o in range(0, nbytes, TENSOR)]
    header, off = {}, 0
    for i, n in enumerate(sizes):
        header[f"layer{i}.weight"] = {"dtype": "F16", "shape": [n // 2], "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        _write_random(f, nbytes, block)
        os.fsync(f.fileno())
    return path


def make_pt(path: Path, st: Path) -> Path:
    """The same tensors as ``st``, as a torch state dict (torch.save's zip, stored entries)."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(st)), path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return path


def _write_random(f, nbytes: int, block: bytes) -> None:
    done = 0
    while done < nbytes:
        n = min(len(block), nbytes - done)
        f.write(block[:n])
        done += n


def drop_caches() -> str | None:
    """Drop the page cache; the reason it could not be, or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror}): run as root for the cold rows"
    return None


def warm(*paths: Path) -> None:
    buf = bytearray(64 * MiB)
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.iterdir()):
            with open(f, "rb") as fh:
                while fh.readinto(buf):
                    pass


def files_of(p: Path) -> list[Path]:
    return [p] if p.is_file() else sorted(p.iterdir())


def nbytes_of(p: Path) -> int:
    return sum(f.stat().st_size for f in files_of(p))


# --- ceilings ------------------------------------------------------------------------------


def _in_threads(threads: int, size: int, chunk: int, reader) -> float:
    """Seconds for ``threads`` threads to take the ``chunk``-byte offsets of ``size`` bytes in
    turn (interleaved), each thread calling its own ``reader()`` on every offset it takes."""
    it = iter(range(0, size, chunk))
    lock = threading.Lock()

    def run():
        read = reader()
        while True:
            with lock:
                o = next(it, None)
            if o is None:
                return
            read(o)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def raw_direct(path: Path, streams: int, chunk: int = 8 * MiB, huge: bool = False) -> float:
    """GB/s of O_DIRECT reads of the whole file by ``streams`` threads (chunks interleaved), into
    buffers of 4 KiB pages, or of 2 MiB pages (``huge``: a virtio disk takes at most 254 separate
    pages per request, so scattered 4 KiB pages cap a request at ~1 MiB, 2 MiB pages at its 4 MiB:
    Note [straight into the segment] in weightd/daemon/stream.py)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffers = []

    def reader():
        if not huge:
            buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
            buffers.append(buf)
            return lambda o: os.preadv(fd, [buf], o)
        # transparent huge pages where the machine allows them (THP "madvise" or "always")
        whole = mmap.mmap(-1, chunk + 2 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffers.append(whole)
        base = ctypes.addressof(ctypes.c_char.from_buffer(whole))
        pad = -base % (2 * MiB)
        with contextlib.suppress(OSError, AttributeError):
            whole.madvise(mmap.MADV_HUGEPAGE, pad, chunk)
        view = memoryview(whole)[pad : pad + chunk]
        buffers.append(view)
        return lambda o: os.preadv(fd, [view], o)

    try:
        return size / _in_threads(streams, size, chunk, reader) / 1e9
    finally:
        os.close(fd)
        for buf in reversed(buffers):  # views before the mappings they are over
            buf.release() if isinstance(buf, memoryview) else buf.close()


def raw_buffered(path: Path, streams: int, chunk: int = 8 * MiB) -> float:
    """GB/s of reading the whole file through the page cache (dropped first: from the disk, with
    the kernel's readahead) by ``streams`` threads, chunks interleaved; None where the cache
    cannot be dropped."""
    if drop_caches():
        return None
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def reader():
        buf = bytearray(chunk)
        return lambda o: os.preadv(fd, [buf], o)

    try:
        return size / _in_threads(streams, size, chunk, reader) / 1e9
    finally:
        os.close(fd)


def cache_to_shm(
    path: Path,
    threads: int = 2,
    chunk: int = 8 * MiB,
    folder: str = "/dev/shm",
    fresh: bool = True,
    sendfile: bool = False,
) -> float:
    """GB/s of filling a shm file from the (warm) page cache by ``preadv`` into a mapping of it
    (or ``sendfile`` into the file, each thread with its own descriptor of it), ``threads``
    threads taking ``chunk`` bytes each. ``fresh``: the file's pages are allocated
    (``posix_fallocate``) on the clock, as any load into a new segment pays; otherwise they are
    allocated and faulted in (``MADV_POPULATE_WRITE``) before it starts: the copy alone."""
    size = path.stat().st_size
    shm = os.path.join(folder, f"weightd-bench-load-{uuid.uuid4().hex[:8]}")
    dst = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    src = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.posix_fallocate(dst, 0, size)
        m = mmap.mmap(dst, size, mmap.MAP_SHARED)
        if not fresh:
            m.madvise(23, 0, size)  # MADV_POPULATE_WRITE
            t0 = time.perf_counter()
        view = memoryview(m)

        def copy(o):
            with view[o : o + chunk] as into:
                os.preadv(src, [into], o)

        outs = []

        def send():
            out = os.open(shm, os.O_WRONLY)
            outs.append(out)

            def one(o):
                os.lseek(out, o, os.SEEK_SET)
                done, n = 0, min(chunk, size - o)
                while done < n:
                    done += os.sendfile(out, src, o + done, n - done)

            return one

        try:
            seconds = (
                time.perf_counter()
                - t0
                + _in_threads(threads, size, chunk, send if sendfile else lambda: copy)
            )
        finally:
            for out in outs:
                os.close(out)
        view.release()
        m.close()
        return size / seconds / 1e9
    finally:
        os.close(src)
        os.close(dst)
        os.unlink(shm)


def median_of(runs: list[dict]) -> dict:
    """The run of median time (its report and memory with it), with every run's seconds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    ok.sort(key=lambda r: r["seconds"])
    out = dict(ok[len(ok) // 2])
    out["runs"] = [round(r["seconds"], 4) for r in runs if "error" not in r]
    out["private_growth"] = max((r.get("private_growth", 0) for r in ok), default=0)
    out["shared_peak"] = max((r.get("shared_peak", 0) for r in ok), default=0)
    return out


def fallocate_rate(folder: str, n: int) -> float:
    path = os.path.join(folder, f"weightd-bench-load-{uuid.uuid4().hex[:8]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t0 = time.perf_counter()
        os.posix_fallocate(fd, 0, n)
        return n / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)


# --- peers (each in a fresh process) ---------------------------------------------------------

RUNAI = """
import json, sys, time
from runai_model_streamer import SafetensorsStreamer
t0 = time.perf_counter(); n = 0; out = {}
with SafetensorsStreamer() as s:
    s.stream_file(sys.argv[1])
    for name, t in s.get_tensors():
        out[name] = t.clone(); n += t.nbytes
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n}))
"""

LOAD_FILE = """
import json, os, sys, time, uuid
from safetensors.torch import load_file
t0 = time.perf_counter()
sd = load_file(sys.argv[1])
path = "/dev/shm/weightd-bench-load-" + uuid.uuid4().hex[:8]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
try:
    total = sum(t.untyped_storage().nbytes() for t in sd.values())
    os.posix_fallocate(fd, 0, total); off = 0
    for t in sd.values():
        b = t.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        mv = memoryview(b); done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], off + done)
        off += len(mv)
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": total}))
finally:
    os.close(fd); os.unlink(path)
"""

TORCH_MMAP = """
import json, sys, time, torch
t0 = time.perf_counter(); n = 0
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
for t in sd.values():
    b = t.view(-1).view(torch.uint8)
    b[::4096].sum()  # one byte of every page: every page faulted in
    n += b.numel()
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n}))
"""


def peer(code: str, path: Path, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=1800,
    )
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- weightd -------------------------------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path, args):
        self.tmp = tmp
        self.args = args
        self.daemons: list[spawn.Daemon] = []

    def daemon(self, *extra: str, wait: bool = True) -> spawn.Daemon:
        instance = "bl" + uuid.uuid4().hex[:8]
        d = spawn.Daemon(
            str(self.tmp / f"{instance}.sock"),
            instance,
            ["--unlink-on-exit", "--log-level", "warning", *extra, *self.args.serve],
            die_with_parent=True,
        )
        self.daemons.append(d)
        return d.start(wait=wait)

    def cleanup(self) -> None:
        for d in self.daemons:
            d.stop()
            d.remove_segments()

    def load(self, d: spawn.Daemon, path: Path) -> dict:
        """One ``weightd load``, request to ready, with the daemon's report and memory growth."""
        base = memory.usage(d.pid).pss_private
        peak = [base]
        # the host's shared memory (/proc/meminfo Shmem): the segment, and what else a load holds
        # there meanwhile (a Hugging Face folder's memfd of converted tensors)
        shm_base = shmem()
        shm_peak = [shm_base]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.01):
                try:
                    peak[0] = max(peak[0], memory.usage(d.pid).pss_private)
                    shm_peak[0] = max(shm_peak[0], shmem())
                except OSError:
                    return

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with Client(d.socket, timeout=3600) as c:
                cpu0, loader0 = cpu_seconds(d.pid), loader_cpu(d.pid)
                t0 = time.perf_counter()
                model = c.load(str(path), "m")
                seconds = time.perf_counter() - t0
                cpu = cpu_seconds(d.pid) - cpu0
                loader = loader_cpu_since(loader0)
                report = next(m for m in c.list() if m["name"] == "m").get("load") or {}
                c.unload("m")
        finally:
            stop.set()
            sampler.join()
        return {
            "seconds": seconds,
            "bytes": model["nbytes"],
            "gbps": model["nbytes"] / seconds / 1e9,
            "daemon": report,
            "private_growth": max(peak[0] - base, 0),
            "shared_peak": max(shm_peak[0] - shm_base, 0),
            "cpu_per_gib": cpu / (model["nbytes"] / GiB),
            "cpu_seconds": cpu,
            # a folder's from_pretrained, in the loader's fork (0 for a file)
            "loader_cpu_seconds": loader or 0.0,
        }


def shmem() -> int:
    """Bytes of shared memory on the host (``Shmem`` in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process, all its threads (``/proc/PID/stat``); ``children``:
    that of its children it has reaped instead."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    at = 13 if children else 11
    return (int(fields[at]) + int(fields[at + 1])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The live children of a process, started by any of its threads."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def loader_cpu(daemon_pid: int) -> tuple[int, float] | None:
    """The daemon's loader process (it runs ``from_pretrained`` in a fork per load) and the CPU
    time of the forks it has reaped; None before its first folder."""
    for pid in children_of(daemon_pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"weightd.daemon.loader" in f.read():
                return pid, cpu_seconds(pid, children=True)
    return None


def loader_cpu_since(before: tuple[int, float] | None) -> float | None:
    """CPU seconds the loader's forks spent since ``before`` (``loader_cpu``), once the fork of
    the load just done is reaped."""
    if before is None:
        return None
    pid, start = before
    deadline = time.monotonic() + 5
    with contextlib.suppress(OSError):
        while children_of(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        return cpu_seconds(pid, children=True) - start
    return None


def gbps(r: dict) -> float | None:
    if not r or "error" in r:
        return None
    return r.get("gbps") or r["bytes"] / r["seconds"] / 1e9


def part_files(b: Bench, args, res: dict, block: bytes) -> None:
    import torch

    d = b.daemon()
    # The daemon imports torch on its first .pt (seconds): paid here, not in a timed row.
    torch.save({"w": torch.zeros(4)}, b.tmp / "tiny.pt")
    b.load(d, b.tmp / "tiny.pt")
    for size in args.sizes:
        n = int(size * GiB)
        label = f"{size:g} GiB"
        print(f"{label}: writing files ...", flush=True)
        st = make_safetensors(b.tmp / f"m{size:g}.safetensors", n, block)
        rows = res["files"][label] = {}
        if args.stops_only:
            rows["stops"] = stops(b, st)
            print(f"  stops: {rows['stops']}", flush=True)
            st.unlink()
            continue
        pt = make_pt(b.tmp / f"m{size:g}.pt", st) if not args.no_pt else None
        for state in ("cold", "warm"):
            r = rows[state] = {}

            def prepare(*paths, state=state, r=r):
                if state == "cold":
                    why = drop_caches()
                    if why:
                        r["skipped"] = why
                        return False
                else:
                    warm(*paths)
                return True

            cases = [
                ("weightd load .safetensors", st, lambda p: b.load(d, p)),
                ("weightd load .pt", pt, lambda p: b.load(d, p)),
                ("runai-model-streamer (default)", st, lambda p: peer(RUNAI, p)),
                (
                    "runai-model-streamer (16)",
                    st,
                    lambda p: peer(RUNAI, p, {"RUNAI_STREAMER_CONCURRENCY": "16"}),
                ),
                ("safetensors.load_file + copy to shm", st, lambda p: peer(LOAD_FILE, p)),
                ("torch.load(mmap=True) + touch", pt, lambda p: peer(TORCH_MMAP, p)),
            ]
            beside = []  # O_DIRECT x4 right after each cold weightd load: the disk drifts
            # Rounds: each round runs every case once, so weightd and the peers share each minute
            # of this disk (runai's cold rate alone swung 1.5-2.2 GB/s between runs); the median
            # of the rounds is shown.
            cases = [c for c in cases if c[1] is not None]
            runs: dict[str, list] = {what: [] for what, _, _ in cases}
            for _ in range(args.reps):
                for what, path, run in cases:
                    if not prepare(path):
                        break
                    runs[what].append(run(path))
                    if state == "cold" and path is st and what.startswith("weightd"):
                        beside.append(raw_direct(st, 4))
                if "skipped" in r:
                    break
            for what, got in runs.items():
                if got:
                    r[what] = median_of(got)
                    print(f"  {state:4s} {what:38s} {gbps(r[what]) or 0:6.2f} GB/s", flush=True)
            if beside:
                rows.setdefault("ceilings", {})["O_DIRECT x4 beside each cold load (median)"] = sorted(
                    beside
                )[len(beside) // 2]
        ceil = rows.setdefault("ceilings", {})
        for streams in (1, 4, 16):
            ceil[f"O_DIRECT x{streams}"] = raw_direct(st, streams)
        for streams in (4, 16):
            ceil[f"O_DIRECT x{streams}, 2 MiB-page buffers"] = raw_direct(st, streams, huge=True)
        for streams in (1, 4):  # through the page cache, from the disk: readahead
            rate = raw_buffered(st, streams)
            if rate is not None:
                ceil[f"buffered read (cache dropped) x{streams}"] = rate
        warm(st)
        for threads in (1, 2):
            ceil[f"page cache -> shm x{threads}"] = cache_to_shm(st, threads, 64 * MiB, fresh=False)
        ceil["page cache -> new shm file x2 (pages allocated)"] = sorted(
            cache_to_shm(st) for _ in range(args.reps)
        )[args.reps // 2]
        # the way weightd copies a cached chunk into 4 KiB pages (Note [one copy from the page cache])
        ceil["page cache -> new shm file by sendfile x4 (pages allocated)"] = sorted(
            cache_to_shm(st, 4, sendfile=True) for _ in range(args.reps)
        )[args.reps // 2]
        for k, v in ceil.items():
            print(f"  ceiling {k:24s} {v:6.2f} GB/s", flush=True)
        if size in args.stop_sizes:
            rows["stops"] = stops(b, st)
            print(f"  stops: {rows['stops']}", flush=True)
        st.unlink()
        if pt is not None:
            pt.unlink()


def stops(b: Bench, st: Path) -> dict:
    """SIGTERM and unload while a (cold) preload of ``st`` runs: seconds until the daemon exits
    or the unload is answered and the model gone; what either left in /dev/shm."""
    out = {}
    d = b.daemon()
    t0 = time.perf_counter()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(30)
    out["sigterm idle"] = time.perf_counter() - t0
    for how in ("sigterm", "unload"):
        drop_caches()
        d = b.daemon("--keep-going", "--model", f"big={st}", wait=False)
        d.wait_ready(until="ping")
        with Client(d.socket, timeout=30) as c:
            done = 0
            while done < st.stat().st_size // 5:  # a fifth in: reserved, streaming
                m = next((m for m in c.list() if m["name"] == "big"), None)
                if m is None or m.get("state") != "loading":
                    out[f"{how}: the load ended before it could be stopped"] = True
                    break
                done = m["done"]
                time.sleep(0.005)
            if how == "unload":
                t0 = time.perf_counter()
                c.unload("big")
                while any(m["name"] == "big" and m.get("state") != "failed" for m in c.list()):
                    time.sleep(0.002)
                out["unload while loading"] = time.perf_counter() - t0
                out["unload: segments left"] = len(d.segments())
        if how == "sigterm":
            t0 = time.perf_counter()
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(60)
            out["sigterm while loading"] = time.perf_counter() - t0
            out["sigterm: segments left"] = len(d.segments())
        d.stop()
    return out


def part_folders(b: Bench, args, res: dict) -> None:
    """A Llama sharded in 4, a Dinov2 saved under names transformers renames, and a Mixtral MoE,
    against their bytes as one safetensors file."""
    import torch
    import transformers
    from safetensors.torch import save_file

    d = b.daemon()
    # The daemon's first folder starts its loader process (imports torch and transformers, once
    # per daemon): timed here, on a tiny folder, and not in the rows below.
    tiny = b.tmp / "tiny"
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
        )
    ).save_pretrained(tiny)
    res["loader start"] = b.load(d, tiny)["seconds"]
    print(f"  first folder (starts the loader process): {res['loader start']:.2f} s", flush=True)
    shutil.rmtree(tiny)
    scale = 0.25 if args.quick else 1.0
    specs = {
        "llama (4 shards)": (
            transformers.LlamaConfig,
            transformers.LlamaForCausalLM,
            dict(
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=max(2, int(16 * scale)),
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=32000,
            ),
        ),
        # saved under the names its authors use: transformers renames most of them on load and
        # cuts the SwiGLU's weights_in into gate and up (views of the file's tensor)
        "dinov2 (renamed)": (
            transformers.Dinov2Config,
            transformers.Dinov2Model,
            dict(
                hidden_size=1024,
                num_hidden_layers=max(2, int(16 * scale)),
                num_attention_heads=16,
                mlp_ratio=4,
                image_size=224,
                patch_size=14,
                use_swiglu_ffn=True,
            ),
        ),
        "mixtral (MoE)": (
            transformers.MixtralConfig,
            transformers.MixtralForCausalLM,
            dict(
                hidden_size=512,
                intermediate_size=1024,
                num_hidden_layers=max(2, int(14 * scale)),
                num_attention_heads=8,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=32000,
            ),
        ),
    }
    for label, (config_cls, model_cls, kw) in specs.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**kw))
        folder = b.tmp / label.split()[0]
        total = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=max(total // 4 + MiB, 8 * MiB))
        one = b.tmp / f"{label.split()[0]}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, one)
        del model
        rows = res["folders"][label] = {
            "bytes": nbytes_of(folder),
            "shards": len(list(folder.glob("*.safetensors"))),
        }
        for state in ("cold", "warm"):
            # in rounds, the folder and its one file in turn: each pair shares its minute of the disk
            runs: dict[str, list] = {"folder": [], "one file": []}
            for _ in range(args.reps):
                for what, path in (("folder", folder), ("one file", one)):
                    if state == "cold":
                        why = drop_caches()
                        if why:
                            rows[f"{state} skipped"] = why
                            break
                    else:
                        warm(path)
                    runs[what].append(b.load(d, path))
            for what, got in runs.items():
                if not got:
                    continue
                rows[f"{state} {what}"] = median_of(got)
                print(
                    f"  {label:18s} {state:4s} {what:8s} {rows[f'{state} {what}']['seconds']:6.2f} s",
                    flush=True,
                )
        shutil.rmtree(folder)
        one.unlink()


def part_huge(b: Bench, args, res: dict, block: bytes) -> None:
    """Fill rate of a segment on a huge=always tmpfs (--shm-dir) against /dev/shm, warm."""
    n = int((0.25 if args.quick else 1) * GiB)
    st = make_safetensors(b.tmp / "huge.safetensors", n, block)
    warm(st)
    with spawn.huge_tmpfs(2 * n + 64 * MiB) as where:
        if where is None:
            res["huge"] = {"skipped": "mounting a huge=always tmpfs needs root"}
        else:
            # The first load of a fresh daemon into huge pages measured 4-10x slower than the
            # next ones here (the VM backing 2 MiB blocks it had not used yet): each side is
            # loaded args.reps + 1 times, the first shown apart, the median of the rest.
            res["huge"] = {}
            for label, d in (("huge pages", b.daemon("--shm-dir", where)), ("4 KiB pages", b.daemon())):
                runs = []
                for _ in range(args.reps + 1):
                    warm(st)
                    runs.append(b.load(d, st))
                res["huge"][label] = median_of(runs[1:])
                res["huge"][label]["first"] = runs[0]["seconds"]
                cold = []  # the page cache dropped: O_DIRECT straight into the pages
                for _ in range(args.reps):
                    if drop_caches():
                        break
                    cold.append(b.load(d, st))
                if cold:
                    res["huge"][label]["cold"] = median_of(cold)
                d.stop()
            # the machine's: the same fill without weightd (fallocate, then preadv into a mapping)
            res["huge"]["plain fill GB/s"] = {
                "huge pages": sorted(cache_to_shm(st, folder=where) for _ in range(3))[1],
                "4 KiB pages": sorted(cache_to_shm(st) for _ in range(3))[1],
            }
            res["huge"]["fallocate GB/s"] = {
                "huge pages": fallocate_rate(where, n),
                "4 KiB pages": fallocate_rate("/dev/shm", n),
            }
    st.unlink()


# --- report --------------------------------------------------------------------------------


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(res: dict, args) -> list[str]:
    lines = []
    for label, rows in res["files"].items():
        ceil = rows.get("ceilings", {})
        raw = max((v for k, v in ceil.items() if k.startswith(("O_DIRECT", "buffered read"))), default=None)
        shm = max((v for k, v in ceil.items() if k.startswith("page cache -> shm")), default=None)
        new = max((v for k, v in ceil.items() if k.startswith("page cache -> new shm file")), default=None)
        lines += [
            f"\n### {label} safetensors (and the same tensors as .pt)\n",
            "| what | cold GB/s | warm GB/s | cold vs raw read | warm vs cache->shm "
            "| daemon private growth | daemon CPU s/GiB cold / warm | path |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        names = [k for k in rows.get("warm", {}) if k != "skipped"]
        for what in names:
            c, w = gbps(rows.get("cold", {}).get(what)), gbps(rows["warm"].get(what))
            grow = rows["warm"][what].get("private_growth")
            grows = [
                x.get("private_growth") for x in (rows.get("cold", {}).get(what), rows["warm"][what]) if x
            ]
            grow = max((g for g in grows if g is not None), default=None)
            paths = "/".join(
                (x or {}).get("daemon", {}).get("path", "")
                for x in (rows.get("cold", {}).get(what), rows["warm"][what])
            ).strip("/")
            cpus = " / ".join(
                f"{x['cpu_per_gib']:.2f}"
                for x in (rows.get("cold", {}).get(what), rows["warm"][what])
                if x and "cpu_per_gib" in x
            )
            lines.append(
                f"| {what} | {c or 0:.2f} | {w or 0:.2f} | {ratio(c, raw)} | {ratio(w, shm)} | "
                f"{'-' if grow is None else f'{grow / MiB:.0f} MiB'} | {cpus or '-'} | {paths or '-'} |"
            )
        for k, v in ceil.items():
            lines.append(f"| ceiling: {k} | | {v:.2f} | | | | | |")
        if "skipped" in rows.get("cold", {}):
            lines.append(f"\ncold rows skipped: {rows['cold']['skipped']}")
        st = "weightd load .safetensors"
        c, w = gbps(rows.get("cold", {}).get(st)), gbps(rows["warm"].get(st))
        runai = max(
            (gbps(rows.get("cold", {}).get(k)) or 0 for k in rows.get("cold", {}) if k.startswith("runai")),
            default=0,
        )
        # weightd against runai's faster setting round by round (each pair shared its minute)
        cold = rows.get("cold", {})
        ours = (cold.get(st) or {}).get("runs") or []
        theirs = [cold[k].get("runs") or [] for k in cold if k.startswith("runai")]
        paired = sorted(
            min(t[i] for t in theirs) / ours[i] for i in range(len(ours)) if all(len(t) > i for t in theirs)
        )
        lines.append(
            f"\ntargets: warm {ratio(w, shm)} of cache->shm (>= 0.7x; {ratio(w, new)} of cache->new "
            f"shm file, pages allocated); cold {ratio(c, raw)} of the best raw read (>= 0.9x), "
            f"{ratio(c, runai)} of runai's best (>= 1.0x)"
            + (
                f"; round by round against runai's faster: {', '.join(f'{x:.2f}x' for x in paired)}"
                if paired and theirs
                else ""
            )
        )
        if "stops" in rows:
            s = rows["stops"]
            lines.append(
                "stops: "
                + ", ".join(f"{k} {v:.3f} s" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
            )
    if res.get("folders"):
        lines += [
            "\n### Hugging Face folders against the same bytes as one safetensors file (weightd load, s)\n",
            "| folder | MiB | shards | cold folder | cold one file | cold ratio "
            "| warm folder | warm one file | warm ratio | peak shared memory, folder / one file (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in res["folders"].items():

            def sec(k, r=r):
                return r.get(k, {}).get("seconds")

            cf, co, wf, wo = (
                sec("cold folder"),
                sec("cold one file"),
                sec("warm folder"),
                sec("warm one file"),
            )
            shared = [
                max((r.get(f"{s} {w}", {}).get("shared_peak", 0) for s in ("cold", "warm")), default=0)
                for w in ("folder", "one file")
            ]
            lines.append(
                f"| {label} | {r['bytes'] / MiB:.0f} | {r['shards']} | {cf or 0:.2f} | {co or 0:.2f} | "
                f"{ratio(cf, co)} | {wf or 0:.2f} | {wo or 0:.2f} | {ratio(wf, wo)} "
                f"| {shared[0] / MiB:.0f} / {shared[1] / MiB:.0f} |"
            )
        lines.append(
            "\ntargets: dense folder <= 1.2x its one file, MoE <= 2x; round by round (folder / its file):"
        )
        for label, r in res["folders"].items():
            each = []
            for state in ("cold", "warm"):
                f, o = (r.get(f"{state} {w}", {}).get("runs") or [] for w in ("folder", "one file"))
                each.append(f"{state} " + ", ".join(f"{a / b:.2f}x" for a, b in zip(f, o)))
            lines.append(f"- {label}: {'; '.join(each)}")
        cpus = len(os.sched_getaffinity(0))
        lines.append(
            f"\nCPU seconds of the median runs: the daemon's, plus the loader's fork for a folder "
            f"(from_pretrained and the guess of what to copy early); no load can take less than its "
            f"CPU seconds / {cpus} CPUs:"
        )
        for label, r in res["folders"].items():
            each = []
            for state in ("cold", "warm"):
                f, o = (r.get(f"{state} {w}") or {} for w in ("folder", "one file"))
                if "cpu_seconds" not in f or "cpu_seconds" not in o:
                    continue
                total = f["cpu_seconds"] + f.get("loader_cpu_seconds", 0)
                each.append(
                    f"{state} folder {f['cpu_seconds']:.2f} + {f.get('loader_cpu_seconds', 0):.2f} s, "
                    f"one file {o['cpu_seconds']:.2f} s ({o['cpu_seconds'] / o['seconds'] / cpus:.0%} of "
                    f"the CPUs); the folder's floor {total / cpus:.2f} s = "
                    f"{ratio(total / cpus, o['seconds'])} its one file"
                )
            lines.append(f"- {label}: {'; '.join(each)}")
        if "loader start" in res:
            lines.append(
                f"(each median of {args.reps}; the daemon's first folder, which starts its loader process "
                f"and imports torch and transformers there, took {res['loader start']:.2f} s, not in these "
                "rows)"
            )
    if res.get("huge"):
        h = res["huge"]
        if "skipped" in h:
            lines.append(f"\nhuge pages: skipped ({h['skipped']})")
        else:
            fa, plain = h.get("fallocate GB/s", {}), h.get("plain fill GB/s", {})
            gb = h["huge pages"]["bytes"] / 1e9
            lines += [
                "\n### Huge-page segments (--shm-dir on a huge=always tmpfs), warm, GB/s\n",
                "| | huge pages | 4 KiB pages (/dev/shm) |",
                "|---|---:|---:|",
                f"| weightd load (median of {len(h['huge pages']['runs'])}) | {gbps(h['huge pages']):.2f} | "
                f"{gbps(h['4 KiB pages']):.2f} |",
                f"| weightd load, a fresh daemon's first | {gb / h['huge pages']['first']:.2f} | "
                f"{gb / h['4 KiB pages']['first']:.2f} |",
                f"| weightd load, page cache dropped (median of {args.reps}) | "
                f"{gbps(h['huge pages'].get('cold')) or 0:.2f} | "
                f"{gbps(h['4 KiB pages'].get('cold')) or 0:.2f} |",
                "| daemon CPU s/GiB, warm / cold | "
                + " | ".join(
                    f"{h[k].get('cpu_per_gib', 0):.2f} / {(h[k].get('cold') or {}).get('cpu_per_gib', 0):.2f}"
                    for k in ("huge pages", "4 KiB pages")
                )
                + " |",
                "| plain fill: fallocate + preadv into a mapping, 2 threads | "
                f"{plain.get('huge pages', 0):.2f} | "
                f"{plain.get('4 KiB pages', 0):.2f} |",
                f"| posix_fallocate alone | {fa.get('huge pages', 0):.2f} | {fa.get('4 KiB pages', 0):.2f} |",
            ]
    return lines


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(res["files"])
    if not labels:  # folders only (--sizes with none)
        return
    fig, axes = plt.subplots(1, len(labels), figsize=(7 * len(labels), 5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        rows = res["files"][label]
        names = [k for k in rows.get("warm", {}) if k != "skipped"]
        ceil = rows.get("ceilings", {})
        ys = range(len(names) + len(ceil))
        cold = [gbps(rows.get("cold", {}).get(n)) or 0 for n in names] + [0] * len(ceil)
        warm_ = [gbps(rows["warm"].get(n)) or 0 for n in names] + list(ceil.values())
        ax.barh([y - 0.2 for y in ys], cold, height=0.4, label="page cache dropped")
        ax.barh([y + 0.2 for y in ys], warm_, height=0.4, label="warm (ceilings: measured)")
        ax.set_yticks(list(ys), names + [f"ceiling: {k}" for k in ceil], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s")
        ax.set_title(f"{label} checkpoint into shared memory")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", type=float, nargs="*", default=[1, 3, 8], help="GiB of the files (none: folders only)"
    )
    p.add_argument(
        "--stop-sizes", type=float, nargs="*", default=[3, 8], help="sizes whose loads are stopped"
    )
    p.add_argument("--quick", action="store_true", help="256 MiB files and small folders")
    p.add_argument("--reps", type=int, default=3, help="rounds of every row (the median is shown)")
    p.add_argument("--no-pt", action="store_true", help="skip the .pt rows (half the disk)")
    p.add_argument("--no-folders", action="store_true")
    p.add_argument("--no-huge", action="store_true", help="skip the huge-page rows")
    p.add_argument(
        "--stops-only", action="store_true", help="only the stops, at --sizes (to load_stops.json)"
    )
    p.add_argument("--serve", nargs=argparse.REMAINDER, default=[], help="extra serve options (last)")
    p.add_argument(
        "--dir", default=None, help="where to write the checkpoints [default: a temp folder in /tmp]"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.stop_sizes = [0.25], [0.25]
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"sizes": args.sizes, "cpus": os.cpu_count(), "serve": args.serve, "files": {}, "folders": {}}
    tmp = Path(tempfile.mkdtemp(prefix="weightd-load-", dir=args.dir))
    b = Bench(tmp, args)
    try:
        block = random_block()
        part_files(b, args, res, block)
        if not args.no_folders and not args.stops_only:
            part_folders(b, args, res)
        if not args.stops_only and not args.no_huge:
            part_huge(b, args, res, block)
    finally:
        b.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.stops_only:
        (OUT / "load_stops.json").write_text(json.dumps(res, indent=2))
        for label, rows in res["files"].items():
            print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows["stops"].items()})
        return 0
    (OUT / "load.json").write_text(json.dumps(res, indent=2))
    plot(res, OUT / "load.png")
    print("\n".join(report(res, args)))
    print(f"\nwrote {OUT / 'load.json'} and {OUT / 'load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Publish throughput, publish-to-attach latency, and repeated publishes.

    python benchmarks/publish.py              # ~1 GiB module
    python benchmarks/publish.py --quick      # ~256 MiB module
    python benchmarks/publish.py --repeated   # only part 3 (~1 min)

1. Publish. ``Client.publish(name, module)`` of an ``nn.Module`` of Linear layers (float32 and
   bfloat16, a few hundred tensors) against copying the same bytes, from the same source
   tensors, by hand:

   - torch ``copy_`` into a preallocated, already-touched buffer (a warm memcpy: no faults);
   - numpy ``copyto`` and torch ``copy_`` into a fresh ``MAP_SHARED`` mapping of a new file
     in /dev/shm (open + ftruncate + mmap + copy: every page is faulted in during the copy,
     as it must be for any publish);
   - the same with ``posix_fallocate`` first, which is what a weightd segment does to turn a
     full /dev/shm into an error instead of a SIGBUS;
   - os.pwrite into a fresh /dev/shm file (no mapping, so no page-table faults).

   Two diagnostic publish rows change only this process: torch limited to one thread, and
   weightd's per-storage fill (a torch ``copy_``, which OpenMP splits over threads) swapped
   for ``np.copyto``. Everything is measured again with 3 busy-looping processes per CPU.

   Each repeat runs every method once, interleaved, so drift hits all of them alike; the
   publish is split in sections (timed by wrapping weightd's functions in this process).
   Between repeats the published model is unloaded (not timed), so no freeing of old
   generations runs in the background of a timed publish.

2. Publish -> attach. A separate, already-running client process is told (over a pipe) the
   moment ``publish`` returns; it then calls ``state_dict(name)`` until the tensors it gets
   hold the new generation's marker. Reported: from publish returning to that ``state_dict``
   returning, and how many tries it took (1 means the first attach already saw it).

3. Repeated publishes (RL weight updates): ten consecutive publishes of the same ~1 GiB module
   under one name, to a daemon on /dev/shm and to one on a huge-page tmpfs (``--shm-dir``,
   mounted here as root; skipped otherwise). From the third on, each is written into the pages
   of a retired generation nobody maps (Note [reusing a segment's pages] in weightd/daemon/
   store.py); the first two get fresh pages. Each publish is followed by a torch ``copy_`` of
   the same bytes into an already-touched buffer (interleaved, so drift hits both alike).
   Targets: the tenth publish >= 0.7x the warm copy, and >= 3x a fresh-page publish on /dev/shm.
   Written to publish_repeated.json / .png.

Restart to serving is measured by benchmarks/restart.py.

Writes benchmarks/out/publish.json and benchmarks/out/publish.png. Every daemon and client it
starts is stopped, and every segment of its instances removed, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import mmap
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from weightd import segment
from weightd.bench import spawn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
PY = sys.executable
GB = 1e9  # bandwidths are in GB/s (10^9 bytes per second)
GiB = 1 << 30
MiB = 1 << 20

PUBLISH = "publish"
SHM_REF = "numpy copyto (fresh shm mmap)"
TARGET_PUBLISH_RATIO = 0.7  # publish GB/s over the memory-copy GB/s


# --- the watcher child (part 2) ---------------------------------------------------------------


def watch_main(sock: str, name: str) -> None:
    """A client process that attaches whenever told that a publish returned."""
    from weightd.client import Client

    c = Client(sock, timeout=30)
    warm = []
    for _ in range(21):
        t0 = time.monotonic()
        sd = c.state_dict(name)
        int(sd["marker"][0])
        warm.append(time.monotonic() - t0)
        del sd
    print(f"ready {statistics.median(warm)!r}", flush=True)
    for line in sys.stdin:
        r = int(line.split()[0])
        if r < 0:
            break
        t_wake = time.monotonic()
        tries = 0
        while True:
            tries += 1
            t_a = time.monotonic()
            sd = c.state_dict(name)
            seen = int(sd["marker"][0])
            t_b = time.monotonic()
            del sd
            if seen == r or t_b - t_wake > 10:
                break
        print(f"{r} {seen} {tries} {t_wake!r} {t_a!r} {t_b!r}", flush=True)
    c.close()


# --- processes, segments, cleanup ---------------------------------------------------------------


class Harness:
    """Owns every process, instance and file this benchmark makes, and removes them all."""

    def __init__(self):
        self.tag = f"pubbench-{os.getpid()}-{secrets.token_hex(3)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="weightd-pubbench-"))
        self.procs: list[subprocess.Popen] = []

    def instance(self, what: str) -> str:
        return f"{self.tag}-{what}"

    def socket(self, what: str) -> str:
        d = self.tmp / what
        d.mkdir(exist_ok=True)
        return str(d / "w.sock")

    def start_daemon(self, sock: str, instance: str, *, log: Path) -> subprocess.Popen:
        p = spawn.Daemon(sock, instance, ["--unlink-on-exit"], log=log).start(wait=False).proc
        self.procs.append(p)
        return p

    def start_watcher(self, sock: str, name: str) -> subprocess.Popen:
        with open(self.tmp / "watcher.log", "ab") as f:
            p = subprocess.Popen(
                [PY, str(Path(__file__).resolve()), "--_watch", sock, name],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=f,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def start_hog(self) -> subprocess.Popen:
        p = subprocess.Popen(
            [PY, "-S", "-c", "while True: pass"], stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.procs.append(p)
        return p

    @staticmethod
    def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Signal ``p`` and wait for it; returns how long it took to exit."""
        if p.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise RuntimeError(
                f"pid {p.pid} did not exit within {timeout:g} s of signal {sig}: killed it"
            ) from None
        return time.monotonic() - t0

    def segments(self) -> list[str]:
        return [n.lstrip("/") for n in segment.Folder().segments(segment.prefix(self.tag)[:-1] + "-")]

    def cleanup(self) -> list[str]:
        problems = []
        for p in self.procs:
            if p.poll() is None:
                for stream in (p.stdin, p.stdout):
                    with contextlib.suppress(Exception):
                        if stream:
                            stream.close()
                try:
                    self.stop(p, signal.SIGTERM, timeout=20)
                except Exception as e:  # noqa: BLE001
                    problems.append(str(e))
        for e in self.segments():
            segment.unlink(segment.Folder(), "/" + e)
            problems.append(f"removed leftover segment {segment.Folder().file(e)}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def wait_ready(sock: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> float:
    """Poll ping until the daemon answers; returns time.monotonic() of the first answer."""
    from weightd.client import Client, DaemonNotRunning

    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(sock, timeout=5) as c:
                c.ping()
            return time.monotonic()
        except DaemonNotRunning:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before serving:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon not serving after {timeout:g} s:\n{_tail(log)}")
        time.sleep(0.002)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


# --- part 1: publish against memory copies ------------------------------------------------------


def make_module(unit: int, n32: int, n16: int):
    """Linear(unit, unit) layers: ``n32`` in float32, then ``n16`` in bfloat16, every page touched."""
    import torch
    from torch import nn

    layers = [nn.Linear(unit, unit, device="meta") for _ in range(n32)]
    layers += [nn.Linear(unit, unit, device="meta", dtype=torch.bfloat16) for _ in range(n16)]
    module = nn.Sequential(*layers).to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.fill_(float(i % 97) / 97)
    return module


def storages_of(state: dict):
    """The distinct storages of a state dict, as flat uint8 tensors (what a publish copies)."""
    import torch

    seen, out = set(), []
    for t in state.values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out.append(torch.empty(0, dtype=torch.uint8).set_(s))
    return out


def offsets_for(srcs) -> tuple[list[int], int]:
    """Offsets as weightd lays storages out (64-byte, large ones 4 KiB aligned)."""
    from weightd.manifest import align_up, storage_alignment

    offs, off = [], 4096
    for s in srcs:
        off = align_up(off, storage_alignment(s.numel()))
        offs.append(off)
        off += s.numel()
    return offs, align_up(off, 4096)


class ShmFile:
    """A fresh file in /dev/shm (named under our instance prefix, so cleanup finds it)."""

    def __init__(self, name: str, size: int, fallocate: bool):
        self.path = f"/dev/shm/{name}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if fallocate:
                os.posix_fallocate(self.fd, 0, size)
            else:
                os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "buf", None) is not None:
            with contextlib.suppress(BufferError):
                self.buf.close()
            self.buf = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def copy_warm(dst, srcs, offs) -> None:
    for s, o in zip(srcs, offs):
        dst[o : o + s.numel()].copy_(s)


def copy_warm_numpy(dst, srcs, offs) -> None:
    import numpy as np

    for s, o in zip(srcs, offs):
        np.copyto(dst[o : o + s.numel()], s.numpy())


def copy_shm(h: Harness, srcs, offs, size: int, *, how: str, fallocate: bool) -> None:
    import numpy as np
    import torch

    if how == "pwrite":
        path = f"/dev/shm/weightd.{h.instance('baseline')}.{secrets.token_hex(4)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            for s, o in zip(srcs, offs):
                view, done = memoryview(s.numpy()), 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], o + done)
        finally:
            os.close(fd)
            os.unlink(path)
        return
    f = ShmFile(f"weightd.{h.instance('baseline')}.{secrets.token_hex(4)}", size, fallocate)
    try:
        if how == "numpy":
            dst = np.frombuffer(f.buf, dtype=np.uint8)
            for s, o in zip(srcs, offs):
                np.copyto(dst[o : o + s.numel()], s.numpy())
        else:
            dst = torch.frombuffer(f.buf, dtype=torch.uint8)
            for s, o in zip(srcs, offs):
                dst[o : o + s.numel()].copy_(s)
        del dst
    finally:
        f.close()


class Sections:
    """Times weightd's own steps of a publish by wrapping its functions in this process only."""

    def __init__(self):
        self.now: dict[str, float] | None = None

    def add(self, key: str, dt: float) -> None:
        if self.now is not None:
            self.now[key] = self.now.get(key, 0.0) + dt

    def wrap(self, owner, attr: str, key) -> None:
        original = getattr(owner, attr)
        sections = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                k = key(*args, **kwargs) if callable(key) else key
                sections.add(k, time.perf_counter() - t0)

        setattr(owner, attr, timed)

    def install(self) -> None:
        from weightd import layout
        from weightd.client import client as client_mod

        self.wrap(client_mod.Client, "call", lambda self_, op, **kw: f"rpc {op}")
        self.wrap(layout, "from_tensors", "from_tensors")
        self.wrap(layout, "write", "layout.write")
        create = segment.Segment.create.__func__
        self.wrap(segment.os, "posix_fallocate", "posix_fallocate")
        seg_cls = segment.Segment

        def create_timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return create(seg_cls, *a, **k)
            finally:
                self.add("Segment.create", time.perf_counter() - t0)

        segment.Segment.create = staticmethod(create_timed)
        self.wrap(segment.Segment, "write_manifest", "manifest+seal")
        self.wrap(segment.Segment, "seal", "manifest+seal")
        self.wrap(segment.Segment, "close", "close")

    @contextlib.contextmanager
    def measure(self, into: dict):
        self.now = into
        try:
            yield
        finally:
            self.now = None


def part_publish(h: Harness, args, res: dict, sections: Sections) -> None:
    import torch

    from weightd.client import Client

    unit, n32, n16 = (512, 192, 128) if args.quick else (1024, 192, 128)
    module = make_module(unit, n32, n16)
    state = module.state_dict()
    srcs = storages_of(state)
    offs, size = offsets_for(srcs)
    nbytes = sum(s.numel() for s in srcs)
    res["module"] = {
        "tensors": len(state),
        "storages": len(srcs),
        "nbytes": nbytes,
        "layers": f"{n32} x Linear({unit},{unit}) float32 + {n16} x bfloat16",
    }
    print(f"module: {len(state)} tensors, {nbytes / MiB:.0f} MiB ({res['module']['layers']})", flush=True)

    sock, inst = h.socket("pub"), h.instance("pub")
    log = h.tmp / "pub.log"
    daemon = h.start_daemon(sock, inst, log=log)
    wait_ready(sock, daemon, log)
    client = Client(sock, timeout=120)
    # warm-up: first use of every code path (imports, allocator), not measured
    client.publish("warmup", {"w": torch.ones(1024)})
    client.unload("warmup")
    warm_dst = torch.zeros(size, dtype=torch.uint8)
    warm_np = warm_dst.numpy()  # the same touched buffer
    copy_warm(warm_dst, srcs, offs)
    copy_shm(h, srcs[:4], offs[:4], offs[4], how="torch", fallocate=True)

    methods = {
        PUBLISH: lambda: client.publish("bench", module),
        "torch copy_ (warm buffer)": lambda: copy_warm(warm_dst, srcs, offs),
        "numpy copyto (warm buffer)": lambda: copy_warm_numpy(warm_np, srcs, offs),
        SHM_REF: lambda: copy_shm(h, srcs, offs, size, how="numpy", fallocate=False),
        "numpy copyto (fresh shm, fallocate)": lambda: copy_shm(
            h, srcs, offs, size, how="numpy", fallocate=True
        ),
        "torch copy_ (fresh shm, fallocate)": lambda: copy_shm(
            h, srcs, offs, size, how="torch", fallocate=True
        ),
        "os.pwrite (fresh shm file, no mmap)": lambda: copy_shm(
            h, srcs, offs, size, how="pwrite", fallocate=False
        ),
    }

    def run(methods: dict, repeats: int, *, record: bool) -> dict:
        times = {k: [] for k in methods}
        print("  methods: " + " | ".join(methods), flush=True)
        for r in range(repeats):
            for label, fn in methods.items():
                gc.collect()
                if label == PUBLISH:
                    parts: dict[str, float] = {}
                    with sections.measure(parts):
                        t0 = time.perf_counter()
                        info = fn()
                        dt = time.perf_counter() - t0
                    if label == PUBLISH and record:
                        parts["total"] = dt
                        parts["fill = layout.write - create - manifest - close"] = parts[
                            "layout.write"
                        ] - sum(parts.get(k, 0.0) for k in ("Segment.create", "manifest+seal", "close"))
                        breakdown.append(parts)
                    assert info["nbytes"] == nbytes, (info["nbytes"], nbytes)
                    t0 = time.perf_counter()
                    client.unload("bench")  # frees the segment now: nothing is freed during the next timing
                    if record:
                        unload_s.append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                times[label].append(dt)
            print(
                f"  repeat {r + 1}/{repeats}, GB/s: "
                + " | ".join(f"{nbytes / v[-1] / GB:.2f}" for v in times.values()),
                flush=True,
            )
        return times

    breakdown, unload_s = [], []
    times = run(methods, args.repeats, record=True)

    # The same, while every CPU is oversubscribed (3 busy-looping processes per CPU), as in a
    # trainer whose data loaders keep every core busy when it publishes.
    hog_n = 3 * (os.cpu_count() or 1)
    busy = [
        PUBLISH,
        "torch copy_ (warm buffer)",
        "numpy copyto (warm buffer)",
        SHM_REF,
        "os.pwrite (fresh shm file, no mmap)",
    ]
    print(f"  with {hog_n} busy-looping processes on {os.cpu_count()} CPUs:", flush=True)
    hogs = [h.start_hog() for _ in range(hog_n)]
    try:
        time.sleep(0.5)
        loaded_times = run({k: methods[k] for k in busy}, args.contended_repeats, record=False)
    finally:
        for p in hogs:
            Harness.stop(p, signal.SIGKILL)
    warm_dst = warm_np = None  # noqa: F841 (the lambdas above hold them)
    client.close()
    Harness.stop(daemon)

    def stats(ts):
        return {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "samples_s": ts,
            "gbps": nbytes / statistics.median(ts) / GB,
        }

    res["publish"] = {"repeats": args.repeats, "methods": {k: stats(v) for k, v in times.items()}}
    res["publish_contended"] = {
        "busy_processes": hog_n,
        "repeats": args.contended_repeats,
        "methods": {k: stats(v) for k, v in loaded_times.items()},
    }
    keys = sorted(
        {k for b in breakdown for k in b},
        key=lambda k: -statistics.median([b.get(k, 0.0) for b in breakdown]),
    )
    res["publish"]["breakdown_median_s"] = {
        k: statistics.median([b.get(k, 0.0) for b in breakdown]) for k in keys
    }
    res["publish"]["unload_1_segment_median_s"] = statistics.median(unload_s)
    res["_module"] = module  # reused by part 2, dropped before the JSON is written


# --- part 2: publish returns -> a running client's new attach sees it --------------------------


def part_latency(h: Harness, args, res: dict) -> None:
    import torch

    from weightd.client import Client

    module = res.pop("_module")
    state = module.state_dict()
    sock, inst = h.socket("lat"), h.instance("lat")
    log = h.tmp / "lat.log"
    daemon = h.start_daemon(sock, inst, log=log)
    wait_ready(sock, daemon, log)
    client = Client(sock, timeout=120)
    client.publish("live", {**state, "marker": torch.tensor([0])})
    watcher = h.start_watcher(sock, "live")
    line = watcher.stdout.readline().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"watcher did not start:\n{_tail(h.tmp / 'watcher.log')}")
    steady_attach = float(line[1])
    rows = []
    for r in range(1, args.rounds + 1):
        time.sleep(0.3)
        t0 = time.monotonic()
        client.publish("live", {**state, "marker": torch.tensor([r])})
        t_ret = time.monotonic()
        watcher.stdin.write(f"{r}\n")
        watcher.stdin.flush()
        got = watcher.stdout.readline().split()
        if len(got) != 6:
            raise RuntimeError(f"watcher failed:\n{_tail(h.tmp / 'watcher.log')}")
        _, seen, tries, t_wake, t_a, t_b = int(got[0]), int(got[1]), int(got[2]), *map(float, got[3:])
        if seen != r:
            raise RuntimeError(f"round {r}: the watcher still saw marker {seen} 10 s after publish returned")
        rows.append(
            {
                "publish_s": t_ret - t0,
                "latency_s": t_b - t_ret,
                "wake_s": t_wake - t_ret,
                "last_attach_s": t_b - t_a,
                "tries": tries,
            }
        )
    watcher.stdin.write("-1\n")
    watcher.stdin.flush()
    watcher.wait(30)
    client.close()
    Harness.stop(daemon)
    lat = [x["latency_s"] for x in rows]
    res["latency"] = {
        "rounds": rows,
        "median_s": statistics.median(lat),
        "min_s": min(lat),
        "max_s": max(lat),
        "wake_median_s": statistics.median([x["wake_s"] for x in rows]),
        "attach_median_s": statistics.median([x["last_attach_s"] for x in rows]),
        "steady_attach_median_s": steady_attach,
        "first_try": sum(x["tries"] == 1 for x in rows),
        "publish_median_s": statistics.median([x["publish_s"] for x in rows]),
    }


# --- part 3: repeated publishes under one name ---------------------------------------------------


TARGET_REPEATED_VS_WARM = 0.7
TARGET_REPEATED_VS_FRESH = 3.0


def part_repeated(h: Harness, args, res: dict) -> None:
    import torch

    from weightd.client import Client

    unit, n32, n16 = (512, 192, 128) if args.quick else (1024, 192, 128)
    module = make_module(unit, n32, n16)
    srcs = storages_of(module.state_dict())
    offs, size = offsets_for(srcs)
    nbytes = sum(s.numel() for s in srcs)
    warm_dst = torch.zeros(size, dtype=torch.uint8)
    # One thread, as a publish writes (pwrite, single-threaded): torch's copy_ over several
    # threads stalls whenever other processes hold the cores, and then measures the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    copy_warm(warm_dst, srcs, offs)
    out = res["repeated"] = {
        "nbytes": nbytes,
        "dirs": {},
        "publishes": args.publishes,
        "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    with spawn.huge_tmpfs(3 * nbytes + 64 * MiB) as huge:
        dirs = {"/dev/shm (4 KiB pages)": None}
        if huge is None:
            out["skipped"] = "huge pages: mounting a tmpfs was refused (run as root)"
        else:
            dirs["huge-page tmpfs"] = huge
        for label, where in dirs.items():
            sock, inst = h.socket(f"rep{len(out['dirs'])}"), h.instance(f"rep{len(out['dirs'])}")
            flags = ["--unlink-on-exit"] + (["--shm-dir", where] if where else [])
            d = spawn.Daemon(sock, inst, flags, log=h.tmp / f"rep{len(out['dirs'])}.log")
            h.procs.append(d.start(wait=False).proc)
            wait_ready(sock, d.proc, d.log)
            client = Client(sock, timeout=120)
            client.publish("warmup", {"w": torch.ones(1024)})
            client.unload("warmup")
            pubs, warms = [], []
            for _ in range(args.publishes):
                gc.collect()
                t0 = time.perf_counter()
                client.publish("rl", module)
                pubs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                copy_warm(warm_dst, srcs, offs)
                warms.append(time.perf_counter() - t0)
            reused = d.output().count("into the pages of generation")
            client.close()
            h.stop(d.proc)
            out["dirs"][label] = {"publish_s": pubs, "warm_copy_s": warms, "reused": reused}
            print(
                f"  {label}: publishes {' '.join(f'{t * 1e3:.0f}' for t in pubs)} ms; warm copy median "
                f"{statistics.median(warms) * 1e3:.0f} ms; {reused} reused",
                flush=True,
            )
    torch.set_num_threads(threads)


# --- report ----------------------------------------------------------------------------------------


def report_repeated(res: dict) -> list[str]:
    rep = res["repeated"]
    gb = rep["nbytes"] / GB
    lines = [
        "",
        f"3. {rep['publishes']} consecutive publishes of a {rep['nbytes'] / GiB:.2f} GiB module under one "
        "name (the first two on fresh pages, the rest into a retired generation's pages), each followed by a "
        "torch copy_ into a touched buffer",
        f"   {'where':24s} {'fresh (1st)':>11s} {'fresh (2nd)':>11s} {'tenth':>9s} {'GB/s':>6s} "
        f"{'warm copy':>9s} {'/warm':>6s} {'/fresh shm':>10s}",
    ]
    shm = next(iter(rep["dirs"].values()))
    fresh_ref = statistics.median(shm["publish_s"][:2])
    checks = []
    for label, r in rep["dirs"].items():
        p, warm = r["publish_s"], statistics.median(r["warm_copy_s"])
        tenth = p[-1]
        lines.append(
            f"   {label:24s} {p[0] * 1e3:9.0f}ms {p[1] * 1e3:9.0f}ms {tenth * 1e3:7.0f}ms {gb / tenth:6.2f} "
            f"{warm * 1e3:7.0f}ms {warm / tenth:5.2f}x {fresh_ref / tenth:9.2f}x"
        )
        checks.append(
            f"   {label}: tenth publish {warm / tenth:.2f}x the warm copy "
            f"(target >= {TARGET_REPEATED_VS_WARM}x: "
            f"{'met' if warm / tenth >= TARGET_REPEATED_VS_WARM else 'MISSED'}), {fresh_ref / tenth:.2f}x a "
            f"fresh-page publish on /dev/shm (target >= {TARGET_REPEATED_VS_FRESH}x: "
            f"{'met' if fresh_ref / tenth >= TARGET_REPEATED_VS_FRESH else 'MISSED'}); "
            f"{r['reused']} of {rep['publishes']} reused pages"
        )
    lines += checks
    if rep.get("skipped"):
        lines.append(f"   {rep['skipped']}")
    return lines


def plot_repeated(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = res["repeated"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in rep["dirs"].items():
        xs = range(1, len(r["publish_s"]) + 1)
        ax.plot(xs, [t * 1e3 for t in r["publish_s"]], "-o", label=f"publish, {label}")
        warm = [t * 1e3 for t in r["warm_copy_s"]]
        ax.plot(xs, warm, ":", label=f"copy_ into touched memory ({label} run)")
    ax.set(
        xlabel="publish number (same name)",
        ylabel="ms",
        title=f"Consecutive publishes of {rep['nbytes'] / GiB:.2f} GiB",
        xticks=list(range(1, rep["publishes"] + 1)),
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ms(s: float) -> str:
    return f"{s * 1e3:8.1f} ms"


def report(res: dict) -> list[str]:
    lines = []
    p = res["publish"]
    nbytes = res["module"]["nbytes"]
    meth = p["methods"]
    ref_warm = meth["torch copy_ (warm buffer)"]["gbps"]
    ref_shm = meth[SHM_REF]["gbps"]
    lines.append(
        f"1. Publish of a {nbytes / GiB:.2f} GiB module ({res['module']['tensors']} tensors, "
        f"{res['module']['layers']}), median of {p['repeats']}"
    )
    lines.append(
        f"   load average at start {res['environment']['loadavg_start']}, at end {res.get('loadavg_end')} "
        f"on {res['environment']['cpus']} CPUs"
    )
    lines.append(
        f"   {'method':38s} {'median':>9s} {'min':>9s} {'max':>9s} {'GB/s':>6s} {'/torch warm':>11s} "
        f"{'/numpy shm':>10s}"
    )
    for k, m in meth.items():
        lines.append(
            f"   {k:38s} {m['median_s']:8.3f}s {m['min_s']:8.3f}s {m['max_s']:8.3f}s {m['gbps']:6.2f} "
            f"{m['gbps'] / ref_warm:10.2f}x {m['gbps'] / ref_shm:9.2f}x"
        )
    ratio_warm = meth[PUBLISH]["gbps"] / ref_warm
    ratio_shm = meth[PUBLISH]["gbps"] / ref_shm
    lines.append(
        f"   target publish >= {TARGET_PUBLISH_RATIO}x memory copy: {ratio_warm:.2f}x the torch warm copy "
        f"[{'met' if ratio_warm >= TARGET_PUBLISH_RATIO else 'NOT met'}], {ratio_shm:.2f}x the fresh-shm "
        "copy "
        f"[{'met' if ratio_shm >= TARGET_PUBLISH_RATIO else 'NOT met'}] (the fair one: both fault in new "
        "pages)"
    )
    pc = res["publish_contended"]
    cm = pc["methods"]
    lines.append(
        f"   the same with {pc['busy_processes']} busy-looping processes on {res['environment']['cpus']} "
        "CPUs "
        f"(median of {pc['repeats']}):"
    )
    for k, m in cm.items():
        lines.append(
            f"   {k:38s} {m['median_s']:8.3f}s {m['min_s']:8.3f}s {m['max_s']:8.3f}s {m['gbps']:6.2f} "
            f"{m['gbps'] / cm['torch copy_ (warm buffer)']['gbps']:10.2f}x "
            f"{m['gbps'] / cm[SHM_REF]['gbps']:9.2f}x"
        )
    lines.append("   where publish's time goes (median per section of the default publish, this process):")
    for k, v in p["breakdown_median_s"].items():
        lines.append(f"     {k:28s} {ms(v)}")
    lines.append(
        f"   (not timed) unload of one {nbytes / GiB:.2f} GiB generation, freed synchronously by the daemon: "
        f"{ms(p['unload_1_segment_median_s']).strip()}"
    )
    lat = res["latency"]
    lines.append("")
    lines.append(
        f"2. Publish returns -> new state_dict in a running client sees it ({len(lat['rounds'])} rounds)"
    )
    lines.append(
        "   publish returned -> state_dict returned the new generation: median "
        f"{ms(lat['median_s']).strip()} "
        f"(min {ms(lat['min_s']).strip()}, max {ms(lat['max_s']).strip()})"
    )
    lines.append(
        f"     of which: pipe wake-up {ms(lat['wake_median_s']).strip()}, the state_dict call "
        f"{ms(lat['attach_median_s']).strip()} (same generation, steady: "
        f"{ms(lat['steady_attach_median_s']).strip()})"
    )
    lines.append(
        f"   first attach after publish returned already saw it: {lat['first_try']}/{len(lat['rounds'])}"
    )
    lines.append(f"   publish with the watcher attached: median {lat['publish_median_s']:.3f} s")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 1.2]})
    meth = res["publish"]["methods"]
    labels = list(meth)
    vals = [meth[k]["gbps"] for k in labels]
    colors = ["tab:blue" if k.startswith(PUBLISH) else "tab:gray" for k in labels]
    ax = axes[0]
    ax.barh(range(len(labels)), vals, color=colors)
    ax.set_yticks(range(len(labels)), [k.replace(" (", "\n(") for k in labels], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("GB/s (median)")
    ax.set_title(f"publish of {res['module']['nbytes'] / GiB:.2f} GiB vs copying the same bytes", fontsize=10)

    ax = axes[1]
    lat = res["latency"]
    ax.bar(
        ["publish\u2192attach"],
        [lat["median_s"] * 1e3],
        color="tab:blue",
        yerr=[[(lat["median_s"] - lat["min_s"]) * 1e3], [(lat["max_s"] - lat["median_s"]) * 1e3]],
        capsize=6,
    )
    ax.set_ylabel("ms (median, min-max)")
    ax.set_title("publish returns \u2192 new attach sees it", fontsize=10)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    import torch

    def read(p):
        try:
            return Path(p).read_text().strip()
        except OSError:
            return None

    mem = {}
    for line in (read("/proc/meminfo") or "").splitlines():
        k, _, v = line.partition(":")
        mem[k] = v.strip()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "mem_total": mem.get("MemTotal"),
        "thp_shmem": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "when": datetime.now().isoformat(timespec="seconds"),
        "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def check_room(args) -> None:
    need = (3 if args.quick else 10) * GiB
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    st = os.statvfs("/dev/shm")
    shm_free = st.f_bavail * st.f_frsize
    if avail < need or shm_free < need * 0.6:
        raise SystemExit(
            f"needs about {need / GiB:.0f} GiB of free memory and {need * 0.6 / GiB:.0f} GiB in /dev/shm; "
            f"have {avail / GiB:.1f} GiB and {shm_free / GiB:.1f} GiB"
        )


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--_watch":
        watch_main(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (~25 s)")
    ap.add_argument("--repeats", type=int, default=None, help="publish repeats [5; quick 3]")
    ap.add_argument("--rounds", type=int, default=None, help="publish->attach rounds [9; quick 3]")
    ap.add_argument("--repeated", action="store_true", help="only part 3: consecutive publishes")
    ap.add_argument("--publishes", type=int, default=10, help="consecutive publishes in part 3 [10]")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.contended_repeats = 1 if args.quick else 2
    check_room(args)

    # SIGTERM (e.g. from a CI timeout) unwinds through the finally below like Ctrl-C does.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    h = Harness()
    res: dict = {"quick": args.quick, "environment": environment()}
    sections = Sections()
    sections.install()
    started = time.monotonic()
    if args.repeated:
        try:
            print("3. consecutive publishes", flush=True)
            part_repeated(h, args, res)
        finally:
            for p in h.cleanup():
                print(f"cleanup: {p}", file=sys.stderr)
        lines = report_repeated(res)
        print("\n".join(lines))
        res["table"] = lines
        res["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "publish_repeated.json").write_text(json.dumps(res, indent=2) + "\n")
        plot_repeated(res, OUT / "publish_repeated.png")
        print(f"\nwrote {OUT / 'publish_repeated.json'} and {OUT / 'publish_repeated.png'}")
        return 0
    try:
        print("1. publish vs memory copies", flush=True)
        part_publish(h, args, res, sections)
        print("2. publish -> attach", flush=True)
        part_latency(h, args, res)
        print("3. consecutive publishes", flush=True)
        part_repeated(h, args, res)
    finally:
        res.pop("_module", None)
        problems = h.cleanup()
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
    res["seconds"] = time.monotonic() - started
    res["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = report(res) + report_repeated(res)
    print()
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    plot_repeated(res, OUT / "publish_repeated.png")
    res["table"] = lines
    (OUT / "publish.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, OUT / "publish.png")
    print(f"\nwrote {OUT / 'publish.json'} and {OUT / 'publish.png'} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

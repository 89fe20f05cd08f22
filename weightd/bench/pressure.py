"""Staying resident: forward passes of workers under memory pressure, weightd against the file.

A worker that ``safetensors.load_file``\\s its checkpoint gets tensors over a mapping of the file:
page cache, which the kernel takes back when memory is short and reads again on the next
touch (major faults, in the middle of a forward pass). A worker attached to weightd maps the
daemon's segment: shared memory, charged to the daemon, never dropped while it is loaded. So
the same limit on the workers' memory costs one of them its latency and the other nothing.

The pressure: the workers run in a memory cgroup of their own (v2 ``memory.high``, or v1
``memory.limit_in_bytes`` where the machine has the v1 hierarchy); once they are ready it is
limited to the anonymous memory the cgroup counts for them (their heaps, torch) plus a third of
the model, so the kernel must take pages back from them to stay under it; nothing else on the
machine is squeezed. Each case first runs without the limit (the reference), then with it.
Needs root (to make a cgroup): ``run`` returns None with the reason otherwise.

Note [a limit that evicts]
--------------------------
The limit is set from the cgroup's own count of anonymous memory (``memory.stat``), after the
workers are ready, not from their ``smaps`` ``Anonymous`` figure: that came out three times the
cgroup's ``rss`` here (220 against 77 MiB for one worker), so a limit built on it sat above all
the workers held and nothing was evicted (0 major faults for both methods in the stop-19 run).
A page of the file is charged to the cgroup that first read it, so the file is dropped from the
page cache before each case (``evict``); a segment's pages were written by the daemon and are
charged to it, never to the workers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20

WORKER = """
import json, os, sys, time, torch
cg, method, where, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = json.loads(sys.argv[5])
if cg:
    with open(cg, "w") as f:  # join the workers' cgroup before anything is loaded
        f.write(str(os.getpid()))
torch.set_num_threads(1)
from weightd.bench.demo import TinyLM
if method == "safetensors.load_file":
    from safetensors.torch import load_file
    with torch.device("meta"):
        model = TinyLM(**cfg)
    sd = load_file(where)  # tensors over a mapping of the file: page cache
    sd.setdefault("embed.weight", sd.get("lm_head.weight"))
    model.load_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, assign=True, strict=False)
    model.lm_head.weight = model.embed.weight
    model.inv_freq = TinyLM(vocab=8, dim=cfg["dim"], layers=0, heads=cfg["heads"]).inv_freq
else:
    from weightd.client import Client
    import functools
    with Client(where, timeout=120) as c:
        model = c.attach("m", model=functools.partial(TinyLM, **cfg))
model.eval()
ids = torch.randint(0, cfg["vocab"], (1, 8))
with torch.no_grad():
    model(ids)
anon = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("Anonymous:"):
        anon = int(line.split()[1]) * 1024
print(json.dumps({"ready": True, "anon": anon}), flush=True)
sys.stdin.readline()
def majflt():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[9])
times, f0 = [], majflt()
with torch.no_grad():
    for _ in range(iters):
        t = time.perf_counter(); model(ids); times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "majflt": majflt() - f0}), flush=True)
"""


@dataclass
class Case:
    method: str
    pressured: bool
    p50: float
    p99: float
    majflt: int
    anon: int


class Cgroup:
    """A memory cgroup for the workers only, under this process's own (v2, else v1)."""

    def __init__(self):
        self.path, self.v2 = _new_cgroup()

    def anonymous(self) -> int:
        """Anonymous memory charged to the cgroup (not its page cache nor shared memory)."""
        stat = dict(line.split() for line in Path(self.path, "memory.stat").read_text().splitlines())
        return int(stat["anon"] if self.v2 else stat["total_rss"])

    def limit(self, nbytes: int) -> None:
        """Limit the cgroup to ``nbytes`` now: the kernel reclaims down to it at once."""
        knob = "memory.high" if self.v2 else "memory.limit_in_bytes"
        try:
            Path(self.path, knob).write_text(str(nbytes))
        except OSError as e:  # v1: EBUSY where it cannot reclaim that much (anonymous, no swap)
            raise RuntimeError(
                f"cannot limit the workers to {nbytes >> 20} MiB ({e.strerror}): they hold more of their own"
            ) from None

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def remove(self) -> None:
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.05)  # its last process is still exiting


def _new_cgroup() -> tuple[str, bool]:
    name = f"weightd-pressure-{uuid.uuid4().hex[:8]}"
    own = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in own if ":memory:" in line), None)
    if v1 is not None and os.path.isdir("/sys/fs/cgroup/memory"):
        where = os.path.join("/sys/fs/cgroup/memory", v1.lstrip("/"), name)
        os.mkdir(where)
        return where, False
    v2 = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), "/")
    where = os.path.join("/sys/fs/cgroup", v2.lstrip("/"), name)
    os.mkdir(where)
    return where, True


def refused() -> str | None:
    """Why this machine cannot run the pressure measurement, or None."""
    try:
        cg = Cgroup()
    except OSError as e:
        return f"cannot make a memory cgroup for the workers ({e.strerror}): run as root"
    cg.remove()
    return None


def _workers(
    method: str, where: str, n: int, iters: int, cfg: dict, cg: Cgroup | None, share: int | None
) -> list[dict]:
    """``n`` workers' forward passes; with ``share``, once they are ready their cgroup is limited
    to its anonymous memory plus ``share`` bytes (Note [a limit that evicts])."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER), cg.procs if cg else "", method, where, str(iters)]
            + [json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    try:
        ready = [json.loads(p.stdout.readline() or '{"error": "no answer"}') for p in procs]
        if share is not None and cg is not None:
            cg.limit(cg.anonymous() + share)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        done = [json.loads(p.stdout.readline() or '{"error": "no answer"}') for p in procs]
        for r, d in zip(ready, done):
            d["anon"] = r.get("anon", 0)
            if "error" in d or "times" not in d:
                raise RuntimeError(f"a {method} worker failed (killed by the limit?): {d}")
        return done
    finally:
        for p in procs:
            p.kill()
            p.wait()


def evict(path) -> None:
    """Drop the file's pages from the page cache: the next read comes from the disk (a worker's
    read brings them in and is charged for them: the kernel charges a page to the cgroup that
    first read it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _case(method: str, where: str, n: int, iters: int, cfg: dict, share: int | None, file: str) -> Case:
    evict(file)
    cg = Cgroup()
    try:
        runs = _workers(method, where, n, iters, cfg, cg, share)
    finally:
        cg.remove()
    times = sorted(t for r in runs for t in r["times"][1:])  # the first pass of each: warm-up
    return Case(
        method,
        share is not None,
        statistics.median(times),
        times[min(len(times) - 1, int(0.99 * len(times)))],
        sum(r["majflt"] for r in runs),
        sum(r["anon"] for r in runs),
    )


def run(size_mib: int = 256, workers: int = 2, iters: int = 30, say=print) -> list[Case] | None:
    """Both methods, without and with the limit. None (and why, through ``say``) where refused."""
    import torch

    from weightd.bench import spawn
    from weightd.bench.demo import TinyLM, config_for, save

    why = refused()
    if why:
        say(f"staying resident: skipped: {why}")
        return None
    cfg = config_for(size_mib)
    torch.manual_seed(0)
    model = TinyLM(**cfg)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cases = []
    with tempfile.TemporaryDirectory(prefix="weightd-pressure-") as tmp:
        st, _ = save(model, Path(tmp))
        del model
        with spawn.throwaway({"m": str(st)}) as d:
            for method, where in (("safetensors.load_file", str(st)), ("weightd attach", d.socket)):
                free = _case(method, where, workers, iters, cfg, None, str(st))
                # what they hold of their own, plus a third of the model: the file cannot all stay
                share = nbytes // 3
                say(
                    f"  {workers} workers {method}: p99 {free.p99 * 1e3:.1f} ms free; limited to their own "
                    f"memory + {share / MiB:.0f} MiB ...",
                    flush=True,
                )
                cases += [free, _case(method, where, workers, iters, cfg, share, str(st))]
    return cases


def table(cases: list[Case]) -> str:
    rows = [("workers", "memory", "forward p50", "forward p99", "p99 vs unpressured", "major faults")]
    free = {c.method: c for c in cases if not c.pressured}
    for c in cases:
        rows.append(
            (
                c.method,
                "limited" if c.pressured else "free",
                f"{c.p50 * 1e3:.1f} ms",
                f"{c.p99 * 1e3:.1f} ms",
                f"{c.p99 / free[c.method].p99:.2f}x",
                str(c.majflt),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)

"""Attach latency and memory: weightd against every worker loading the checkpoint itself.

    python benchmarks/attach.py           # ~1 GiB model, 1/2/4/8 workers, plus an ~8 GiB model
    python benchmarks/attach.py --quick   # ~76 MiB model (same tensor count), 1/2 workers
    python benchmarks/attach.py --ready   # only "ready to serve", 1/4/8 workers, 1 GiB

"Ready to serve" (also part of the full run): N fresh workers each get the model once and touch
every weight (the first forward's page faults), timed together, by weightd attach from a daemon
whose segments are on 4 KiB pages (/dev/shm), weightd attach from one on a huge-page tmpfs
(``serve --shm-dir``, mounted here as root; skipped if not permitted), torch.load(mmap=True) +
assign, and safetensors.load_file; ratios against the better of the two plain-mmap methods.

Side by side, for each worker count, N fresh processes each get the same model by:

- weightd-state_dict      ``weightd.client.state_dict(name)`` from a running daemon
- weightd-attach          ``weightd.client.attach(name, model=builder)``
- torch.load              every worker reads the .pt
- torch.load(mmap=True)+load_state_dict(assign=True)   every worker maps the .pt
- safetensors.load_file   every worker loads the .safetensors

then touch every weight byte and wait, all alive, while the parent sums their Pss
(``weightd.bench.workers``). The file-loading methods run before the daemon starts, so each row's
/dev/shm growth is its own; the checkpoint files are warm in the page cache for all of them.

Also measured, in this (one, long-lived) client process: ``state_dict(name)`` for the model and
for one 8x larger with the same tensors (attach must not scale with bytes), and
``attach(name, model=...)`` split into skeleton build and the rest. The 8x model is a sparse
file of zeros (its bytes do not matter to attach; it costs no disk writes, but 8x the model in
/dev/shm while it is loaded), removed as soon as it is measured.

Writes benchmarks/out/attach.json and benchmarks/out/attach.png.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightd import memory
from weightd.bench import workers as w
from weightd.bench.demo import TinyLM, save

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
FILE_METHODS = (w.TORCH_LOAD, w.TORCH_MMAP_ASSIGN, w.SAFETENSORS)
SHORT = {
    w.WEIGHTD_STATE_DICT: "weightd state_dict",
    w.WEIGHTD_ATTACH: "weightd attach",
    w.TORCH_LOAD: "torch.load",
    w.TORCH_MMAP_ASSIGN: "torch.load(mmap)+assign",
    w.SAFETENSORS: "safetensors.load_file",
    w.NONE: "idle worker (no weights)",
}
# Each method is compared with the weightd call that gives the same thing.
REFERENCE = {
    w.TORCH_LOAD: w.WEIGHTD_STATE_DICT,
    w.SAFETENSORS: w.WEIGHTD_STATE_DICT,
    w.TORCH_MMAP_ASSIGN: w.WEIGHTD_ATTACH,
}
HUGE = "weightd-attach (huge pages)"
HUGE_SD = "weightd-state_dict (huge pages)"
READY_METHODS = (w.WEIGHTD_STATE_DICT, HUGE_SD, w.SAFETENSORS, w.WEIGHTD_ATTACH, HUGE, w.TORCH_MMAP_ASSIGN)
# what each gives (a state dict or a module) is compared with the plain mmap that gives the same
SAME_KIND = {
    w.WEIGHTD_STATE_DICT: w.SAFETENSORS,
    HUGE_SD: w.SAFETENSORS,
    w.WEIGHTD_ATTACH: w.TORCH_MMAP_ASSIGN,
    HUGE: w.TORCH_MMAP_ASSIGN,
}
TARGET_HUGE_TOUCH_S_PER_GIB = 10e-3
TARGET_HUGE_READY = 0.5  # x the best plain mmap
TARGET_SMALL_READY = 1.0
TARGET_STATE_DICT_S = 2e-3
TARGET_SCALING = 1.5
TARGET_PSS = 1.1


def model_config(dim: int) -> dict:
    # 20 blocks of 12 tensors + embedding + final norm: 244 tensors whatever the width.
    return {"vocab": 16384, "dim": dim, "layers": 20, "heads": dim // 64}


def param_bytes(cfg: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in TinyLM(**cfg).parameters())


def bigger(cfg: dict, factor: int = 8) -> dict:
    """The same tensors, wider (a multiple of 64) to be about ``factor`` x the bytes."""
    target = factor * param_bytes(cfg)
    guess = cfg["dim"] * math.sqrt(factor)
    dims = [64 * k for k in range(int(guess // 64) - 1, int(guess // 64) + 3)]
    return model_config(min(dims, key=lambda d: abs(param_bytes(model_config(d)) - target)))


def write_sparse_safetensors(path: Path, cfg: dict) -> int:
    """A valid safetensors file of zeros for TinyLM(cfg), written as a hole: no data on disk."""
    with torch.device("meta"):
        model = TinyLM(**cfg)
    header, offset = {}, 0
    for name, p in model.named_parameters():  # named_parameters() lists the tied weight once
        n = p.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def latency(socket: str, name: str, builder, repeats: int) -> dict:
    """state_dict and attach timings of one model, from one client connection in this process."""
    from weightd.client import Client, info

    with Client(socket) as c:
        for _ in range(10):  # warm up: connection, lazy imports, the daemon's reply cache
            c.state_dict(name)
        sd_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sd = c.state_dict(name)
            sd_times.append(time.perf_counter() - t0)
            del sd
        builds, totals, copies = [], [], 0
        for _ in range(max(10, repeats // 10)):
            module = c.attach(name, model=builder)
            a = info(module)
            builds.append(a.build_seconds)
            totals.append(a.attach_seconds)
            copies = max(copies, a.copies)
            del module
        manifest = c.manifest(name)
    gc.collect()
    sd_times.sort()
    return {
        "nbytes": manifest.nbytes,
        "tensors": len(manifest.tensors),
        "state_dict_median_s": statistics.median(sd_times),
        "state_dict_p10_s": sd_times[len(sd_times) // 10],
        "state_dict_p90_s": sd_times[len(sd_times) * 9 // 10],
        "state_dict_repeats": repeats,
        "attach_median_s": statistics.median(totals),
        "attach_build_median_s": statistics.median(builds),
        "attach_rest_median_s": statistics.median(t - b for t, b in zip(totals, builds)),
        "attach_copies": copies,
    }


def ready_to_serve(st: Path, pt: Path, builder, counts: list[int], nbytes: int) -> dict:
    """Attach (or load) once and touch every weight, in N fresh workers at once, by each method."""
    from weightd.bench.spawn import huge_tmpfs

    rows: dict[str, dict] = {}

    def measure(label: str, job: w.Job, n: int) -> None:
        r = w.run(job, n)
        rows[f"{label}|{n}"] = {
            "method": label,
            "workers": n,
            "import_s": r.imported,
            "get_s": r.latency,
            "touch_s": max(r.pages - r.loop, 0.0),  # first touch, less the touch loop's own cost
            "loop_s": r.loop,
            "sum_s": r.touch,
            "ready_s": r.ready,
            "pss": r.pss,
        }
        print(
            f"  ready {n} x {label:<32} import {w.ms(r.imported):>9}  get {w.ms(r.latency):>9}  "
            f"first touch {w.ms(r.pages - r.loop):>9}  "
            f"ready {w.ms(r.ready):>9}  (then a full read {w.ms(r.touch)})",
            flush=True,
        )

    for n in counts:
        job = w.Job(w.TORCH_MMAP_ASSIGN, path=str(pt), builder=builder, repeats=1, touch_pages=True)
        measure(w.TORCH_MMAP_ASSIGN, job, n)
        measure(w.SAFETENSORS, w.Job(w.SAFETENSORS, path=str(st), repeats=1, touch_pages=True), n)
    with w.daemon({"bench": str(st)}) as d:
        for n in counts:
            job = w.Job(w.WEIGHTD_STATE_DICT, name="bench", socket=d.socket, repeats=1, touch_pages=True)
            measure(w.WEIGHTD_STATE_DICT, job, n)
            job = w.Job(
                w.WEIGHTD_ATTACH, name="bench", socket=d.socket, builder=builder, repeats=1, touch_pages=True
            )
            measure(w.WEIGHTD_ATTACH, job, n)
        first = phases(d.socket, builder.keywords)
        print("  a fresh process's first attach: " + ", ".join(f"{k} {v:.2f} ms" for k, v in first.items()))
    skipped = None
    with huge_tmpfs(nbytes + (256 << 20)) as where:
        if where is None:
            skipped = "mounting a tmpfs was refused (run as root for the huge-page rows)"
        else:
            with w.daemon({"bench": str(st)}, args=["--shm-dir", where]) as d:
                for n in counts:
                    job = w.Job(
                        w.WEIGHTD_STATE_DICT, name="bench", socket=d.socket, repeats=1, touch_pages=True
                    )
                    measure(HUGE_SD, job, n)
                    job = w.Job(
                        w.WEIGHTD_ATTACH,
                        name="bench",
                        socket=d.socket,
                        builder=builder,
                        repeats=1,
                        touch_pages=True,
                    )
                    measure(HUGE, job, n)
    return {"rows": rows, "counts": counts, "nbytes": nbytes, "skipped": skipped, "phases": first}


def report_ready(ready: dict) -> list[str]:
    rows, counts, gib = ready["rows"], ready["counts"], ready["nbytes"] / 2**30
    lines = [
        "",
        f"Ready to serve: {w.mib(ready['nbytes'])}, N fresh workers at once, each (after import torch): "
        "import what the method needs, get the weights once, then touch every page of every weight once "
        "(one byte per 4 KiB: the first forward's page faults, without the arithmetic, which is the same "
        "for all; less the same loop's cost over resident pages). Medians over the workers; 'vs mmap': "
        "ready-to-serve over the better of torch.load(mmap=True)+assign and safetensors.load_file; 'full "
        "read': a sum over every weight after that.",
    ]
    head = [
        "workers / method",
        "import",
        "get",
        "first touch",
        "touch/GiB",
        "ready",
        "vs same kind",
        "vs best mmap",
    ]
    table = [[*head, "full read"]]
    checks = []
    for n in counts:
        best = min(rows[f"{m}|{n}"]["ready_s"] for m in (w.TORCH_MMAP_ASSIGN, w.SAFETENSORS))
        for m in READY_METHODS:
            r = rows.get(f"{m}|{n}")
            if r is None:
                continue
            table.append(
                [
                    f"{n}  {SHORT.get(m, m)}",
                    w.ms(r.get("import_s", 0.0)),
                    w.ms(r["get_s"]),
                    w.ms(r["touch_s"]),
                    w.ms(r["touch_s"] / gib),
                    w.ms(r["ready_s"]),
                    w.ratio(r["ready_s"], rows[f"{SAME_KIND[m]}|{n}"]["ready_s"]) if m in SAME_KIND else "",
                    w.ratio(r["ready_s"], best),
                    w.ms(r["sum_s"]),
                ]
            )
            if m in (HUGE, HUGE_SD):
                checks.append(
                    f"  {n} workers, {SHORT.get(m, m)}: touch {r['touch_s'] / gib * 1e3:.1f} ms/GiB <= "
                    f"{TARGET_HUGE_TOUCH_S_PER_GIB * 1e3:.0f}: "
                    f"{'met' if r['touch_s'] / gib <= TARGET_HUGE_TOUCH_S_PER_GIB else 'MISSED'}; ready "
                    f"{r['ready_s'] / best:.2f}x the best mmap <= {TARGET_HUGE_READY}x: "
                    f"{'met' if r['ready_s'] / best <= TARGET_HUGE_READY else 'MISSED'}"
                )
            if m == HUGE_SD and f"{w.SAFETENSORS}|{n}" in rows:
                st = rows[f"{w.SAFETENSORS}|{n}"]["ready_s"]
                checks.append(
                    f"  {n} workers, {SHORT.get(m, m)}: ready (import included) {w.ms(r['ready_s'])} vs "
                    f"safetensors.load_file from the page cache {w.ms(st)}: no later: "
                    f"{'met' if r['ready_s'] <= st else 'MISSED'}"
                )
            if m in (w.WEIGHTD_ATTACH, w.WEIGHTD_STATE_DICT):
                met = r["ready_s"] / best <= TARGET_SMALL_READY
                checks.append(
                    f"  {n} workers, {SHORT[m]} (4 KiB pages): ready {r['ready_s'] / best:.2f}x the best "
                    "mmap <= "
                    f"{TARGET_SMALL_READY}x: {'met' if met else 'MISSED'}"
                )
    lines += ["", w.table(table), "", "Targets (ready to serve):", *checks]
    if ready.get("phases"):
        lines += [
            "",
            "A fresh process's first attach (4 KiB pages, median of 5 processes): "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in ready["phases"].items()),
        ]
    if ready["skipped"]:
        lines.append(f"  huge pages: skipped: {ready['skipped']}")
    return lines


def plot_ready(ready: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in READY_METHODS:
        rs = [ready["rows"][f"{m}|{n}"] for n in ready["counts"] if f"{m}|{n}" in ready["rows"]]
        if rs:
            style = "-o" if m in SAME_KIND else "--s"
            ys = [r["ready_s"] * 1e3 for r in rs]
            ax.plot([r["workers"] for r in rs], ys, style, label=SHORT.get(m, m))
    ax.set(
        xlabel="workers (all at once)",
        ylabel="ready to serve per worker (ms, median)",
        xticks=ready["counts"],
        title=f"Get the weights + touch every one: {w.mib(ready['nbytes'])}",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PHASES_CHILD = r"""
import functools, gc, json, os, sys, time
import torch
from weightd.bench.demo import TinyLM
from weightd.client import Client
from weightd.client.mapping import Mapping
from weightd.client.module import build_skeleton, fill
from weightd.manifest import Manifest

socket, cfg = sys.argv[1], json.loads(sys.argv[2])
builder = functools.partial(TinyLM, **cfg)
gc.disable()  # as attach does (client._gc_paused)
out, t = {}, time.perf_counter()


def lap(key):
    global t
    now = time.perf_counter()
    out[key] = (now - t) * 1e3
    t = now


c = Client(socket)
lap("connect")
reply = c.call("manifest", name="bench", generation=None, pid=os.getpid())
lap("request")
manifest = Manifest.from_dict(reply["manifest"])
lap("manifest decode")
mapping = Mapping(manifest, owner=c.daemon_uid)
lap("mapping")
tensors = mapping.tensors()
lap("tensor views")
module = build_skeleton(builder, manifest.skeleton, "bench")
lap("skeleton (the model's __init__)")
fill(module, tensors, mapping, strict=True, requires_grad=False)
lap("fill")
print(json.dumps(out))
"""


def phases(socket: str, cfg: dict, runs: int = 5) -> dict:
    """Where a fresh process's first attach spends its milliseconds (median of ``runs`` processes)."""
    import subprocess

    got = []
    for _ in range(runs):
        r = subprocess.run(
            [sys.executable, "-c", PHASES_CHILD, socket, json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        got.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(g[k] for g in got) for k in got[0]}


def run_ready_only(args) -> int:
    cfg = model_config(args.dim)
    with tempfile.TemporaryDirectory(prefix="weightd-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = TinyLM(**cfg)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"model: TinyLM {cfg}: {len(model.state_dict())} tensors, {w.mib(nbytes)}", flush=True)
        st, pt = save(model, tmp)
        del model
        gc.collect()
        ready = ready_to_serve(st, pt, functools.partial(TinyLM, **cfg), args.ready_workers, nbytes)
    lines = report_ready(ready)
    print("\n".join(lines))
    ready["table"] = lines
    ready["loadavg"] = os.getloadavg()
    (args.out / "attach_ready.json").write_text(json.dumps(ready, indent=2))
    plot_ready(ready, args.out / "attach_ready.png")
    print(f"wrote {args.out / 'attach_ready.json'} and {args.out / 'attach_ready.png'}")
    return 0


def run_all(args) -> dict:
    cfg = model_config(args.dim)
    counts = args.workers
    out: dict = {"config": cfg, "worker_counts": counts, "results": []}
    with tempfile.TemporaryDirectory(prefix="weightd-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = TinyLM(**cfg)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ntensors = len(model.state_dict())
        print(f"model: TinyLM {cfg}: {ntensors} tensors, {w.mib(nbytes)}", flush=True)
        st, pt = save(model, tmp)
        del model
        gc.collect()
        builder = functools.partial(TinyLM, **cfg)
        out["model"] = {
            "nbytes": nbytes,
            "tensors": ntensors,
            "safetensors": st.stat().st_size,
            "pt": pt.stat().st_size,
        }
        base = memory.shm_used()

        def measure(job: w.Job, n: int) -> None:
            t0 = time.monotonic()
            r = w.run(job, n)
            r.extra["shm_growth"] = max(0, r.shm_used - base)
            out["results"].append(r)
            print(
                f"  {n} x {SHORT[job.method]:<24} {w.ms(r.latency):>10}  Pss {w.mib(r.pss):>10}"
                f"  ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )

        for n in counts:
            for method in FILE_METHODS:
                path = st if method == w.SAFETENSORS else pt
                measure(w.Job(method, path=str(path), builder=builder, repeats=args.repeats), n)
        measure(w.Job(w.NONE), max(counts))

        with w.daemon({"bench": str(st)}) as d:
            for n in counts:
                measure(w.Job(w.WEIGHTD_STATE_DICT, name="bench", socket=d.socket, repeats=10), n)
                measure(
                    w.Job(w.WEIGHTD_ATTACH, name="bench", socket=d.socket, builder=builder, repeats=10), n
                )
            out["daemon_pss"] = memory.usage(d.pid).pss

            print(f"latency in one client process, {args.latency_repeats} repeats ...", flush=True)
            out["latency"] = {"1x": latency(d.socket, "bench", builder, args.latency_repeats)}
            cfg8 = bigger(cfg)
            big = tmp / "big.safetensors"
            nbig = write_sparse_safetensors(big, cfg8)
            print(f"model 8x: TinyLM {cfg8}: {w.mib(nbig)} ({nbig / nbytes:.2f}x), loading ...", flush=True)
            from weightd.client import Client

            try:
                with Client(d.socket) as c:
                    t0 = time.monotonic()
                    c.load(str(big), "bench8x")
                    load_s = time.monotonic() - t0
                out["latency"]["8x"] = latency(
                    d.socket, "bench8x", functools.partial(TinyLM, **cfg8), args.latency_repeats
                )
                out["latency"]["8x"].update(config=cfg8, daemon_load_s=load_s)
            finally:
                # Free the 8x model at once: its segment (unlinked now, freed once this
                # process's mappings are gone) and its file.
                with Client(d.socket) as c:
                    if any(m["name"] == "bench8x" for m in c.list()):
                        c.unload("bench8x")
                big.unlink(missing_ok=True)
                gc.collect()
        out["leftover_segments"] = d.leftover
        out["ready"] = ready_to_serve(st, pt, builder, args.ready_workers, nbytes)
    return out


def report(out: dict) -> None:
    results = out["results"]
    by = {(r.method, r.workers): r for r in results}
    nbytes = out["model"]["nbytes"]
    print()
    print(
        f"Model: {w.mib(nbytes)} in {out['model']['tensors']} tensors. Median get-the-weights latency per "
        "worker "
        "(all workers start at once; median of repeats inside each worker), then total Pss of all workers "
        "with every weight touched and all of them alive."
    )
    print(
        "'vs weightd': against weightd state_dict for methods that give a state dict, weightd attach for "
        "those "
        "that give a module."
    )
    rows = [
        [
            "workers / method",
            "latency",
            "vs weightd",
            "touch",
            "total Pss",
            "vs weightd",
            "Pss_Shmem",
            "/dev/shm +",
        ]
    ]
    for n in out["worker_counts"]:
        for method in (w.WEIGHTD_STATE_DICT, w.WEIGHTD_ATTACH, *FILE_METHODS):
            r = by.get((method, n))
            if r is None:
                continue
            ref = by.get((REFERENCE.get(method, method), n))
            same = ref is r
            rows.append(
                [
                    f"{n}  {SHORT[method]}",
                    w.ms(r.latency),
                    "(ref)" if same else w.ratio(r.latency, ref.latency),
                    w.ms(r.touch),
                    w.mib(r.pss),
                    "(ref)" if same else w.ratio(r.pss, ref.pss),
                    w.mib(r.pss_shmem),
                    w.mib(r.extra["shm_growth"]),
                ]
            )
    idle = next(r for r in results if r.method == w.NONE)
    rows.append(
        [f"{idle.workers}  {SHORT[w.NONE]}", "-", "", "", w.mib(idle.pss), "", w.mib(idle.pss_shmem), ""]
    )
    print()
    print(w.table(rows))

    lat = out["latency"]
    print()
    print("In one long-lived client process (median; state_dict p10-p90 in brackets):")
    rows = [
        [
            "model",
            "bytes",
            "tensors",
            "state_dict",
            "p10-p90",
            "attach",
            "skeleton build",
            "the rest",
            "copies",
        ]
    ]
    for key, L in lat.items():
        rows.append(
            [
                key,
                w.mib(L["nbytes"]),
                str(L["tensors"]),
                f"{L['state_dict_median_s'] * 1e3:.3f} ms",
                f"{L['state_dict_p10_s'] * 1e3:.3f}-{L['state_dict_p90_s'] * 1e3:.3f} ms",
                w.ms(L["attach_median_s"]),
                w.ms(L["attach_build_median_s"]),
                w.ms(L["attach_rest_median_s"]),
                str(L["attach_copies"]),
            ]
        )
    print(w.table(rows))

    checks = out["checks"] = {}
    one = lat["1x"]["state_dict_median_s"]
    checks["state_dict_under_2ms"] = {
        "value_s": one,
        "target_s": TARGET_STATE_DICT_S,
        "met": one < TARGET_STATE_DICT_S,
    }
    if "8x" in lat:
        scale = lat["8x"]["state_dict_median_s"] / one
        checks["state_dict_8x_scaling"] = {
            "value": scale,
            "target": TARGET_SCALING,
            "met": scale < TARGET_SCALING,
        }
    n = max(out["worker_counts"])
    for method in w.WEIGHTD_METHODS:
        r = by[(method, n)]
        expected = nbytes + idle.pss  # one model, plus what n workers cost with no weights at all
        checks[f"pss_{method}_{n}_workers"] = {
            "total_pss": r.pss,
            "expected": expected,
            "value": r.pss / expected,
            "target": TARGET_PSS,
            "met": r.pss / expected < TARGET_PSS,
            "pss_shmem_over_model": r.pss_shmem / nbytes,
        }
    print()
    print("Targets:")
    c = checks["state_dict_under_2ms"]
    print(f"  state_dict median {c['value_s'] * 1e3:.3f} ms < 2 ms: {_met(c)}")
    if "state_dict_8x_scaling" in checks:
        c = checks["state_dict_8x_scaling"]
        print(f"  state_dict 8x model / 1x model = {c['value']:.2f}x < {TARGET_SCALING}x: {_met(c)}")
    for method in w.WEIGHTD_METHODS:
        c = checks[f"pss_{method}_{n}_workers"]
        print(
            f"  {SHORT[method]}, {n} workers: total Pss {w.mib(c['total_pss'])} vs one model + {n} idle "
            "workers "
            f"{w.mib(c['expected'])} = {c['value']:.3f}x < {TARGET_PSS}x: {_met(c)} "
            f"(Pss_Shmem = {c['pss_shmem_over_model']:.3f} models)"
        )
    print(
        f"  the daemon itself: Pss {w.mib(out['daemon_pss'])}; segments left after it stopped: "
        f"{len(out['leftover_segments']) or 'none'}"
    )


def _met(check: dict) -> str:
    return "met" if check["met"] else "MISSED"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    counts = out["worker_counts"]
    for method in (w.WEIGHTD_STATE_DICT, w.WEIGHTD_ATTACH, *FILE_METHODS):
        rs = [r for r in out["results"] if r.method == method]
        style = "-o" if method in w.WEIGHTD_METHODS else "--s"
        ax1.plot([r.workers for r in rs], [r.pss / 2**30 for r in rs], style, label=SHORT[method])
        ax2.plot([r.workers for r in rs], [r.latency * 1e3 for r in rs], style, label=SHORT[method])
    nbytes = out["model"]["nbytes"]
    idle = next(r for r in out["results"] if r.method == w.NONE)
    per_worker = idle.pss / idle.workers  # Python and torch alone, per worker
    ax1.plot(
        counts,
        [(nbytes + n * per_worker) / 2**30 for n in counts],
        ":",
        color="black",
        label="one model + idle workers (ideal)",
    )
    ax1.axhline(nbytes / 2**30, color="grey", linestyle=":", label="one model's bytes")
    ax1.set(
        xlabel="workers",
        ylabel="total Pss of all workers (GiB)",
        xticks=counts,
        title=f"Memory: {w.mib(out['model']['nbytes'])} model, every weight touched",
    )
    ax2.set(
        xlabel="workers",
        ylabel="median latency per worker (ms)",
        yscale="log",
        xticks=counts,
        title="Getting the weights (all workers at once)",
    )
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~76 MiB model, 1 and 2 workers, fewer repeats")
    p.add_argument(
        "--workers", type=lambda s: [int(x) for x in s.split(",")], help="worker counts, e.g. 1,2,4,8"
    )
    p.add_argument("--ready", action="store_true", help='only "ready to serve" (1/4/8 workers, or --workers)')
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.dim = 256 if args.quick else 1024  # 76 MiB or 1 GiB, 244 tensors either way
    args.ready_workers = args.workers or ([1, 2] if args.quick else [1, 4, 8])
    args.workers = args.workers or ([1, 2] if args.quick else [1, 2, 4, 8])
    cache_bytecode()
    if args.ready:
        args.out.mkdir(parents=True, exist_ok=True)
        with w.sigterm_exits():
            return run_ready_only(args)
    args.repeats = 2 if args.quick else 3
    args.latency_repeats = 100 if args.quick else 500
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        with w.sigterm_exits():
            out = run_all(args)
    except KeyboardInterrupt:  # everything started has been stopped and removed on the way here
        print("interrupted", file=sys.stderr)
        return 130
    report(out)
    ready_lines = report_ready(out["ready"])
    print("\n".join(ready_lines))
    out["ready"]["table"] = ready_lines
    plot_ready(out["ready"], args.out / "attach_ready.png")
    out["env"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "thp_shmem": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "seconds": time.monotonic() - t0,
        "argv": sys.argv[1:],
    }
    png, js = args.out / "attach.png", args.out / "attach.json"
    plot(out, png)
    out["results"] = [r.to_dict() for r in out["results"]]
    js.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {js} and {png} ({time.monotonic() - t0:.0f} s)")
    return 0


def cache_bytecode() -> None:
    """weightd's modules compiled to cached bytecode, as installing a wheel leaves them (and as
    torch, safetensors and every other installed package are measured here). An editable
    install has none where Python may not write it ($PYTHONDONTWRITEBYTECODE=1, as on the
    machine the README's figures come from): every fresh worker would then compile each module
    it imports, ~13 ms of an 18 ms import, which is no cost of weightd's."""
    import compileall

    for folder in (ROOT / "weightd", ROOT / "client"):
        compileall.compile_dir(str(folder), quiet=1)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())

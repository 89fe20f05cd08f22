"""Ray actors sharing one model: weightd, the ``ray-zerocopy`` package, and the naive way.

    python benchmarks/ray_actors.py              # 4 actors, a ~1 GiB model (fp32), then bf16
    python benchmarks/ray_actors.py --quick      # ~128 MiB
    python benchmarks/ray_actors.py --runs 3     # every fp32 method 3 times: medians and spread

Each method runs in a fresh local Ray cluster in its own driver process, one after the other:

- weightd        ``ModelWrapper.from_model(model)`` from ``weightd.client.ray_zerocopy``;
                 each actor ``load()``s (attaches from the node's daemon)
- ray-zerocopy   the PyPI package 0.2.0, same code with its own import, run in a separate
                 venv (benchmarks/out/venv-rzc: same torch and Ray, built here if missing)
- naive          ``ray.put(model)``; each actor ``ray.get``s it (a private copy per actor)
- weightd-huge   weightd with the daemons' segments on a huge-page tmpfs (``serve --shm-dir``
                 through ``$WEIGHTD_SERVE_SHM_DIR``; mounted here as root, skipped otherwise)

"first forward" is the actor's first forward pass after load(), which touches every weight:
its page faults are where the mapping's page size shows.

Columns: time from creating the 4 actors to all of them ready (including Ray starting their
worker processes, the same for every method), the load()/attach/get latency inside an actor
(median), the actors' total Pss after each ran a forward pass touching every weight, the
object store's bytes (its /dev/shm/plasma* file's allocated blocks) and the shared memory in
use (that, plus this run's weightd segments: exact, unlike a statvfs of /dev/shm, which other
processes of the machine move), and the driver's peak RSS. "total" is what the node pays: the
shared memory (the one copy, counted once) plus the private memory (Pss minus Pss_Shmem) of
the actors, the raylet and the daemon.

Writes benchmarks/out/ray_actors.json and benchmarks/out/ray_actors.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
RZC_VENV = OUT / "venv-rzc"
RZC_VERSION = "0.2.0"
GIB = 1 << 30
MIB = 1 << 20


# --- the model: GPT-shaped, a tied embedding and a non-persistent buffer (defined here, so that
# the ray-zerocopy venv, which has no weightd installed, can build it too) ---


def build_model(size_mib: int, dtype: str):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.ln = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.fc2 = nn.Linear(4 * dim, dim)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.ln(x))))

    class LM(nn.Module):
        def __init__(self, vocab, dim, layers):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.full((dim,), 0.5), persistent=False)

        def forward(self, ids):
            x = self.embed(ids) * self.scale.to(self.embed.weight.dtype)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    dim, vocab = 1024, 16384
    per_layer = 8 * dim * dim * 4
    layers = max(1, round((size_mib * MIB - vocab * dim * 4) / per_layer))
    torch.manual_seed(0)
    with torch.no_grad():
        model = LM(vocab, dim, layers).eval()
    return model.to(getattr(torch, dtype))


# --- one method, in its own driver process ---


def run_method(method: str, size_mib: int, actors: int, dtype: str) -> dict:
    import resource

    import ray
    import torch

    sys.path.insert(0, str(ROOT))
    from weightd import memory  # stdlib only: importable in the ray-zerocopy venv through sys.path
    from weightd.bench.raycluster import plasma_bytes  # stdlib only too

    os.environ.setdefault("XDG_RUNTIME_DIR", str(OUT / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)
    shm0 = memory.shm_used()
    instances: list[str] = []
    ray.init(
        address="local",
        num_cpus=actors,
        include_dashboard=False,
        object_store_memory=int(2.5 * size_mib * MIB) + 256 * MIB,
        log_to_driver=False,
    )
    result = {"method": method, "dtype": dtype, "actors": actors, "size_mib": size_mib}
    daemon_pids = []
    try:
        model = build_model(size_mib, dtype)
        result["model_bytes"] = sum(
            t.numel() * t.element_size()
            for t in {t.data_ptr(): t for t in model.state_dict().values()}.values()
        )
        ids = torch.arange(16)
        expected = model(ids)
        t0 = time.perf_counter()
        if method in ("weightd", "weightd-huge"):
            from weightd.client.ray_zerocopy import ModelWrapper, ensure_daemons
            from weightd.client.ray_zerocopy.daemons import ping
            from weightd.daemon.config import Config

            sockets = ensure_daemons()
            daemon_pids = [ping(s)["pid"] for s in sockets.values()]
            instances = [Config(socket=s).instance for s in sockets.values()]
            payload = ModelWrapper.from_model(model, mode="actor")
        elif method == "ray-zerocopy":
            from ray_zerocopy import ModelWrapper

            payload = ModelWrapper.from_model(model, mode="actor")
        else:
            payload = [ray.put(model)]  # in a list: the actor gets the ref, and times its ray.get
        result["prepare_s"] = time.perf_counter() - t0

        @ray.remote(num_cpus=1)
        class Actor:
            def __init__(self, payload):
                t = time.perf_counter()
                self.model = payload.load() if not isinstance(payload, list) else ray.get(payload[0])
                self.load_s = time.perf_counter() - t

            def ready(self):
                t = time.perf_counter()
                with torch.no_grad():
                    out = self.model(torch.arange(16))  # touches every weight (the head is the embedding)
                return os.getpid(), self.load_s, out, time.perf_counter() - t

        t0 = time.perf_counter()
        handles = [Actor.remote(payload) for _ in range(actors)]
        replies = ray.get([h.ready.remote() for h in handles])
        result["ready_s"] = time.perf_counter() - t0
        result["load_s"] = statistics.median(r[1] for r in replies)
        result["first_forward_s"] = statistics.median(r[3] for r in replies)
        # allclose: the actors run on one thread each, the driver on several (another summation order)
        result["correct"] = all(
            torch.allclose(r[2].float(), expected.float(), rtol=1e-3, atol=1e-3) for r in replies
        )
        pids = [r[0] for r in replies]
        del model, expected
        usages = [memory.usage(p) for p in pids]
        result["actors_pss"] = sum(u.pss for u in usages)
        result["actors_private"] = sum(u.pss_private for u in usages)
        raylet = _our_raylets()
        result["raylet_private"] = sum(memory.usage(p).pss_private for p in raylet)
        result["daemon_private"] = sum(memory.usage(p).pss_private for p in daemon_pids)
        # Exact, and blind to whatever else on the machine uses /dev/shm meanwhile: the bytes
        # allocated to weightd's segments (of this run's daemons) and to Ray's plasma file.
        where = Path(os.environ.get("WEIGHTD_SERVE_SHM_DIR") or "/dev/shm")
        segs = sum(
            p.stat().st_blocks * 512
            for i in (instances if method.startswith("weightd") else [])
            for p in where.glob(f"weightd.{i}.*")
        )
        result["weightd_segments"] = segs
        result["object_store"] = plasma_bytes(raylet)
        result["shm_growth"] = segs + result["object_store"]
        result["shm_growth_statvfs"] = memory.shm_used() - shm0
        result["total"] = (
            result["shm_growth"]
            + result["actors_private"]
            + result["raylet_private"]
            + result["daemon_private"]
        )
        for h in handles:
            ray.kill(h)
    except Exception as e:  # ray-zerocopy and bf16: the failure is the result
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        if method.startswith("weightd"):
            from weightd.client.ray_zerocopy import shutdown_daemons

            shutdown_daemons()
        ray.shutdown()
    result["driver_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _our_raylets() -> list[int]:
    """The raylet this driver started (other Ray clusters may run on the machine)."""
    import ray

    node = ray._private.worker._global_node
    return [info.process.pid for info in node.all_processes.get("raylet", [])]


# --- the orchestrator ---


def rzc_python() -> tuple[Path | None, str]:
    """The ray-zerocopy venv's python, built if missing; or None and why."""
    python = RZC_VENV / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import ray_zerocopy"], capture_output=True).returncode == 0
    ):
        return python, ""
    import ray
    import torch

    torch_version = torch.__version__.split("+")[0]
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", RZC_VENV], check=True)
        # constraints.txt pins the CPU torch on this machine's disk; ray pinned to the project's.
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "-c",
                ROOT / "constraints.txt",
                f"torch=={torch_version}",
                f"ray=={ray.__version__}",
                f"ray-zerocopy=={RZC_VERSION}",
            ],
            check=True,
        )
    except subprocess.CalledProcessError as e:
        return None, f"building {RZC_VENV} failed: {e}"
    return python, ""


def run_child(python: Path, method: str, args, dtype: str, env: dict | None = None) -> dict:
    cmd = [
        str(python),
        __file__,
        "--run",
        method,
        "--dtype",
        dtype,
        "--size-mib",
        str(args.size_mib),
        "--actors",
        str(args.actors),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "method": method,
            "dtype": dtype,
            "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
        }
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    head = (
        "method",
        "dtype",
        "ready s",
        "load s",
        "1st forward",
        "actors Pss",
        "object store",
        "shm in use",
        "total",
        "driver peak",
        "ok",
    )
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append((r["method"], r["dtype"], *["-"] * 8, "FAILED: " + r["error"][:70]))
            continue
        rows.append(
            (
                r["method"],
                r["dtype"],
                f"{r['ready_s']:.2f}",
                f"{r['load_s'] * 1e3:.1f} ms",
                f"{r['first_forward_s'] * 1e3:.1f} ms",
                _g(r["actors_pss"]),
                _g(r["object_store"]),
                _g(r["shm_growth"]),
                _g(r["total"]),
                _g(r["driver_peak_rss"]),
                "yes" if r["correct"] else "WRONG OUTPUT",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _g(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = [f"{r['method']}\n{r['dtype']}" for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(labels, [r["total"] / GIB for r in ok], color="tab:blue")
    a.set_ylabel("GiB")
    a.set_title(f"node memory, {ok[0]['actors'] if ok else '?'} actors (shm + private)")
    b.bar(labels, [r["load_s"] * 1e3 for r in ok], color="tab:orange")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.set_title("load()/attach in an actor (median)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    failed = [f"{r['method']} {r['dtype']}: {r['error'][:60]}" for r in results if "error" in r]
    if failed:
        fig.text(0.01, 0.01, "failed: " + "; ".join(failed), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a ~128 MiB model")
    p.add_argument("--runs", type=int, default=3, help="runs of each fp32 method (medians, spread)")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size_mib = 128
    if args.run:
        print(json.dumps(run_method(args.run, args.size_mib, args.actors, args.dtype)), flush=True)
        return

    OUT.mkdir(parents=True, exist_ok=True)
    rzc, why = rzc_python()
    from weightd.bench.spawn import huge_tmpfs

    results, runs = [], []
    with huge_tmpfs(int(1.5 * args.size_mib * MIB) + 256 * MIB) as huge:
        plan = [("weightd", "float32"), ("ray-zerocopy", "float32"), ("weightd-huge", "float32")]
        for k in range(args.runs):  # interleaved, so that drift hits every method alike
            for method, dtype in plan:
                if method == "weightd-huge" and huge is None:
                    continue
                print(f"run {k + 1}/{args.runs}: {method} {dtype} ...", file=sys.stderr, flush=True)
                runs.append(_run(rzc, why, method, dtype, args, huge))
        for method, dtype in [("naive", "float32"), ("weightd", "bfloat16"), ("ray-zerocopy", "bfloat16")]:
            print(f"running {method} {dtype} ...", file=sys.stderr, flush=True)
            results.append(_run(rzc, why, method, dtype, args, huge))
    results = _medians(runs) + results
    print(table(results))
    spread = _spread(runs)
    for line in spread:
        print(line)
    if huge is None:
        print("weightd-huge: skipped (mounting a tmpfs was refused: run as root)")
    verdict = _targets(results)
    for line in verdict:
        print(line)
    (OUT / "ray_actors.json").write_text(
        json.dumps({"results": results, "runs": runs, "spread": spread, "targets": verdict}, indent=2)
    )
    plot(results, OUT / "ray_actors.png")
    print(f"wrote {OUT / 'ray_actors.json'} and {OUT / 'ray_actors.png'}")


def _run(rzc, why: str, method: str, dtype: str, args, huge: str | None) -> dict:
    if method == "ray-zerocopy" and rzc is None:
        return {"method": method, "dtype": dtype, "error": why}
    python = rzc if method == "ray-zerocopy" else Path(sys.executable)
    env = {"WEIGHTD_SERVE_SHM_DIR": huge} if method == "weightd-huge" else {}
    return run_child(python, method, args, dtype, env)


def _medians(runs: list[dict]) -> list[dict]:
    """One row per method: the run with the median load time, its load and forward the medians."""
    out = []
    for key in dict.fromkeys((r["method"], r["dtype"]) for r in runs):
        rs = [r for r in runs if (r["method"], r["dtype"]) == key]
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out.append(rs[0])
            continue
        row = dict(sorted(ok, key=lambda r: r["load_s"])[len(ok) // 2])
        row["load_s"] = statistics.median(r["load_s"] for r in ok)
        row["first_forward_s"] = statistics.median(r["first_forward_s"] for r in ok)
        row["runs"] = len(ok)
        out.append(row)
    return out


def _spread(runs: list[dict]) -> list[str]:
    lines = []
    for key in dict.fromkeys((r["method"], r["dtype"]) for r in runs):
        ok = [r for r in runs if (r["method"], r["dtype"]) == key and "error" not in r]
        if ok:
            loads = sorted(r["load_s"] * 1e3 for r in ok)
            fwd = sorted(r["first_forward_s"] * 1e3 for r in ok)
            lines.append(
                f"{key[0]} {key[1]}: {len(ok)} runs: load() {' / '.join(f'{x:.1f}' for x in loads)} ms; "
                f"first forward {' / '.join(f'{x:.1f}' for x in fwd)} ms"
            )
    return lines


def _targets(results: list[dict]) -> list[str]:
    by = {(r["method"], r["dtype"]): r for r in results}
    w, z = by.get(("weightd", "float32"), {}), by.get(("ray-zerocopy", "float32"), {})
    out = []
    if "error" not in w and "error" not in z and w and z:
        out.append(
            f"target attach <= ray-zerocopy load(): {w['load_s'] * 1e3:.1f} ms vs {z['load_s'] * 1e3:.1f} "
            "ms: "
            f"{'MET' if w['load_s'] <= z['load_s'] else 'MISSED'}"
        )
        for label, row in (("weightd", w), ("weightd-huge", by.get(("weightd-huge", "float32"), {}))):
            if row and "error" not in row:
                mine, theirs = row["first_forward_s"] * 1e3, z["first_forward_s"] * 1e3
                out.append(
                    f"target first forward <= 0.5x ray-zerocopy's: {label} {mine:.1f} ms vs {theirs:.1f} ms "
                    f"= {mine / theirs:.2f}x: {'MET' if mine / theirs <= 0.5 else 'MISSED'}"
                )
        h = by.get(("weightd-huge", "float32"), {})
        if h and "error" not in h:
            out.append(
                f"target attach <= ray-zerocopy load() (huge pages): {h['load_s'] * 1e3:.1f} ms vs "
                f"{z['load_s'] * 1e3:.1f} ms: {'MET' if h['load_s'] <= z['load_s'] else 'MISSED'}"
            )
        out.append(
            f"target total memory <= ray-zerocopy: {_g(w['total'])} vs {_g(z['total'])}: "
            f"{'MET' if w['total'] <= z['total'] else 'MISSED'}"
        )
    wb, zb = by.get(("weightd", "bfloat16"), {}), by.get(("ray-zerocopy", "bfloat16"), {})
    out.append(
        "target bf16 works with weightd where ray-zerocopy fails: "
        f"weightd {'ok' if wb.get('correct') else 'FAILED'}, "
        f"ray-zerocopy {'FAILED (' + zb['error'][:80] + ')' if 'error' in zb else 'ok'}"
    )
    return out


if __name__ == "__main__":
    main()

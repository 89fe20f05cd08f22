"""GPU benchmark: one copy per GPU through CUDA IPC against every process loading its own.

    python benchmarks/gpu.py [--mib 1024] [--device cuda:0]

On one GPU, end to end: a model of ``--mib`` MiB; 1, 2 and 4 worker processes each get it on
the GPU (a) ``ipc``: views of the copy a daemon started with ``serve --device`` holds (CUDA IPC),
(b) ``copy``: each copies it from a daemon's shared-memory segment to the GPU itself (a second
daemon, without ``--device``; pinned), (c) ``load``: each loads the checkpoint itself
(``safetensors.torch.load_file(device=...)``, the file in the page cache). GPU memory is read
from ``torch.cuda.mem_get_info`` (device-wide) while all workers are alive, minus what as many
idle processes with a CUDA context take. Times are each worker's, from its request to tensors
ready on the GPU (its CUDA context made before). Also: host-to-device bandwidth from a
shared-memory mapping, pinned against unpinned. Prints a table, writes benchmarks/out/gpu.json
and benchmarks/out/gpu.png. Exits at once without CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightd.bench import spawn

OUT = Path(__file__).resolve().parent / "out"
MiB = 1 << 20

WORKER = r"""
import json, os, sys, time, torch
from weightd.client import state_dict
sock, method, path, device = sys.argv[1:5]
torch.zeros(1, device=device)           # the CUDA context first, so it is not timed
say = lambda o: (print(json.dumps(o), flush=True))
t0 = time.perf_counter()
if method == "ipc":
    sd = state_dict("m", socket=sock, device=device)
elif method == "copy":
    sd = state_dict("m", socket=sock, device=device, pin=True)
elif method == "load":
    from safetensors.torch import load_file
    sd = load_file(path, device=device)
else:
    sd = {}
torch.cuda.synchronize()
say({"seconds": time.perf_counter() - t0, "n": len(sd)})
sys.stdin.readline()
"""


def gpu_used(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def run_workers(n: int, method: str, sock: str, path: str, device: str) -> tuple[list[float], int]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, sock, method, path, device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
        time.sleep(0.2)
        used = gpu_used(torch.device(device))
        return [r["seconds"] for r in reports], used
    finally:
        for p in procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def bandwidth(path_mib: int, device: torch.device, pin: bool, sock: str) -> float:
    from weightd.client import state_dict

    best = []
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        state_dict("m", socket=sock, device=str(device), pin=pin)
        torch.cuda.synchronize(device)
        best.append(time.perf_counter() - t0)
    return path_mib * MiB / statistics.median(best) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing to measure")
        return 0
    from safetensors.torch import save_file

    device = torch.device(args.device)
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="weightd-gpu-"))
    path = tmp / "m.safetensors"
    per = args.mib * MiB // 4 // 256
    save_file({f"t{i}": torch.randn(per) for i in range(256)}, path)
    try:
        rows, results = [], {"mib": args.mib, "device": torch.cuda.get_device_name(device), "runs": []}
        # Two daemons: with --device a client always gets views of the daemon's GPU copy, so the
        # copies from shared memory are measured against a daemon that holds none.
        with (
            spawn.throwaway({"m": str(path)}, args=["--device", args.device]) as gpu_daemon,
            spawn.throwaway({"m": str(path)}) as shm_daemon,
        ):
            results["daemon_gpu_bytes"] = gpu_used(device)  # the daemon's copy and context
            sockets = {"ipc": gpu_daemon.socket, "copy": shm_daemon.socket, "load": "-"}
            for n in (1, 2, 4):
                _, idle = run_workers(n, "none", gpu_daemon.socket, str(path), args.device)
                load_s = None
                for method in ("load", "ipc", "copy"):
                    seconds, used = run_workers(n, method, sockets[method], str(path), args.device)
                    weights = used - idle
                    run = {
                        "workers": n,
                        "method": method,
                        "median_s": statistics.median(seconds),
                        "gpu_bytes": weights,
                    }
                    results["runs"].append(run)
                    load_s = load_s or run["median_s"]
                    rows.append(
                        (
                            n,
                            method,
                            f"{run['median_s'] * 1e3:.1f} ms",
                            f"{run['median_s'] / load_s:.3f}x",
                            f"{weights / MiB:,.0f} MiB",
                            f"{weights / (args.mib * MiB):.2f}x model",
                        )
                    )
            results["h2d_gbps"] = {
                "unpinned": bandwidth(args.mib, device, False, shm_daemon.socket),
                "pinned": bandwidth(args.mib, device, True, shm_daemon.socket),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"model {args.mib} MiB on {results['device']}; GPU memory beyond the workers' CUDA contexts "
        "(the daemon's own copy is counted for every method alike)"
    )
    print(f"{'workers':>7}  {'method':<6}  {'ready in':>10}  {'vs load':>8}  {'GPU memory':>12}  {'':>12}")
    for r in rows:
        print(f"{r[0]:>7}  {r[1]:<6}  {r[2]:>10}  {r[3]:>8}  {r[4]:>12}  {r[5]:>12}")
    h = results["h2d_gbps"]
    print(
        f"host-to-device from shared memory: unpinned {h['unpinned']:.2f} GB/s, pinned {h['pinned']:.2f} GB/s"
    )
    (OUT / "gpu.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in ("ipc", "copy", "load"):
            pts = [(r["workers"], r["gpu_bytes"] / MiB) for r in results["runs"] if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("worker processes")
        ax.set_ylabel("GPU memory for weights (MiB)")
        ax.legend()
        fig.savefig(OUT / "gpu.png", dpi=120, bbox_inches="tight")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: one copy per GPU through CUDA IPC against every process loading its own.

    python benchmarks/gpu.py [--mib 1024] [--device cuda:0]

On one GPU, end to end: a model of ``--mib`` MiB is served by ``weightd serve --device``;
1, 2 and 4 worker processes each get it on the GPU (a) through the daemon's copy (CUDA IPC),
(b) by copying from shared memory themselves, (c) by loading the checkpoint themselves. GPU
memory is read from ``torch.cuda.mem_get_info`` (device-wide) while all workers are alive,
minus what as many idle processes with a CUDA context take. Also: attach latency, and
pinned against unpinned host-to-device bandwidth from a shared-memory mapping. Prints a table,
writes benchmarks/out/gpu.json and benchmarks/out/gpu.png. Exits at once without CUDA.
"""

from __future__ import annotations

import argparse
import json
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
    rows, results = [], {"mib": args.mib, "device": torch.cuda.get_device_name(device), "runs": []}
    with spawn.throwaway({"m": str(path)}, args=["--device", args.device]) as d:
        sock = d.socket
        before = gpu_used(device)  # the daemon's copy and context are in here
        for n in (1, 2, 4):
            _, idle = run_workers(n, "none", sock, str(path), args.device)
            for method in ("ipc", "copy", "load"):
                seconds, used = run_workers(n, method, sock, str(path), args.device)
                weights = used - idle
                run = {
                    "workers": n,
                    "method": method,
                    "median_s": statistics.median(seconds),
                    "gpu_bytes": weights,
                }
                results["runs"].append(run)
                rows.append(
                    (
                        n,
                        method,
                        f"{run['median_s'] * 1e3:.1f} ms",
                        f"{weights / MiB:,.0f} MiB",
                        f"{weights / (args.mib * MiB):.2f}x model",
                    )
                )
        results["daemon_gpu_bytes"] = before
        results["h2d_gbps"] = {
            "unpinned": bandwidth(args.mib, device, False, sock),
            "pinned": bandwidth(args.mib, device, True, sock),
        }
    path.unlink(missing_ok=True)

    print(
        f"model {args.mib} MiB on {results['device']}; GPU memory beyond the workers' CUDA contexts "
        "(the daemon's own copy is counted for every method alike)"
    )
    print(f"{'workers':>7}  {'method':<6}  {'attach/load':>12}  {'GPU memory':>12}  {'':>12}")
    for r in rows:
        print(f"{r[0]:>7}  {r[1]:<6}  {r[2]:>12}  {r[3]:>12}  {r[4]:>12}")
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

"""What metrics cost the requests: latency with ``--metrics`` scraped every 100 ms, against off.

    python benchmarks/metrics.py           # ~1 minute
    python benchmarks/metrics.py --quick   # a smoke run (~15 s)

Four daemons serve the same checkpoint (a safetensors file of 200 tensors, the tensor table
of a small transformer), each with four worker processes attached (so that every scrape has
processes to account for):

- off        ``weightd serve``
- off-b      the same again: the noise floor of comparing two daemons
- on         ``weightd serve --metrics 127.0.0.1:PORT``, never scraped: the cost of counting
- scraped    the same, scraped every 100 ms by a separate process, as Prometheus would

The daemons' threads and the client share one CPU (see ``pin``); workers and the scraper run
wherever the scheduler puts them.

One client process times ``manifest`` (what every attach asks first) and ``ls`` round trips
against each, in many short rounds, the three modes in a shuffled order each round, so that
whatever else the machine does falls on all three alike. The verdict is paired: each round's
median and mean of a mode divided by the same round's of ``off``, and the median of those
ratios over the rounds (a burst of load elsewhere on the machine moves one round, not the
verdict). Prints the table, and what a scrape took; writes benchmarks/out/metrics.json and
benchmarks/out/metrics.png. Exits 1 if a ratio is past 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightd.bench.spawn import throwaway
from weightd.client import Client

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
MODES = ("off", "off-b", "on", "scraped")
OPS = ("manifest", "ls")
SCRAPE_SECONDS = 0.1
HOLDERS = 4
LIMIT = 1.05

SCRAPER = textwrap.dedent(
    """
    import json, select, sys, time, urllib.request
    url, period = sys.argv[1], float(sys.argv[2])
    took = []
    while not select.select([sys.stdin], [], [], 0)[0]:  # until the parent writes a line
        t0 = time.perf_counter()
        body = urllib.request.urlopen(url, timeout=5).read()
        took.append(time.perf_counter() - t0)
        if len(took) == 1:
            print(len(body), flush=True)
        time.sleep(max(0.0, period - (time.perf_counter() - t0)))
    print(json.dumps(took), flush=True)
    """
)

HOLDER = textwrap.dedent(
    """
    import sys
    from weightd.client import state_dict
    sd = state_dict("m", socket=sys.argv[1])
    total = sum(float(t.sum()) for t in sd.values())
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def pin(pid: int, cpu: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpu``: where the scheduler happens to place a daemon's
    threads against the client's moved identical daemons by up to 30 % on a busy 2-core machine;
    on one core they agree within about 1 %."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint(directory: str) -> str:
    path = os.path.join(directory, "m.safetensors")
    save_file({f"layer{i // 4}.w{i % 4}": torch.randn(64, 64) for i in range(200)}, path)
    return path


def timed(client: Client, op: str, n: int) -> list[float]:
    call = (lambda: client.manifest("m")) if op == "manifest" else client.list
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {
        "p50": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "p99": xs[int(0.99 * (len(xs) - 1))],
        "n": len(xs),
    }


def measure(rounds: int, per_round: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="weightd-bench-metrics-")
    path = checkpoint(tmp)
    ports = {"on": free_port(), "scraped": free_port()}
    samples = {(mode, op): [] for mode in MODES for op in OPS}
    per = {(mode, op): [] for mode in MODES for op in OPS}  # (median, mean) of each round
    rng = random.Random(0)
    cpu = {max(os.sched_getaffinity(0))}
    with ExitStack() as stack:
        clients, holders = {}, []
        for mode in MODES:
            extra = ["--metrics", f"127.0.0.1:{ports[mode]}"] if mode in ports else []
            d = stack.enter_context(throwaway({"m": path}, args=extra))
            pin(d.pid, cpu)
            clients[mode] = stack.enter_context(Client(d.socket))
            for _ in range(HOLDERS):
                cmd = [sys.executable, "-c", HOLDER, d.socket]
                holders.append(
                    subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                )
        for p in holders:
            assert p.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{ports['scraped']}/metrics"
        cmd = [sys.executable, "-c", SCRAPER, url, str(SCRAPE_SECONDS)]
        scraper = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        body_bytes = int(scraper.stdout.readline())
        pin(os.getpid(), cpu)
        for mode in MODES:  # warm-up: manifest replies cached, sockets connected
            for op in OPS:
                timed(clients[mode], op, 50)
        t0 = time.monotonic()
        for _ in range(rounds):
            for mode in rng.sample(MODES, len(MODES)):
                for op in OPS:
                    xs = timed(clients[mode], op, per_round)
                    samples[mode, op] += xs
                    per[mode, op].append((statistics.median(xs), statistics.fmean(xs)))
        seconds = time.monotonic() - t0
        scraper.stdin.write("stop\n")
        scraper.stdin.close()
        scrapes = json.loads(scraper.stdout.readline())
        scraper.wait(10)
        for p in holders:
            p.stdin.close()
            p.wait(10)
    os.unlink(path)
    os.rmdir(tmp)

    def paired(mode: str, op: str, which: int) -> float:
        return statistics.median(m[which] / o[which] for m, o in zip(per[mode, op], per["off", op]))

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "per_round": per_round,
        "seconds": seconds,
        "scrapes": {"count": len(scrapes), "bytes": body_bytes, **summary(scrapes)},
        "latency": {f"{mode}/{op}": summary(samples[mode, op]) for mode in MODES for op in OPS},
        "ratio": {
            f"{mode}/{op}": {"p50": paired(mode, op, 0), "mean": paired(mode, op, 1)}
            for mode in MODES[1:]
            for op in OPS
        },
    }


def report(result: dict) -> bool:
    s = result["scrapes"]
    print(
        f"{result['rounds']} rounds x {result['per_round']} requests per op and mode "
        f"in {result['seconds']:.0f} s "
        f"(load average {result['load_average'][0]:.1f}); {s['count']} scrapes of {s['bytes']} bytes, "
        f"p50 {1e3 * s['p50']:.1f} ms, p99 {1e3 * s['p99']:.1f} ms"
    )
    print()
    head = ("op", "metrics", "p50 µs", "mean µs", "p99 µs", "p50 / off", "mean / off")
    print(f"{head[0]:<10}{head[1]:<9}" + "".join(f"{h:>11}" for h in head[2:]))
    ok = True
    for op in OPS:
        for mode in MODES:
            lat = result["latency"][f"{mode}/{op}"]
            ratio = result["ratio"].get(f"{mode}/{op}", {"p50": 1.0, "mean": 1.0})
            if mode in ("on", "scraped"):
                ok &= ratio["p50"] <= LIMIT and ratio["mean"] <= LIMIT
            print(
                f"{op:<10}{mode:<9}"
                + "".join(f"{1e6 * lat[k]:>11.1f}" for k in ("p50", "mean", "p99"))
                + f"{ratio['p50']:>11.3f}{ratio['mean']:>11.3f}"
            )
    print(
        f"\nratios: the median over rounds of each round's figure over the same round's 'off' (limit {LIMIT})"
    )
    return ok


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS) + 1, figsize=(14, 4))
    stats = ("p50", "mean", "p99")
    width = 0.27
    for ax, op in zip(axes, OPS):
        for i, mode in enumerate(MODES):
            lat = result["latency"][f"{mode}/{op}"]
            ax.bar(
                [j + i * width for j in range(len(stats))], [1e6 * lat[k] for k in stats], width, label=mode
            )
        ax.set_xticks([j + width for j in range(len(stats))], stats)
        ax.set_ylabel("round trip (µs)")
        ax.set_title(f"{op}")
        ax.legend(title="metrics")
    ax = axes[-1]
    labels = [f"{mode}/{op}" for op in OPS for mode in MODES[1:]]
    for i, which in enumerate(("p50", "mean")):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [result["ratio"][k][which] for k in labels], width, label=which)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(LIMIT, color="red", lw=0.8, ls="--", label=f"limit {LIMIT}")
    ax.set_xticks([j + width / 2 for j in range(len(labels))], labels, rotation=15)
    ax.set_ylim(0.8, 1.2)
    ax.set_title("paired ratio to metrics off")
    ax.legend()
    fig.suptitle(f"weightd request latency, metrics off / on / scraped every {int(SCRAPE_SECONDS * 1000)} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--per-round", type=int, default=100, help="requests of each op per mode and round")
    args = ap.parse_args()
    result = measure(args.rounds or (20 if args.quick else 200), args.per_round)
    ok = report(result)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "metrics.png")
    print(f"wrote {OUT / 'metrics.json'} and {OUT / 'metrics.png'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""A model on every node of a Ray cluster: read from storage once and copied between peers,
against every node reading the file itself.

    python benchmarks/fanout.py                  # 1, 2 and 4 nodes, a 1 GiB checkpoint
    python benchmarks/fanout.py --gib 0.25 --nodes 1,2

For each node count, a fresh local Ray cluster (``ray.cluster_utils.Cluster``: every node on
this machine, each with its own daemon), and two ways to have the checkpoint on every node,
the file evicted from the page cache before each (``POSIX_FADV_DONTNEED``):

- ``each reads``  every node's daemon loads the file (what ``load_everywhere`` did before);
- ``peers``       ``ray_zerocopy.load_everywhere``: one daemon reads it, the others copy it
                  from peers through Ray's object store while it is read (Note [one storage
                  read per cluster], Note [a copy that starts before the seal] in
                  weightd/client/ray_zerocopy/peers.py);
- ``peers, after the seal``  the same copy started only once the reading node sealed its
                  segment (``load`` on one node, then ``peers.spread``): what ``load_everywhere``
                  did before the copy overlapped the read;
- ``Ray alone``   (2 nodes) the floor of the copy: Ray moving the same bytes between the two
                  nodes in objects of the same size, as many in flight, each written into a
                  new /dev/shm file, without weightd (no storage read, no digest);
- ``CPU floor``   (2 nodes, computed) the CPU time of one node's load and of Ray alone, on this
                  machine's cores: no way of doing both can end sooner where every core is busy.

Each way runs ``--repeat`` times (interleaved); a row is the run with the median time.

Columns: seconds until every node serves it, and that against one node loading it alone;
bytes the daemons asked the file system for (``rchar`` of /proc/PID/io: on a shared or
network file system each of those is served by the origin), and what came from the disk
(``read_bytes``: here one page cache serves every node); bytes moved between nodes (what the
receivers took out of the object store; on one machine Ray's object manager moves them over
loopback TCP, memory to memory: that is "the network" here); the object store's peak, in
bytes and in chunks (Ray's own accounting, ``store_stats.object_store_bytes_used`` summed over
nodes, sampled every 10 ms; and the pages the stores' /dev/shm/plasma files hold afterwards,
a high-water mark sampling cannot miss). Ray deletes released objects in batches, every
``free_objects_period_milliseconds`` (1000 by default): what a transfer released in that long
still counts. The clusters here are started with 20 (``--free-ms``). "CPU busy": the seconds
all cores of the machine spent outside idle while it ran (/proc/stat), whoever spent them.

Writes benchmarks/out/fanout.json and benchmarks/out/fanout.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
MIB = 1 << 20
GIB = 1 << 30
NAME = "fanout-bench"


def make_checkpoint(path: Path, nbytes: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    layers = 16
    per = nbytes // layers // 4
    save_file({f"layer{i}.weight": torch.randn(per // 1024, 1024, generator=g) for i in range(layers)}, path)


def cpu_busy() -> float:
    """Seconds the machine's cores have spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


class StorePeak:
    """The object store's bytes in use, summed over the cluster's nodes, sampled in a thread."""

    def __init__(self, address: str):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._state = get_state_from_address(address)
        self._reply = get_memory_info_reply
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self._reply(self._state).store_stats.object_store_bytes_used
            self.peak = max(self.peak, used)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _copied(peers) -> int:
    """Bytes the receiving nodes took from the object store so far (the registry counts them)."""
    import ray

    reg = peers.registry(create=False)
    return sum(ray.get(reg.progress.remote()).values()) if reg is not None else 0


def ray_alone(nbytes: int, nodes: list[str], chunk: int, window: int) -> tuple[float, float]:
    """Seconds Ray alone takes to move ``nbytes`` from one node to another as the peers do:
    objects of ``chunk`` bytes made by an actor on the first node, ``window`` asked for at a
    time by an actor on the second, each written (``pwrite``) into a new /dev/shm file and
    dropped. No weightd, no digest: the floor of a copy between nodes. And the machine's busy
    CPU seconds meanwhile (the actors' start not counted)."""
    import numpy as np
    import ray

    from weightd.client.ray_zerocopy.daemons import on_node

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self):
            self.buf = np.full(nbytes, 7, dtype=np.uint8)

        def read(self, offset: int, length: int):
            return self.buf[offset : offset + length]

        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    class Receiver:
        def ready(self) -> bool:
            return True

        def pull(self, holder) -> tuple[float, float]:
            fd, where = tempfile.mkstemp(dir="/dev/shm", prefix="weightd-fanout-floor-")
            try:
                os.ftruncate(fd, nbytes)
                busy = cpu_busy()
                t0 = time.perf_counter()
                todo = iter(range(0, nbytes, chunk))
                pending = {}

                def ask():
                    for o in todo:
                        pending[holder.read.remote(o, min(chunk, nbytes - o))] = o
                        return

                for _ in range(window):
                    ask()
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    offset = pending.pop(ready[0])
                    data = ray.get(ready[0])
                    del ready
                    ask()
                    os.pwrite(fd, data, offset)
                    del data
                return time.perf_counter() - t0, cpu_busy() - busy
            finally:
                os.close(fd)
                os.unlink(where)

    holder = Holder.options(scheduling_strategy=on_node(nodes[0])).remote()
    receiver = Receiver.options(scheduling_strategy=on_node(nodes[1])).remote()
    try:
        ray.get([holder.ready.remote(), receiver.ready.remote()])  # started: not timed
        return ray.get(receiver.pull.remote(holder))
    finally:
        ray.kill(holder)
        ray.kill(receiver)


def run_cluster(nodes: int, path: Path, store: int, runtime: str, free_ms: int, repeat: int) -> list[dict]:
    import ray

    sys.path.insert(0, str(ROOT))
    from weightd.bench import raycluster
    from weightd.bench.pressure import evict
    from weightd.client import Client
    from weightd.client import ray_zerocopy as rz
    from weightd.client.ray_zerocopy import peers
    from weightd.client.ray_zerocopy.daemons import agent

    samples: dict[str, list[dict]] = {}
    env = {"RAY_free_objects_period_milliseconds": str(free_ms)}
    with raycluster.local_cluster(nodes, runtime=runtime, object_store_memory=store, env=env) as c:
        sockets = c.sockets
        daemons = {}
        for n, s in sockets.items():
            with Client(s) as cl:
                daemons[n] = cl.ping()["pid"]
        raylets = raycluster.raylet_pids(c)
        methods = ["peers"]
        if nodes > 1:
            methods = ["each reads", "peers", "peers, after the seal"] + (["Ray alone"] if nodes == 2 else [])
        first = ray.get_runtime_context().get_node_id()  # load_everywhere's reader by default
        for method in [m for _ in range(repeat) for m in methods]:
            evict(path)
            d0 = {n: io(p) for n, p in daemons.items()}
            copied0 = _copied(peers)
            busy = cpu_busy()
            with StorePeak(c.address) as peak:
                t0 = time.perf_counter()
                if method == "peers":
                    rz.load_everywhere(NAME, str(path))
                elif method == "peers, after the seal":
                    ray.get(agent(first).load.remote(sockets[first], str(path), NAME, None))
                    peers.spread(NAME, first, sockets, path=str(path))
                elif method == "each reads":  # every node's agent has its daemon read the file
                    ray.get([agent(n).load.remote(s, str(path), NAME, None) for n, s in sockets.items()])
                else:
                    seconds, busy = ray_alone(path.stat().st_size, sorted(sockets), peers.CHUNK, peers.WINDOW)
                if method != "Ray alone":
                    seconds = time.perf_counter() - t0
            if method != "Ray alone":
                busy = cpu_busy() - busy
                for s in sockets.values():  # every node serves it
                    with Client(s) as cl:
                        assert NAME in {m["name"] for m in cl.list()}
            samples.setdefault(method, []).append(
                {
                    "nodes": nodes,
                    "method": method if nodes > 1 else "one node",
                    "seconds": seconds,
                    "cpu_busy": busy,
                    "storage_rchar": sum(io(p)["rchar"] - d0[n]["rchar"] for n, p in daemons.items()),
                    "storage_disk": sum(
                        io(p)["read_bytes"] - d0[n]["read_bytes"] for n, p in daemons.items()
                    ),
                    "moved": _copied(peers) - copied0 if method != "Ray alone" else path.stat().st_size,
                    "store_peak": peak.peak,
                    "plasma_pages": raycluster.plasma_bytes(raylets),
                    "chunk": peers.CHUNK,
                    "window": peers.WINDOW,
                }
            )
            print(json.dumps(samples[method][-1]), flush=True)
            if method != "Ray alone":
                rz.unload_everywhere(NAME)
    rows = []
    for runs in samples.values():
        row = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows.append({**row, "runs": [round(r["seconds"], 3) for r in runs]})
    return rows


def cpu_floor(rows: list[dict]) -> dict | None:
    """The 2-node row no way can beat on this machine: the CPU time of one node's load and of
    Ray alone moving the bytes, spread over every core."""
    one = next((r for r in rows if r["nodes"] == 1), None)
    alone = next((r for r in rows if r["method"] == "Ray alone"), None)
    if one is None or alone is None:
        return None
    cpu = one["cpu_busy"] + alone["cpu_busy"]
    return {
        "nodes": 2,
        "method": f"CPU floor: (load + Ray alone) CPU / {os.cpu_count()} cores",
        "seconds": cpu / os.cpu_count(),
        "cpu_busy": cpu,
        "runs": [],
    }


def table(rows: list[dict], model: int) -> str:
    one = next((r["seconds"] for r in rows if r["nodes"] == 1), None)
    lines = [
        "| nodes | method | every node ready | vs one node | CPU busy | storage read (rchar) | from disk | "
        "moved between nodes | object store peak | plasma pages |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['seconds'] / one:.2f}x" if one else ""
        head = f"| {r['nodes']} | {r['method']} | {r['seconds']:.2f} s | {ratio} | {r['cpu_busy']:.2f} s |"
        if "store_peak" not in r:  # computed, not run
            lines.append(head + " | | | | |")
            continue
        chunks = r["store_peak"] / r["chunk"]
        lines.append(
            f"{head} "
            f"{r['storage_rchar'] / model:.2f}x ({r['storage_rchar'] / MIB:,.0f} MiB) | "
            f"{r['storage_disk'] / MIB:,.0f} MiB | {r['moved'] / MIB:,.0f} MiB | "
            f"{r['store_peak'] / MIB:,.0f} MiB ({chunks:.1f} chunks) | {r['plasma_pages'] / MIB:,.0f} MiB |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, color in (
        ("each reads", "tab:orange"),
        ("peers, after the seal", "tab:gray"),
        ("peers", "tab:blue"),
    ):
        rs = [r for r in rows if r["method"] in (method, "one node")]
        a.plot([r["nodes"] for r in rs], [r["seconds"] for r in rs], "o-", color=color, label=method)
        b.plot(
            [r["nodes"] for r in rs], [r["storage_rchar"] / GIB for r in rs], "o-", color=color, label=method
        )
    for r in rows:
        if r["method"].startswith("CPU floor"):
            a.plot([r["nodes"]], [r["seconds"]], "x", color="black", label="CPU floor (load + copy)")
    a.set_title("seconds until every node serves it")
    b.set_title("GiB read from storage (daemons' rchar)")
    for ax in (a, b):
        ax.set_xlabel("nodes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="checkpoint size [1]")
    p.add_argument("--nodes", default="1,2,4", help="node counts [1,2,4]")
    p.add_argument("--store-mib", type=int, default=600, help="object store per node [600]")
    p.add_argument("--repeat", type=int, default=3, help="runs of each way; the median is shown [3]")
    p.add_argument(
        "--free-ms",
        type=int,
        default=20,
        help="Ray's free_objects_period_milliseconds: how long released objects may wait to be "
        "deleted, in batches [20; Ray's default is 1000]",
    )
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # The daemons' sockets, locks and logs: never the user's own daemon; removed with the run.
    with (
        tempfile.TemporaryDirectory(prefix="weightd-fanout-") as runtime,
        tempfile.TemporaryDirectory(prefix="weightd-fanout-ckpt-", dir="/tmp") as tmp,
    ):
        path = Path(tmp) / "model.safetensors"
        make_checkpoint(path, int(args.gib * GIB))
        model = path.stat().st_size
        rows = []
        for n in (int(x) for x in args.nodes.split(",")):
            rows += run_cluster(n, path, args.store_mib * MIB, runtime, args.free_ms, args.repeat)
    floor = cpu_floor(rows)
    if floor is not None:  # beside the 2-node rows
        rows.insert(max(i for i, r in enumerate(rows) if r["nodes"] <= 2) + 1, floor)
    text = table(rows, model)
    chunk, window = rows[0]["chunk"] // MIB, rows[0]["window"]
    print(f"\n{model / GIB:.2f} GiB checkpoint, chunks of {chunk} MiB, window {window}\n")
    print(text)
    print(f"Ray's free_objects_period_milliseconds: {args.free_ms}")
    meta = {"model_bytes": model, "free_objects_period_milliseconds": args.free_ms, "rows": rows}
    (OUT / "fanout.json").write_text(json.dumps(meta, indent=1))
    plot(rows, OUT / "fanout.png")
    print(f"\nwrote {OUT / 'fanout.json'} and {OUT / 'fanout.png'}")


if __name__ == "__main__":
    main()

"""The one local Ray cluster of the Ray tests and benchmarks: ``ray.cluster_utils.Cluster``
nodes on this machine, each with its own weightd daemon, all stopped on the way out.

    with local_cluster(3, runtime=tmp, object_store_memory=400 << 20) as c:
        c.sockets      # {node id: its daemon's socket} (ray_zerocopy.ensure_daemons)
        c.add_node(num_cpus=1, object_store_memory=c.store)

The daemons' sockets, locks and logs go to ``runtime`` (``$XDG_RUNTIME_DIR`` while the cluster
runs: never the user's own daemon); ``instances(runtime)`` names their segments' instances, for
a check that none was left. Only this cluster's own handles stop it (never ``ray stop``: others
run clusters on the machine too).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Ray kills workers when the whole machine is short of memory, whoever uses it; on a shared
# machine that would be other jobs' doing.
QUIET_MONITOR = {"RAY_memory_monitor_refresh_ms": "0"}


@contextlib.contextmanager
def local_cluster(
    nodes: int,
    *,
    runtime: str | Path,
    object_store_memory: int,
    num_cpus: int = 1,
    pythonpath: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    system_config: dict | None = None,
):
    """A cluster of ``nodes`` nodes (the head and ``nodes - 1`` workers, in ``c.workers``), the
    driver connected, a daemon on every node (``c.sockets``). ``pythonpath``: folders the
    workers import from (the raylets pass ``$PYTHONPATH`` on); ``env``: more variables read by
    the raylets (``RAY_*`` settings), set while the cluster runs; ``system_config``: the head's
    ``_system_config``."""
    import ray
    from ray.cluster_utils import Cluster

    from weightd.client import ray_zerocopy as rz

    settings = {**QUIET_MONITOR, **(env or {}), "XDG_RUNTIME_DIR": str(runtime)}
    if pythonpath:
        settings["PYTHONPATH"] = os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        head = {"num_cpus": num_cpus, "object_store_memory": object_store_memory, "include_dashboard": False}
        if system_config:
            head["_system_config"] = system_config
        c = Cluster(initialize_head=True, head_node_args=head)
        try:
            c.store = object_store_memory
            c.workers = [
                c.add_node(num_cpus=num_cpus, object_store_memory=object_store_memory)
                for _ in range(nodes - 1)
            ]
            ray.init(address=c.address, log_to_driver=False)
            c.sockets = rz.ensure_daemons()
            yield c
        finally:
            try:
                if ray.is_initialized():
                    rz.shutdown_daemons()
                    ray.shutdown()
            finally:
                c.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def instances(runtime: str | Path) -> list[str]:
    """The daemon instances (segment name prefixes) of the daemons Ray started under ``runtime``."""
    from weightd.daemon.config import Config

    return [
        Config(socket=str(sock)).instance
        for sock in Path(runtime).glob("weightd-ray-*.sock")
        if not sock.name.endswith(".admin.sock")
    ]


def raylet_pids(c) -> list[int]:
    """The process ids of the cluster's raylets (whose object stores a benchmark reads)."""
    return [p.process.pid for node in [c.head_node, *c.worker_nodes] for p in node.all_processes["raylet"]]


def plasma_bytes(raylets: list[int]) -> int:
    """Pages Ray's object stores hold: their (deleted) /dev/shm/plasma files, held open by the
    raylets ``raylets`` (a high-water mark: sampling cannot miss it). Stdlib only."""
    seen, total = set(), 0
    for pid in raylets:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target, st = os.readlink(fd), os.stat(fd)
            except OSError:
                continue
            if "/dev/shm/plasma" in target and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total

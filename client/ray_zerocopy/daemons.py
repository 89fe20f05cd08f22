"""A weightd daemon on every Ray node, and how a process finds its own node's daemon.

Note [the node-local socket]
    A process inside Ray resolves its daemon's socket in this order:

    1. ``socket=``, where the caller gives one;
    2. ``$WEIGHTD_SOCKET`` (set it per node, e.g. ``WEIGHTD_SOCKET=... ray start ...``: the
       raylet and every worker it starts inherit it);
    3. the socket of the daemon that :func:`ensure_daemons` started *for this Ray node*:
       ``<runtime dir>/weightd-ray-<node id[:12]>.sock``, where it exists (runtime dir:
       ``$XDG_RUNTIME_DIR``, else ``/tmp/weightd-<uid>``);
    4. ``weightd.protocol.default_socket()``: the node's fixed path (a systemd daemon).

    The node id in (3) is what keeps several Ray nodes on one machine (``ray.cluster_utils.
    Cluster``, or several raylets per host) apart: they share /tmp and /dev/shm, so a fixed path
    would make them share one daemon. A daemon's segments are named after a hash of its socket
    path (``weightd.<instance>.*``), so per-node sockets get per-node segments too.

The daemon actor and the probe tasks use only the torch-free connection; nothing this module
imports imports torch (Note [no worker starts on the way] in ray_zerocopy.peers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import zmq
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from weightd import protocol
from weightd.client.connection import Connection
from weightd.errors import DaemonNotRunning, WeightdError

NAMESPACE = "weightd"
ACTOR_PREFIX = "weightd-daemon-"
READY_TIMEOUT = 120.0
SERVE_THREADS = 4  # transfers' chunks a node's agent sends at once (peers.SERVES * peers.WINDOW)


def node_socket(socket: str | None = None) -> str:
    """The socket of this node's daemon, resolved as Note [the node-local socket] says.

    >>> from weightd.client import ray_zerocopy
    >>> ray_zerocopy.node_socket()            # inside an actor on node 5f3a...
    '/run/user/1000/weightd-ray-5f3a09c1d2e4.sock'
    """
    if socket:
        return os.path.abspath(socket)
    if os.environ.get(protocol.ENV_SOCKET):
        return os.path.abspath(os.environ[protocol.ENV_SOCKET])
    node = _current_node_id()
    if node is not None:
        ours = ray_socket(node)
        if os.path.exists(ours):
            return ours
    return os.path.abspath(protocol.default_socket())


def ray_socket(node_id: str) -> str:
    """Where the daemon that Ray starts for node ``node_id`` listens."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(f"/tmp/weightd-{os.getuid()}")
    return str(base / f"weightd-ray-{node_id[:12]}.sock")


def ping(socket: str, timeout: float = 2.0) -> dict | None:
    """The daemon's ping reply, or None when nobody answers there (torch-free)."""
    try:
        with Connection(socket, timeout=timeout) as c:
            return c.call("ping")
    except (WeightdError, zmq.ZMQError):
        return None


def alive_nodes() -> list[str]:
    """Ids of the Ray nodes that are alive and can run work (the driver must be connected)."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def ensure_daemons(
    socket: str | None = None, *, timeout: float = READY_TIMEOUT, fill: bool = True
) -> dict[str, str]:
    """Make sure every alive Ray node has a weightd daemon; returns ``{node id: socket}``.

    On each node, a daemon that already answers at the node's socket (Note [the node-local
    socket]) is used as it is. Elsewhere a detached actor pinned to the node starts
    ``weightd serve --unlink-on-exit`` (at ``socket``, or at the node's own Ray path) and keeps
    it running for the cluster's life, or until :func:`shutdown_daemons`. Idempotent: call it
    again after adding nodes, or to replace a daemon that died.

    ``fill``: a daemon that lacks a model the cluster keeps everywhere (``load_everywhere``,
    ``publish_everywhere``, ``ModelWrapper``) gets it from a node that holds it, before this
    returns (Note [one storage read per cluster] in ray_zerocopy.peers).

    >>> ray.init()
    >>> ray_zerocopy.ensure_daemons()
    {'5f3a09c1d2e4...': '/tmp/weightd-1000/weightd-ray-5f3a09c1d2e4.sock'}
    """
    from weightd.client.ray_zerocopy import peers

    peers.registry()  # started now (a worker process): the first copy between nodes does not wait for it
    nodes = alive_nodes()
    probes = {n: _probe.options(scheduling_strategy=on_node(n)).remote(socket) for n in nodes}
    agents = {n: agent(n) for n in nodes}  # also where a daemon runs already: each node's agent
    found: dict[str, str] = {}
    held: dict[str, list[str]] = {}
    starting = {}
    for node, ref in probes.items():
        existing = ray.get(ref, timeout=timeout)
        if existing is not None:
            found[node], held[node] = existing
        else:
            starting[node] = agents[node].ensure.remote(socket)
    for node, ref in starting.items():
        found[node], held[node] = ray.get(ref, timeout=timeout), []
    ray.get([a.ready.remote() for a in agents.values()], timeout=timeout)
    if fill:
        peers.complete(found, held)
    return found


def shutdown_daemons(*, timeout: float = 30.0) -> list[str]:
    """Stop the daemons :func:`ensure_daemons` started and free their segments.

    Daemons that were already running (systemd, by hand) are left alone. Workers that are
    still attached keep their mappings; the memory goes when they let go. Returns the sockets
    of the daemons stopped.
    """
    from weightd.client.ray_zerocopy import peers

    with contextlib.suppress(ValueError):  # nothing left to copy from or to
        ray.kill(ray.get_actor(peers.REGISTRY, namespace=NAMESPACE), no_restart=True)
    stopped = []
    for name in _daemon_actor_names():
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        with contextlib.suppress(ray.exceptions.RayError):
            stopped.append(ray.get(actor.stop.remote(), timeout=timeout))
        ray.kill(actor, no_restart=True)
    return [s for s in stopped if s]


def _current_node_id() -> str | None:
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def on_node(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node, soft=False)


# num_cpus=0: a probe must run even while every CPU of the node is busy with inference.
@ray.remote(num_cpus=0, max_retries=0)
def _probe(socket: str | None) -> tuple[str, list[str]] | None:
    """The node's daemon's socket and the models it serves, or None if none answers."""
    path = node_socket(socket)
    try:
        with Connection(path, timeout=2.0) as c:
            return path, [m["name"] for m in c.call("list")["models"] if m.get("state", "ready") == "ready"]
    except (WeightdError, zmq.ZMQError):
        return None


def agent(node: str):
    """Node ``node``'s ``NodeDaemon`` actor (started if it has none)."""
    return NodeDaemon.options(
        name=ACTOR_PREFIX + node,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=on_node(node),
        num_cpus=0,
        max_restarts=0,
    ).remote()


def _daemon_actor_names() -> list[str]:
    from ray.util import list_named_actors

    return sorted(
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(ACTOR_PREFIX)
    )


# Threads, in three groups that never wait for each other: the default one starts and stops
# the daemon; "serve" sends chunks to other nodes; "fill" copies models into this node's daemon
# (a fill waits for other nodes' "serve" threads, never for its own node's).
@ray.remote(concurrency_groups={"serve": 2 * SERVE_THREADS, "fill": 4})
class NodeDaemon:
    """A node's weightd agent, for the cluster's life: keeps ``weightd serve --unlink-on-exit``
    running on the node (``ensure``; not where a daemon answered already), and copies models
    between nodes' daemons (Note [one storage read per cluster] in ray_zerocopy.peers).

    The daemon runs under a supervisor (Note [a Ray actor's children are SIGKILLed] in
    ray_zerocopy.supervisor) that stops it gracefully when this actor's process ends, however it ends:
    a cluster that goes down takes its weights with it.
    """

    def __init__(self):
        from weightd.client.ray_zerocopy import peers

        self.socket: str | None = None
        self.peers = peers
        self.sources = peers.Sources()
        self.reading = peers.Reading()

    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="serve")
    def describe(self, socket: str, name: str) -> dict:
        return self.peers.describe(socket, name)

    @ray.method(concurrency_group="serve")
    def read(self, *args):
        return self.sources.read(*args)

    @ray.method(concurrency_group="fill")
    def load(self, socket: str, path: str, name: str, factory: str | None) -> dict:
        return self.peers.load(socket, path, name, factory)

    @ray.method(concurrency_group="fill")
    def start_load(self, socket: str, path: str, name: str, factory: str | None) -> dict:
        return self.reading.start(socket, path, name, factory)

    @ray.method(concurrency_group="fill")
    def finish_load(self, token: str) -> dict:
        return self.reading.finish(token)

    @ray.method(concurrency_group="fill")
    def fill(self, name: str, key: str, node: str, socket: str) -> dict | None:
        return self.peers.fill(name, key, node, socket)

    @ray.method(concurrency_group="fill")
    def unload(self, socket: str, name: str) -> bool:
        return self.peers.unload(socket, name)

    def ensure(self, socket: str | None) -> str:
        path = os.path.abspath(
            socket
            or os.environ.get(protocol.ENV_SOCKET)
            or ray_socket(ray.get_runtime_context().get_node_id())
        )
        if ping(path):  # ours, still running, or someone else's that appeared meanwhile: use it
            return path
        _purge(path)  # what a daemon that died by SIGKILL left behind
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {k: v for k, v in os.environ.items() if k != protocol.ENV_SOCKET}
        cmd = [
            sys.executable,
            SUPERVISOR,
            str(os.getpid()),
            path + ".log",
            "--",
            sys.executable,
            "-m",
            "weightd",
            "serve",
            "--socket",
            path,
            "--unlink-on-exit",
        ]
        subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)  # returns once it has forked away
        self.socket = path
        deadline = time.monotonic() + READY_TIMEOUT
        while not ping(path, timeout=1.0):
            if time.monotonic() > deadline:
                raise DaemonNotRunning(
                    f"weightd serve --socket {path} did not answer in {READY_TIMEOUT:g} s: see {path}.log"
                )
            time.sleep(0.05)
        return path

    def stop(self, timeout: float = 30.0) -> str | None:
        if self.socket is None:
            return None
        reply = ping(self.socket)
        if reply:
            pid = int(reply["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        _purge(self.socket)
        return self.socket


SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))  # run by path: no torch import


def _purge(path: str) -> None:
    # Only the segments of this socket's instance; purge refuses while a daemon answers there.
    subprocess.run(
        [sys.executable, "-m", "weightd", "purge", "--socket", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False

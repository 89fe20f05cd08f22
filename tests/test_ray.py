"""weightd under real Ray: a two-node local cluster, a daemon per node, actors, tasks, Ray Data.

One cluster for the module (starting Ray costs seconds): two nodes on this machine, each
with its own daemon (Note [the node-local socket]), so every test also proves that whatever
node Ray picks finds its own node's weights. Workers import this module and tests/models.py
through PYTHONPATH, which the raylets pass on.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")
if importlib.util.find_spec("ray.data") is None:  # not imported here: it brings pandas (~0.7 s CPU)
    pytest.skip("ray.data is not installed", allow_module_level=True)

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from weightd.bench import raycluster  # noqa: E402
from weightd.client import Client, DaemonNotRunning, ModelNotFound, info  # noqa: E402
from weightd.client import ray_zerocopy as rz  # noqa: E402
from weightd.client.ray_zerocopy import ModelWrapper  # noqa: E402
from weightd.client.ray_zerocopy import daemons as ray_daemons  # noqa: E402
from weightd.daemon.config import Config  # noqa: E402

from conftest import SHM, remove_segments  # noqa: E402
from models import build_tiny, trained_tiny  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)
MIB = 1 << 20

pytestmark = pytest.mark.timeout(180)


# --- the cluster ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    runtime = tmp_path_factory.mktemp("xdg")  # where the Ray-started daemons put their sockets
    with raycluster.local_cluster(
        2, runtime=runtime, num_cpus=2, object_store_memory=96 * MIB, pythonpath=(TESTS,)
    ) as c:
        yield c
    leaked = [s for i in raycluster.instances(runtime) for s in remove_segments(i)]
    assert not leaked, f"daemons started through Ray left segments: {leaked}"


def on_node(node_id: str) -> dict:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


def in_weightd_segment(t: torch.Tensor) -> bool:
    """Whether the tensor's bytes lie in a mapping of a weightd segment of this process."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "/weightd." in parts[5]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


@ray.remote(num_cpus=0)
def resolve_socket() -> tuple[str, str]:
    return ray.get_runtime_context().get_node_id(), rz.node_socket()


@ray.remote(num_cpus=0)
def attach_and_run(name: str, ids: torch.Tensor):
    model = rz.attach(name, model=build_tiny)
    shared = all(in_weightd_segment(p) for p in model.parameters())
    return ray.get_runtime_context().get_node_id(), shared, model(ids)


@ray.remote(num_cpus=0)
class Loader:
    def __init__(self, wrapper, **load_kwargs):
        self.model = wrapper.load(**load_kwargs)

    def run(self, x):
        with torch.no_grad():
            return self.model(x)

    def facts(self) -> dict:
        model = self.model
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "shared": all(in_weightd_segment(p) for p in model.parameters()),
            "tied": model.head.weight is model.embed.weight,
            "inv_freq": model.inv_freq.clone(),
            "inference": any(p.is_inference() for p in model.parameters()),
            "copies": info(model).copies,
        }

    def fine_tune(self, ids) -> float:
        """One SGD step on the attached weights: they are ordinary tensors, the writes private."""
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        loss = self.model(ids).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        return float(self.model.embed.weight.detach().sum())


# --- test models: a pipeline with modules in nested places, bf16, ties, a shared module ---


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.register_buffer("pos", torch.linspace(0, 1, 16), persistent=False)

    def forward(self, ids):
        return self.proj(self.embed(ids) + self.pos.to(self.embed.weight.dtype))


class Head(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.out = nn.Linear(16, 32, bias=False)
        self.out.weight = embed.weight  # tied across modules of the pipeline

    def forward(self, h):
        return self.out(h)

    def pid(self, _):
        return torch.tensor(os.getpid())


class Stage:
    def __init__(self, head):
        self.head = head
        self.scale = 0.5


class Pipeline:
    """Modules in an attribute, a list, a dict and a plain object; one of them held twice."""

    def __init__(self):
        self.encoder = Encoder()
        self.stages = [Stage(Head(self.encoder.embed))]
        self.extra = {"norm": nn.LayerNorm(16), "again": self.encoder}
        self.name = "pipe"

    def __call__(self, ids):
        h = self.extra["norm"](self.encoder(ids))
        return self.stages[0].head(h) * self.stages[0].scale


def bf16_pipeline(seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    p = Pipeline()
    for m in (p.encoder, p.extra["norm"], p.stages[0].head):
        m.to(torch.bfloat16)
    with torch.no_grad():
        p.extra["norm"].weight.add_(torch.randn(16, dtype=torch.bfloat16))
    return p


class Predictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)

    def predict(self, x):
        return self.forward(x).argmax(-1)

    def where(self, _):
        return torch.tensor(os.getpid())


# --- tests ---


def test_import_weightd_client_does_not_import_ray():
    code = textwrap.dedent("""
        import sys
        import weightd.client
        assert "ray" not in sys.modules, "weightd.client imported ray"
        from weightd.client import ray_zerocopy
        assert "ray" in sys.modules and hasattr(ray_zerocopy, "ModelWrapper")
        assert "ray_zerocopy" not in sys.modules, "the PyPI package's top-level name is not ours"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_each_node_gets_its_own_daemon(cluster, tmp_path):
    sockets = cluster.sockets
    nodes = rz.alive_nodes()
    assert sorted(sockets) == nodes and len(nodes) == 2
    assert len(set(sockets.values())) == 2, "two nodes on one machine must not share a socket"
    pids = {n: ray_daemons.ping(s)["pid"] for n, s in sockets.items()}
    assert len(set(pids.values())) == 2
    assert rz.ensure_daemons() == sockets, "idempotent"
    assert {n: ray_daemons.ping(s)["pid"] for n, s in sockets.items()} == pids, "no second daemon started"
    for node in nodes:
        assert ray.get(resolve_socket.options(**on_node(node)).remote()) == (node, sockets[node])

    # a model loaded on every node, from a file every node can read
    from safetensors.torch import save_file

    src = trained_tiny(seed=4)
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items() if k != "head.weight"},
        tmp_path / "lm.safetensors",
    )
    loaded = rz.load_everywhere("lm-file", str(tmp_path / "lm.safetensors"))
    assert sorted(loaded) == nodes
    ids = torch.arange(12)
    for node in nodes:
        where, shared, out = ray.get(attach_and_run.options(**on_node(node)).remote("lm-file", ids))
        assert where == node and shared
        assert torch.equal(out, src(ids))
    # each node's daemon has its own segment, under its own instance name
    instances = {Config(socket=s).instance for s in sockets.values()}
    assert all(list(SHM.glob(f"weightd.{i}.*")) for i in instances)
    assert rz.unload_everywhere("lm-file") == 2
    assert not any(list(SHM.glob(f"weightd.{i}.*")) for i in instances)


def test_actor_mode_in_actors_and_in_the_driver(cluster):
    src = trained_tiny(seed=1)
    ids = torch.arange(20) % 64
    expected = src(ids)
    wrapper = ModelWrapper.from_model(src, mode="actor")
    restored = pickle.loads(pickle.dumps(wrapper))
    assert len(pickle.dumps(wrapper)) < 16_000 < sum(p.numel() * 4 for p in src.parameters()), (
        "no weights in the pickle"
    )
    assert all(p.is_meta for p in wrapper._skeleton.parameters()), "the skeleton is weightless"
    assert not wrapper._skeleton.inv_freq.is_meta, "non-persistent buffers stay real"

    # the driver
    model = restored.load()
    assert torch.equal(model(ids), expected) and not model.training
    assert model.head.weight is model.embed.weight and info(model).copies == 0
    assert "inv_freq" not in model.state_dict(), "non-persistent buffers stay non-persistent"
    with pytest.raises(TypeError, match="actor mode wrapper"):
        wrapper(ids)
    with pytest.raises(AttributeError, match="actor mode wrapper"):
        _ = wrapper.embed

    # actors, one on each node
    actors = [Loader.options(**on_node(n)).remote(wrapper) for n in rz.alive_nodes()]
    for actor, node in zip(actors, rz.alive_nodes()):
        assert torch.equal(ray.get(actor.run.remote(ids)), expected)
        facts = ray.get(actor.facts.remote())
        assert facts["node"] == node and facts["shared"] and facts["tied"] and facts["copies"] == 0
        assert torch.equal(facts["inv_freq"], src.inv_freq) and not facts["inference"]

    # fine-tuning on top: an actor changes its weights; the daemon's stay as published
    tuner = Loader.remote(wrapper, requires_grad=True)
    before = float(src.embed.weight.detach().sum())
    assert ray.get(tuner.fine_tune.remote(ids)) != pytest.approx(before)
    assert torch.equal(ray.get(actors[0].run.remote(ids)), expected), "another actor never sees the write"
    assert float(wrapper.load().embed.weight.sum()) == pytest.approx(before)

    # unloaded: actors keep working, new loads are told what to do
    for a in [*actors, tuner]:
        ray.kill(a)
    assert wrapper.unload() == 2
    assert torch.equal(model(ids), expected), "the driver's attached model keeps working"
    with pytest.raises(ModelNotFound):
        wrapper.load()


def test_task_mode_custom_methods_and_pickling(cluster):
    src = Predictor()
    x = torch.randn(5, 8)
    wrapper = ModelWrapper.from_model(src, mode="task", method_names=("forward", "predict", "where"))
    assert torch.equal(wrapper(x), src(x))
    assert torch.equal(wrapper.predict(x), src.predict(x))
    assert int(wrapper.where(x)) != os.getpid(), "the method ran in a Ray task, not here"
    restored = pickle.loads(pickle.dumps(wrapper))
    assert torch.equal(restored.forward(x), src(x))
    only_call = ModelWrapper.from_model(src, mode="task")
    with pytest.raises(AttributeError, match="method_names"):
        _ = only_call.predict  # only __call__ unless asked

    pipe = bf16_pipeline(seed=2)
    ids = torch.arange(10)
    pipe_wrapper = ModelWrapper.from_model(pipe, mode="task")
    rewritten = pipe_wrapper.load()
    assert torch.equal(rewritten(ids), pipe(ids))
    assert isinstance(rewritten.encoder, rz.RemoteModule) and rewritten.extra["again"] is rewritten.encoder
    assert isinstance(pipe.encoder, Encoder), "the user's pipeline is left as it was"
    for w in (wrapper, only_call, pipe_wrapper):
        assert w.unload() == 2


def test_bf16_pipeline_with_ties_and_a_shared_module(cluster):
    pipe = bf16_pipeline(seed=3)
    ids = torch.arange(24) % 32
    expected = pipe(ids)
    wrapper = ModelWrapper.from_model(pipe, mode="actor")
    unique = {
        t.data_ptr(): t
        for m in (pipe.encoder, pipe.extra["norm"], pipe.stages[0].head)
        for t in m.state_dict().values()
    }
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    sockets = cluster.sockets
    assert len(sockets) == 2
    for socket in sockets.values():  # this node's daemon from this process, the other's through Ray
        with Client(socket) as c:
            published = {m["name"]: m for m in c.list()}[wrapper.model_name]
        assert published["nbytes"] == nbytes, "the tied embedding and the module held twice are stored once"

    @ray.remote(num_cpus=0)
    def run(w, ids):
        p = w.load()
        return {
            "out": p(ids),
            "tied": p.stages[0].head.out.weight is p.encoder.embed.weight,
            "shared": p.extra["again"] is p.encoder,
            "dtype": p.encoder.embed.weight.dtype,
            "in_segment": in_weightd_segment(p.encoder.embed.weight)
            and in_weightd_segment(p.extra["norm"].weight),
            "pos": p.encoder.pos.clone(),
        }

    for node in rz.alive_nodes():
        r = ray.get(run.options(**on_node(node)).remote(wrapper, ids))
        assert torch.equal(r["out"], expected), "bit-exact bf16"
        assert r["tied"] and r["shared"] and r["in_segment"] and r["dtype"] == torch.bfloat16
        assert torch.equal(r["pos"], pipe.encoder.pos)
    rz.unload_everywhere(wrapper.model_name)

    # model_attr_names: only the encoder goes to the daemons; the norm travels in the skeleton
    w2 = ModelWrapper.from_model(pipe, mode="actor", model_attr_names=["encoder"])
    with Client(next(iter(sockets.values()))) as c:
        assert {m["name"]: m for m in c.list()}[w2.model_name]["nbytes"] == sum(
            t.numel() * t.element_size() for t in pipe.encoder.state_dict().values()
        )
    loaded = w2.load()
    assert not loaded.extra["norm"].weight.is_meta and torch.equal(loaded(ids), expected)
    assert loaded.stages[0].head.out.weight is loaded.encoder.embed.weight, (
        "a tie into an unpublished module holds"
    )
    rz.unload_everywhere(w2.model_name)


class Infer:
    """A Ray Data UDF, as users of ray-zerocopy write it."""

    def __init__(self, model_wrapper):
        self.model = model_wrapper.load()

    def __call__(self, batch):
        with torch.no_grad():
            out = self.model(torch.as_tensor(batch["id"]) % 64)
        return {"id": batch["id"], "y": out.sum(-1).numpy(), "pid": [os.getpid()] * len(batch["id"])}


def attach_udf(batch):
    """A function UDF that attaches by name, with nothing configured."""
    model = rz.attach("data-lm", model=build_tiny)
    with torch.no_grad():
        out = model(torch.as_tensor(batch["id"]) % 64)
    return {"id": batch["id"], "y": out.sum(-1).numpy(), "pid": [os.getpid()] * len(batch["id"])}


def test_ray_data_map_batches(cluster):
    src = trained_tiny(seed=2)
    wrapper = ModelWrapper.from_model(src, mode="actor", name="data-lm")
    expected = src(torch.arange(64) % 64).sum(-1)
    ds = ray.data.range(64, override_num_blocks=4)
    runs = {
        "concurrency": ds.map_batches(
            Infer, fn_constructor_kwargs={"model_wrapper": wrapper}, concurrency=2, batch_size=16
        ),
        "ActorPoolStrategy": ds.map_batches(
            Infer,
            fn_constructor_kwargs={"model_wrapper": wrapper},
            compute=ray.data.ActorPoolStrategy(size=2),
            batch_size=16,
        ),
        "function": ds.map_batches(attach_udf, batch_size=16),
    }
    for how, out in runs.items():
        rows = sorted(out.take_all(), key=lambda r: r["id"])
        assert [r["id"] for r in rows] == list(range(64)), how
        assert torch.allclose(torch.tensor([r["y"] for r in rows]), expected, atol=1e-5), how
        assert os.getpid() not in {r["pid"] for r in rows}, how
    wrapper.unload()


DRIVER = """
import ray, torch
from models import trained_tiny
from weightd.client.ray_zerocopy import ModelWrapper

@ray.remote(num_cpus=0)
class Survivor:
    def __init__(self, wrapper):
        self.model = wrapper.load()
    def run(self, ids):
        with torch.no_grad():
            return self.model(ids)

ray.init(address={address!r}, namespace="weightd-test", log_to_driver=False)
wrapper = ModelWrapper.from_model(trained_tiny(seed=7), mode="actor", name="survivor-lm")
actor = Survivor.options(name="survivor", lifetime="detached").remote(wrapper)
ray.get(actor.run.remote(torch.arange(3)))
print("driver done", flush=True)
"""


def test_driver_exits_while_a_detached_actor_keeps_computing(cluster):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER.format(address=cluster.address)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "driver done" in proc.stdout, proc.stderr[-3000:]
    actor = ray.get_actor("survivor", namespace="weightd-test")
    try:
        ids = torch.arange(30) % 64
        for _ in range(3):
            assert torch.equal(ray.get(actor.run.remote(ids)), trained_tiny(seed=7)(ids))
            time.sleep(0.2)
    finally:
        ray.kill(actor)
        rz.unload_everywhere("survivor-lm")


def test_daemons_stop_with_their_actors_and_shutdown_frees_everything(cluster):
    sockets = dict(cluster.sockets)
    rz.publish_everywhere("to-free", {"w": torch.ones(MIB // 4)})
    instances = [Config(socket=s).instance for s in sockets.values()]
    assert all(list(SHM.glob(f"weightd.{i}.*")) for i in instances)

    # a daemon whose actor dies (any way) stops and takes its segments along
    node, sock = next(iter(sockets.items()))
    pid = ray_daemons.ping(sock)["pid"]
    ray.kill(ray.get_actor(ray_daemons.ACTOR_PREFIX + node, namespace=ray_daemons.NAMESPACE))
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the daemon outlived its actor"
    assert not list(SHM.glob(f"weightd.{Config(socket=sock).instance}.*"))
    # ensure_daemons replaces it
    assert rz.ensure_daemons() == sockets and ray_daemons.ping(sock)["pid"] != pid

    stopped = rz.shutdown_daemons()
    assert sorted(stopped) == sorted(sockets.values())
    assert not any(ray_daemons.ping(s) for s in sockets.values())
    assert not any(list(SHM.glob(f"weightd.{i}.*")) for i in instances)
    with pytest.raises(DaemonNotRunning, match="weightd serve"):
        rz.attach("to-free", socket=next(iter(sockets.values())))
    cluster.sockets = rz.ensure_daemons()  # for whatever runs after


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent) is as good as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"

"""One storage read per cluster: nodes fill their segments from peers through Ray.

The daemon's side first (a reservation for a given layout, checked on commit, abandoned
whole), on plain daemons. Then a local Ray cluster, one for the module: three nodes on this
machine, each with its own daemon (Note [the node-local socket]), a fourth added later; a
256 MiB checkpoint every node can read. Note [one storage read per cluster] in
weightd/client/ray_zerocopy/peers.py says what is checked here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from test_streaming import failing_file  # noqa: E402, F401  (a file whose reads fail at a chosen byte)

from weightd import segment  # noqa: E402
from weightd.bench import raycluster  # noqa: E402
from weightd.client import CheckpointError, Client, ProtocolError, SegmentError, TransferFailed  # noqa: E402
from weightd.client import ray_zerocopy as rz  # noqa: E402
from weightd.client.connection import Connection  # noqa: E402
from weightd.client.ray_zerocopy import peers  # noqa: E402
from weightd.daemon.config import Config  # noqa: E402
from weightd.errors import ModelNotFound  # noqa: E402
from weightd.manifest import DTYPE_SIZES, Manifest  # noqa: E402

from conftest import SHM, remove_segments, wait_until  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)
MIB = 1 << 20
CHECKPOINT_MIB = 256

pytestmark = pytest.mark.timeout(300)


# --- the daemon's side, no Ray ---


def test_a_peer_copy_is_served_only_with_its_source_layout(make_daemon):
    src, dst = make_daemon(), make_daemon()
    w = torch.arange(3 * MIB // 4, dtype=torch.float32)
    with Client(src.socket) as a, Client(dst.socket) as b:
        a.publish("m", {"w": w, "tied": w, "view": w[10:20], "b": torch.ones(7, dtype=torch.bfloat16)})
        source = a.manifest("m")
        held = a.state_dict("m")
        mapped = held["w"].untyped_storage()  # the source's bytes, as a holder maps them

        def fill(copy):
            for offset, length in peers._chunks(source):
                copy.write(offset, _bytes_at(mapped, source, offset, length))

        copy = peers.Copy(b, source, via="peer:node-a")
        assert b.stats()["publishing"][0]["via"] == "peer:node-a"
        fill(copy)
        summary = copy.commit()
        assert summary["via"] == "peer:node-a" and summary["nbytes"] == source.nbytes
        mine = b.manifest("m")
        assert mine.uuid != source.uuid and mine.layout_digest() == source.layout_digest()
        assert (mine.storages, mine.tensors) == (source.storages, source.tensors), "names, dtypes, ties"
        got = b.state_dict("m")
        assert all(torch.equal(got[k], held[k]) for k in held)
        assert got["tied"].data_ptr() == got["w"].data_ptr(), "ties stay ties"

        # a copy whose manifest says something else than the source's is never served
        wrong = peers.Copy(b, source, via="peer:node-a")
        fill(wrong)
        wrong.manifest.tensors[0] = wrong.manifest.tensors[0]._replace(
            name="x" * len(wrong.manifest.tensors[0].name)
        )
        wrong.encoded = wrong.manifest.to_json()
        with pytest.raises(SegmentError, match="layout its peer fill reserved"):
            wrong.commit()
        assert not os.path.exists(segment.Folder().file(wrong.manifest.segment))
        assert b.manifest("m").uuid == mine.uuid, "what was served is undisturbed"

        # given up half-way: the segment goes, nothing is served
        half = peers.Copy(b, source, via="peer:node-a")
        half.write(*next((o, _bytes_at(mapped, source, o, n)) for o, n in peers._chunks(source)))
        half.abort()
        assert not os.path.exists(segment.Folder().file(half.manifest.segment))
        assert b.stats()["publishing"] == [] and b.manifest("m").uuid == mine.uuid

        with pytest.raises(ProtocolError, match="peer:<node id>"):
            b.call("publish_begin", name="m", nbytes=1, layout=source.layout_digest(), via="elsewhere")
        with pytest.raises(ProtocolError, match="sha256"):
            b.call("publish_begin", name="m", nbytes=1, layout="x" * 64, via="peer:a")
        with pytest.raises(ProtocolError, match="both"):
            b.call("publish_begin", name="m", nbytes=1, via="peer:a")


def test_the_watermark_covers_only_what_is_written_without_a_hole(tmp_path):
    """Note [the watermark]: chunks end out of order; the padding between pieces is never written."""
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 1 << 20)
        d = segment.DATA_OFFSET

        def mark() -> int:
            return segment.read_watermark(os.pread(fd, segment.DATA_OFFSET, 0))

        # two pieces, the second one page aligned after padding, each written in chunks
        mark_ = segment.Watermark(fd, [(d, 3000), (d + 4096, 8192)])
        assert mark_.mark == d and mark() == 0, "nothing written, nothing published"
        mark_.written(d + 4096 + 4096, 4096)  # the second piece's second chunk first
        assert mark() == 0
        mark_.written(d + 1000, 2000)
        assert mark() == 0, "a hole at the start"
        mark_.written(d, 1000)
        assert mark() == d + 4096, "the first piece, and the padding after it"
        mark_.written(d + 4096, 4096)
        assert mark() == d + 4096 + 8192 == mark_.mark, "everything: the end of the last piece"
    finally:
        os.close(fd)


def test_the_watermark_in_the_mapping_is_a_hint_the_daemon_decides(make_daemon, checkpoint, request):
    """Note [the watermark]: a CPU that reorders memory accesses may show a holder the word in
    its mapping before the bytes under it. Here the word says more than is written (a load
    held up: its storage, a FUSE file system, stopped): the holder asks the daemon before it
    sends, and the daemon's mark is what was written."""
    path, _ = checkpoint
    slow = request.getfixturevalue("failing_file")(path, os.path.getsize(path) + 1)
    server = _fuse_server(slow)
    d = make_daemon()
    read = _rchar(server)
    loader = threading.Thread(target=lambda: Client(d.socket).load(str(slow), "m"))
    loader.start()
    try:
        wait_until(lambda: _rchar(server) >= read + 2 * MIB, timeout=60, what="data read")
        os.kill(server, signal.SIGSTOP)
        with Connection(d.socket) as c:  # laid out: its data is being read
            reply = c.call("loading", name="m")
            owner = c.daemon_uid
        source = Manifest.from_dict(reply["manifest"])
        end = peers._data_end(source)
        assert reply["mark"] < end, "the load is held up"
        mapped = peers._Mapped(source, owner, streaming=True)
        fd = os.open(segment.Folder().file(source.segment), os.O_WRONLY)
        try:  # what a reordering CPU could show: the word past bytes not there yet
            os.pwrite(fd, segment.SEAL.pack(end), segment.WATERMARK_OFFSET)
        finally:
            os.close(fd)
        assert segment.read_watermark(mapped.mapping) == end

        class Asked(Exception):
            pass

        def final():
            raise Asked

        with pytest.raises(Asked):  # the word alone does not let it send
            mapped.wait(end, "m", final)
        told = peers.Sources()._final(d.socket, "m", source.generation, source.uuid)
        assert told is not None and told < end, "the daemon says what was written"
        del mapped
    finally:
        os.kill(server, signal.SIGCONT)
        loader.join(120)
    assert not loader.is_alive()


def _bytes_at(storage: torch.UntypedStorage, source, offset: int, length: int) -> bytes:
    """``length`` bytes of the source segment from ``offset``, through storage 0's mapping."""
    base = storage.data_ptr() - source.storages[0].offset
    import ctypes

    return ctypes.string_at(base + offset, length)


# --- the cluster ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    runtime = tmp_path_factory.mktemp("xdg")
    store = 400 * MIB  # per node: two transfers' chunks (Note [the object store's bound]), and room to spare
    # A dead node is noticed within seconds (the default waits ~30 s).
    config = {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
        "health_check_timeout_ms": 1000,
    }
    with raycluster.local_cluster(
        3, runtime=runtime, object_store_memory=store, pythonpath=(TESTS,), system_config=config
    ) as c:
        yield c
    leaked = [s for i in raycluster.instances(runtime) for s in remove_segments(i)]
    assert not leaked, f"daemons started through Ray left segments: {leaked}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 256 MiB safetensors file, and the sha256 of each tensor's bytes."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"layer{i}.weight": torch.randn(CHECKPOINT_MIB // 8 * MIB // 4, generator=g).view(-1, 1024)
        for i in range(8)
    }
    tensors["embed"] = torch.randn(1000, 7, generator=g).to(torch.bfloat16)
    save_file(tensors, path)
    hashes = {k: _sha(v) for k, v in tensors.items()}
    del tensors
    yield str(path), hashes
    path.unlink()


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def facts(socket: str, name: str) -> dict:
    """What the daemon at ``socket`` serves as ``name``: the sha256 of each tensor's bytes, read
    from its segment (every node's /dev/shm is this machine's: no Ray worker, no torch import
    per node), the manifest's layout, the summary, the publishes under way."""
    with Client(socket) as c:
        manifest = c.manifest(name)
        summary = {m["name"]: m for m in c.list()}[name]
        publishing = c.stats()["publishing"]
    hashes = {}
    fd = os.open(segment.Folder().file(manifest.segment), os.O_RDONLY)
    try:
        for t in manifest.tensors:
            nbytes = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
            assert t.extent() - t.offset == nbytes, "contiguous tensors only here"
            at = manifest.storages[t.storage].offset + t.offset
            hashes[t.name] = hashlib.sha256(os.pread(fd, nbytes, at)).hexdigest()
    finally:
        os.close(fd)
    return {
        "hashes": hashes,
        "layout": (manifest.storages, manifest.tensors),
        "summary": summary,
        "publishing": publishing,
    }


def serves(socket: str, name: str) -> bool:
    with Client(socket) as c:
        return name in [m["name"] for m in c.list()]


def read_bytes(socket: str) -> int:
    """Bytes the daemon at ``socket`` has read through read-like system calls (/proc/PID/io)."""
    with Client(socket) as c:
        pid = c.ping()["pid"]
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def node_of(node) -> str:
    return node.node_id


def test_load_everywhere_reads_storage_once_and_a_node_added_later_fills_from_peers(cluster, checkpoint):
    path, hashes = checkpoint
    sockets = rz.ensure_daemons()
    reader = node_of(cluster.workers[0])
    before = {n: read_bytes(s) for n, s in sockets.items()}
    loaded = rz.load_everywhere("ckpt", path, reader=reader)
    read = {n: read_bytes(s) - before[n] for n, s in sockets.items()}
    size = os.path.getsize(path)
    assert sorted(loaded) == sorted(sockets)
    assert read[reader] >= size, read
    assert all(read[n] < 8 * MIB for n in sockets if n != reader), f"only {reader} reads the file: {read}"
    seen = {n: facts(s, "ckpt") for n, s in sockets.items()}
    for node, f in seen.items():
        assert f["hashes"] == hashes, f"node {node}'s segment differs from the file"
        assert f["layout"] == seen[reader]["layout"], "names, dtypes, shapes, storages as the source's"
        assert f["summary"].get("via", "").startswith("peer:") == (node != reader), "copied, not read"

    # a node added later: ensure_daemons starts its daemon and fills it from the others
    cluster.workers.append(cluster.add_node(num_cpus=1, object_store_memory=cluster.store))
    cluster.wait_for_nodes()
    sockets = rz.ensure_daemons()
    new = node_of(cluster.workers[-1])
    assert new in sockets
    late = facts(sockets[new], "ckpt")
    assert late["hashes"] == hashes and late["layout"] == seen[reader]["layout"]
    assert late["summary"]["via"].startswith("peer:")
    assert read_bytes(sockets[new]) < 8 * MIB, "the new node's daemon read nothing from storage"
    assert rz.unload_everywhere("ckpt") == len(sockets)


def test_publish_everywhere_copies_ties_and_dtypes_from_peers(cluster):
    w = torch.randn(64, 1024)
    state = {"w": w, "tied": w, "rows": w[3:9], "half": torch.randn(5, 3).to(torch.bfloat16)}
    out = rz.publish_everywhere("pub", state)
    sockets = rz.ensure_daemons()
    assert sorted(out) == sorted(sockets)
    here = ray.get_runtime_context().get_node_id()
    seen = {n: facts(s, "pub") for n, s in sockets.items()}
    for node, f in seen.items():
        assert f["hashes"] == {k: _sha(v) for k, v in state.items()}
        assert f["layout"] == seen[here]["layout"]
        assert len(f["layout"][0]) == 2, "the tied weight and the view share one storage"
        assert ("via" in f["summary"]) == (node != here)
    assert rz.unload_everywhere("pub") == len(sockets)


def test_a_corrupted_chunk_is_refused_naming_the_node_it_came_from(cluster, checkpoint):
    path, _ = checkpoint
    sockets = rz.ensure_daemons()
    reader = node_of(cluster.workers[0])
    reg = peers.registry()
    ray.get(reg.hook.remote(reader, "corrupt"))
    try:
        with pytest.raises(TransferFailed, match=f"from node {reader}.*does not match the digest"):
            rz.load_everywhere("bad", path, reader=reader)
    finally:
        ray.get(reg.hook.remote(reader, None))
    for node, socket in sockets.items():
        with Client(socket) as c:
            served = [m["name"] for m in c.list()]
            assert ("bad" in served) == (node == reader), "only the reader, which loaded it itself, serves it"
            assert c.stats()["publishing"] == []
            unsealed = [
                s
                for s in SHM.glob(f"weightd.{Config(socket=socket).instance}.*")
                if not segment.inspect(segment.Folder(), "/" + s.name)[2]
            ]
            assert not unsealed, "nothing half-written is left"
    rz.unload_everywhere("bad")


def test_a_publish_left_without_a_holder_is_sent_again_by_the_publisher(cluster):
    here = ray.get_runtime_context().get_node_id()
    state = {"w": torch.randn(256, 1024), "half": torch.randn(9, 5).to(torch.bfloat16)}
    reg = peers.registry()
    ray.get(reg.hook.remote(here, "fail"))  # the only holder cannot send: it is dropped at once
    try:
        out = rz.publish_everywhere("again", state)
    finally:
        ray.get(reg.hook.remote(here, None))
    sockets = rz.ensure_daemons()
    try:
        assert sorted(out) == sorted(sockets)
        seen = {n: facts(s, "again") for n, s in sockets.items()}
        for f in seen.values():
            assert f["hashes"] == {k: _sha(v) for k, v in state.items()}
            assert f["publishing"] == [], "the copies that found no holder were abandoned, not left half-way"
        resent = [n for n, f in seen.items() if n != here and "via" not in f["summary"]]
        assert len(resent) == 1, "one other node got it again from the publisher"
        # and the rest from peers, as a tree rooted there (a node that finished first may serve
        # a later one: the cluster has a fourth node once the test that adds one ran), never
        # from the publisher's node, which could not send
        via = {n: f["summary"].get("via") for n, f in seen.items()}
        rest = [n for n in via if n not in (here, resent[0])]
        assert all(via[n] in {f"peer:{m}" for m in via if m != here} for n in rest), via
        assert any(via[n] == f"peer:{resent[0]}" for n in rest), via
    finally:  # also when it fails: the module's other tests share these daemons
        unloaded = rz.unload_everywhere("again")
    assert unloaded == len(sockets)


def test_killing_the_source_mid_transfer_still_serves_every_remaining_node(cluster, checkpoint):
    path, hashes = checkpoint
    sockets = rz.ensure_daemons()
    source = cluster.workers[0]
    reader = node_of(source)
    before = {n: read_bytes(s) for n, s in sockets.items() if n != reader}
    reg = peers.registry()
    ray.get(reg.hook.remote(reader, "stall"))  # it sends two chunks of each transfer, then hangs
    result: dict = {}
    copied = sum(ray.get(reg.progress.remote()).values())

    def load():
        try:
            result["loaded"] = rz.load_everywhere("survive", path, reader=reader)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=load)
    t.start()
    wait_until(
        lambda: sum(ray.get(reg.progress.remote()).values()) > copied, timeout=120, what="a chunk copied"
    )
    cluster.remove_node(source, allow_graceful=False)
    cluster.workers.remove(source)
    t.join(240)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    why = [w for _, node, w in ray.get(reg.drops.remote()) if node == reader]
    assert why and not any(w.startswith("no chunk") for w in why), (
        f"the dead holder was noticed (Ray's node table or its error), not timed out: {why}"
    )
    sockets = rz.ensure_daemons()
    assert reader not in sockets and sorted(before) == sorted(sockets)
    reread = sorted(read_bytes(s) - before[n] for n, s in sockets.items())
    size = os.path.getsize(path)
    assert reread[-1] >= size and sum(reread[:-1]) < 16 * MIB, (
        f"one node read it again, the others copied: {reread}"
    )
    for socket in sockets.values():
        f = facts(socket, "survive")
        assert f["hashes"] == hashes
        assert f["publishing"] == []
    assert rz.unload_everywhere("survive") == len(sockets)


def test_a_load_that_fails_while_peers_copy_it_is_served_nowhere(cluster, tmp_path, request):
    """Note [a copy that starts before the seal]: peers copy the reading node's segment while it
    streams; its load then fails (a real EIO near the end of the file): its error is raised,
    every copy is abandoned, nothing of it is served or left on any node."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    backing = tmp_path / "backing.safetensors"
    save_file({f"w{i}": torch.randn(16 * MIB // 4, generator=g) for i in range(12)}, backing)
    bad = request.getfixturevalue("failing_file")(backing, backing.stat().st_size - 5 * MIB)
    sockets = rz.ensure_daemons()
    reader = node_of(cluster.workers[0])
    reg = peers.registry()
    copied = sum(ray.get(reg.progress.remote()).values())
    with pytest.raises(CheckpointError, match="reading it failed"):
        rz.load_everywhere("broken", str(bad), reader=reader)
    moved = sum(ray.get(reg.progress.remote()).values()) - copied
    for node, socket in sockets.items():
        with Client(socket) as c:
            assert "broken" not in [m["name"] for m in c.list()], f"node {node} serves it ({moved} B copied)"
            assert c.stats()["publishing"] == [], "every copy abandoned"
            instance = Config(socket=socket).instance
            assert not [s.name for s in SHM.glob(f"weightd.{instance}.*")], "nothing half-written is left"
    assert "broken" not in ray.get(reg.everywhere.remote()), "a node added later is not filled with it"

    # Note [a re-load that fails]: the same failure, for a name the cluster already serves
    rz.load_everywhere("kept", str(backing), reader=reader)
    before = {}
    for node, socket in sockets.items():
        with Client(socket) as c:
            before[node] = c.manifest("kept").uuid
    kept = ray.get(reg.everywhere.remote())["kept"]
    with pytest.raises(CheckpointError, match="reading it failed"):
        rz.load_everywhere("kept", str(bad), reader=reader)
    for node, socket in sockets.items():
        with Client(socket) as c:
            assert c.manifest("kept").uuid == before[node], f"node {node} still serves the old one"
            assert c.stats()["publishing"] == []
            instance = Config(socket=socket).instance
            assert len(list(SHM.glob(f"weightd.{instance}.*"))) == 1, "the old segment alone"
    assert ray.get(reg.everywhere.remote())["kept"] == kept, "a node added later gets the old one"
    assert rz.unload_everywhere("kept") == len(sockets)


def test_a_lease_whose_receiver_went_silent_lapses(cluster):
    """A transfer whose receiver went silent (its node died: it never releases its lease) stops
    keeping its holder busy after ``lease_idle``, and a receiver waiting for that holder gets it
    then, not when its own wait ends. A registry of its own, with a short ``lease_idle``."""
    reg = peers.Peers.options(num_cpus=0).remote(lease_idle=1.0)
    try:
        ray.get(reg.register.remote("m", "k", {"storages": [[0, MIB]]}, None, None))
        ray.get(reg.hold.remote("k", "node-a", {"streaming": False}))
        taken = [ray.get(reg.acquire.remote("k", 0.0)) for _ in range(peers.SERVES)]
        assert [t["kind"] for t in taken] == ["peer"] * peers.SERVES
        assert ray.get(reg.acquire.remote("k", 0.0))["kind"] == "busy", "every slot of the holder taken"
        ray.get(reg.release.remote("k", "node-a", taken[0]["lease"]))
        again = ray.get(reg.acquire.remote("k", 0.0))
        assert again["kind"] == "peer", "a released slot is free at once"
        # nobody releases or reports a chunk now: the leases lapse while this one waits
        got = ray.get(reg.acquire.remote("k", 10 * peers.LEASE_WAIT))
        assert got["kind"] == "peer" and got["node"] == "node-a", got
    finally:
        ray.kill(reg)


DRIVER = """
import json, sys
import ray
from weightd.client.ray_zerocopy import peers
address, name, path, reader, sockets = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
peers.spread_load(name, reader, json.loads(sockets), path)  # load_everywhere, the nodes given
"""


@contextlib.contextmanager
def orphaned(cluster, checkpoint, request, name: str):
    """A load_everywhere of ``checkpoint`` whose driver was killed mid-load: the driver
    (``spread_load``, the nodes given: no torch import) is SIGKILLed while the reading node,
    ``cluster.workers[0]``, still reads (its storage, a FUSE file system, stopped) and the
    others have begun their copies. Yields ``(sockets, reader, key, resume)``; ``resume()``
    lets the storage answer again."""
    path, _ = checkpoint
    # a file whose reads never fail, and whose server can be stopped
    slow = request.getfixturevalue("failing_file")(path, os.path.getsize(path) + 1)
    server = _fuse_server(slow)
    sockets = rz.ensure_daemons()
    reader = node_of(cluster.workers[0])
    read = _rchar(server)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address, name, str(slow), reader, json.dumps(sockets)]
    )
    stopped = [False]

    def resume() -> None:
        if stopped[0]:
            os.kill(server, signal.SIGCONT)
            stopped[0] = False

    try:
        with Client(sockets[reader]) as c:

            def streaming() -> dict | None:
                try:
                    return c.call("loading", name=name)["manifest"]
                except ModelNotFound:
                    return None

            # stopped once the daemon reads the data (past the header, so laid out), far from its end
            wait_until(
                lambda: _rchar(server) >= read + 2 * MIB or driver.poll() is not None,
                timeout=60,
                what="data read",
            )
            assert driver.poll() is None, "the driver ended first"
            os.kill(server, signal.SIGSTOP)
            stopped[0] = True
            wait_until(lambda: streaming() is not None, timeout=30, what="the segment laid out")
            manifest = streaming()
            others = [n for n in sockets if n != reader]
            wait_until(lambda: all(_copying(sockets[n], name) for n in others), timeout=60, what="copies")
            driver.kill()
            driver.wait(30)
            assert streaming() is not None, "the driver died before the load ended (the race was lost)"
        yield sockets, reader, manifest["uuid"], resume
    finally:
        resume()
        driver.kill()
        driver.wait(30)


def test_a_load_whose_caller_dies_goes_on_and_is_served_everywhere(cluster, checkpoint, request):
    """Note [the caller that goes away]: once the storage answers again, every node serves the
    model, copied from peers (the reading node's agent gave the verdict), and the registry
    keeps it everywhere."""
    _, hashes = checkpoint
    with orphaned(cluster, checkpoint, request, "orphan") as (sockets, reader, key, resume):
        resume()
        wait_until(lambda: all(serves(s, "orphan") for s in sockets.values()), timeout=60, what="every node")
    for node, socket in sockets.items():
        f = facts(socket, "orphan")
        assert f["hashes"] == hashes and f["publishing"] == []
        assert f["summary"].get("via", "").startswith("peer:") == (node != reader)
    assert ray.get(peers.registry().everywhere.remote())["orphan"][0] == key
    assert rz.unload_everywhere("orphan") == len(sockets)


def test_a_load_whose_caller_and_reader_die_is_read_again_by_another_node(cluster, checkpoint, request):
    """Note [the caller that goes away]: the reading node dies too, before its seal. Nobody is
    left to say so but the receivers: one of them sees the node gone from Ray's node table,
    settles it ``lost``, and one remaining node reads the file again while the others copy it
    from that node."""
    _, hashes = checkpoint
    with orphaned(cluster, checkpoint, request, "orphan2") as (sockets, reader, key, resume):
        source = cluster.workers[0]
        cluster.remove_node(source, allow_graceful=False)
        cluster.workers.remove(source)
        resume()
        left = {n: s for n, s in sockets.items() if n != reader}
        wait_until(
            lambda: all(serves(s, "orphan2") for s in left.values()), timeout=120, what="every node left"
        )
    seen = {n: facts(s, "orphan2") for n, s in left.items()}
    assert all(f["hashes"] == hashes and f["publishing"] == [] for f in seen.values())
    again = [n for n, f in seen.items() if "via" not in f["summary"]]
    assert len(again) == 1, "one node read it again"
    assert all(f["summary"]["via"] == f"peer:{again[0]}" for n, f in seen.items() if n != again[0])
    assert ray.get(peers.registry().everywhere.remote())["orphan2"][0] == key
    assert rz.unload_everywhere("orphan2") == len(left)


def _fuse_server(mounted: Path) -> int:
    """The pid of the tests/fusefs.py process serving the file ``mounted``."""
    where = str(mounted.parent).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if where in argv and any(a.endswith(b"fusefs.py") for a in argv):
            return int(proc.name)
    raise AssertionError(f"no fusefs.py serves {mounted}")


def _rchar(pid: int) -> int:
    """Bytes process ``pid`` has read so far (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _copying(socket: str, name: str) -> bool:
    """Whether the daemon at ``socket`` has a peer copy of ``name`` reserved (being written)."""
    with Client(socket) as c:
        return any(
            p.get("name") == name and p.get("via", "").startswith("peer:") for p in c.stats()["publishing"]
        )

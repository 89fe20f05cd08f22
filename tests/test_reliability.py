"""Reliability and security under load, faults and hostile input (quick versions).

The long versions of the load, fuzz and kill runs are ``benchmarks/stress.py``. Everything
here starts real daemons and real processes and cleans up every segment and process.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightd import protocol
from weightd.client import Client, publish, state_dict
from weightd.errors import CheckpointError, ModelNotFound, PermissionDenied, ProtocolError

import hostile
from conftest import (
    as_user,
    in_private_shm,
    module_daemon,
    needs_root,
    private_shm_refused,
    segments,
    wait_until,
    worker_code,
    worker_env,
)

MIB = 1 << 20


# --- one daemon for the corpus and the fuzzer ------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PWNED"
    return root, hostile.build_corpus(root / "corpus", marker), marker


with tempfile.TemporaryDirectory(prefix="weightd-corpus-") as _t:
    CORPUS_IDS = [c.id for c in hostile.build_corpus(Path(_t), Path(_t) / "marker")]


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_dir):
    """One daemon for the module: serves ``good`` (known bytes), loads only from its model dir
    (which holds the corpus) and is checked for leaks when the module ends."""
    root, _, _ = corpus_dir
    models = root / "corpus"
    good = hostile.write_model(models / "good-model.safetensors", seed=1)
    outside = root / "outside.safetensors"
    hostile.write_model(outside, seed=2)
    os.symlink(outside, models / "link.safetensors")
    args = ["--model", f"good={models / 'good-model.safetensors'}", "--model-dir", str(models)]
    with module_daemon(tmp_path_factory, *args, "--log-level", "warning") as d:
        yield d, good


def check_good(d, good) -> None:
    assert hostile.digests(state_dict("good", socket=d.socket)) == good


@pytest.mark.parametrize("case_id", CORPUS_IDS)
def test_hostile_checkpoint_is_refused_naming_file_and_problem(case_id, served, corpus_dir):
    d, good = served
    _, corpus, marker = corpus_dir
    case = next(c for c in corpus if c.id == case_id)
    before = segments(d.instance)
    with d.client() as c:
        with pytest.raises(CheckpointError) as e:
            c.load(str(case.path), "bad")
        assert str(case.path) in str(e.value), str(e.value)
        assert re.search(case.problem, str(e.value)), str(e.value)
        assert segments(d.instance) == before, "no segment left behind"
        assert [m["name"] for m in c.list()] == ["good"]
    assert not marker.exists(), "a pickle in a checkpoint ran code"
    check_good(d, good)


def test_the_evil_pickles_would_run_if_unpickled(tmp_path):
    """Control for the corpus: its malicious files really do run code when fully unpickled."""
    cases = hostile.build_corpus(tmp_path / "c", tmp_path / "ran")
    evil = [str(c.path) for c in cases if "calls" in c.id]
    assert len(evil) == 8
    code = textwrap.dedent(f"""
        import os, torch
        ran = []
        for path in {evil!r}:
            try:
                torch.load(path, weights_only=False)
            except Exception:
                pass
            ran.append(os.path.exists({str(tmp_path / "ran")!r}))
            if ran[-1]:
                os.unlink({str(tmp_path / "ran")!r})
        print(sum(ran))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "8", r.stderr[-2000:]


# --- hostile requests -------------------------------------------------------------------------


def test_fuzzed_requests_on_both_sockets_get_typed_answers(served, corpus_dir):
    d, good = served
    stats = Counter()
    root, _, _ = corpus_dir
    # warm up (first requests allocate caches), then measure
    for _ in range(200):
        hostile.raw_request(d.socket, [b"w", b'{"v":1,"op":"manifest","name":"good"}'])
    check_good(d, good)
    before = hostile.daemon_memory(d.proc.pid)
    models = root / "corpus"
    paths = [
        str(models / "good-model.safetensors"),
        str(models / "link.safetensors"),
        str(models / "trunc-4.safetensors"),
        str(models / ".." / "outside.safetensors"),
        str(models / "hf-0"),
        str(models / "evil-os.system.pt"),
    ]
    hostile.fuzz(d.socket, paths, max_examples=400, stats=stats)()
    assert d.proc.poll() is None, "the daemon survived"
    check_good(d, good)
    after = hostile.daemon_memory(d.proc.pid)
    assert stats["messages"] >= 400 and stats["bad_request"] > 0, stats
    assert after["private_dirty"] - before["private_dirty"] < 8 * MIB, (before, after)
    assert not corpus_dir[2].exists()
    # loads the fuzzer made inside the model dir are whole models, and nothing else is in /dev/shm
    with d.client() as c:
        for m in c.list():
            if m["name"] != "good":
                assert hostile.digests(c.state_dict(m["name"])) == good
                c.unload(m["name"])
        served_segments = {m["segment"].lstrip("/") for m in c.list()}
    wait_until(
        lambda: set(segments(d.instance)) == served_segments,
        timeout=20,
        what="retired generations of fuzzer loads to be freed",
    )


def test_replayed_and_reordered_request_ids_each_get_their_reply(served):
    d, good = served
    s = hostile.dealer(d.socket)
    try:
        rids = [b"a", b"b", b"a", b"c", b"b", b"a"]
        names = ["good", "nope", "good", "good", "nope", "nope"]
        for rid, name in zip(rids, names):
            s.send_multipart([rid, protocol.request("manifest", name=name)])
        replies = [s.recv_multipart() for _ in rids if s.poll(5000)]
    finally:
        s.close(linger=0)
    assert [r[0] for r in replies] == rids, "one reply per request, in order, echoing its id"
    assert [json.loads(r[1])["ok"] for r in replies] == [n == "good" for n in names]


@pytest.mark.parametrize("sock_kind", ["read", "admin"])
def test_oversized_messages(served, sock_kind):
    d, good = served
    path = d.socket if sock_kind == "read" else protocol.admin_socket(d.socket)
    t0 = time.monotonic()
    # one frame over ZMQ_MAXMSGSIZE: the peer is dropped before the frame is buffered
    assert hostile.raw_request(path, [b"r", b"x" * (protocol.MAX_REQUEST_BYTES + 1)], timeout_ms=300) is None
    assert time.monotonic() - t0 < 5
    # ZMQ_MAXMSGSIZE limits each frame, not the message: 32 frames of 1 MiB arrive whole, and
    # the daemon drops them unanswered with the connection (Note [a request is bounded as a
    # whole]). The allocator may keep about one such message (its peak), but six of them in a
    # row do not add up.
    big = [b"r", b"{}"] + [b"y" * protocol.MAX_REQUEST_BYTES] * 32
    base = hostile.daemon_memory(d.proc.pid)["private_dirty"]
    sizes = []
    for _ in range(6):
        # the daemon answers a request within milliseconds of reading it: 0.3 s of silence is none
        assert hostile.raw_request(path, big, timeout_ms=300) is None
        time.sleep(0.1)
        sizes.append(hostile.daemon_memory(d.proc.pid)["private_dirty"])
    assert max(sizes) - base < 48 * MIB, [(s - base) // MIB for s in sizes]
    check_good(d, good)


def test_load_paths_cannot_escape_the_model_dir(served, corpus_dir, tmp_path):
    d, good = served
    root, _, _ = corpus_dir
    models = root / "corpus"
    sibling = Path(str(models) + "-evil")
    sibling.mkdir(exist_ok=True)
    hostile.write_model(sibling / "m.safetensors", seed=3)
    (models / "subdir").mkdir(exist_ok=True)
    if not (models / "linkdir").exists():
        os.symlink(root, models / "linkdir")
    for kind in ("folder", "indexed"):  # a folder inside whose shard is a symlink to outside
        folder = models / f"shard-link-{kind}"
        if not folder.exists():
            folder.mkdir()
            shard = "model-00001-of-00001.safetensors" if kind == "indexed" else "model.safetensors"
            os.symlink(root / "outside.safetensors", folder / shard)
            if kind == "indexed":
                names = load_file(str(root / "outside.safetensors")).keys()
                (folder / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": dict.fromkeys(names, shard)})
                )
    escapes = [
        str(models / "shard-link-folder"),
        str(models / "shard-link-indexed"),
        str(models / ".." / "outside.safetensors"),  # '..'
        str(root / "outside.safetensors"),  # absolute, outside
        str(models / "link.safetensors"),  # a symlink inside pointing outside
        str(models / "linkdir" / "outside.safetensors"),  # through a symlinked folder
        str(sibling / "m.safetensors"),  # a sibling whose name starts like the model dir
        f"/proc/self/root{root}/outside.safetensors",  # resolves to the same file
        "outside.safetensors",  # relative: the daemon's cwd, not the model dir
        str(models / "subdir" / ".." / ".." / "outside.safetensors"),
        "/etc/passwd",
    ]
    admin = protocol.admin_socket(d.socket)
    for path in escapes:
        body = json.loads(
            hostile.raw_request(admin, [b"r", protocol.request("load", path=path, name="esc")])[1]
        )
        assert body["ok"] is False and body["error"]["code"] == PermissionDenied.code, (path, body)
    for path in [str(models) + "/good-model.safetensors\x00.txt", "\ud800"]:
        body = json.loads(
            hostile.raw_request(admin, [b"r", json.dumps({"v": 1, "op": "load", "path": path}).encode()])[1]
        )
        assert body["error"]["code"] == ProtocolError.code, (path, body)
    with d.client() as c:
        assert [m["name"] for m in c.list()] == ["good"]
        # and inside the model dir, '..' that stays inside is fine (so the refusals above are real)
        m = c.load(str(models / "subdir" / ".." / "good-model.safetensors"), "inside")
        assert hostile.digests(c.state_dict("inside")) == good
        c.unload("inside")
        assert m["source"] == str(models / "good-model.safetensors")
    check_good(d, good)


BAD_NAMES = [
    "../../etc/x",
    "a/b",
    "/abs",
    ".hidden",
    "-dash",
    "",
    "x" * 129,
    "a\x00b",
    "a b",
    "é",
    "a\nb",
    "..",
    ".",
    "etc\n",
]


def test_model_names_cannot_escape_dev_shm(served, corpus_dir):
    d, good = served
    root, _, _ = corpus_dir
    path = str(root / "corpus" / "good-model.safetensors")
    shm_before = set(os.listdir("/dev/shm"))
    admin = protocol.admin_socket(d.socket)
    for name in BAD_NAMES:
        assert not protocol.is_name(name)
        reqs = [{"op": "publish_begin", "name": name, "nbytes": 16}, {"op": "unload", "name": name}]
        if name:  # an empty name in a load means "the file's stem"
            reqs.append({"op": "load", "path": path, "name": name})
        for req in reqs:
            op = req.pop("op")
            body = json.loads(
                hostile.raw_request(admin, [b"r", json.dumps({"v": 1, "op": op, **req}).encode()])[1]
            )
            assert body["error"]["code"] in (
                {ProtocolError.code, ModelNotFound.code} if op == "unload" else {ProtocolError.code}
            ), (name, op, body)
    # a file whose stem is not a valid name cannot become one either
    dotted = root / "corpus" / ".x.safetensors"
    shutil.copy(path, dotted)
    with d.client() as c, pytest.raises(ProtocolError, match="bad model name"):
        c.load(str(dotted))
    new = set(os.listdir("/dev/shm")) - shm_before
    mine = [
        f for f in new if d.instance in f or any(k in f for k in ("etc", "abs", "hidden", "dash", "x" * 100))
    ]
    assert mine == [], "nothing new in /dev/shm"
    assert not Path("/etc/x").exists() and not Path("/dev/shm/a").exists()
    check_good(d, good)


# --- load -------------------------------------------------------------------------------------


def load_scenario(make_daemon, tmp_path, clients: int, cycles: int):
    files, expected, args = hostile.load_models(tmp_path, kib=256, dim=96)
    d = make_daemon(*args)
    # c is published (a 3rd served model), d is loaded and x unloaded while the clients run
    publish("c", hostile.model_tensors(12, 256), socket=d.socket)
    names = ["a", "b", "c", "lin", "d", "x"]
    warm = hostile.run_load(d.socket, d.instance, expected, clients=clients, cycles=5, names=["a", "b", "c"])
    assert not warm.untyped and not warm.bad
    mem_before = hostile.daemon_memory(d.proc.pid)

    def during():
        with Client(d.socket, timeout=60) as c:
            t0 = time.perf_counter()
            c.load(str(files["d"]), "d")
            time.sleep(0.05)
            c.unload("x")
            return {"load_unload_seconds": time.perf_counter() - t0}

    r = hostile.run_load(
        d.socket,
        d.instance,
        expected,
        clients=clients,
        cycles=cycles,
        names=names,
        during=during,
        timeout=30,
        deadline=240,
        module_name="lin",
        module_dim=96,
    )
    mem_after = hostile.daemon_memory(d.proc.pid)
    return d, r, mem_before, mem_after


def test_many_clients_attach_and_detach_while_models_come_and_go(make_daemon, tmp_path):
    d, r, before, after = load_scenario(make_daemon, tmp_path, clients=8, cycles=20)
    assert not r.untyped, r.untyped[0]
    assert not r.hung, f"clients {r.hung} hung"
    assert r.bad == [], f"reads that were not bit-exact: {Counter(r.bad)}"
    assert r.attaches + sum(r.typed.values()) == 8 * 20
    assert set(r.typed) <= {ModelNotFound.code, "bad_segment"}, r.typed
    assert all(r.ok.get(n, 0) > 0 for n in ("a", "b", "c", "lin")), r.ok
    assert r.modules > 0 and r.left_mapped == 0, "detached modules and dropped state dicts leave no mapping"
    assert after["private_dirty"] - before["private_dirty"] < 4 * MIB, (before, after)
    with Client(d.socket) as c:
        listed = {m["name"]: m["segment"].lstrip("/") for m in c.list()}
    assert sorted(listed) == ["a", "b", "c", "d", "lin"]
    assert set(segments(d.instance)) == set(listed.values()), "no segment leaks"


# --- faults -----------------------------------------------------------------------------------


def test_sigkill_at_random_points_of_load_publish_unload(make_daemon, tmp_path, instance):
    files = {
        "base": str(tmp_path / "base.safetensors"),
        "unload": str(tmp_path / "u.safetensors"),
        "big": str(tmp_path / "big.safetensors"),
        "publish_kib": 16 * 1024,
        "digests": {},
    }
    files["digests"]["base"] = hostile.write_model(Path(files["base"]), seed=21)
    files["digests"]["U"] = hostile.write_model(Path(files["unload"]), seed=22)
    files["digests"]["L"] = hostile.big_model(Path(files["big"]), 96)
    seed = int(os.environ.get("WEIGHTD_STRESS_SEED", random.randrange(1 << 30)))
    out = hostile.kill_sweep(
        lambda: make_daemon(keep=True), files, rounds=6, rng=random.Random(seed), log=lambda *_: None
    )
    assert out["problems"] == [], f"seed {seed}: {out['problems']}"
    assert out["tally"]["models checked bit-exact"] >= 6
    # a last daemon that frees everything on exit: nothing is left after the sweep
    out["daemon"].stop()
    last = make_daemon()
    with Client(last.socket) as c:
        assert {"base", "L", "P"} <= {m["name"] for m in c.list()}
    assert last.stop() == 0
    assert segments(instance) == []


def test_client_killed_mid_request_is_forgotten(make_daemon, workers, tmp_path):
    hostile.big_model(tmp_path / "big.safetensors", 64)
    d = make_daemon()
    publish("m", hostile.model_tensors(1), socket=d.socket)
    w = workers(
        worker_code(
            d.socket,
            f"""
        import zmq
        from weightd import protocol
        sd = state_dict("m", socket=SOCK)           # maps generation 1
        c = Client(SOCK)
        admin, _ = c._socket_for("load")
        big = {str(tmp_path / "big.safetensors")!r}
        admin.send_multipart([b"L", protocol.request("load", path=big, name="big")])
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.connect(protocol.endpoint(SOCK))
        for i in range(2000):                        # requests whose replies nobody will read
            s.send_multipart([b"%d" % i, protocol.request("manifest", name="m", pid=os.getpid())])
        say(os.getpid())
        while True:
            s.send_multipart([b"x", protocol.request("manifest", name="m", pid=os.getpid())])
    """,
        )
    )
    pid = w.read()
    os.kill(pid, signal.SIGKILL)
    assert w.proc.wait(10) == -signal.SIGKILL
    with Client(d.socket) as c:
        assert c.ping()["pid"] == d.proc.pid
        [gen1] = [m["segment"].lstrip("/") for m in c.list() if m["name"] == "m"]
        # the load the dead client asked for still completes, whole
        wait_until(
            lambda: any(m["name"] == "big" and "generation" in m for m in c.list()),
            timeout=60,
            what="the orphaned load",
        )
        assert hostile.digests(c.state_dict("big")) == hostile.digests(
            load_file(str(tmp_path / "big.safetensors"))
        )
        publish("m", hostile.model_tensors(2), socket=d.socket)
        # generation 1 was kept for the dead pid; the daemon notices it is gone and frees it
        wait_until(
            lambda: gen1 not in segments(d.instance),
            timeout=30,
            what="the dead client's generation to be freed",
        )
        assert all(a["pid"] != pid for m in c.stats()["models"] for a in m["attached"])
        assert hostile.digests(c.state_dict("m")) == hostile.digests(hostile.model_tensors(2))


def test_publisher_killed_mid_publish_leaves_nothing_served(make_daemon, workers, instance):
    d = make_daemon()
    w = workers(
        worker_code(
            d.socket,
            """
        from weightd import segment
        c = Client(SOCK)
        r = c.call("publish_begin", name="p", nbytes=64 << 20)
        seg = segment.Segment.create(segment.Folder(), r["segment"], (64 << 20) + 8192, r["mode"])
        seg.write(4096, bytes(32 << 20))            # half of it, never sealed
        say(r["segment"])
        hear()
    """,
        )
    )
    seg = w.read()
    w.proc.kill()
    w.proc.wait()
    with Client(d.socket) as c:
        assert c.list() == []
        with pytest.raises(ModelNotFound):
            c.state_dict("p")
        publish("q", {"w": torch.ones(4)}, socket=d.socket)
        assert [m["name"] for m in c.list()] == ["q"]
    assert seg.lstrip("/") in segments(instance), "the half-written segment is still reserved..."
    assert d.stop() == 0
    assert segments(instance) == [], "...and the daemon removes it (here: when it stops)"


SMALL_SHM = """
import json, os, subprocess, sys, time, torch
from safetensors.torch import load_file, save_file
from weightd.client import Client, DaemonNotRunning
from weightd.errors import OutOfSpace
tmp, out = sys.argv[1], {}
save_file({"w": torch.ones(10 << 20 >> 2)}, tmp + "/m10.safetensors")
save_file({"w": torch.ones(40 << 20 >> 2)}, tmp + "/m40.safetensors")
sock = tmp + "/small.sock"
log = open(tmp + "/small.log", "wb")
d = subprocess.Popen([sys.executable, "-m", "weightd", "serve", "--socket", sock, "--instance", "small",
                      "--unlink-on-exit", "--model", "a=" + tmp + "/m40.safetensors"], stdout=log, stderr=log)
while True:
    try:
        Client(sock, timeout=2).ping(); break
    except DaemonNotRunning:
        assert d.poll() is None, open(tmp + "/small.log").read()
        time.sleep(0.05)
c = Client(sock, timeout=60)
out["df"] = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
for what, call in [("load", lambda: c.load(tmp + "/m40.safetensors", "b")),
                   ("publish", lambda: c.publish("p", {"w": torch.ones(40 << 20 >> 2)}))]:
    try:
        call(); out[what] = "ok"
    except OutOfSpace as e:
        out[what] = str(e)
# fill /dev/shm up to the last page with someone else's file, then load and attach
filler = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR)
st = os.statvfs("/dev/shm")
os.posix_fallocate(filler, 0, st.f_bavail * st.f_frsize - (4 << 20))
try:
    c.load(tmp + "/m10.safetensors", "c"); out["load_when_full"] = "ok"
except OutOfSpace as e:
    out["load_when_full"] = str(e)
reader = subprocess.run([sys.executable, "-c", '''
import sys, torch
from weightd.client import state_dict
sd = state_dict("a", socket=sys.argv[1])
total = float(sd["w"].sum())          # every page read
sd["w"].fill_(2.0)                    # every page copied on write: private memory, not /dev/shm
print(total, float(sd["w"].sum()))
''', sock], capture_output=True, text=True)
out["reader"] = [reader.returncode, reader.stdout.strip(), reader.stderr[-500:]]
out["served"] = sorted(m["name"] for m in c.list())
out["segments"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith("weightd."))
c.close()
d.terminate()
out["daemon_rc"] = d.wait(30)
out["left"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith("weightd."))
print(json.dumps(out))
"""


def test_a_small_dev_shm_fills_up_with_typed_errors_and_no_sigbus(tmp_path):
    why = private_shm_refused()
    if why:
        pytest.skip(f"no private small tmpfs ({why}); test_lifecycle's --max-bytes test covers the budget")
    (tmp_path / "small.py").write_text(SMALL_SHM)
    # a private mount namespace: /dev/shm is a fresh 64 MiB tmpfs for the daemon and its clients only
    r = subprocess.run(
        in_private_shm("64m", [sys.executable, str(tmp_path / "small.py"), str(tmp_path)]),
        capture_output=True,
        text=True,
        timeout=110,
        env=worker_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["df"] == 64 * MIB
    for what in ("load", "publish", "load_when_full"):
        assert "--shm-size" in out[what] and "--ipc=host" in out[what], (what, out[what])
    assert out["reader"][0] == 0, f"reader exited {out['reader'][0]} (-7 is SIGBUS): {out['reader'][2]}"
    assert out["reader"][1] == f"{float(10 << 20)} {float(20 << 20)}"
    assert out["served"] == ["a"] and len(out["segments"]) == 1
    assert out["daemon_rc"] == 0 and out["left"] == []


def test_socket_file_deleted_or_replaced_under_a_running_daemon(tmp_path, make_daemon):
    hostile.write_model(tmp_path / "m.safetensors", seed=5)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    early = Client(d.socket)
    for vandalism in ("delete", "replace"):
        for path in (d.socket, protocol.admin_socket(d.socket)):
            os.unlink(path)
            if vandalism == "replace":
                Path(path).write_text("not a socket")
        t0 = time.monotonic()

        def works():
            try:
                with Client(d.socket, timeout=2) as c:
                    c.ping()
                    c.call("unload", name="nope")
            except ModelNotFound:
                return True  # the admin socket answered too
            except Exception:
                return False

        wait_until(works, timeout=10, what=f"the daemon to bind again after a {vandalism}")
        assert time.monotonic() - t0 < 5
    assert early.ping()["pid"] == d.proc.pid, "a client connected before keeps working"
    early.close()


# --- isolation --------------------------------------------------------------------------------

GROUP = 4243


@needs_root
def test_mode_600_segments_are_unreadable_even_to_the_group(tmp_path, shared_dir, make_daemon):
    hostile.write_model(tmp_path / "m.safetensors", seed=6)
    sock = os.path.join(shared_dir, "weightd.sock")
    d = make_daemon(
        "--model", f"m={tmp_path / 'm.safetensors'}", "--group", str(GROUP), "--mode", "600", socket=sock
    )
    [seg] = segments(d.instance)
    assert os.stat(f"/dev/shm/{seg}").st_mode & 0o777 == 0o600
    code = worker_code(
        sock,
        as_user(
            GROUP,
            [GROUP],
            """
        from weightd.errors import PermissionDenied
        out = {"list": [m["name"] for m in Client(SOCK).list()]}   # the read socket is the group's
        try:
            state_dict("m", socket=SOCK)
            out["attach"] = "allowed"
        except PermissionDenied as e:
            out["attach"] = str(e)
        for what, fn in [("unlink", lambda p: os.unlink(p)), ("truncate", lambda p: os.truncate(p, 0)),
                         ("read", lambda p: open(p, "rb").read(1))]:
            try:
                fn("/dev/shm/" + sys.argv[1])
                out[what] = "allowed"
            except PermissionError:
                out[what] = "denied"
        say(out)
    """,
        ),
    )
    r = subprocess.run(
        [sys.executable, "-c", code, seg], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["list"] == ["m"]
    assert (
        "may not read segment" in out["attach"]
        and "mode 600" in out["attach"]
        and "--mode 640" in out["attach"]
    ), out
    assert (out["unlink"], out["truncate"], out["read"]) == ("denied", "denied", "denied")
    assert segments(d.instance) == [seg]


@needs_root
def test_a_segment_planted_by_another_user_is_never_adopted(tmp_path, make_daemon, instance):
    hostile.write_model(tmp_path / "m.safetensors", seed=7)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}", keep=True)
    d.stop(signal.SIGKILL)
    # Any user may create files in /dev/shm: one makes a well-formed, sealed segment with this
    # instance's prefix, hoping the next daemon serves it (and that it can rewrite it later).
    code = worker_code(
        "unused",
        as_user(
            65534,
            [],
            f"""
        from weightd import layout, segment
        from weightd.manifest import Manifest
        t = {{"w": torch.full((1024,), 666.0)}}
        blobs, tensors, keep = layout.from_tensors(t, source="evil")
        name = "/weightd.{instance}.evil-000000.0123456789ab"
        m = Manifest(name="evil", generation=99, storages=[], tensors=tensors, segment=name, uuid="0" * 32)
        layout.write(m, blobs, folder=segment.Folder(), mode=0o666)
        m2 = Manifest(
            name="m", generation=99, storages=[], tensors=tensors, segment=name[:-1] + "c", uuid="1" * 32
        )
        layout.write(m2, blobs, folder=segment.Folder(), mode=0o666)
        say("planted")
    """,
        ),
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    planted = [s for s in segments(instance) if os.stat(f"/dev/shm/{s}").st_uid == 65534]
    assert len(planted) == 2
    try:
        d2 = make_daemon(keep=True)
        with Client(d2.socket) as c:
            served = {m["name"]: m["generation"] for m in c.list()}
            assert served == {"m": 1}, "the planted segments are not served (nor do they replace m)"
            assert float(c.state_dict("m")["f32"].float().abs().max()) != 666.0
        assert "ignoring" in d2.output() and "uid 65534" in d2.output()
        d2.stop()
        assert all(os.path.exists(f"/dev/shm/{s}") for s in planted), "not ours to remove either"
    finally:
        for s in planted:
            os.unlink(f"/dev/shm/{s}")
    make_daemon().stop()  # adopt m and free it


def test_stray_writes_never_reach_the_daemon_or_other_workers(make_daemon, workers, tmp_path):
    expected = hostile.write_model(tmp_path / "m.safetensors", seed=8, kib=1024)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    [seg] = segments(d.instance)
    before = hostile.shm_sha(seg)
    writers = [
        workers(
            worker_code(
                d.socket,
                f"""
        import hostile
        sd = state_dict("m", socket=SOCK)
        for t in sd.values():
            t.reshape(-1).view(torch.uint8).fill_({i + 1})    # every byte of every weight
        say("written")
        hear()                                               # all the others have written too
        mine = all(bool((t.reshape(-1).view(torch.uint8) == {i + 1}).all()) for t in sd.values())
        fresh = hostile.digests(state_dict("m", socket=SOCK)) == {expected!r}
        say({{"mine": mine, "fresh": fresh}})
    """,
            )
        )
        for i in range(3)
    ]
    for w in writers:
        assert w.read() == "written"
    assert hostile.digests(state_dict("m", socket=d.socket)) == expected
    for w in writers:
        w.send("check")
    for w in writers:
        assert w.read() == {"mine": True, "fresh": True}, (
            "each sees only its own writes; a new attach sees none"
        )
        assert w.finish() == 0
    assert hostile.shm_sha(seg) == before, "the segment's bytes never changed"

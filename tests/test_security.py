"""Trust on a shared host: another local user tries to take over or break the daemon.

These tests play that other user: a uid with no passwd entry (root can be any uid). The
interpreter lives under /root, which other users cannot enter, so each such process starts as
root, imports what it needs, and drops its privileges for good before the part under test
(as ``conftest.as_user`` does). Without root they skip.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zmq
from safetensors.torch import save_file

from weightd import protocol, segment
from weightd.client import Client, state_dict
from weightd.errors import ConfigError, PermissionDenied, UnsafePath

from conftest import needs_root, segments, wait_until, worker_env

# Imported before the privileges go: nothing under /root can be read afterwards.
PRELUDE = """\
import os, sys, json, grp, pwd, logging, signal, time
import weightd.cli, weightd.daemon.server, weightd.client, weightd.trust
from weightd.client import Client, state_dict
"""


def drop(uid: int, gid: int | None = None) -> str:
    gid = uid if gid is None else gid
    return f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"


def as_uid(uid: int, body: str, gid: int | None = None) -> list[str]:
    return [sys.executable, "-c", PRELUDE + drop(uid, gid) + textwrap.dedent(body)]


def clean_env() -> dict:
    """No socket named anywhere: the default is the per-user fallback /tmp/weightd-<uid>."""
    env = worker_env()
    for key in ("WEIGHTD_SOCKET", "XDG_RUNTIME_DIR", "WEIGHTD_SHM_DIR"):
        env.pop(key, None)
    return env


def serve_as(uid: int, args: list[str], log: Path) -> subprocess.Popen:
    body = f"sys.argv = ['weightd', 'serve', *{args!r}]\nweightd.cli.main()\n"
    out = open(log, "wb")
    return subprocess.Popen(as_uid(uid, body), stdout=out, stderr=subprocess.STDOUT, env=clean_env())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def uids():
    """Two uids nobody uses (no passwd entry), fresh per test: the daemon's user and a neighbour."""
    base = random.randrange(50_000, 59_000, 2)
    yield base, base + 1
    for uid in (base, base + 1):
        shutil.rmtree(f"/tmp/weightd-{uid}", ignore_errors=True)


def model(path: Path, value: float) -> Path:
    save_file({"w": torch.full((256,), value)}, str(path))
    path.chmod(0o644)
    return path


def weightd(*args: str, uid: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    if uid is None:
        cmd = [sys.executable, "-m", "weightd", *args]
    else:
        cmd = as_uid(uid, f"sys.argv = ['weightd', *{list(args)!r}]\nweightd.cli.main()\n")
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)


pytestmark = needs_root


# --- 1. the per-user fallback socket directory ---------------------------------------------------


def test_a_squatted_fallback_socket_directory_is_refused_and_its_lock_never_followed(
    uids, shared_dir, instance
):
    me, neighbour = uids
    squat = Path(f"/tmp/weightd-{me}")
    squat.mkdir()
    os.chown(squat, neighbour, neighbour)
    squat.chmod(0o777)
    precious = Path(shared_dir) / "precious"  # a file of the daemon's user
    precious.write_text("keep me")
    os.chown(precious, me, me)
    os.symlink(precious, squat / "weightd.sock.lock")
    os.lchown(squat / "weightd.sock.lock", neighbour, neighbour)
    m = model(Path(shared_dir) / "m.safetensors", 1.0)
    proc = serve_as(me, ["--instance", instance, "--model", f"m={m}"], Path(shared_dir) / "serve.log")
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop(proc)
    out = (Path(shared_dir) / "serve.log").read_text()
    assert rc == UnsafePath.exit_code, out
    assert f"{squat} belongs to uid {neighbour}" in out and "remove it" in out, out
    assert "Traceback" not in out
    assert precious.read_text() == "keep me", "the lock's symlink was followed"
    assert segments(instance) == [], "nothing is loaded before the socket is known to be safe"


def test_the_fallback_directory_is_made_0700_and_the_lock_is_a_fresh_file(uids, shared_dir, instance):
    me, _ = uids
    log = Path(shared_dir) / "serve.log"
    proc = serve_as(me, ["--instance", instance, "--unlink-on-exit"], log)
    sock = Path(f"/tmp/weightd-{me}/weightd.sock")
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, what="the daemon's socket")
        assert proc.poll() is None, log.read_text()
        st = os.lstat(sock.parent)
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (me, 0o700)
        lock = os.lstat(str(sock) + ".lock")
        assert stat.S_ISREG(lock.st_mode) and lock.st_uid == me
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()


def test_a_symlink_as_the_lock_file_is_refused(tmp_path, make_daemon, instance):
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    os.symlink(precious, tmp_path / "weightd.sock.lock")
    r = weightd("serve", "--socket", str(tmp_path / "weightd.sock"), "--instance", instance)
    assert r.returncode == UnsafePath.exit_code, r.stderr
    assert "weightd.sock.lock is a symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert precious.read_text() == "keep me"


def test_a_socket_directory_others_may_write_is_refused(tmp_path, instance):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # sticky or not: anyone could bind weightd.sock there first
    r = weightd("serve", "--socket", str(shared / "weightd.sock"), "--instance", instance)
    assert r.returncode == UnsafePath.exit_code, r.stderr
    assert f"{shared} (owner uid 0 (root), mode 1777) may be written by every user" in r.stderr
    assert "chmod go-w" in r.stderr


# --- 2. clients trust a socket only where nobody else can put one -------------------------------


def test_a_client_never_talks_to_a_squatters_daemon(uids, shared_dir, instance):
    me, neighbour = uids
    squat = Path(f"/tmp/weightd-{me}")
    squat.mkdir()
    os.chown(squat, neighbour, neighbour)
    squat.chmod(0o755)
    evil = model(Path(shared_dir) / "evil.safetensors", 666.0)
    log = Path(shared_dir) / "squatter.log"
    # The neighbour's own daemon, in a directory of the neighbour's: to it, all is in order.
    squatter = serve_as(
        neighbour,
        [
            "--socket",
            f"{squat}/weightd.sock",
            "--instance",
            instance,
            "--model",
            f"m={evil}",
            "--mode",
            "644",
            "--unlink-on-exit",
        ],
        log,
    )
    try:
        wait_until(lambda: (squat / "weightd.sock").exists() or squatter.poll() is not None, what="squatter")
        assert squatter.poll() is None, log.read_text()
        r = subprocess.run(
            as_uid(
                me,
                """
            from weightd.errors import UnsafePath
            try:
                sd = state_dict("m")
                print(json.dumps({"attached": float(sd["w"][0])}))
            except UnsafePath as e:
                print(json.dumps({"refused": str(e)}))
        """,
            ),
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    finally:
        stop(squatter)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "refused" in out, f"the client attached the squatter's weights: {out}"
    assert f"{squat} belongs to uid {neighbour}" in out["refused"]


def test_a_client_maps_only_segments_of_the_daemons_user(tmp_path, make_daemon, monkeypatch):
    m = model(tmp_path / "m.safetensors", 1.0)
    d = make_daemon("--model", f"m={m}")
    [seg] = segments(d.instance)
    # A /dev/shm the client sees (a container's, $WEIGHTD_SHM_DIR) where somebody else put a
    # file of that name: the daemon's bytes with other weights.
    fake = tmp_path / "shm"
    fake.mkdir()
    shutil.copyfile(f"/dev/shm/{seg}", fake / seg)
    with Client(d.socket) as c:
        offset = c.manifest("m").storages[0].offset
        assert c.daemon_uid == c.ping()["uid"] == os.geteuid()  # the kernel's word and the daemon's
    with open(fake / seg, "r+b") as f:
        f.seek(offset)
        f.write(torch.full((256,), 666.0).numpy().tobytes())
    os.chown(fake / seg, 54321, 54321)
    monkeypatch.setenv(segment.ENV_SHM_DIR, str(fake))
    with pytest.raises(UnsafePath, match=r"belongs to uid 54321, not to the daemon's user \(uid 0"):
        state_dict("m", socket=d.socket)
    os.chown(fake / seg, 0, 0)
    assert float(state_dict("m", socket=d.socket)["w"][0]) == 666.0  # the check is the owner, nothing else


# --- 3. names planted in /dev/shm ----------------------------------------------------------------


def test_planted_names_are_skipped_at_restart_and_by_purge(tmp_path, make_daemon, instance):
    m = model(tmp_path / "m.safetensors", 1.0)
    d = make_daemon("--model", f"m={m}", keep=True)
    [seg] = segments(instance)
    d.stop()
    prefix = f"/dev/shm/weightd.{instance}."
    planted = {k: prefix + f"{k}-000000.0123456789ab" for k in ("link", "dir", "fifo", "file")}
    r = subprocess.run(
        as_uid(
            65534,
            f"""
        p = {planted!r}
        os.symlink("/dev/shm/{seg}", p["link"])     # a symlink to the daemon's own segment
        os.mkdir(p["dir"])
        os.mkfifo(p["fifo"])                        # opening it for reading would block forever
        with open(p["file"], "wb") as f:
            f.write(sys.stdin.buffer.read())        # a perfect copy, but not the daemon's
        os.chmod(p["file"], 0o600)                  # and closed to the daemon
    """,
        ),
        input=Path(f"/dev/shm/{seg}").read_bytes(),
        capture_output=True,
        env=clean_env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    try:
        d2 = make_daemon(keep=True)
        with Client(d2.socket) as c:
            assert [(x["name"], x["generation"]) for x in c.list()] == [("m", 1)]
        d2.stop()
        out = d2.output()
        for p in planted.values():
            assert f"skipping {p} is" in out or f"skipping {p} belongs" in out, out
        assert "Traceback" not in out
        # purge removes the daemon's segment and leaves what others planted, warning about it
        p = weightd("purge", "--socket", d.socket, "--instance", instance)
        assert p.returncode == 0, p.stderr
        assert "removed 1 segments" in p.stdout
        for name in planted.values():
            assert f"skipping a name others may have planted: {name} " in p.stderr, p.stderr
            assert os.path.lexists(name)
        assert not os.path.exists(f"/dev/shm/{seg}")
    finally:
        for p in planted.values():
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            elif os.path.lexists(p):
                os.unlink(p)


def test_purge_by_a_user_who_may_not_is_a_typed_error(tmp_path, shared_dir, make_daemon, instance):
    m = model(tmp_path / "m.safetensors", 1.0)
    sock = os.path.join(shared_dir, "weightd.sock")
    d = make_daemon("--model", f"m={m}", socket=sock, keep=True)
    [seg] = segments(instance)
    d.stop()
    r = weightd("purge", "--socket", sock, "--instance", instance, uid=65534)
    assert r.returncode == PermissionDenied.exit_code, r.stderr
    assert (
        "belong to uid 0" in r.stderr
        and "you are uid 65534" in r.stderr
        and "run purge as" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert segments(instance) == [seg]
    assert weightd("purge", "--socket", sock, "--instance", instance).returncode == 0
    assert segments(instance) == []


# --- 4. --model-dir: a symlink swapped in while a load is checked ------------------------------


RENAME_EXCHANGE = 2


def test_model_dir_holds_while_a_folder_is_swapped_for_a_symlink(tmp_path, make_daemon):
    inside, outside = tmp_path / "models", tmp_path / "secret"
    (inside / "x").mkdir(parents=True)
    outside.mkdir()
    model(inside / "x" / "m.safetensors", 1.0)
    model(outside / "m.safetensors", 666.0)
    os.symlink(outside, inside / "y")
    # Swap models/x (a folder) and models/y (a symlink out) atomically, as fast as possible.
    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        a, b = {str(inside / "x")!r}.encode(), {str(inside / "y")!r}.encode()
        while True:
            libc.renameat2(-100, a, -100, b, {RENAME_EXCHANGE})
    """),
        ]
    )
    d = make_daemon("--model-dir", str(inside))
    seen = {"inside": 0, "outside": 0, "refused": 0}
    try:
        with Client(d.socket, timeout=30) as c:
            for _ in range(150):
                try:
                    c.load(str(inside / "x" / "m.safetensors"), "m")
                except PermissionDenied:
                    seen["refused"] += 1
                    continue
                w = float(c.state_dict("m")["w"][0])
                seen["inside" if w == 1.0 else "outside"] += 1
    finally:
        flipper.kill()
        flipper.wait()
    assert seen["outside"] == 0, seen
    assert seen["inside"] > 0 and seen["refused"] > 0, seen  # both states were hit


# --- 5. the segments' mode is --mode, whatever the umask --------------------------------------


def test_mode_is_exact_whatever_the_umask(tmp_path, make_daemon, instance):
    m = model(tmp_path / "m.safetensors", 1.0)
    old = os.umask(0o077)
    try:
        d = make_daemon("--model", f"m={m}", "--mode", "640")
        with Client(d.socket) as c:
            c.publish("p", {"w": torch.ones(8)})
    finally:
        os.umask(old)
    modes = {s: stat.S_IMODE(os.stat(f"/dev/shm/{s}").st_mode) for s in segments(instance)}
    assert len(modes) == 2 and set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "666"], "lets other users write"),
        (["--mode", "660"], "lets other users write"),
        (["--mode", "999"], "is not an octal mode"),
        (["--mode", "440"], "the daemon must read and write"),
        (["--group", "nosuch-group"], "no group named 'nosuch-group'"),
    ],
)
def test_bad_mode_and_group_are_usage_errors(tmp_path, args, message):
    r = weightd("serve", "--socket", str(tmp_path / "weightd.sock"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_over_long_socket_path_is_refused_before_anything_is_made(tmp_path, instance):
    m = model(tmp_path / "m.safetensors", 1.0)
    deep = tmp_path / ("d" * 100)
    r = weightd("serve", "--socket", str(deep / "weightd.sock"), "--instance", instance, "--model", f"m={m}")
    assert r.returncode == ConfigError.exit_code, r.stderr
    assert "at most 107" in r.stderr and "shorter --socket" in r.stderr and "Traceback" not in r.stderr
    assert segments(instance) == [] and not deep.exists()
    with pytest.raises(ConfigError, match="at most 107"):
        Client(str(deep / "weightd.sock"))


# --- 13. a publish sealed but never committed ---------------------------------------------------


def test_a_publish_sealed_but_never_committed_is_not_adopted(make_daemon, workers, instance):
    d = make_daemon(keep=True)
    # The publisher writes and seals its segment, then stops just before it would commit.
    w = workers(f"""
        import json, sys, torch
        from weightd.client import Client
        c = Client({d.socket!r})
        call = c.call
        def paused(op, **kw):
            if op == "publish_commit":
                print(json.dumps(kw["segment"]), flush=True)
                sys.stdin.readline()
            return call(op, **kw)
        c.call = paused
        c.publish("p", {{"w": torch.ones(8)}})
    """)
    name = w.read()
    assert name.lstrip("/") in segments(instance)
    d.stop(signal.SIGKILL)  # the daemon dies before the commit: it never checked that segment
    w.proc.kill()
    d2 = make_daemon()
    with Client(d2.socket) as c:
        assert c.list() == []
    assert name.lstrip("/") not in segments(instance)
    assert "unfinished segment" in d2.output()


# --- 14. a message is bounded as a whole, not frame by frame -----------------------------------


def test_a_message_of_many_frames_is_dropped_unanswered(tmp_path, make_daemon):
    m = model(tmp_path / "m.safetensors", 1.0)
    d = make_daemon("--model", f"m={m}")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(protocol.endpoint(d.socket))
    try:
        # every frame is small (ZMQ_MAXMSGSIZE bounds a frame), the message is not
        s.send_multipart([b"r1", protocol.request("ping")] + [b"y" * 1000] * 2000)
        # so is a request with one frame too many, however small
        s.send_multipart([b"r2", protocol.request("ping"), b"extra"])
        s.send_multipart([b"r3", protocol.request("ping")])
        assert s.poll(5000)
        rid, body = s.recv_multipart()
        assert rid == b"r3" and json.loads(body)["ok"], "only the well-formed request is answered"
        assert not s.poll(500)
    finally:
        s.close(linger=0)
    out = d.output()
    assert (
        "dropped a message of 2003 frames, 2000021 bytes" in out and "dropped a message of 4 frames" in out
    ), out
    assert f"uid {os.geteuid()}" in out
    assert float(state_dict("m", socket=d.socket)["w"][0]) == 1.0  # everyone else is served


# --- 15. clients in another PID namespace --------------------------------------------------------


def _nspid(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [pid]


def test_stats_sees_a_client_in_a_child_pid_namespace_by_its_real_pid(tmp_path, make_daemon):
    m = model(tmp_path / "m.safetensors", 1.0)
    d = make_daemon("--model", f"m={m}")
    code = f"""
        import os, sys, json
        from weightd.client import state_dict
        sd = state_dict("m", socket={d.socket!r})
        print(json.dumps(os.getpid()), flush=True)
        sys.stdin.readline()
    """
    p = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    try:
        inner = json.loads(p.stdout.readline())
        with Client(d.socket) as c:
            [entry] = c.stats()["models"]
        [attached] = entry["attached"]
        assert _nspid(attached["pid"])[-1] == inner and attached["pid"] != inner
        assert attached["shared"] > 0
        assert entry["not_visible"] == {"other_pid_namespace": 0, "unreadable": 0}
    finally:
        p.kill()
        p.wait()


def test_stats_says_what_it_cannot_see(tmp_path, sock, instance):
    m = model(tmp_path / "m.safetensors", 1.0)
    # The daemon in a PID namespace of its own (a container without hostPID): the kernel gives
    # it no pid for clients outside, so it cannot read their memory.
    log = open(tmp_path / "serve.log", "wb")
    d = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
            sys.executable,
            "-m",
            "weightd",
            "serve",
            "--socket",
            sock,
            "--instance",
            instance,
            "--model",
            f"m={m}",
            "--unlink-on-exit",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=worker_env(),
    )
    try:
        wait_until(lambda: os.path.exists(sock) or d.poll() is not None, what="the daemon")
        sd = state_dict("m", socket=sock)
        with Client(sock) as c:
            [entry] = c.stats()["models"]
        assert entry["attached"] == [] and entry["not_visible"]["other_pid_namespace"] == 1
        r = weightd("stats", "--socket", sock)
        assert "1 process in another PID namespace" in r.stdout, r.stdout
        del sd
    finally:
        # unshare passes no signal on: stop the daemon itself (pid 1 of its namespace)
        children = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        d.wait(30)
        log.close()


def test_removing_another_users_file_under_a_segment_name_is_a_typed_error(uids, instance):
    # shm_unlink of a root-owned name as another user: posix_ipc raises PermissionsError (not an
    # OSError); weightd turns it into PermissionDenied, never a traceback.
    name = f"/{segment.prefix(instance)}theirs"
    seg = segment.Segment.create(segment.Folder(), name, 4096, mode=0o644)
    try:
        seg.close()
        r = subprocess.run(
            as_uid(
                uids[0],
                f"""
                from weightd import segment
                from weightd.errors import PermissionDenied
                try:
                    segment.unlink(segment.Folder(), {name!r})
                except PermissionDenied as e:
                    print("denied:", e)
                """,
            ),
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert r.returncode == 0 and "denied: may not remove /dev/shm/" in r.stdout, r.stdout + r.stderr
        assert os.path.exists(segment.Folder().file(name))
    finally:
        segment.unlink(segment.Folder(), name)

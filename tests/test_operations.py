"""Running it for real: systemd notify, stats, progress, reload, access control, the unit file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightd.client import Client, publish, state_dict

from conftest import Daemon, as_user, big_model, needs_root, segments, worker_code, worker_env

ROOT = Path(__file__).resolve().parent.parent


def test_readiness_status_watchdog_and_stopping_over_notify_socket(tmp_path, make_daemon):
    save_file({"w": torch.ones(1024)}, tmp_path / "m.safetensors")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}", env=env)
    seen = []

    def until(key: str) -> None:
        while not any(key in m for m in seen):
            seen.append(listener.recv(4096).decode())

    until("READY=1")
    ready = next(m for m in seen if "READY=1" in m)
    assert f"MAINPID={d.proc.pid}" in ready and "STATUS=serving 1 models" in ready
    assert any("STATUS=loading m: 100%" in m for m in seen), "start-up progress goes to systemd"
    seen.clear()
    until("WATCHDOG=1")  # every 100 ms: half of WATCHDOG_USEC
    until("WATCHDOG=1")
    d.stop(signal.SIGTERM)
    until("STOPPING=1")
    assert d.proc.returncode == 0
    listener.close()


def test_stats_names_attached_processes_and_their_memory(serve, attached_worker):
    d = serve({"w": torch.ones(1 << 20)})  # 4 MiB
    w = attached_worker(
        d.socket,
        """
        total = float(sd["w"].sum())          # every page read: shared
        sd["w"][:1024 * 4].fill_(2.0)         # four pages written: private copies
        say(os.getpid())
        hear()
        """,
    )
    pid = w.read()
    with Client(d.socket) as c:
        s = c.stats()
    [m] = s["models"]
    assert (m["name"], m["generation"], m["current"], m["nbytes"]) == ("m", 1, True, 4 << 20)
    [a] = [a for a in m["attached"] if a["pid"] == pid]
    assert a["rss"] >= 4 << 20 and a["copied"] >= 4 * 4096, a
    assert s["shm"]["size"] >= s["shm"]["used"] >= 4 << 20 and s["shm"]["free"] > 0
    assert s["daemon"]["pid"] == d.proc.pid and s["daemon"]["pss"] > 0
    out = subprocess.run(
        [sys.executable, "-m", "weightd", "stats", "--socket", d.socket], capture_output=True, text=True
    )
    assert str(pid) in out.stdout and "/dev/shm:" in out.stdout and "daemon: pid" in out.stdout
    w.send("bye")
    assert w.finish() == 0


def test_load_reports_progress_and_ls_shows_it(tmp_path, make_daemon):
    big_model(tmp_path / "big.safetensors", 512)
    save_file({"w": torch.ones(8)}, tmp_path / "small.safetensors")
    d = make_daemon()
    with Client(d.socket) as c, Client(d.socket) as watcher:
        admin, _ = c._socket_for("load")
        for rid, path in [(b"1", "big.safetensors"), (b"2", "small.safetensors")]:
            admin.send_multipart(
                [rid, json.dumps({"v": 1, "op": "load", "path": str(tmp_path / path)}).encode()]
            )
        # loads run one at a time: while the big one runs, both are listed as loading
        for _ in range(100):  # both requests reach the daemon within a few ms
            loading = {m["name"] for m in watcher.list() if m.get("state") == "loading"}
            if loading == {"big", "small"}:
                break
            time.sleep(0.002)
        assert loading == {"big", "small"}
        replies = {}
        while len(replies) < 2:
            rid, body = admin.recv_multipart()
            body = json.loads(body)
            if "model" in body:
                replies[rid] = body["model"]
        assert replies[b"1"]["nbytes"] == 512 << 20 and replies[b"2"]["name"] == "small"
        assert [m["name"] for m in watcher.list()] == ["big", "small"]
        calls = []
        c.load(
            str(tmp_path / "big.safetensors"), "big", progress=lambda done, total: calls.append((done, total))
        )
    assert calls[-1] == (512 << 20, 512 << 20), "progress ends at 100%"
    assert all(t == 512 << 20 for _, t in calls) and [x for x, _ in calls] == sorted(x for x, _ in calls)


def test_reload_loads_only_what_is_new(tmp_path, make_daemon):
    save_file({"w": torch.ones(8)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(8)}, tmp_path / "b.safetensors")
    d = make_daemon("--model", f"a={tmp_path / 'a.safetensors'}")
    env = dict(
        os.environ, WEIGHTD_SERVE_MODEL=f"a={tmp_path / 'a.safetensors'} b={tmp_path / 'b.safetensors'}"
    )
    out = subprocess.run(
        [sys.executable, "-m", "weightd", "reload", "--socket", d.socket],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "loaded b generation 1" in out.stdout and "loaded a" not in out.stdout
    with Client(d.socket) as c:
        assert [(m["name"], m["generation"]) for m in c.list()] == [("a", 1), ("b", 1)]


def test_one_daemon_per_socket_and_graceful_sigint(tmp_path, make_daemon):
    d = make_daemon()
    second = Daemon(d.socket, d.instance + "b", [])
    second.start(wait=False)
    assert (
        second.proc.wait(60) == 4 and f"already running on {d.socket} (pid {d.proc.pid})" in second.output()
    )
    second.stop()
    assert d.stop(signal.SIGINT) == 0
    assert not Path(d.socket).exists(), "the socket goes with the daemon"


GROUP = 4242  # a group id no one else uses: the tests run as root and drop to nobody


@needs_root
def test_group_members_attach_but_cannot_change_anything(tmp_path, shared_dir, make_daemon):
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, tmp_path / "m.safetensors")
    sock = os.path.join(shared_dir, "weightd.sock")
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}", "--group", str(GROUP), socket=sock)
    [seg] = segments(d.instance)
    st = os.stat(f"/dev/shm/{seg}")
    assert (st.st_gid, st.st_mode & 0o777) == (GROUP, 0o640)
    code = worker_code(
        sock,
        as_user(
            GROUP,
            [GROUP],
            """
        from weightd.errors import PermissionDenied
        out = {}
        sd = state_dict("m", socket=SOCK)
        out["read"] = float(sd["w"][100])
        sd["w"][100] = -1.0                      # a private copy of that page, nobody else sees it
        out["wrote"] = float(sd["w"][100])
        c = Client(SOCK)
        out["list"] = [m["name"] for m in c.list()]
        for what, call in [("load", lambda: c.load("/etc/passwd", "x")), ("unload", lambda: c.unload("m")),
                           ("publish", lambda: c.publish("x", {"w": torch.ones(1)}))]:
            try:
                call()
                out[what] = "allowed"
            except PermissionDenied as e:
                out[what] = "denied"
        try:
            os.open("/dev/shm/" + sys.argv[1], os.O_RDWR)
            out["write_segment"] = "allowed"
        except PermissionError:
            out["write_segment"] = "denied"
        say(out)
    """,
        ),
    )
    member = subprocess.run(
        [sys.executable, "-c", code, seg], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert member.returncode == 0, member.stderr
    assert json.loads(member.stdout) == {
        "read": 100.0,
        "wrote": -1.0,
        "list": ["m"],
        "load": "denied",
        "unload": "denied",
        "publish": "denied",
        "write_segment": "denied",
    }
    assert float(state_dict("m", socket=sock)["w"][100]) == 100.0

    stranger = subprocess.run(
        [sys.executable, "-c", worker_code(sock, as_user(65534, [], "state_dict('m', socket=SOCK)"))],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        stranger.returncode != 0
        and "PermissionDenied" in stranger.stderr
        and "daemon's group" in stranger.stderr
    )

    # and the daemon's own user (root here) may do everything
    assert publish("x", {"w": torch.ones(2)}, socket=sock)["generation"] == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    weightd = Path(sys.executable).with_name("weightd")
    unit = (ROOT / "systemd" / "weightd.service").read_text().replace("/usr/local/bin/weightd", str(weightd))
    (tmp_path / "weightd.service").write_text(unit)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "weightd.service")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "Type=notify" in unit and "RuntimeDirectory=weightd" in unit and "EnvironmentFile=" in unit
    assert "ExecReload=" in unit and "WatchdogSec=" in unit and "User=weightd" in unit

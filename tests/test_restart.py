"""Restart as systemd does it: the unit's own command lines, adoption instead of reloading,
serving while loading, --keep-going, --check, and what a stop leaves (issue 13).

The unit's ExecStart= and ExecReload= are read from systemd/weightd.service and the models
from systemd/weightd.env, with only the paths replaced (the weightd binary, the socket, the
group, /models), then run as they are.
"""

from __future__ import annotations

import grp
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightd.bench import spawn
from weightd.client import Client, StillLoading, state_dict
from weightd.daemon.config import Config
from weightd.errors import CheckpointError

from conftest import WEIGHTD, big_file, in_private_shm, private_shm_refused, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "weightd.service"
ENV_FILE = ROOT / "systemd" / "weightd.env"


# --- the unit, as systemd reads it ----------------------------------------------------------


def unit_lines(key: str) -> list[str]:
    """``ExecStart=`` etc. of the [Service] section (no continuation lines in ours)."""
    out = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}="):
            out.append(line.split("=", 1)[1])
    return out


def environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= syntax as ours uses it: KEY=VALUE lines, # comments, quotes."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = " ".join(shlex.split(value))
    return env


def command(key: str, sock: str) -> list[str]:
    """The unit's command line for ``key`` with this machine's paths in."""
    (line,) = unit_lines(key)
    argv = shlex.split(line)
    assert argv[0] == "/usr/local/bin/weightd", argv
    out = WEIGHTD + argv[1:]
    out = [sock if a == "/run/weightd/weightd.sock" else a for a in out]
    if "--group" in out:  # the unit's group may not exist here: the test's own group
        out[out.index("--group") + 1] = grp.getgrgid(os.getegid()).gr_name
    return out


def unit_env(models_dir: Path, *, models: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in environment_file(ENV_FILE).items():
        if key == "WEIGHTD_SERVE_MODEL" and not models:
            continue
        env[key] = value.replace("/models/", f"{models_dir}/")
    return env


def instance_of(sock: str) -> str:
    return Config(socket=sock).instance  # the unit passes no --instance: the socket's hash


@pytest.fixture
def unit(tmp_path):
    """Start the unit's ExecStart (``start(models=True)``), run its ExecReload; every daemon
    stopped and the instances' segments removed at the end."""
    started: list[spawn.Daemon] = []
    models_dir = tmp_path / "models"
    models_dir.mkdir()

    class Unit:
        dir = models_dir
        socket = str(tmp_path / "w.sock")

        def start(
            self, models: bool = True, socket: str | None = None, until: str = "loaded"
        ) -> spawn.Daemon:
            sock = socket or self.socket
            d = spawn.Daemon(
                sock,
                instance_of(sock),
                argv=command("ExecStart", sock),
                env=unit_env(models_dir, models=models),
                log=tmp_path / f"daemon.{len(started)}.log",
            )
            started.append(d)
            return d.start(timeout=120, until=until)

        def reload(self) -> subprocess.CompletedProcess:
            return subprocess.run(
                command("ExecReload", self.socket),
                env=unit_env(models_dir),
                capture_output=True,
                text=True,
                timeout=120,
            )

    yield Unit()
    for d in started:
        d.stop()
    for d in started:
        d.remove_segments()


def write_models(models_dir: Path, bert: float = 1.0, llama: float = 2.0) -> None:
    """The two models weightd.env names: a file and a folder of safetensors."""
    save_file({"w": torch.full((1 << 20,), bert)}, models_dir / "bert.safetensors")
    (models_dir / "llama-3-8b").mkdir(exist_ok=True)
    save_file({"w": torch.full((1 << 20,), llama)}, models_dir / "llama-3-8b" / "model.safetensors")


def served(sock: str) -> dict[str, dict]:
    with Client(sock) as c:
        return {m["name"]: m for m in c.list()}


# --- the unit's command lines -------------------------------------------------------------


def test_unit_restart_adopts_and_reload_loads_only_the_changed_model(unit, tmp_path):
    write_models(unit.dir)
    empty_sock = str(tmp_path / "empty.sock")
    unit.start(models=False, socket=empty_sock).stop()  # imports warm, as for the restart below
    t0 = time.monotonic()
    unit.start(models=False, socket=empty_sock).stop()
    t_empty = time.monotonic() - t0

    d = unit.start()
    first = served(unit.socket)
    assert {n: (m["generation"], m["state"]) for n, m in first.items()} == {
        "bert": (1, "ready"),
        "llama": (1, "ready"),
    }
    d.stop(signal.SIGKILL)  # a crash: Restart=on-failure starts the same command again

    t0 = time.monotonic()
    d = unit.start()
    t_restart = time.monotonic() - t0
    after = served(unit.socket)
    # Both served from the segments the killed daemon left: same generations, no reload.
    assert {n: (m["generation"], m["segment"], m["adopted"]) for n, m in after.items()} == {
        n: (1, m["segment"], True) for n, m in first.items()
    }
    assert len(d.segments()) == 2, d.segments()
    assert d.output().count("not reloaded") == 2
    assert state_dict("bert", socket=unit.socket)["w"][0].item() == 1.0
    # the stop of the empty daemon is in t_empty too: a fair margin for the restart's
    assert t_restart < t_empty + 0.5, (t_restart, t_empty)

    # Rewrite one checkpoint with new values, leave the other alone: ExecReload loads only it.
    save_file({"w": torch.full((1 << 20,), 5.0)}, unit.dir / "bert.safetensors")
    r = unit.reload()
    assert r.returncode == 0, r.stderr
    now = served(unit.socket)
    assert (now["bert"]["generation"], now["llama"]["generation"]) == (2, 1), r.stdout
    assert "unchanged llama generation 1" in r.stdout and "loaded bert generation 2" in r.stdout
    assert state_dict("bert", socket=unit.socket)["w"][0].item() == 5.0


def test_a_rewritten_file_is_reloaded_at_start_up_and_an_unchanged_one_is_not(unit):
    write_models(unit.dir)
    d = unit.start()
    first = served(unit.socket)
    d.stop()  # systemctl stop: the segments stay
    assert len(d.segments()) == 2
    write_models(unit.dir, llama=7.0)
    save_file({"w": torch.full((1 << 20,), 1.0)}, unit.dir / "bert.safetensors")  # same bytes, new mtime
    d = unit.start()
    now = served(unit.socket)
    assert now["llama"]["generation"] == 2 and now["bert"]["generation"] == 2
    assert state_dict("llama", socket=unit.socket)["w"][0].item() == 7.0
    # the replaced generations went: no process had them mapped after the restart
    wait_until(lambda: len(d.segments()) == 2, timeout=30, what="old generations freed")
    assert {m["segment"] for m in now.values()}.isdisjoint(m["segment"] for m in first.values())


def test_stop_leaves_the_segments_a_new_daemon_shows_their_age_and_source_and_purge_frees_them(unit):
    write_models(unit.dir)
    d = unit.start()
    d.stop()  # SIGTERM, as systemctl stop
    assert len(d.segments()) == 2, "stop keeps the models for the next start"
    d = unit.start(models=False)  # a start without the preloads: ls shows what it adopted
    r = subprocess.run([*WEIGHTD, "ls", "--socket", unit.socket], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ready (adopted)" in r.stdout and str(unit.dir / "bert.safetensors") in r.stdout
    r = subprocess.run(
        [*WEIGHTD, "stats", "--socket", unit.socket], capture_output=True, text=True, timeout=60
    )
    assert "adopted from the previous daemon" in r.stdout, r.stdout
    d.stop()
    # the unit's user, its socket from the environment: no flags
    env = dict(os.environ, WEIGHTD_SOCKET=unit.socket)
    r = subprocess.run([*WEIGHTD, "purge"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "removed 2 segments" in r.stdout, r.stdout + r.stderr
    assert d.segments() == []


# --- serve while loading, keep going, check -----------------------------------------------


def test_serves_while_loading_and_an_attach_waits_for_a_loading_model(make_daemon, tmp_path):
    save_file({"w": torch.ones(16)}, tmp_path / "small.safetensors")
    big = big_file(tmp_path / "big.safetensors", 3 << 30)
    t0 = time.monotonic()
    d = make_daemon("--model", f"big={big}", "--model", f"small={tmp_path / 'small.safetensors'}", wait=False)
    d.wait_ready(until="ping")
    with Client(d.socket, timeout=0.5) as c:
        assert c.ping()["preloading"] == 2
        states = {m["name"]: m["state"] for m in c.list()}
        assert states == {"big": "loading", "small": "loading"}
        with pytest.raises(StillLoading, match="still loading"):
            c.manifest("big")  # the caller's 0.5 s pass first: a typed answer, not a timeout
    with Client(d.socket, timeout=120) as c:
        assert c.manifest("small").name == "small"  # waits behind big, then answers
        assert c.ping()["preloading"] == 0
    assert time.monotonic() - t0 < 120


def test_keep_going_serves_the_other_models_and_shows_the_failure(make_daemon, tmp_path):
    save_file({"w": torch.ones(16)}, tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    d = make_daemon(
        "--keep-going",
        "--model",
        f"bad={tmp_path / 'bad.safetensors'}",
        "--model",
        f"good={tmp_path / 'good.safetensors'}",
    )
    with Client(d.socket) as c:
        models = {m["name"]: m for m in c.list()}
        assert models["good"]["state"] == "ready"
        assert models["bad"]["state"] == "failed" and models["bad"]["error"]["code"] == "bad_checkpoint"
        assert [m["name"] for m in c.stats()["failed"]] == ["bad"]
        with pytest.raises(Exception, match="failed to load"):
            c.manifest("bad")
    r = subprocess.run([*WEIGHTD, "ls", "--socket", d.socket], capture_output=True, text=True, timeout=60)
    assert "bad: failed: [bad_checkpoint]" in r.stdout
    assert "preload of bad failed" in d.output()


def test_without_keep_going_a_failed_preload_stops_the_daemon(make_daemon, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    d = make_daemon("--model", f"bad={tmp_path / 'bad.safetensors'}", wait=False)
    assert d.proc.wait(60) == CheckpointError.exit_code
    assert d.segments() == []


def test_serve_check_loads_and_exits_with_the_failure_and_leaves_the_segments(sock, instance, tmp_path):
    save_file({"w": torch.ones(16)}, tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    base = [*WEIGHTD, "serve", "--socket", sock, "--instance", instance, "--check"]
    good = ["--model", f"good={tmp_path / 'good.safetensors'}"]
    r = subprocess.run(
        [*base, *good, "--model", f"bad={tmp_path / 'bad.safetensors'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == CheckpointError.exit_code, r.stderr
    assert "bad.safetensors" in r.stderr
    r = subprocess.run([*base, *good], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # what it loaded stays for the daemon that starts next (ExecStartPre=, then ExecStart=)
    d = spawn.Daemon(sock, instance, good + ["--unlink-on-exit"], log=tmp_path / "d.log").start()
    try:
        assert "not reloaded" in d.output()
        assert len(d.segments()) == 1
    finally:
        d.stop()


def test_reload_goes_on_past_a_bad_entry_and_exits_non_zero(make_daemon, tmp_path):
    for n in ("a", "c"):
        save_file({"w": torch.ones(16)}, tmp_path / f"{n}.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"not a checkpoint")
    d = make_daemon()
    models = " ".join(f"{n}={tmp_path / n}.safetensors" for n in "abc")
    env = dict(os.environ, WEIGHTD_SERVE_MODEL=models)
    r = subprocess.run(
        [*WEIGHTD, "reload", "--socket", d.socket], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == CheckpointError.exit_code
    assert "loaded a generation 1" in r.stdout and "loaded c generation 1" in r.stdout
    assert "b:" in r.stderr and "1 of 3 models failed" in r.stderr
    assert sorted(served(d.socket)) == ["a", "c"]


# --- a tmpfs with room for one copy ---------------------------------------------------------

TMPFS_SCENARIO = textwrap.dedent(
    """
    import os, signal, sys
    from weightd.bench import spawn
    from weightd.client import Client, state_dict
    sock, instance, model, log = sys.argv[1:5]
    args = ["--model", f"big={model}"]
    d = spawn.Daemon(sock, instance, args, log=log).start(timeout=300)
    d.stop(signal.SIGKILL)
    d = spawn.Daemon(sock, instance, args, log=log).start(timeout=300)
    try:
        with Client(sock) as c:
            (m,) = c.list()
        sd = state_dict("big", socket=sock)
        print(m["generation"], m["adopted"], len(d.segments()), int(sd["w"][0]), int(sd["w"][-1]), flush=True)
    finally:
        d.stop()
        d.remove_segments()
    """
)


def test_a_2gib_model_restarts_in_a_tmpfs_sized_for_1_2_models(tmp_path, sock, instance):
    size = 2 << 30
    big = big_file(tmp_path / "big.safetensors", size)
    with open(big, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x09")
    # A private /dev/shm of 1.2 models (conftest.in_private_shm): the host's is untouched.
    why = private_shm_refused()
    if why:
        pytest.skip(why)
    r = subprocess.run(
        in_private_shm(
            int(size * 1.2),
            [
                sys.executable,
                "-c",
                TMPFS_SCENARIO,
                sock,
                instance,
                str(big),
                str(tmp_path / "d.log"),
            ],
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "d.log").read_text() if (tmp_path / "d.log").exists() else ""
    assert r.returncode == 0, r.stderr[-3000:] + log[-3000:]
    generation, adopted, segments, first, last = r.stdout.split()
    assert (generation, adopted, segments, first, last) == ("1", "True", "1", "7", "9"), log
    assert "not reloaded" in log


def test_a_hugging_face_folder_is_adopted_unchanged_and_reloaded_when_one_of_its_files_changes(
    make_daemon, tmp_path
):
    pytest.importorskip("transformers")
    from hf_models import save

    folder = save("gpt2", tmp_path / "gpt2")
    args = ("--model", f"g={folder}")
    make_daemon(*args, keep=True).stop()
    d = make_daemon(*args, keep=True)
    assert "not reloaded" in d.output()
    with Client(d.socket) as c:
        origin = c.manifest("g", full=True).origin  # the daemon's own record, not in attach replies
    read = {Path(f["path"]).name for f in origin["files"]}
    # every file from_pretrained and the small-file copy read, and the folder itself
    assert {"config.json", "model.safetensors", "generation_config.json", "gpt2"} <= read, read
    assert origin["conversions"]["transformers"]
    d.stop()
    # a small file rewritten is a change too: workers read it from the segment
    import json

    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "top_k": 7}))
    d = make_daemon(*args)
    with Client(d.socket) as c:
        assert [m["generation"] for m in c.list()] == [2]


def test_an_adopted_segment_takes_the_new_daemons_mode(make_daemon, tmp_path):
    # An unchanged preload is served from the old segment; with the access of the new --mode, not
    # of the daemon that made it (world-readable weights must not stay so after a stricter restart).
    save_file({"w": torch.full((1 << 16,), 3.0)}, tmp_path / "m.safetensors")
    d = make_daemon("--mode", "0644", "--model", f"m={tmp_path / 'm.safetensors'}", keep=True)
    [seg] = d.segments()
    assert os.stat(f"/dev/shm{seg}").st_mode & 0o777 == 0o644
    d.stop()
    d = make_daemon("--mode", "0640", "--model", f"m={tmp_path / 'm.safetensors'}")
    [m] = served(d.socket).values()
    assert (m["generation"], m["adopted"], m["segment"]) == (1, True, seg)
    assert os.stat(f"/dev/shm{seg}").st_mode & 0o777 == 0o640
    assert "now has mode 640" in d.output()

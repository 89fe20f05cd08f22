"""Issue 14, hardening: wrong answers given silently, and papercuts. One test per finding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from weightd import cli, segment
from weightd.client import Client
from weightd.errors import AttachError, CheckpointError, ConfigError, ModelNotFound, RequestTimeout

from conftest import run_weightd, segments, wait_until, worker_code


def weightd(sock: str, *args: str) -> subprocess.CompletedProcess:
    return run_weightd(*args, socket=sock)


# --- 8: default names keep everything but a known extension ---------------------------------


def test_default_names_keep_dots_and_drop_only_a_checkpoint_extension(tmp_path, make_daemon, sock):
    for folder in ("Qwen2.5-0.5B", "Qwen2.5-1.5B"):
        (tmp_path / folder).mkdir()
        save_file({"w": torch.ones(4)}, tmp_path / folder / "model.safetensors")
    save_file({"w": torch.ones(4)}, tmp_path / "model.v2.safetensors")
    torch.save({"w": torch.ones(4)}, tmp_path / "x.tar.pt")
    make_daemon("--model", str(tmp_path / "Qwen2.5-0.5B"))
    for path in ("Qwen2.5-1.5B", "model.v2.safetensors", "x.tar.pt"):  # the CLI's load: the same rule
        out = weightd(sock, "load", str(tmp_path / path))
        assert out.returncode == 0, out.stderr
    with Client(sock) as c:
        got = {m["name"]: m["generation"] for m in c.list()}
    assert got == {"Qwen2.5-0.5B": 1, "Qwen2.5-1.5B": 1, "model.v2": 1, "x.tar": 1}


def test_two_preloads_with_one_name_are_refused_at_start(tmp_path, monkeypatch):
    from weightd.daemon.server import Server

    monkeypatch.setattr(Server, "run", lambda self: pytest.fail("started with two models of one name"))
    a, b = tmp_path / "a" / "bert.safetensors", tmp_path / "b" / "bert.safetensors"
    result = CliRunner().invoke(
        cli.main, ["serve", "--socket", str(tmp_path / "s.sock"), "--model", str(a), "--model", str(b)]
    )
    assert result.exit_code == ConfigError.exit_code, result.output
    assert str(a) in result.output and str(b) in result.output and "NAME=PATH" in result.output
    # reload (systemd's ExecReload) reads the same list: the same refusal, before it loads anything
    result = CliRunner().invoke(
        cli.main, ["reload", "--socket", str(tmp_path / "s.sock")], env={"WEIGHTD_SERVE_MODEL": f"{a} {b}"}
    )
    assert result.exit_code == ConfigError.exit_code and "NAME=PATH" in result.output, result.output


# --- 10: flattening refuses colliding keys ---------------------------------------------------


def test_publish_refuses_a_nested_key_that_collides_with_a_dotted_one(make_daemon, sock):
    make_daemon()
    with Client(sock) as c:
        with pytest.raises(CheckpointError, match=r"'a\.b'"):
            c.publish("m", {"a": {"b": torch.ones(2)}, "a.b": torch.zeros(2)})
        assert c.list() == []


# --- 9: skeleton building touches no state another thread can see ---------------------------


def test_a_thread_building_modules_during_attaches_gets_real_parameters(make_daemon, sock):
    from models import TinyLM, trained_tiny

    make_daemon()
    with Client(sock) as c:
        c.publish("tiny", trained_tiny())
        stop, seen = threading.Event(), {"built": 0, "meta": []}

        def build_own_modules():
            while not stop.is_set():
                m = TinyLM()
                seen["built"] += 1
                seen["meta"] += [n for n, p in m.named_parameters() if p.is_meta]
                if any(bool((p == 0).all()) for p in m.parameters() if not p.is_meta and p.dim() > 1):
                    seen["meta"].append("an initialiser was skipped")

        other = threading.Thread(target=build_own_modules)
        other.start()
        try:
            deadline = time.monotonic() + 3
            attaches = 0
            while time.monotonic() < deadline or attaches < 50:
                model = c.attach("tiny", model=TinyLM)
                assert not any(p.is_meta for p in model.parameters())
                attaches += 1
        finally:
            stop.set()
            other.join()
    assert seen["built"] > 10, "the other thread hardly ran"
    assert not seen["meta"], f"another thread's modules got meta parameters: {seen['meta'][:5]}"


# --- 11: --model does not split its argument ------------------------------------------------


def test_a_checkpoint_path_with_a_space_serves(tmp_path, make_daemon, sock):
    (tmp_path / "my models").mkdir()
    save_file({"w": torch.ones(8)}, tmp_path / "my models" / "a.safetensors")
    make_daemon("--model", f"a={tmp_path / 'my models' / 'a.safetensors'}")
    with Client(sock) as c:
        assert [m["name"] for m in c.list()] == ["a"]


# --- papercut: a publisher killed mid-write ----------------------------------------------------


def test_a_publisher_killed_mid_write_frees_its_reservation_promptly(make_daemon, sock, instance, workers):
    make_daemon()
    w = workers(
        worker_code(
            sock,
            """
        from weightd import segment
        with Client(SOCK) as c:
            r = c.call("publish_begin", name="p", nbytes=4 << 20)
            shm = segment.Folder()
            seg = segment.Segment.create(shm, r["segment"], 4 << 20, r["mode"], tuple(r["owner"]))
            seg.write(segment.DATA_OFFSET, b"half a model")
            say(r["segment"])
            hear()  # killed here, mid-write
    """,
        )
    )
    name = w.read()
    assert segments(instance), "the publisher made its segment"
    with Client(sock) as c:
        [pending] = c.stats()["publishing"]
        assert (pending["name"], pending["segment"], pending["pid"]) == ("p", name, w.pid)
        assert pending["nbytes"] == 4 << 20
        out = weightd(sock, "stats")
        assert "publishing" in out.stdout and name in out.stdout, out.stdout
        w.proc.kill()
        w.proc.wait()
        wait_until(lambda: not segments(instance), timeout=10, what="the dead publisher's segment to go")
        assert c.stats()["publishing"] == [] and c.list() == []


# --- papercut: stats does not call memory one process maps "private" ------------------------


def test_stats_tells_pages_mapped_alone_from_pages_copied(make_daemon, sock, attached_worker):
    make_daemon()
    with Client(sock) as c:
        c.publish("m", {"w": torch.ones(1 << 20)})  # 4 MiB
    w = attached_worker(
        sock,
        """
        float(sd["w"].sum())                  # every page read, by this process alone
        sd["w"][: 1024 * 4].fill_(2.0)        # four pages written: its own copies
        say(os.getpid())
        hear()
        """,
    )
    pid = w.read()
    with Client(sock) as c:
        [a] = [a for a in c.stats()["models"][0]["attached"] if a["pid"] == pid]
    assert "private" not in a
    assert 4 * 4096 <= a["copied"] < 1 << 20 and a["mapped_alone"] >= 3 << 20, a
    out = weightd(sock, "stats")
    header = out.stdout.splitlines()[0]
    assert "PRIVATE" not in header and "MAPPED ALONE" in header and "COPIED" in header, out.stdout
    assert "private" not in out.stdout.lower(), out.stdout
    w.send("bye")
    assert w.finish() == 0


# --- papercut: a Hugging Face config.json without model_type ----------------------------------


def test_a_config_json_without_model_type_is_a_typed_error(tmp_path, make_daemon, sock):
    # Not a transformers folder (no model_type, no architectures): a folder of weights, served as
    # such; attach without model= says how to build the module.
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    make_daemon("--model", f"m={folder}")
    with Client(sock) as c:
        # not a model folder (its config names no model type): a folder of weights, served as such
        with pytest.raises(AttachError, match="pass model="):
            c.attach("m")
        assert c.state_dict("m")["w"].sum() == 4, "the weights themselves are served"


# --- papercut: an I/O error while reading a checkpoint ---------------------------------------


def test_an_io_error_reading_a_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, make_daemon, sock):
    # /proc/self/mem is a regular file whose first page (address 0) no process maps, so reading
    # it fails with EIO, as a bad disk or a broken NFS mount would; the daemon refuses it before
    # reading (it is the daemon's own memory: weightd never reads /proc), with the same error.
    bad = tmp_path / "bad.safetensors"
    bad.symlink_to("/proc/self/mem")
    save_file({"w": torch.ones(4)}, tmp_path / "good.safetensors")
    make_daemon("--model", f"good={tmp_path / 'good.safetensors'}")
    with Client(sock) as c:
        with pytest.raises(CheckpointError) as e:
            c.load(str(bad))
        assert str(bad) in str(e.value) and "never reads /proc" in str(e.value)
        assert [m["name"] for m in c.list()] == ["good"]
    out = weightd(sock, "load", str(bad))
    assert out.returncode == CheckpointError.exit_code and "internal" not in out.stderr, out.stderr


# --- papercut: attach / state_dict / publish take timeout= -----------------------------------


def test_attach_state_dict_and_publish_give_up_within_their_timeout(make_daemon, sock):
    from weightd.client import attach, publish, state_dict

    d = make_daemon()
    with Client(sock) as c:
        c.publish("m", {"w": torch.ones(4)})
    state_dict("m", socket=sock)  # connected, so the calls below wait on a reply only
    os.kill(d.pid, signal.SIGSTOP)  # a daemon that answers nothing
    try:
        calls = {
            "attach": lambda: attach("m", model=lambda: torch.nn.Linear(2, 2), socket=sock, timeout=0.5),
            "state_dict": lambda: state_dict("m", socket=sock, timeout=0.5),
            "publish": lambda: publish("m", {"w": torch.zeros(4)}, socket=sock, timeout=0.5),
        }
        for what, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout, match="0.5 s"):
                call()
            assert time.monotonic() - t0 < 4, f"{what} waited past its timeout= (default: 10 s)"
    finally:
        os.kill(d.pid, signal.SIGCONT)


# --- papercut: every user-facing error is importable from weightd.client ----------------------


def test_every_weightd_error_is_importable_from_weightd_client():
    import weightd.client
    from weightd import errors

    for cls in errors.BY_CODE.values():
        assert getattr(weightd.client, cls.__name__, None) is cls, cls.__name__
        assert cls.__name__ in weightd.client.__all__


# --- papercut: a segment deleted behind the daemon's back ------------------------------------


def test_a_model_whose_segment_was_deleted_is_no_longer_listed(tmp_path, make_daemon, sock):
    save_file({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(4)}, tmp_path / "b.safetensors")
    d = make_daemon("--model", str(tmp_path / "a.safetensors"), "--model", str(tmp_path / "b.safetensors"))
    with Client(sock) as c:
        seg = {m["name"]: m["segment"] for m in c.list()}["a"]
        os.unlink(segment.Folder().file(seg))  # as `rm /dev/shm/weightd.*` would

        wait_until(lambda: [m["name"] for m in c.list()] == ["b"], timeout=10, what="ls to drop model a")
        with pytest.raises(ModelNotFound):
            c.state_dict("a")
        assert c.state_dict("b")["w"].sum() == 4
    out = weightd(sock, "ls")
    assert " a " not in out.stdout and "b" in out.stdout
    wait_until(lambda: "no longer served" in d.log.read_text(), timeout=5, what="the warning in the log")

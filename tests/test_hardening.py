"""Issue 14, hardening: wrong answers given silently, and papercuts. One test per finding."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from weightd import cli
from weightd.client import Client
from weightd.errors import CheckpointError, ConfigError


def weightd(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightd", *args, "--socket", sock], capture_output=True, text=True, timeout=60
    )


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

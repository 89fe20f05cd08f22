"""The command line: options onto Config (mocked at Server.run), and real commands on a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from weightd import cli
from weightd.daemon.server import Server
from weightd.errors import CheckpointError, DaemonNotRunning, ModelNotFound


@pytest.fixture
def captured(monkeypatch):
    """Stop at the CLI -> Server.run boundary and keep the Config the CLI built."""
    seen = {}

    def run(self):
        seen["config"] = self.config

    monkeypatch.setattr(Server, "run", run)
    return seen


def test_serve_maps_options_onto_config(captured, tmp_path):
    result = CliRunner().invoke(
        cli.main,
        [
            "serve",
            "--model",
            "a=/m/a.safetensors",
            "--model",
            "/m/bert.safetensors",
            "--factory",
            "a=pkg.mod:build",
            "--socket",
            str(tmp_path / "s.sock"),
            "--mode",
            "600",
            "--max-bytes",
            "1000",
            "--instance",
            "x1",
        ],
    )
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert [(m.name, m.path, m.factory) for m in c.models] == [
        ("a", "/m/a.safetensors", "pkg.mod:build"),
        (None, "/m/bert.safetensors", None),
    ]
    assert (c.socket, c.mode, c.max_bytes, c.instance) == (str(tmp_path / "s.sock"), 0o600, 1000, "x1")


def test_every_option_is_an_environment_variable(captured, tmp_path):
    env = {
        "WEIGHTD_SOCKET": str(tmp_path / "env.sock"),
        "WEIGHTD_SERVE_MODEL": "a=/m/a.safetensors b=/m/b",
        "WEIGHTD_SERVE_MAX_BYTES": "42",
    }
    result = CliRunner().invoke(cli.main, ["serve"], env=env)
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (
        [m.name for m in c.models] == ["a", "b"] and c.socket == env["WEIGHTD_SOCKET"] and c.max_bytes == 42
    )
    # the instance (segment names) follows from the socket unless given
    assert len(c.instance) == 10


def test_factory_for_an_unknown_model_is_a_usage_error(captured):
    result = CliRunner().invoke(cli.main, ["serve", "--model", "a=/m/a.pt", "--factory", "b=x:y"])
    assert result.exit_code == 2 and "no --model named b" in result.output


def test_errors_become_documented_exit_codes(tmp_path):
    result = CliRunner().invoke(cli.main, ["ls", "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == DaemonNotRunning.exit_code
    assert "daemon_not_running" in result.output and "weightd serve" in result.output


def test_ls_load_unload_on_a_real_daemon(tmp_path, make_daemon):
    save_file({"w": torch.ones(256, 256)}, tmp_path / "a.safetensors")
    d = make_daemon("--model", f"a={tmp_path / 'a.safetensors'}")

    def weightd(*args):
        return subprocess.run(
            [sys.executable, "-m", "weightd", *args, "--socket", d.socket],
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = weightd("ls", "--json")
    assert out.returncode == 0, out.stderr
    [m] = json.loads(out.stdout)
    assert (m["name"], m["generation"], m["nbytes"], m["tensors"]) == ("a", 1, 256 * 256 * 4, 1)

    out = weightd("load", str(tmp_path / "a.safetensors"), "--name", "b")
    assert out.returncode == 0 and "loaded b generation 1" in out.stdout
    out = weightd("load", str(tmp_path / "a.safetensors"), "--name", "b", "--json")
    assert json.loads(out.stdout)["generation"] == 2, "loading a name again makes a new generation"
    table = weightd("ls").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "GEN", "SIZE"] and "256.0 KiB" in table

    assert weightd("unload", "b").returncode == 0
    assert weightd("unload", "b").returncode == ModelNotFound.exit_code
    assert weightd("load", str(tmp_path / "missing.pt")).returncode == CheckpointError.exit_code
    assert [m["name"] for m in json.loads(weightd("ls", "--json").stdout)] == ["a"]

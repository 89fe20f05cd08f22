"""The command line: options onto Config (mocked at Server.run), and real commands on a real daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from weightd import cli
from weightd.daemon.server import Server
from weightd.errors import CheckpointError, DaemonNotRunning, ModelNotFound

from conftest import run_weightd


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


def test_the_readers_defaults_are_the_daemons_and_the_help_says_them(captured, tmp_path):
    from weightd.daemon import stream

    sock = str(tmp_path / "s.sock")
    result = CliRunner().invoke(cli.main, ["serve", "--socket", sock])
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (c.load_readers, c.load_chunk) == (stream.DEFAULT_READERS, stream.DEFAULT_CHUNK)
    args = ["serve", "--socket", sock, "--load-readers", "3", "--load-chunk", "2M"]
    result = CliRunner().invoke(cli.main, args)
    assert (captured["config"].load_readers, captured["config"].load_chunk) == (3, 2 << 20)
    help_text = " ".join(CliRunner().invoke(cli.main, ["serve", "--help"]).output.split())
    assert f"[default: {stream.DEFAULT_READERS}]" in help_text
    assert f"[default: {stream.DEFAULT_CHUNK >> 20}M]" in help_text


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


# A value each option's type accepts, as its environment variable would hold it.
ENV_VALUES = {
    "max_bytes": "64G",
    "mode": "600",
    "group": "0",
    "metrics": "9477",
    "log_level": "debug",
    "log_format": "json",
    "timeout": "30",
    "load_chunk": "16M",
    "load_direct": "always",
}


def _options():
    for name, command in cli.main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.expose_value:
                yield name, command, param


@pytest.mark.parametrize(
    "name,command,option", list(_options()), ids=[f"{n}-{max(o.opts, key=len)}" for n, _, o in _options()]
)
def test_each_option_reads_weightd_command_option(name, command, option, monkeypatch):
    """README's rule, for every option of every command: WEIGHTD_<COMMAND>_<OPTION>, OPTION the
    long option's name in capitals with dashes as underscores."""
    variable = "WEIGHTD_" + (name + "_" + max(option.opts, key=len).lstrip("-")).upper().replace("-", "_")
    if option.is_flag:
        value = "1"
    elif isinstance(option.type, click.types.IntParamType):
        value = "7"
    else:
        value = ENV_VALUES.get(option.name, "x")
    monkeypatch.setenv(variable, value)
    args = [a.name for a in command.params if isinstance(a, click.Argument)]  # load PATH, unload NAME
    ctx = command.make_context(name, args)
    assert ctx.get_parameter_source(option.name) == click.core.ParameterSource.ENVIRONMENT, variable
    got = ctx.params[option.name]
    assert got is not None and got is not False and got != (), f"{variable}={value} did not arrive: {got!r}"


def test_old_variable_names_are_not_read(captured, tmp_path):
    """The names before the rule (click's from the parameter: model_dirs, as_json) are gone."""
    env = {"WEIGHTD_SERVE_MODEL_DIRS": str(tmp_path), "WEIGHTD_SERVE_MODEL_DIR": "/m"}
    result = CliRunner().invoke(cli.main, ["serve", "--socket", str(tmp_path / "s.sock")], env=env)
    assert result.exit_code == 0, result.output
    assert captured["config"].model_dirs == ["/m"]


def test_a_path_with_a_space_is_one_model_on_the_command_line_and_quoted_in_the_variable(captured):
    result = CliRunner().invoke(cli.main, ["serve", "--model", "a=/m/my models/a.safetensors"])
    assert result.exit_code == 0, result.output
    assert [(m.name, m.path) for m in captured["config"].models] == [("a", "/m/my models/a.safetensors")]
    env = {"WEIGHTD_SERVE_MODEL": "b=/m/b.pt 'a=/m/my models/a.safetensors' c=/m/with\\ space"}
    result = CliRunner().invoke(cli.main, ["serve"], env=env)
    assert result.exit_code == 0, result.output
    assert [(m.name, m.path) for m in captured["config"].models] == [
        ("b", "/m/b.pt"),
        ("a", "/m/my models/a.safetensors"),
        ("c", "/m/with space"),
    ]
    result = CliRunner().invoke(cli.main, ["serve"], env={"WEIGHTD_SERVE_MODEL": "'a=/m/x"})
    assert result.exit_code == 2 and "quote each value as in a shell" in result.output


def _systemd_environment_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (outer quotes removed), and the
    names of the commented-out examples: each must be a variable the CLI reads."""
    env, examples = {}, set()
    for line in path.read_text().splitlines():
        m = re.match(r"^(#?)\s*(WEIGHTD_[A-Z_]+)=(.*)$", line)
        if m and m.group(1):
            examples.add(m.group(2))
        elif m:
            value = m.group(3)
            env[m.group(2)] = value[1:-1] if value[:1] == value[-1:] == '"' else value
    return env, examples


def test_systemd_environment_file_names_real_variables(captured, tmp_path):
    root = Path(__file__).parent.parent / "systemd"
    env, examples = _systemd_environment_file(root / "weightd.env")
    known = {v for _, _, o in _options() for v in o.envvar}
    named = set(env) | examples
    assert env and named <= known, f"weightd.env names variables no option reads: {named - known}"
    result = CliRunner().invoke(cli.main, ["serve", "--socket", str(tmp_path / "s.sock")], env=env)
    assert result.exit_code == 0, result.output
    assert [m.model_name for m in captured["config"].models] == ["bert", "llama"]
    unit = (root / "weightd.service").read_text()
    for command in re.findall(r"^Exec\w+=/usr/local/bin/weightd (\w+)", unit, re.M):
        assert command in cli.main.commands


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
        return run_weightd(*args, socket=d.socket)

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


@pytest.mark.parametrize("value", ["-5", "0", "lots"])
def test_max_bytes_must_be_a_positive_number_of_bytes(captured, value, tmp_path):
    result = CliRunner().invoke(
        cli.main, ["serve", "--socket", str(tmp_path / "s.sock"), "--max-bytes", value]
    )
    assert result.exit_code == 2 and "--max-bytes" in result.output and "Traceback" not in result.output
    assert "64G" in result.output, result.output
    assert "config" not in captured


def test_max_bytes_takes_binary_units(captured, tmp_path):
    result = CliRunner().invoke(
        cli.main, ["serve", "--socket", str(tmp_path / "s.sock"), "--max-bytes", "64G"]
    )
    assert result.exit_code == 0, result.output
    assert captured["config"].max_bytes == 64 << 30

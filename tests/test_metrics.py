"""serve --metrics and --log-format json, on a real daemon scraped over real HTTP (and a unix
socket), parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from weightd import cli
from weightd.client import Client, publish
from weightd.errors import CheckpointError, ModelNotFound

from conftest import wait_until


def url_of(daemon) -> str:
    """The URL the daemon says it serves metrics on (it binds port 0: the kernel picks one)."""
    found = []

    def said():
        found[:] = re.findall(r"serving metrics on (http://[^\s\"]+)", daemon.output())
        return bool(found)

    wait_until(said, what="the daemon to say where its metrics are")
    return found[0]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of one exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    return found[name, frozenset(labels.items())]


def moved(before: dict, after: dict, name: str) -> dict:
    """The samples of ``name`` whose value changed, as {labels: difference}."""
    return {
        dict(labels).get("op", "") + "/" + dict(labels).get("outcome", ""): after[key] - before.get(key, 0.0)
        for key in after
        for n, labels in [key]
        if n == name and after[key] != before.get(key, 0.0)
    }


def stats_json(sock: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "weightd", "stats", "--socket", sock, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_scrape_equals_stats_and_counters_move_by_what_was_done(tmp_path, make_daemon, attached_worker):
    save_file({"w": torch.ones(1 << 20), "b": torch.zeros(7)}, tmp_path / "m.safetensors")
    d = make_daemon("--metrics", "127.0.0.1:0")
    url = url_of(d)
    before = samples(scrape(url))
    assert value(before, "weightd_requests_total", op="manifest", outcome="ok") == 0

    # what is done: a load, an attach held by a second process, a failed request, a publish
    with Client(d.socket) as c:
        c.load(str(tmp_path / "m.safetensors"), "m")
        w = attached_worker(d.socket, "say(os.getpid())\nhear()")
        pid = w.read()
        with pytest.raises(ModelNotFound):
            c.manifest("nope")
    publish("p", {"x": torch.arange(10.0)}, socket=d.socket)

    text = scrape(url)
    after = samples(text)
    # stats --json may see /dev/shm change under it (other processes use it): take the scrape
    # and stats that bracket each other with the same figure.
    for _ in range(20):
        stats = stats_json(d.socket)
        again = samples(scrape(url))
        if value(again, "weightd_shm_free_bytes") == stats["shm"]["free"]:
            break
    assert value(again, "weightd_shm_free_bytes") == stats["shm"]["free"]
    assert value(after, "weightd_shm_total_bytes") == stats["shm"]["size"]

    by_name = {m["name"]: m for m in stats["models"]}
    assert set(by_name) == {"m", "p"}
    for name, m in by_name.items():
        assert value(after, "weightd_model_bytes", model=name, state="current") == m["size"]
        assert value(after, "weightd_model_generation", model=name) == m["generation"]
        assert value(after, "weightd_model_attached_processes", model=name) == len(m["attached"])
        assert value(after, "weightd_loading", model=name) == 0
    assert [a["pid"] for a in by_name["m"]["attached"]] == [pid]
    assert value(after, "weightd_model_attached_processes", model="m") == 1

    # counters moved by exactly what was done (the scrapes themselves are not requests)
    assert moved(before, after, "weightd_requests_total") == {
        "load/ok": 1,
        "manifest/ok": 1,
        "manifest/not_found": 1,
        "publish_begin/ok": 1,
        "publish_commit/ok": 1,
    }
    assert moved(before, after, "weightd_request_seconds_count") == {
        "load/": 1,
        "manifest/": 2,
        "publish_begin/": 1,
        "publish_commit/": 1,
    }
    assert value(after, "weightd_load_seconds_count", format="safetensors") == 1
    assert value(after, "weightd_load_bytes_total") == by_name["m"]["nbytes"] == (4 << 20) + 28
    assert value(after, "weightd_publish_total", model="p") == 1
    assert ("weightd_publish_total", frozenset({("model", "m")})) not in after

    # the process collector's defaults, about the daemon itself
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_open_fds") > 0
    started = time.time() - stats["daemon"]["uptime"]
    assert abs(value(after, "process_start_time_seconds") - started) < 10

    # nothing a reader of the read socket could not see: no paths, segment names or pids
    assert str(tmp_path) not in text and d.instance not in text and "/dev/shm" not in text
    labels = {v for _, ls in after for _, v in ls}
    assert labels.isdisjoint({str(pid), str(d.proc.pid)}), labels
    w.send("bye")
    assert w.finish() == 0


def test_metrics_are_read_only(make_daemon):
    d = make_daemon("--metrics", "127.0.0.1:0")
    url = url_of(d)
    for method in ("POST", "PUT", "DELETE"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method=method), timeout=10)
        assert e.value.code == 501
    assert "weightd_shm_total_bytes" in scrape(url)


def test_a_load_in_progress_shows_as_loading_with_its_progress(tmp_path, make_daemon):
    save_file({f"t{i}": torch.randn(1 << 20) for i in range(48)}, tmp_path / "big.safetensors")  # 192 MiB
    d = make_daemon("--metrics", "127.0.0.1:0")
    url = url_of(d)
    seen = []
    loader = threading.Thread(target=lambda: Client(d.socket).load(str(tmp_path / "big.safetensors"), "big"))
    loader.start()
    while loader.is_alive():
        found = samples(scrape(url))
        key = ("weightd_loading", frozenset({("model", "big")}))
        if found.get(key) == 1:
            seen.append(value(found, "weightd_load_progress_ratio", model="big"))
    loader.join()
    assert seen, "no scrape saw the load running"
    assert all(0.0 <= r <= 1.0 for r in seen) and seen == sorted(seen)
    found = samples(scrape(url))
    assert value(found, "weightd_loading", model="big") == 0
    assert ("weightd_load_progress_ratio", frozenset({("model", "big")})) not in found


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def test_metrics_over_a_unix_socket(tmp_path, make_daemon):
    save_file({"w": torch.ones(256)}, tmp_path / "m.safetensors")
    path = str(tmp_path / "metrics.sock")
    d = make_daemon("--metrics", f"unix:{path}", "--model", f"m={tmp_path / 'm.safetensors'}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the read socket's mode
    conn = _UnixHTTP(path)
    conn.request("GET", "/metrics")
    reply = conn.getresponse()
    assert reply.status == 200
    found = samples(reply.read().decode())
    conn.close()
    assert value(found, "weightd_model_generation", model="m") == 1
    assert d.stop() == 0
    assert not os.path.exists(path), "the daemon removes its metrics socket when it stops"
    # a socket file a dead daemon left is replaced; something else at the path is refused
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    d2 = make_daemon("--metrics", f"unix:{path}")
    conn = _UnixHTTP(path)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()
    d2.stop()


def test_a_path_that_is_not_a_socket_or_a_port_in_use_is_a_clear_error(tmp_path, make_daemon):
    (tmp_path / "file").write_text("mine")
    d = make_daemon("--metrics", f"unix:{tmp_path / 'file'}", wait=False)
    assert d.proc.wait(60) == 1
    assert "cannot serve metrics on unix:" in d.output() and "is not a socket" in d.output()
    assert (tmp_path / "file").read_text() == "mine"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = make_daemon("--metrics", str(port), socket=str(tmp_path / "other.sock"), wait=False)
        assert d.proc.wait(60) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in d.output() and "another --metrics" in d.output()


@pytest.mark.parametrize(
    "address, says",
    [
        ("nonsense", "port must be a number"),
        ("127.0.0.1:", "port must be a number"),
        ("localhost:99999", "port must be a number"),
        (":9477", "names no host"),
        ("unix:", "needs a path"),
        ("no-such-host.invalid:9477", "cannot resolve host"),
    ],
)
def test_a_bad_metrics_address_is_a_usage_error(address, says):
    result = CliRunner().invoke(cli.main, ["serve", "--metrics", address])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--metrics'" in result.output and says in result.output


def test_metrics_are_off_by_default_and_an_environment_variable_turns_them_on(monkeypatch):
    from weightd.daemon.server import Server

    seen = []
    monkeypatch.setattr(Server, "run", lambda self: seen.append(self.config))  # the CLI boundary
    assert CliRunner().invoke(cli.main, ["serve"]).exit_code == 0
    env = {"WEIGHTD_SERVE_METRICS": "9477", "WEIGHTD_SERVE_LOG_FORMAT": "json"}
    assert CliRunner().invoke(cli.main, ["serve"], env=env).exit_code == 0
    assert [c.metrics for c in seen] == [None, "127.0.0.1:9477"]


def test_metrics_addresses_as_written():
    from weightd.daemon.metrics import parse_address

    assert str(parse_address("9477")) == "127.0.0.1:9477"  # a bare port: this machine only
    assert str(parse_address("0.0.0.0:9477")) == "0.0.0.0:9477"
    assert str(parse_address("[::1]:9477")) == "[::1]:9477"
    assert parse_address("unix:rel/m.sock").path == os.path.abspath("rel/m.sock")


def test_json_log_lines_parse_and_name_the_model(tmp_path, make_daemon):
    save_file({"w": torch.ones(256)}, tmp_path / "m.safetensors")
    d = make_daemon("--log-format", "json", "--model", f"m={tmp_path / 'm.safetensors'}")
    with Client(d.socket) as c:
        with pytest.raises(CheckpointError):
            c.load(str(tmp_path / "missing.safetensors"), "gone")
        c.unload("m")
    assert d.stop() == 0
    lines = [json.loads(line) for line in d.output().splitlines()]  # every line is one JSON object
    assert lines and all({"time", "level", "message", "pid"} <= set(e) for e in lines)
    assert all(e["pid"] == d.proc.pid for e in lines)
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", e["time"]) for e in lines)
    [loaded] = [e for e in lines if e["message"].startswith("loaded m ")]
    assert (loaded["level"], loaded["model"], loaded["generation"]) == ("info", "m", 1)
    [failed] = [e for e in lines if e["message"].startswith("load failed")]
    assert (failed["level"], failed["model"]) == ("warning", "gone") and "generation" not in failed
    [unloaded] = [e for e in lines if e["message"].startswith("unloaded m")]
    assert (unloaded["model"], unloaded["generation"]) == ("m", 1)
    assert lines[-1]["message"] == "weightd stopped" and "model" not in lines[-1]


def test_human_logs_stay_the_default(tmp_path, make_daemon):
    d = make_daemon()
    assert d.stop() == 0
    assert re.search(rf"weightd\[{d.proc.pid}\] INFO weightd stopped", d.output())

"""Stops and deaths mid-load (issue 14, items 6 and 7): one test per case.

Timing is asserted loosely (seconds); the exact figures are in benchmarks/restart.py's stop
part and the README.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from weightd.client import Cancelled, Client
from weightd.errors import CheckpointError, DaemonNotRunning

from conftest import WEIGHTD, big_file, wait_until

GiB = 1 << 30


def loading(sock: str, name: str) -> bool:
    """Whether ``name``'s load is under way with bytes copied already."""
    try:
        with Client(sock, timeout=2) as c:
            return any(m["name"] == name and m["state"] == "loading" and m["done"] > 0 for m in c.list())
    except Exception:
        return False


def test_sigterm_during_a_large_preload_stops_at_once_and_removes_the_half_written_segment(
    make_daemon, tmp_path
):
    save_file({"w": torch.ones(16)}, tmp_path / "small.safetensors")
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    # keep: a stop leaves finished segments for the next daemon, never a half-written one
    d = make_daemon(
        "--model", f"small={tmp_path / 'small.safetensors'}", "--model", f"big={big}", keep=True, wait=False
    )
    wait_until(lambda: loading(d.socket, "big"), timeout=60, what="the big preload under way")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    seconds = time.monotonic() - t0
    assert seconds < 3.0, f"SIGTERM took {seconds:.2f} s to act during a load"
    (left,) = d.segments()
    assert "small" in left  # the finished model stays, for the next start to adopt
    assert "cancelled" in d.output()
    d.remove_segments()


def test_sigterm_answers_a_requested_load_as_cancelled(make_daemon, tmp_path):
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    d = make_daemon()
    out = {}

    def load():
        try:
            with Client(d.socket) as c:
                c.load(str(big), "big")
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=load)
    t.start()
    wait_until(lambda: loading(d.socket, "big"), timeout=60, what="the load under way")
    d.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert not t.is_alive()
    assert isinstance(out.get("error"), Cancelled | DaemonNotRunning), out
    assert d.proc.wait(30) == 0
    assert d.segments() == []


def test_a_load_whose_requester_deadline_passed_is_not_started(make_daemon, tmp_path):
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    save_file({"w": torch.ones(16)}, tmp_path / "small.safetensors")
    d = make_daemon()
    first = threading.Thread(target=lambda: Client(d.socket).load(str(big), "big"))
    first.start()
    wait_until(lambda: loading(d.socket, "big"), timeout=60, what="the big load under way")
    with Client(d.socket) as c:
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="before it could start"):
            c.load(str(tmp_path / "small.safetensors"), "small", timeout=0.5)
        assert time.monotonic() - t0 < 5
    first.join(120)
    with Client(d.socket) as c:
        assert [m["name"] for m in c.list()] == ["big"]  # small was never loaded
    assert "small" not in "".join(d.segments())


def test_a_running_load_past_its_requester_deadline_is_cancelled_and_leaves_nothing(make_daemon, tmp_path):
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    d = make_daemon()
    with Client(d.socket) as c:
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="while it ran"):
            c.load(str(big), "big", timeout=1.0)
        assert time.monotonic() - t0 < 5
        assert c.list() == []
    assert d.segments() == []


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_checkpoint_that_is_not_a_regular_file_is_refused_before_it_is_read(make_daemon, tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(path)  # opening it to read would block until someone writes
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    save_file({"w": torch.ones(16)}, tmp_path / "good.safetensors")
    d = make_daemon()
    with Client(d.socket, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match="not a regular file"):
            c.load(str(path), "x")
        # and the next load is not queued behind it
        assert c.load(str(tmp_path / "good.safetensors"), "good")["name"] == "good"
        assert time.monotonic() - t0 < 5


def test_weightd_load_exits_with_a_clear_error_when_its_daemon_dies(make_daemon, tmp_path):
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    d = make_daemon()
    cli = subprocess.Popen(
        [*WEIGHTD, "load", str(big), "--socket", d.socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: loading(d.socket, "big"), timeout=60, what="the load under way")
        d.proc.kill()
        t0 = time.monotonic()
        _, err = cli.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == DaemonNotRunning.exit_code, err
    assert "went away" in err and "Traceback" not in err
    assert seconds < 5, f"weightd load took {seconds:.1f} s to notice"
    d.remove_segments()  # the killed daemon's half-written segment (a restart would sweep it)


def waiting(sock: str, name: str) -> int:
    """How many attaches the daemon holds until ``name`` is loaded (``ls``'s ``waiting``)."""
    with Client(sock, timeout=2) as c:
        return sum(m.get("waiting", 0) for m in c.list() if m["name"] == name)


def test_a_client_waiting_on_a_daemon_that_is_killed_hears_it_within_seconds(make_daemon, tmp_path):
    """The same through the API, for a request that gets no progress (an attach waiting for a
    preload): the connection ends with the daemon, and the client hears it at once, from the end
    of its connection (``PeerGone``: "went away while answering") — not from its probe of the
    socket file every ``PROBE_SECONDS``, which would say "connection refused" and is only the
    fallback for a daemon that left its connection open."""
    big = big_file(tmp_path / "big.safetensors", 2 * GiB)
    d = make_daemon("--model", f"big={big}", wait=False)
    d.wait_ready(until="ping")
    out = {}

    def attach():
        try:
            with Client(d.socket, timeout=120) as c:
                c.manifest("big")
        except Exception as e:
            out["error"] = e
            out["at"] = time.monotonic()

    t = threading.Thread(target=attach)
    t.start()
    wait_until(lambda: waiting(d.socket, "big") == 1, what="the attach held by the daemon")
    t0 = time.monotonic()
    d.proc.kill()
    t.join(30)
    d.remove_segments()  # the killed daemon's half-written segment (a restart would sweep it)
    assert isinstance(out.get("error"), DaemonNotRunning), out
    assert "went away while answering 'manifest'" in str(out["error"]), out
    assert out["at"] - t0 < 5


class _Sleeper:
    """Unpickled (``--allow-pickle``), it is ``time.sleep(600)``: a load that never checks
    whether it should stop."""

    def __reduce__(self):
        return (time.sleep, (600,))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_a_daemon_whose_load_does_not_end(make_daemon, tmp_path, sig):
    torch.save({"w": _Sleeper()}, tmp_path / "slow.pt")
    d = make_daemon("--allow-pickle", "--model", f"slow={tmp_path / 'slow.pt'}", wait=False)
    d.wait_ready(until="ping")
    d.proc.send_signal(sig)
    # The first signal cancels the load, which cannot notice: the daemon says what it waits for.
    wait_until(lambda: "send SIGTERM or SIGINT again" in d.output(), what="the stop waiting for the load")
    assert d.proc.poll() is None
    d.proc.send_signal(sig)
    assert d.proc.wait(30) == 1  # not a clean stop: a load was abandoned
    out = d.output()
    assert "abandoning a load under way" in out and "Traceback" not in out
    assert d.segments() == []  # nothing was written yet; the socket and lock are gone with it
    assert not os.path.exists(d.socket)

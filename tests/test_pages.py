"""Pages: segments on a huge-page tmpfs (serve --shm-dir), prefaulting on attach, and publishes
that reuse a retired generation's pages without ever writing one a process maps."""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from weightd import segment
from weightd.bench import spawn
from weightd.client import Client, state_dict

from conftest import wait_until, worker_code

MIB = 1 << 20


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **env),
    )


@contextlib.contextmanager
def _tmpfs(size: int, huge: str):
    """A tmpfs mounted by the one launcher's ``huge_tmpfs``; skips where mounting is refused."""
    with spawn.huge_tmpfs(size, huge=huge) as where:
        if where is None:
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        yield where


@pytest.fixture
def huge_dir():
    with _tmpfs(256 * MIB, "always") as where:
        yield where


def _weights(path, mib: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"w{i}": torch.randn(mib * MIB // 4 // 4, generator=g) for i in range(4)}
    save_file(tensors, str(path))
    return tensors


def test_segments_on_a_huge_page_tmpfs_get_2mib_pages_end_to_end(tmp_path, huge_dir, make_daemon, workers):
    tensors = _weights(tmp_path / "m.safetensors")
    d = make_daemon("--shm-dir", huge_dir, "--model", f"m={tmp_path / 'm.safetensors'}")
    # The segment is a plain file in the folder, nothing in /dev/shm.
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"weightd.{d.instance}.")]
    files = [f for f in os.listdir(huge_dir) if f.startswith(f"weightd.{d.instance}.")]
    assert len(files) == 1 and os.stat(os.path.join(huge_dir, files[0])).st_size % (2 * MIB) == 0
    wait_until(lambda: "get 2 MiB pages" in d.output(), what="the startup log's page size")

    # A fresh worker finds it from the manifest alone, prefaults it (the default on huge pages)
    # and maps every byte with huge-page entries, copying none.
    w = workers(
        worker_code(
            d.socket,
            """
            from weightd import memory
            sd = state_dict("m", socket=SOCK)
            use = memory.mapping_usage(os.getpid(), "weightd.")
            say({"sum": float(sum(t.double().sum() for t in sd.values())), "rss": use.rss,
                 "huge": use.huge, "copied": use.anonymous})
            hear()
            """,
        )
    )
    got = w.read()
    assert got["sum"] == pytest.approx(float(sum(t.double().sum() for t in tensors.values())))
    assert got["huge"] >= 16 * MIB and got["rss"] >= 16 * MIB and got["copied"] == 0

    with Client(d.socket) as c:
        s = c.stats()
        [m] = s["models"]
        assert m["page_size"] == 2 * MIB
        assert s["shm"]["directory"] == huge_dir and "huge=always" in s["shm"]["huge_pages_asked"]
        assert "warning" not in s["shm"]
        [a] = m["attached"]
        assert a["pid"] == w.pid and a["huge"] >= 16 * MIB
        # A publish lands in the same folder, written by the client where the daemon said, and
        # whole huge pages long: the reply says the folder asks for them (Folder.rounded_size).
        c.publish("p", {"x": torch.arange(3 * MIB // 4, dtype=torch.float32)})
        [p] = [f for f in os.listdir(huge_dir) if f.startswith(f"weightd.{d.instance}.p-")]
        assert os.stat(os.path.join(huge_dir, p)).st_size % (2 * MIB) == 0
        assert torch.equal(c.state_dict("p")["x"], torch.arange(3 * MIB // 4, dtype=torch.float32))
    out = _cli("stats", "--socket", d.socket)
    assert f"{huge_dir}:" in out.stdout and "2.0 MiB pages" in out.stdout, out.stdout + out.stderr
    w.send({})
    assert w.finish() == 0
    d.stop()
    assert not os.listdir(huge_dir)


def test_huge_pages_asked_for_but_not_given_warn_with_the_remedy(tmp_path, make_daemon):
    # huge=advise gives huge pages only to mappings that ask with madvise; segments are written
    # with pwrite, so they get 4 KiB pages: asked for, not given.
    with _tmpfs(64 * MIB, "advise") as where:
        _weights(tmp_path / "m.safetensors", mib=4)
        d = make_daemon("--shm-dir", where, "--model", f"m={tmp_path / 'm.safetensors'}")
        wait_until(lambda: "got 4 KiB pages although" in d.output(), what="the warning")
        assert "huge=always" in d.output()  # the remedy
        with Client(d.socket) as c:
            s = c.stats()
        assert s["models"][0]["page_size"] == 4096 and "huge=always" in s["shm"]["warning"]
        out = _cli("stats", "--socket", d.socket)
        assert "warning: segments in" in out.stderr
        d.stop()


def test_a_missing_shm_dir_is_refused_with_the_remedy(tmp_path):
    r = _cli("serve", "--socket", str(tmp_path / "s.sock"), "--shm-dir", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr
    # The same from the environment variable the option reads.
    r = _cli("serve", "--socket", str(tmp_path / "s.sock"), WEIGHTD_SERVE_SHM_DIR=str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a folder" in r.stderr


def test_planted_names_in_the_shm_dir_are_skipped(tmp_path, huge_dir, make_daemon, instance):
    prefix = os.path.join(huge_dir, f"weightd.{instance}.")
    os.symlink("/etc/passwd", prefix + "link")
    os.mkfifo(prefix + "fifo")
    fd = os.open(prefix + "other", os.O_CREAT | os.O_WRONLY, 0o644)
    os.fchown(fd, 65534, 65534)
    os.close(fd)
    d = make_daemon("--shm-dir", huge_dir)
    wait_until(lambda: d.output().count("skipping") >= 3, what="three planted names skipped")
    d.stop()
    assert sorted(os.listdir(huge_dir)) == sorted(
        f"weightd.{instance}.{n}" for n in ("link", "fifo", "other")
    )  # never followed, never removed
    for n in ("link", "fifo", "other"):
        os.unlink(prefix + n)


def test_populate_maps_every_page_without_copying_one(tmp_path, make_daemon, workers):
    _weights(tmp_path / "m.safetensors", mib=8)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    w = workers(
        worker_code(
            d.socket,
            """
            from weightd import memory
            for populate in (False, True):
                sd = state_dict("m", socket=SOCK, populate=populate)
                use = memory.mapping_usage(os.getpid(), "weightd.")
                say({"rss": use.rss, "copied": use.anonymous})
                del sd
            """,
        )
    )
    lazy, eager = w.read(), w.read()
    assert lazy["rss"] < 1 * MIB  # 4 KiB pages: nothing faulted in until touched (the default)
    assert eager["rss"] >= 8 * MIB and eager["copied"] == 0  # all mapped, none copied
    assert w.finish() == 0


def test_populate_falls_back_where_the_kernel_refuses():
    # A mapping the kernel cannot populate (no access): the call says so instead of failing.
    with mmap.mmap(-1, 4 * MIB, prot=0) as m:
        assert segment.populate(m) is False
    with mmap.mmap(-1, 4 * MIB) as m:
        assert segment.populate(m) is True


# --- publishing into reused pages -------------------------------------------------------------


def test_publish_reuses_unmapped_pages_and_never_writes_a_mapped_segment(make_daemon, workers):
    d = make_daemon()

    def gen(k: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((MIB,), float(k)), "b": torch.full((1000,), float(k))}

    def ino(r: dict) -> int:
        return os.stat(segment.Folder().file(r["segment"])).st_ino

    with Client(d.socket) as c:
        g1 = c.publish("rl", gen(1))
        ino1 = ino(g1)
        c.publish("rl", gen(2))
        # Nobody maps generation 1: generation 3 is written into its pages, and its old name is gone.
        g3 = c.publish("rl", gen(3))
        assert ino(g3) == ino1 and not os.path.exists(segment.Folder().file(g1["segment"]))
        assert d.output().count("into the pages of generation") == 1
        assert torch.equal(c.state_dict("rl")["w"], torch.full((MIB,), 3.0))

        # A worker maps generation 3 and forks a child that keeps the mapping after the parent
        # exits: a process the daemon never heard of.
        w = workers(
            worker_code(
                d.socket,
                """
                sd = state_dict("rl", socket=SOCK)
                r, wr = os.pipe()
                if os.fork() == 0:
                    os.close(r)
                    os.write(wr, b"x")
                    while sys.stdin.readline():
                        say(sorted({float(sd["w"].min()), float(sd["w"].max()), float(sd["b"][0])}))
                    os._exit(0)
                os.read(r, 1)
                say({"forked": True})
                """,
            )
        )
        assert w.read() == {"forked": True}
        assert w.proc.wait(30) == 0  # the parent is gone; its child still maps generation 3
        wait_until(lambda: len(d.segments()) == 1, timeout=30, what="generation 2 to be freed")

        ino3 = ino(g3)
        g4 = c.publish("rl", gen(4))  # generation 3 retires: mapped (by the orphan), so never reused
        ino4 = ino(g4)
        g5 = c.publish("rl", gen(5))
        assert ino(g5) != ino3 and os.path.exists(segment.Folder().file(g3["segment"]))
        assert d.output().count("into the pages of generation") == 1
        g6 = c.publish("rl", gen(6))  # generation 4 is free: reused
        assert ino(g6) == ino4
        assert "into the pages of generation 4" in d.output()
        assert "into the pages of generation 3" not in d.output()
        assert torch.equal(c.state_dict("rl")["w"], torch.full((MIB,), 6.0))
        w.send({})
        assert w.read() == [3.0]  # the orphan still reads generation 3, bit for bit
    w.proc.stdin.close()


def test_reused_pages_are_swept_not_adopted_when_the_daemon_dies_mid_publish(make_daemon, sock):
    d = make_daemon(keep=True)
    with Client(d.socket) as c:
        c.publish("rl", {"w": torch.ones(MIB)})
        c.publish("rl", {"w": torch.ones(MIB) * 2})
        r = c.call("publish_begin", name="rl", nbytes=4 * MIB)
        assert r["reuse"]  # generation 1's segment, unsealed, under the new name
        assert not segment.inspect(segment.Folder(), r["segment"])[2]
    d.stop()
    d2 = make_daemon()
    with Client(d2.socket) as c:
        [m] = c.list()
        assert m["generation"] == 2 and torch.equal(
            state_dict("rl", socket=d2.socket)["w"], torch.ones(MIB) * 2
        )
    assert not os.path.exists(segment.Folder().file(r["segment"]))

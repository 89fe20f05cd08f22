"""Many processes, one copy: proven with the kernel's own accounting, and kept safe."""

from __future__ import annotations

import os

from weightd.memory import usage

from conftest import SHM, big_model, segment_digest, segments, worker_code, worker_env

MiB = 1 << 20


def test_four_workers_share_one_copy(tmp_path, make_daemon, workers):
    sd = big_model(tmp_path / "m.safetensors", 64, seed=1, tensors=16)
    model_bytes = sum(t.numel() * 4 for t in sd.values())
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    # The model is in shared memory once: the pages its segment holds (the kernel's count, not
    # /dev/shm's fill, which other processes on the machine change), plus a header page and the
    # manifest.
    held = sum(os.stat(SHM / s).st_blocks * 512 for s in segments(d.instance))
    assert model_bytes <= held <= model_bytes + MiB, (held, model_bytes)

    code = worker_code(
        d.socket,
        """
        sd = state_dict("m", socket=SOCK)
        total = sum(float(t.sum()) for t in sd.values())   # touches every page, no big temporaries
        say({"pid": os.getpid(), "total": total})
        hear()
    """,
    )
    ws = [workers(code) for _ in range(4)]
    # the same process without the model: what a worker costs anyway (torch alone is ~150 MB)
    baseline = workers(
        worker_code(
            d.socket,
            """
        total = float(torch.randn(1000).sum())
        say({"pid": os.getpid()})
        hear()
    """,
        )
    )
    reports = [w.read() for w in ws]
    baseline.read()
    expected = sum(float(t.sum()) for t in sd.values())
    assert all(abs(r["total"] - expected) < 1e-3 * abs(expected) + 1e-2 for r in reports)

    per_worker = [usage(w.pid) for w in ws]
    daemon = usage(d.proc.pid)
    total_shmem = sum(u.pss_shmem for u in per_worker)
    # Every page counted once across workers and daemon: within 10% of one model.
    assert abs(total_shmem + daemon.pss_shmem - model_bytes) <= 0.10 * model_bytes, (
        total_shmem,
        daemon.pss_shmem,
        model_bytes,
    )
    # ...and each worker carries about a quarter, not a whole copy
    own = usage(baseline.pid).private
    for u in per_worker:
        assert u.pss_shmem < 0.35 * model_bytes, u
        assert u.private - own < 0.10 * model_bytes, (u, own)
    for w in ws + [baseline]:
        w.send("bye")
        assert w.finish() == 0


def test_a_workers_writes_stay_private(tmp_path, make_daemon, attached_worker):
    sd = big_model(tmp_path / "m.safetensors", 4, seed=1, tensors=2)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    seg = "/" + segments(d.instance)[0]
    digest = segment_digest(seg)

    writer = attached_worker(
        d.socket,
        """
        w = sd["layer0.weight"]
        w[:1024].fill_(12345.0)     # in-place writes into the shared weight
        sd["layer1.weight"].mul_(0)
        say({"first": float(w[0]), "zeros": bool((sd["layer1.weight"] == 0).all())})
        hear()
        """,
    )
    wrote = writer.read()
    assert wrote == {"first": 12345.0, "zeros": True}, "the writer sees its own writes"
    seen = attached_worker(
        d.socket,
        'say({"first": float(sd["layer0.weight"][0]), "sum1": float(sd["layer1.weight"].double().sum())})',
    ).read()
    assert seen["first"] == float(sd["layer0.weight"][0])
    assert abs(seen["sum1"] - float(sd["layer1.weight"].double().sum())) < 1e-3
    assert segment_digest(seg) == digest, "the daemon's bytes are untouched"
    writer.send("bye")
    assert writer.finish() == 0


def test_tensors_outlive_the_client_the_unload_and_the_daemon(tmp_path, make_daemon, workers):
    sd = big_model(tmp_path / "m.safetensors", 8, seed=1, tensors=4)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    w = workers(
        worker_code(
            d.socket,
            """
        import gc, weightd.client.client as cc
        from models import build_tiny
        sd = state_dict("m", socket=SOCK)
        view = sd["layer2.weight"][10:20]          # a view must keep the mapping alive too
        sums = {k: float(t.double().sum()) for k, t in sd.items()}
        cc._local.clients.clear()                 # drop every client handle
        del sd
        gc.collect()
        say("attached")
        hear()                                    # the parent unloads and stops the daemon
        gc.collect()
        say({"view": view.tolist()})
    """,
        )
    )
    assert w.read() == "attached"
    with d.client() as c:
        c.unload("m")
    assert segments(d.instance) == []
    assert d.stop() == 0
    w.send("go")
    assert w.read() == {"view": sd["layer2.weight"][10:20].tolist()}
    assert w.finish() == 0, "no SIGSEGV after unlink and daemon exit"


def test_segments_under_a_configured_directory(tmp_path, make_daemon, workers):
    """Containers mount the host's /dev/shm somewhere and say where with $WEIGHTD_SHM_DIR."""
    big_model(tmp_path / "m.safetensors", 1, seed=1, tensors=1)
    d = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}")
    (tmp_path / "host-shm").symlink_to("/dev/shm")  # stands in for a bind mount
    (tmp_path / "private-shm").mkdir()  # what a container without --ipc=host sees
    code = worker_code(
        d.socket,
        """
        from weightd.client import SegmentError
        try:
            say(float(state_dict("m", socket=SOCK)["layer0.weight"].sum()))
        except SegmentError as e:
            say(str(e))
    """,
    )
    ok = workers(code, env=dict(worker_env(), WEIGHTD_SHM_DIR=str(tmp_path / "host-shm"))).read()
    assert isinstance(ok, float)
    missing = workers(code, env=dict(worker_env(), WEIGHTD_SHM_DIR=str(tmp_path / "private-shm"))).read()
    assert "--ipc=host" in missing and "WEIGHTD_SHM_DIR" in missing

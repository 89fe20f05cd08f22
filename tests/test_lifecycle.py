"""Weights that change: publish, generations, refresh, unload while attached, restart, capacity."""

from __future__ import annotations

import select
import signal

import pytest
import torch
from safetensors.torch import save_file

from weightd.client import Client, ModelNotFound, attach, info, publish, refresh, state_dict
from weightd.errors import CheckpointError, OutOfSpace

from conftest import segments, wait_until, worker_code
from models import build_tiny, trained_tiny


def test_publish_from_a_running_process(make_daemon, workers):
    d = make_daemon()
    w = workers(
        worker_code(
            d.socket,
            """
        from models import trained_tiny
        from weightd.client import publish
        m = trained_tiny(seed=3)
        r = publish("lm", m, socket=SOCK, factory="models:build_tiny")
        say({"generation": r["generation"], "nbytes": r["nbytes"]})
    """,
        )
    )
    r = w.read()
    assert w.finish() == 0
    src = trained_tiny(seed=3)
    unique = sum(p.numel() * p.element_size() for p in src.parameters()) + src.scale.numel() * 4
    assert r == {"generation": 1, "nbytes": unique}, "tied weights are stored once"
    model = attach("lm", socket=d.socket)  # the publisher named the factory
    assert model.head.weight is model.embed.weight
    assert torch.equal(model(torch.arange(9)), src(torch.arange(9)))
    assert info(model).copies == 0


def test_publish_dicts_views_and_refusals(make_daemon):
    d = make_daemon()
    base = torch.randn(8, 6)
    nested = {
        "enc": {"w": base.t(), "rows": base[2:4]},
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    r = publish("d", nested, socket=d.socket)
    assert r["nbytes"] == base.numel() * 4 + 5 * 2 + 4
    sd = state_dict("d", socket=d.socket)
    assert sd["enc.w"].stride() == base.t().stride() and torch.equal(sd["enc.w"], base.t())
    assert sd["enc.rows"].storage_offset() == 12 and torch.equal(sd["enc.rows"], base[2:4])
    assert sd["enc.w"].untyped_storage().data_ptr() == sd["enc.rows"].untyped_storage().data_ptr()
    assert torch.equal(sd["f8"].view(torch.uint8), nested["f8"].view(torch.uint8))

    jagged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    for bad, match in [
        ({"n": jagged}, "nested tensor"),
        ({"s": torch.eye(3).to_sparse()}, "layout"),
        ({"x": torch.ones(2), "step": 3}, "'step' holds a int"),
        ([torch.ones(1)], "not list"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            publish("d", bad, socket=d.socket)
    with Client(d.socket) as c:
        assert [(m["name"], m["generation"]) for m in c.list()] == [("d", 1)], "refusals disturb nothing"
    assert len(segments(d.instance)) == 1


def test_generations_old_attachers_keep_working_and_are_freed(tmp_path, make_daemon, attached_worker):
    save_file({"w": torch.full((1024,), 1.0)}, tmp_path / "v1.safetensors")
    save_file({"w": torch.full((1024,), 2.0)}, tmp_path / "v2.safetensors")
    d = make_daemon("--model", f"m={tmp_path / 'v1.safetensors'}")
    w = attached_worker(
        d.socket,
        """
        say(float(sd["w"].sum()))
        hear()
        say(float(sd["w"].sum()))
        hear()
        """,
    )
    assert w.read() == 1024.0
    with Client(d.socket) as c:
        assert c.load(str(tmp_path / "v2.safetensors"), "m")["generation"] == 2
        assert float(c.state_dict("m")["w"][0]) == 2.0, "new attaches get the newest"
        old = c.state_dict("m", generation=1)
        assert float(old["w"][0]) == 1.0, "an older generation on request, while someone maps it"
        del old
        w.send("again")
        assert w.read() == 1024.0, "the old attacher still reads its generation bit-exact"
        assert len(segments(d.instance)) == 2
        w.send("bye")
        assert w.finish() == 0
        wait_until(lambda: len(segments(d.instance)) == 1, timeout=20, what="generation 1 to be freed")
        with pytest.raises(ModelNotFound, match="generation 1"):
            c.state_dict("m", generation=1)


def test_refresh_in_place(make_daemon):
    d = make_daemon()
    publish("lm", trained_tiny(seed=1), socket=d.socket)
    model = attach("lm", model=build_tiny, socket=d.socket, requires_grad=True)
    params = dict(model.named_parameters())
    publish("lm", trained_tiny(seed=2), socket=d.socket)
    assert refresh(model, socket=d.socket) is model
    assert info(model).generation == 2
    assert all(p is params[n] for n, p in model.named_parameters()), "same Parameter objects"
    assert model.head.weight is model.embed.weight and model.head.weight.requires_grad
    src = trained_tiny(seed=2)
    assert torch.equal(model(torch.arange(7)), src(torch.arange(7)))


def test_unload_while_attached(make_daemon, workers):
    d = make_daemon()
    publish("lm", trained_tiny(), socket=d.socket)
    w = workers(
        worker_code(
            d.socket,
            """
        from models import build_tiny
        m = attach("lm", model=build_tiny, socket=SOCK)
        say("ready")
        hear()
        say(m(torch.arange(5)).sum().item())
    """,
        )
    )
    assert w.read() == "ready"
    with Client(d.socket) as c:
        c.unload("lm")
        assert c.list() == []
        with pytest.raises(ModelNotFound):
            c.state_dict("lm")
    assert segments(d.instance) == []
    w.send("go")
    assert w.read() == pytest.approx(trained_tiny()(torch.arange(5)).sum().item())
    assert w.finish() == 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_restart_adopts_without_reloading(how, tmp_path, make_daemon, attached_worker):
    src = {f"t{i}": torch.randn(256, 256) for i in range(8)}
    save_file(src, tmp_path / "m.safetensors")
    d1 = make_daemon("--model", f"m={tmp_path / 'm.safetensors'}", keep=True)
    before = segments(d1.instance)
    w = attached_worker(
        d1.socket,
        """
        say(float(sum(t.sum() for t in sd.values())))
        hear()
        say(float(sum(t.sum() for t in sd.values())))
        """,
    )
    total = w.read()
    d1.stop(how)
    (tmp_path / "m.safetensors").unlink()  # proof that nothing is reloaded from the file
    d2 = make_daemon()
    assert segments(d2.instance) == before
    assert "adopted m generation 1" in d2.output()
    with Client(d2.socket) as c:
        assert [m["name"] for m in c.list()] == ["m"]
        sd = c.state_dict("m")
        assert all(torch.equal(sd[k], v) for k, v in src.items())
        assert c.load.__self__ is c  # the daemon takes new work as usual
    w.send("go")
    assert w.read() == total, "a worker attached across the restart never notices"
    assert w.finish() == 0
    # generations continue where the old daemon stopped
    assert publish("m", {"x": torch.ones(1)}, socket=d2.socket)["generation"] == 2


def test_sigkill_in_the_middle_of_a_load_leaves_nothing_served(tmp_path, make_daemon):
    big = {f"t{i}": torch.randn(1024, 1024) for i in range(128)}  # 512 MiB: a load that takes a while
    save_file(big, tmp_path / "big.safetensors")
    del big
    d = make_daemon(keep=True)
    c = Client(d.socket)
    admin, _ = c._socket_for("load")
    admin.send_multipart(
        [b"r1", b'{"v":1,"op":"load","path":"%s"}' % str(tmp_path / "big.safetensors").encode()]
    )
    wait_until(lambda: segments(d.instance), timeout=30, what="the load to create its segment")
    d.stop(signal.SIGKILL)
    c.close()
    assert segments(d.instance), "the unsealed segment is there after the kill"
    d2 = make_daemon()
    assert segments(d2.instance) == [], "the new daemon removed the unsealed segment"
    assert "unfinished segment" in d2.output()
    with Client(d2.socket) as c2:
        assert c2.list() == []


def test_capacity_is_checked_before_creating_anything(tmp_path, make_daemon):
    save_file({"w": torch.ones(1 << 18)}, tmp_path / "one-mib.safetensors")
    d = make_daemon("--max-bytes", str(3 << 20))
    with Client(d.socket) as c:
        c.load(str(tmp_path / "one-mib.safetensors"), "a")
        c.load(str(tmp_path / "one-mib.safetensors"), "b")
        with pytest.raises(OutOfSpace, match="--max-bytes"):
            c.load(str(tmp_path / "one-mib.safetensors"), "c")
        with pytest.raises(OutOfSpace, match="--shm-size"):
            c.call("publish_begin", name="huge", nbytes=1 << 60)
        assert [m["name"] for m in c.list()] == ["a", "b"]
    assert len(segments(d.instance)) == 2


def test_readers_always_see_a_whole_generation(make_daemon, workers):
    d = make_daemon()
    shape = (64, 1024)

    def generation(g: int) -> dict:
        return {f"t{i}": torch.full(shape, float(g)) for i in range(8)}

    publish("m", generation(1), socket=d.socket)
    # Each reader reads until it has seen three generations and read three times; the test
    # publishes one generation after another until every reader has said what it saw: however
    # loaded the machine, reads and publishes overlap, and no clock decides when they stop.
    readers = [
        workers(
            worker_code(
                d.socket,
                """
        seen, reads, bad = set(), 0, 0
        state_dict("m", socket=SOCK)
        say("ready")
        hear()
        while len(seen) < 3 or reads < 3:
            sd = state_dict("m", socket=SOCK)
            values = {float(t.min()) for t in sd.values()} | {float(t.max()) for t in sd.values()}
            if len(values) != 1 or len(sd) != 8:
                bad += 1
            seen |= values
            reads += 1
        say({"reads": reads, "bad": bad, "seen": sorted(seen)})
    """,
            )
        )
        for _ in range(3)
    ]
    for r in readers:
        assert r.read() == "ready"
    for r in readers:
        r.send("go")
    g, pending, outs = 1, list(readers), []
    while pending:
        g += 1
        publish("m", generation(g), socket=d.socket)
        for r in [r for r in pending if select.select([r.proc.stdout], [], [], 0)[0]]:
            outs.append(r.read())
            pending.remove(r)
    for out in outs:
        assert out["bad"] == 0, out
        assert len(out["seen"]) >= 3, "readers saw several generations go by"
    for r in readers:
        assert r.finish() == 0
    wait_until(lambda: len(segments(d.instance)) == 1, timeout=20, what="retired generations to be freed")

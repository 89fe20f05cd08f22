"""The request handlers without sockets: frames in, a reply out, over a real store and segments."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from weightd import protocol, segment
from weightd.daemon.config import Config
from weightd.daemon.endpoints import Peer
from weightd.daemon.handlers import Handlers
from weightd.daemon.loads import Loads
from weightd.daemon.store import Store

READ = Peer(sock=None, identity=b"peer", rid=b"r1", admin=False)
ADMIN = Peer(sock=None, identity=b"peer", rid=b"r1", admin=True)


@pytest.fixture
def handlers(tmp_path, instance):
    config = Config(socket=str(tmp_path / "w.sock"), instance=instance)
    store = Store(config.instance, segment.Folder.probe())
    loads = Loads(store)
    yield Handlers(config, store, loads)
    loads.shutdown()
    store.close(unlink=True)


def ask(h: Handlers, peer: Peer, op: str, **fields) -> dict:
    reply = h.handle([peer.rid, protocol.request(op, **fields)], peer)
    return json.loads(reply)


def test_read_ops_on_the_read_socket_admin_ops_only_on_the_admin_socket(handlers):
    assert ask(handlers, READ, "ping")["ok"]
    assert ask(handlers, READ, "list")["models"] == []
    assert ask(handlers, READ, "stats")["ok"], "stats is a read op"
    for op in protocol.ADMIN_OPS:
        err = ask(handlers, READ, op, name="x")["error"]
        assert err["code"] == "permission_denied" and "admin socket" in err["message"], op


def test_every_read_op_has_a_handler_and_unknown_ops_are_refused(handlers):
    for op in protocol.READ_OPS:
        reply = ask(handlers, READ, op, name="none")
        assert reply["ok"] or reply["error"]["code"] == "not_found", (op, reply)
    err = ask(handlers, ADMIN, "reboot")["error"]
    assert err["code"] == "bad_request" and "unknown op" in err["message"]


def test_a_load_is_answered_later_with_progress_then_the_model(handlers, tmp_path):
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, str(tmp_path / "m.safetensors"))
    frames = [b"r9", protocol.request("load", path=str(tmp_path / "m.safetensors"), name="m")]
    peer = Peer(sock=None, identity=b"p", rid=b"r9", admin=True)
    assert handlers.handle(frames, peer) is None, "a load replies when it is done, not at once"
    sent: list[dict] = []
    deadline = time.monotonic() + 30
    while not any("model" in r for r in sent) and time.monotonic() < deadline:
        handlers.loads.report(lambda p, reply: sent.append(json.loads(reply)))
        time.sleep(0.01)
    assert sent[-1]["model"]["name"] == "m" and sent[-1]["model"]["nbytes"] == 4096
    assert sent[-2]["progress"] == {"done": 4096, "total": 4096}
    manifest = ask(handlers, READ, "manifest", name="m")["manifest"]
    assert [t[0] for t in manifest["tensors"]] == ["w"]

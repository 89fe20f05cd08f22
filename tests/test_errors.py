"""Bad input gets a clear, typed error and disturbs nothing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from hf_models import LLAMA_LIKE
from safetensors.torch import load_file, save_file

from weightd import protocol
from weightd.client import Client, DaemonNotRunning, ModelNotFound, state_dict
from weightd.errors import AlreadyRunning, CheckpointError, ProtocolError

from conftest import segments
from hostile import raw_request


def write_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}

CORRUPT = {
    "empty file": lambda p: p.write_bytes(b""),
    "header length past the end": lambda p: write_safetensors(p, GOOD, bytes(16), header_len=10_000),
    "header not json": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{nope" + bytes(16)),
    "offsets out of range (truncated data)": lambda p: write_safetensors(p, GOOD, bytes(8)),
    "overlapping tensors": lambda p: write_safetensors(
        p,
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        },
        bytes(16),
    ),
    "dtype and byte count disagree": lambda p: write_safetensors(
        p, {"w": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)
    ),
    "unknown dtype": lambda p: write_safetensors(
        p, {"w": {"dtype": "F12", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
    ),
    "negative shape": lambda p: write_safetensors(
        p, {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)
    ),
    "shape product overflows": lambda p: write_safetensors(
        p, {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16)
    ),
    "truncated mid-file": lambda p: (
        save_file({"w": torch.ones(1000)}, p),
        p.write_bytes(p.read_bytes()[:2000]),
    ),
}


@pytest.fixture
def served(serve):
    """A daemon already serving one good model, to show that failures never disturb it."""
    good = {"w": torch.randn(64, 64), "b": torch.arange(64)}
    return serve(good, "good"), good


def refused_disturbing_nothing(served, path) -> None:
    """Loading ``path`` is a CheckpointError naming it, no segment is left, and the served
    model is untouched."""
    d, good = served
    before = segments(d.instance)
    with d.client(timeout=120) as c:
        with pytest.raises(CheckpointError) as e:
            c.load(str(path), "bad")
        assert str(path) in str(e.value)
        assert segments(d.instance) == before, "no segment left behind"
        assert [m["name"] for m in c.list()] == ["good"]
    sd = state_dict("good", socket=d.socket)
    assert torch.equal(sd["w"], good["w"]) and torch.equal(sd["b"], good["b"])


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors_is_refused_and_disturbs_nothing(case, tmp_path, served):
    path = tmp_path / "bad.safetensors"
    CORRUPT[case](path)
    refused_disturbing_nothing(served, path)


def _weight_missing(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _dtype_not_a_name(folder):
    """A header value of a type no safetensors writer gives (a list for a dtype's name)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["model.norm.weight"]["dtype"] = [header["model.norm.weight"]["dtype"]]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size :])


@pytest.mark.parametrize("case", [_weight_missing, _truncated, _dtype_not_a_name])
def test_a_corrupt_folder_is_refused_and_disturbs_nothing(case, tmp_path, served):
    """A folder whose headers the daemon copies from before its loader process runs (Note [the
    daemon's first guess] in weightd/daemon/early.py): a weight missing (the copy under way
    when the loader refuses), a file shorter than its header says (nothing guessed) or a header
    value of a type no writer gives (passed over by the guess, refused by the loader): a
    CheckpointError naming the folder, no segment left, the served model untouched."""
    import transformers

    folder = tmp_path / "llama"
    # the parity set's sizes, with a vocabulary large enough that the copy is under way (2 MiB)
    config = transformers.LlamaConfig(
        **dict(LLAMA_LIKE, hidden_size=64, num_hidden_layers=1, vocab_size=4096)
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    case(folder)
    refused_disturbing_nothing(served, folder)


def test_missing_path_and_unknown_suffix(tmp_path, served):
    d, _ = served
    (tmp_path / "weights.npz").write_bytes(b"x")
    with d.client() as c:
        with pytest.raises(CheckpointError, match="no such file"):
            c.load(str(tmp_path / "nope.safetensors"))
        with pytest.raises(CheckpointError, match="unknown checkpoint type"):
            c.load(str(tmp_path / "weights.npz"))


def test_corrupt_pt_and_pickled_module(tmp_path, served):
    d, _ = served
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    torch.save({"w": torch.ones(3), "epoch": 3}, tmp_path / "training.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with d.client() as c:
        with pytest.raises(CheckpointError, match="corrupt"):
            c.load(str(tmp_path / "garbage.pt"))
        with pytest.raises(CheckpointError, match="'epoch' holds a int"):
            c.load(str(tmp_path / "training.pt"))
        with pytest.raises(CheckpointError, match="--allow-pickle"):
            c.load(str(tmp_path / "module.pt"))
        assert [m["name"] for m in c.list()] == ["good"]


def test_pickled_module_only_with_allow_pickle(tmp_path, make_daemon):
    lin = torch.nn.Linear(4, 3)
    torch.save(lin, tmp_path / "module.pt")
    d = make_daemon("--model", f"lin={tmp_path / 'module.pt'}", "--allow-pickle")
    sd = state_dict("lin", socket=d.socket)
    assert torch.equal(sd["weight"], lin.weight) and torch.equal(sd["bias"], lin.bias)


def test_index_naming_a_missing_shard(tmp_path, served):
    d, _ = served
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with d.client() as c, pytest.raises(CheckpointError, match="s2.safetensors"):
        c.load(str(folder))


def test_unknown_model_name(served):
    d, _ = served
    with pytest.raises(ModelNotFound, match="no model named 'nope'.*loaded: good"):
        state_dict("nope", socket=d.socket)
    with d.client() as c, pytest.raises(ModelNotFound):
        c.unload("nope")


def test_daemon_not_running_is_said_at_once(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DaemonNotRunning, match="weightd serve"):
        state_dict("m", socket=str(tmp_path / "nobody.sock"))
    # a socket file nobody listens on (a daemon that was SIGKILLed leaves one)
    import socket as s

    dead = str(tmp_path / "dead.sock")
    srv = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    srv.bind(dead)
    srv.close()
    with pytest.raises(DaemonNotRunning, match="connection refused"):
        Client(dead)
    assert time.monotonic() - t0 < 2.0


def test_second_daemon_on_the_same_socket_refuses(served, sock, instance):
    d, _ = served
    out = subprocess.run(
        [sys.executable, "-m", "weightd", "serve", "--socket", sock, "--instance", instance + "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == AlreadyRunning.exit_code
    assert f"already running on {sock} (pid {d.proc.pid})" in out.stderr
    with d.client() as c:
        assert c.ping()["pid"] == d.proc.pid


def test_bad_model_at_start_exits_cleanly(tmp_path, make_daemon, instance):
    save_file({"w": torch.ones(4)}, tmp_path / "ok.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    d = make_daemon(
        "--model", str(tmp_path / "ok.safetensors"), "--model", str(tmp_path / "bad.safetensors"), wait=False
    )
    assert d.proc.wait(60) == CheckpointError.exit_code
    assert "bad.safetensors" in d.output() and "truncated" in d.output()
    assert segments(instance) == [], "the model loaded before the bad one is removed too"


MALFORMED = {
    "not json": [b"r1", b"{nope"],
    "json but not an object": [b"r1", b"[1,2]"],
    "no version": [b"r1", b'{"op":"ping"}'],
    "future version": [b"r1", b'{"v":99,"op":"ping"}'],
    "no op": [b"r1", b'{"v":1}'],
    "unknown op": [b"r1", b'{"v":1,"op":"format_disk"}'],
    "op of the wrong type": [b"r1", b'{"v":1,"op":7}'],
    "name of the wrong type": [b"r1", b'{"v":1,"op":"manifest","name":["a"]}'],
    "generation is a bool": [b"r1", b'{"v":1,"op":"manifest","name":"good","generation":true}'],
    "bad model name": [b"r1", b'{"v":1,"op":"load","path":"/x.safetensors","name":"../../etc"}'],
    "huge request id": [b"r" * 1000, b'{"v":1,"op":"ping"}'],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_a_typed_error(case, served):
    d, good = served
    # the admin socket takes every op, so every kind of malformation reaches the parser
    reply = raw_request(protocol.admin_socket(d.socket), MALFORMED[case])
    assert reply is not None and len(reply) == 2
    body = json.loads(reply[1])
    assert body["ok"] is False and body["error"]["code"] in (ProtocolError.code, CheckpointError.code), body
    assert body["error"]["message"]
    # and the daemon keeps serving, undisturbed
    assert torch.equal(state_dict("good", socket=d.socket)["w"], good["w"])


def test_changes_are_refused_on_the_read_socket(served, tmp_path):
    d, good = served
    for op in (
        '{"v":1,"op":"unload","name":"good"}',
        '{"v":1,"op":"load","path":"/x.pt"}',
        '{"v":1,"op":"publish_begin","name":"x","nbytes":1}',
    ):
        body = json.loads(raw_request(d.socket, [b"r", op.encode()])[1])
        assert body["error"]["code"] == "permission_denied" and "admin socket" in body["error"]["message"]
    assert torch.equal(state_dict("good", socket=d.socket)["w"], good["w"])


def test_oversized_messages_are_dropped_and_a_lone_frame_answered(served):
    d, good = served
    # ZMQ_MAXMSGSIZE: the daemon drops the peer before buffering the message
    assert raw_request(d.socket, [b"r1", b"x" * (protocol.MAX_REQUEST_BYTES + 10)], timeout_ms=500) is None
    reply = raw_request(d.socket, [b"only-one-frame"])
    assert json.loads(reply[1])["error"]["code"] == ProtocolError.code
    assert torch.equal(state_dict("good", socket=d.socket)["w"], good["w"])

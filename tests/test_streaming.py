"""Checkpoints stream into segments through the daemon's reader threads (weightd.daemon.stream).

Every format arrives bit-exact; a load stopped at any stage leaves nothing; O_DIRECT refused
falls back to the page cache; a file that shrinks mid-load, or a real I/O error mid-chunk (a FUSE
file system, tests/fusefs.py), is a CheckpointError naming it, and what was served before stays
served, byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightd import segment
from weightd.client import Client
from weightd.daemon import stream
from weightd.daemon.store import Store
from weightd.errors import Cancelled, CheckpointError

from conftest import segments

MiB = 1 << 20


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest() + str(
        (t.dtype, tuple(t.shape))
    )


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd sizes and dtypes, so tensors start and end at offsets no block size divides."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(1001, 1003, generator=g),  # ~4 MiB: several 1 MiB chunks
        "b": torch.randn(77, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 255, (3 * MiB + 5,), generator=g, dtype=torch.uint8),
        "d": torch.randn(513, 129, generator=g, dtype=torch.float64),
        "e": torch.zeros(0, 4),
        "f": torch.randn(7, 3, generator=g).to(torch.float16),
    }


def _ls(d, name: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "weightd", "ls", "--json", "--socket", d.socket],
        capture_output=True,
        text=True,
        check=True,
    )
    return next(m for m in json.loads(out.stdout) if m["name"] == name)


def _served(c: Client, name: str) -> dict[str, str]:
    return {k: _digest(v) for k, v in c.state_dict(name).items()}


@pytest.mark.parametrize("direct", ["auto", "always", "never"])
def test_every_format_streams_bit_exact(tmp_path, make_daemon, direct):
    tensors = _tensors()
    st = tmp_path / "one.safetensors"
    save_file(tensors, st)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / fname)
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    pt = tmp_path / "sd.pt"
    state = dict(tensors)
    state["a_view"] = state["a"][10:20]  # a view: one storage, two tensors
    state["c_again"] = state["c"]  # tied
    torch.save(state, pt)
    d = make_daemon("--load-readers", "4", "--load-chunk", "1M", "--load-direct", direct)
    want = {k: _digest(v) for k, v in tensors.items()}
    with Client(d.socket, timeout=120) as c:
        for name, path, expect in [
            ("one", st, want),
            ("sharded", sharded, want),
            ("pt", pt, {k: _digest(v) for k, v in state.items()}),
        ]:
            c.load(str(path), name)
            assert _served(c, name) == expect, f"{name}: served bytes differ from the file's"
            report = _ls(d, name)["load"]
            assert report["readers"] == 4 and report["chunk"] == MiB and report["gbps"] > 0
            # the file's bytes came from the file (streamed), not through memory
            from_files = report["direct_bytes"] + report["buffered_bytes"]
            assert (
                from_files == report["bytes"] == sum(v.untyped_storage().nbytes() for v in tensors.values())
            )
            if direct == "always":
                assert report["path"] == "direct" and report["direct_bytes"] == report["bytes"]
            if direct == "never":
                assert report["path"] == "buffered"
        # what the file holds, read by safetensors itself, against what is served
        with safe_open(str(st), "pt") as f:
            assert {k: _digest(f.get_tensor(k)) for k in f.keys()} == _served(c, "one")
    assert "copy:" in d.output() and "GB/s" in d.output()


@pytest.mark.timeout(600)  # from_pretrained here and in the daemon: slow on a busy machine
def test_huggingface_folder_streams_its_weight_files(tmp_path, make_daemon):
    transformers = pytest.importorskip("transformers")
    from hf_models import save

    folder = save("llama", tmp_path / "llama")
    d = make_daemon("--load-readers", "3", "--load-chunk", "1M")
    want = transformers.LlamaForCausalLM.from_pretrained(str(folder)).state_dict()
    with Client(d.socket, timeout=120) as c:
        c.load(str(folder), "llama")
        got = c.state_dict("llama")
        assert {k: _digest(v) for k, v in got.items()} == {k: _digest(v) for k, v in want.items()}
    report = _ls(d, "llama")["load"]
    # what from_pretrained took as it is streams from the file; only what it computed (and the
    # small files) is copied from memory
    assert report["buffered_bytes"] + report["direct_bytes"] > report["memory_bytes"]


def _store(instance: str, **kw) -> Store:
    return Store(
        instance,
        segment.Folder.probe(),
        readers=stream.Readers(kw.pop("readers", 2), kw.pop("chunk", MiB), kw.pop("direct", "auto")),
    )


def _stopper(n: int):
    calls = [0]

    def check():
        calls[0] += 1
        if calls[0] >= n:
            raise Cancelled(f"stopped at check {n}")

    return check, calls


@pytest.mark.parametrize("kind", ["safetensors", "pt", "folder"])
def test_a_load_stopped_at_each_stage_leaves_nothing(tmp_path, instance, kind, monkeypatch):
    """Stop the load at its 1st, 2nd, ... look at the token (reading, reserving in steps,
    streaming, sealing) until one runs to the end: none leaves a segment or a served model."""
    monkeypatch.setattr(segment, "RESERVE_STEP", MiB)  # many reservation steps to stop between
    tensors = _tensors(1)
    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(tensors, path)
    elif kind == "pt":
        path = tmp_path / "m.pt"
        torch.save(tensors, path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        save_file(dict(list(tensors.items())[:3]), path / "a.safetensors")
        save_file(dict(list(tensors.items())[3:]), path / "b.safetensors")
    store = _store(instance, readers=1)
    try:
        n, stages = 1, 0
        while True:
            check, calls = _stopper(n)
            try:
                store.load(str(path), "m", check=check)
            except Cancelled:
                assert segments(instance) == [], f"stopped at check {n}: a segment was left"
                assert store.list() == [] and store.loading() == {}
                stages += 1
                n += 1
                continue
            break
        assert stages >= 5, "stops were tried before reading, while reserving, streaming and sealing"
        assert [m["name"] for m in store.list()] == ["m"]
    finally:
        store.close(unlink=True)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs, whose files refuse O_DIRECT (EINVAL on open)."""
    where = tmp_path / "ramfs"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)]).returncode:
        pytest.skip("mounting a ramfs (a file system that refuses O_DIRECT) needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_direct_refused_falls_back_to_the_page_cache(ramfs, tmp_path, make_daemon):
    tensors = _tensors(2)
    path = ramfs / "m.safetensors"
    save_file(tensors, path)
    d = make_daemon("--load-direct", "always", "--load-chunk", "1M")
    with Client(d.socket, timeout=60) as c:
        c.load(str(path), "m")
        assert _served(c, "m") == {k: _digest(v) for k, v in tensors.items()}
    report = _ls(d, "m")["load"]
    assert report["path"] == "buffered" and report["direct_refused"] == [str(path)]
    assert "O_DIRECT refused" in d.output()


@pytest.mark.parametrize("direct", ["always", "never"])
def test_a_file_that_shrinks_mid_load_is_a_checkpoint_error_and_the_served_model_stays(
    tmp_path, instance, direct
):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(3), path)
    store = _store(instance, readers=2, direct=direct)
    try:
        v1 = store.load(str(path), "m")
        before = _segment_digest(v1.manifest.segment)
        save_file(_tensors(4), path)  # a new version, then cut in the middle of a chunk
        cut = os.path.getsize(path) - 3 * MiB - 12345
        calls = [0]

        def check():
            calls[0] += 1
            if calls[0] == 2:  # checked and laid out; its bytes not copied yet
                os.truncate(path, cut)

        with pytest.raises(CheckpointError, match=str(path)) as e:
            store.load(str(path), "m", check=check)
        assert "shrank" in str(e.value) or "ended" in str(e.value)
        served = store.get("m")
        assert served is v1 and _segment_digest(v1.manifest.segment) == before
        assert segments(instance) == [v1.manifest.segment.lstrip("/")]
    finally:
        store.close(unlink=True)


@pytest.fixture
def failing_file(tmp_path):
    """``make(backing, bad)``: a path whose bytes are ``backing``'s but whose reads covering byte
    ``bad`` fail with EIO: a one-file FUSE file system served by tests/fusefs.py."""
    if os.geteuid() != 0:
        pytest.skip("mounting a FUSE file system (a file with a real I/O error) needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: a file with a real I/O error needs FUSE")
    started = []

    def make(backing, bad: int):
        where = tmp_path / f"fuse{len(started)}"
        where.mkdir()
        server = subprocess.Popen(
            [
                sys.executable,
                os.path.join(os.path.dirname(__file__), "fusefs.py"),
                str(where),
                str(backing),
                "m.safetensors",
                str(bad),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((server, where))
        line = server.stdout.readline()
        if line.strip() != "ready":
            server.wait(10)
            pytest.skip(
                f"mounting a FUSE file system was refused here: {server.stderr.read().strip()[-300:]}"
            )
        return where / "m.safetensors"

    yield make
    for server, where in started:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("direct", ["always", "never"])
def test_an_io_error_mid_chunk_is_a_checkpoint_error_and_the_served_model_stays(
    tmp_path, make_daemon, failing_file, direct
):
    """A real EIO from the file system, in the middle of a chunk of the second tensor."""
    good = tmp_path / "good.safetensors"
    save_file(_tensors(5), good)
    backing = tmp_path / "v2.safetensors"
    save_file(_tensors(6), backing)
    (header,) = struct.unpack("<Q", backing.read_bytes()[:8])
    bad = failing_file(backing, 8 + header + 4 * MiB + 12345)
    with open(bad, "rb") as f:  # served up to the bad byte, then a real EIO
        assert f.read(4 * MiB) == backing.read_bytes()[: 4 * MiB]
        with pytest.raises(OSError) as eio:
            f.read()
        assert eio.value.errno == errno.EIO
    d = make_daemon("--load-readers", "2", "--load-chunk", "1M", "--load-direct", direct)
    with Client(d.socket, timeout=120) as c:
        c.load(str(good), "m")
        before = _served(c, "m")
        with pytest.raises(CheckpointError, match=re.escape(str(bad))) as e:
            c.load(str(bad), "m")
        assert "Input/output error" in str(e.value)
        assert _served(c, "m") == before == {k: _digest(v) for k, v in _tensors(5).items()}
        assert [m["name"] for m in c.list() if m.get("state") != "failed"] == ["m"]
    assert len(d.segments()) == 1  # the served generation only: nothing half-written left


def _segment_digest(name: str) -> str:
    with open(segment.Folder().file(name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize(
    "direct,huge_pages",
    [("always", False), ("never", False), ("never", True)],
    ids=["direct", "sendfile", "through-a-mapping"],
)
def test_readers_copy_chunks_exactly_from_files_and_memory(tmp_path, direct, huge_pages):
    """The reader pool alone: pieces at odd offsets of files and buffers land where they should,
    read with O_DIRECT or from the page cache by either way (Note [one copy from the page cache])."""
    src = tmp_path / "src"
    data = np.random.default_rng(0).integers(0, 255, 5 * MiB + 77, dtype=np.uint8)
    src.write_bytes(data.tobytes())
    dst = tmp_path / "dst"
    size = 12 * MiB
    with open(src, "rb") as f, open(dst, "w+b") as out:
        out.truncate(size)
        pieces = [
            stream.Piece(3 * MiB + 1, 4096 + 64, fd=f.fileno(), offset=12345, path=str(src)),
            stream.Piece(2 * MiB, 6 * MiB, fd=f.fileno(), offset=3 * MiB + 77, path=str(src)),
            stream.Piece(1000, 9 * MiB, data=data[:1000]),
        ]
        seen = []
        with stream.pool(3, MiB, direct) as readers:
            report = readers.copy(
                out.fileno(),
                pieces,
                progress=lambda done, total: seen.append((done, total)),
                huge_pages=huge_pages,
            )
        got = np.fromfile(dst, dtype=np.uint8)
    assert (got[4096 + 64 : 4096 + 64 + 3 * MiB + 1] == data[12345 : 12345 + 3 * MiB + 1]).all()
    assert (got[6 * MiB : 8 * MiB] == data[3 * MiB + 77 : 5 * MiB + 77]).all()
    assert (got[9 * MiB : 9 * MiB + 1000] == data[:1000]).all()
    assert report.nbytes == 5 * MiB + 1001 and report.memory == 1000
    assert (report.direct if direct == "always" else report.buffered) == 5 * MiB + 1
    assert seen[-1] == (report.nbytes, report.nbytes)


def test_unload_of_a_loading_model_stops_its_load(tmp_path, make_daemon, instance):
    """``weightd unload NAME`` while NAME loads: the load is cancelled, its segment removed."""
    big = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [1 << 30], "data_offsets": [0, 1 << 30]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(big, "wb") as f:  # sparse: quick to make, every page still copied
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 30))
    d = make_daemon("--load-readers", "1", "--load-chunk", "1M")
    errors = []
    with Client(d.socket, timeout=120) as c, Client(d.socket, timeout=30) as other:

        def progress(done, total):
            if not errors and done < total:  # under way: unload it from another client
                errors.append(other.unload("big"))

        with pytest.raises(Cancelled, match="unloaded while it loaded"):
            c.load(str(big), "big", progress=progress)
        assert errors and errors[0]["state"] == "cancelled"
        assert [m["name"] for m in c.list() if m.get("state") != "failed"] == []
    assert segments(instance) == []


def _header(path) -> tuple[int, dict]:
    """A safetensors file's data start and header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def test_storages_lie_where_their_file_has_them_and_are_read_straight_in(tmp_path, instance):
    """Note [a storage where its file has it]: each storage at a segment offset that agrees with
    its file offset modulo 4 KiB, back to back as in the file, so O_DIRECT reads the file's aligned
    blocks straight into the segment (Note [straight into the segment]) and only its two unaligned
    ends through a buffer."""
    tensors = _tensors(7)
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    start, header = _header(path)
    store = _store(instance, readers=3, chunk=MiB, direct="always")
    try:
        model = store.load(str(path), "m")
        m = model.manifest
        by_name = {t.name: m.storages[t.storage] for t in m.tensors}
        first = min(start + h["data_offsets"][0] for k, h in header.items() if k != "__metadata__")
        base = by_name["d"].offset - (start + header["d"]["data_offsets"][0])
        for name, h in header.items():
            if name == "__metadata__" or h["data_offsets"][0] == h["data_offsets"][1]:
                continue
            st = by_name[name]
            # where the file has it, shifted as a whole: the file's layout, page for page
            assert st.offset == base + start + h["data_offsets"][0], name
            assert (st.offset - start - h["data_offsets"][0]) % 4096 == 0, name
        assert base + first >= segment.DATA_OFFSET
        report = model.load
        data = os.path.getsize(path) - start
        assert report["direct_bytes"] == report["bytes"] == data
        # all but the first and the last partial 4 KiB block came straight in
        assert data - 2 * 4096 < report["straight_bytes"] <= data
        with open(path, "rb") as f, open(segment.Folder().file(m.segment), "rb") as s:
            f.seek(start)
            s.seek(base + start)
            assert s.read(data) == f.read(), "the segment's data area is the file's"
    finally:
        store.close(unlink=True)


def test_a_file_whose_tensors_are_not_aligned_reads_through_the_buffer(tmp_path, make_daemon):
    """A float32 tensor 3 bytes into the data area: placed where its file has it, it would be
    misaligned for its dtype, so it is page aligned in the segment instead, and with offsets that
    disagree modulo 4 KiB its bytes go through the readers' buffers, bit-exact."""
    w = np.random.default_rng(1).standard_normal(3 * MiB // 4 + 5).astype(np.float32)
    odd = np.arange(3, dtype=np.uint8)
    header = {
        "odd": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "w": {"dtype": "F32", "shape": [w.size], "data_offsets": [3, 3 + w.nbytes]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + odd.tobytes() + w.tobytes())
    d = make_daemon("--load-readers", "2", "--load-chunk", "1M", "--load-direct", "always")
    with Client(d.socket, timeout=60) as c:
        c.load(str(path), "m")
        got = c.state_dict("m")
        assert got["w"].numpy().tobytes() == w.tobytes() and got["odd"].numpy().tobytes() == odd.tobytes()
        assert got["w"].data_ptr() % 4096 == 0, "page aligned, not where the file has it"
    report = _ls(d, "m")["load"]
    assert report["path"] == "direct" and report["straight_bytes"] == 0


def test_readers_read_runs_straight_in_and_their_edges_through_the_buffer(tmp_path):
    """The reader pool alone: pieces back to back in the file and in the segment, at offsets that
    agree modulo 4 KiB, are one run read straight in across chunks; its unaligned ends, a piece
    after a gap, and the file's unaligned end come through the buffer; every byte lands."""
    src = tmp_path / "src"
    data = np.random.default_rng(2).integers(0, 255, 9 * MiB + 333, dtype=np.uint8)
    src.write_bytes(data.tobytes())
    dst = tmp_path / "dst"
    shift = 3 * 4096  # segment offset - file offset: congruent
    with open(src, "rb") as f, open(dst, "w+b") as out:
        out.truncate(10 * MiB + shift)
        fd, p = f.fileno(), str(src)
        pieces = [  # a run of three (one crossing 1 MiB chunks), then one after a gap, to the file's end
            stream.Piece(100, 1000 + shift, fd=fd, offset=1000, path=p),
            stream.Piece(3 * MiB + 7, 1100 + shift, fd=fd, offset=1100, path=p),
            stream.Piece(5000, 1100 + 3 * MiB + 7 + shift, fd=fd, offset=1100 + 3 * MiB + 7, path=p),
            stream.Piece(len(data) - 5 * MiB - 10, 5 * MiB + 10 + shift, fd=fd, offset=5 * MiB + 10, path=p),
        ]
        with stream.pool(2, MiB, "always") as readers:
            report = readers.copy(out.fileno(), pieces)
        got = np.fromfile(dst, dtype=np.uint8)
    for piece in pieces:
        want = data[piece.offset : piece.offset + piece.nbytes]
        assert (got[piece.dst : piece.dst + piece.nbytes] == want).all()
    assert report.direct == sum(p.nbytes for p in pieces)
    run = 3 * MiB + 100 + 7 + 5000  # the first three: aligned middle from 4096 to its last full block
    tail = len(data) - 5 * MiB - 10
    assert report.straight == (1000 + run) // 4096 * 4096 - 4096 + (5 * MiB + 10 + tail) // 4096 * 4096 - (
        5 * MiB + 4096
    )

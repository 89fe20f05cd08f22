"""Model folders are untrusted input: what their author, a writer inside --model-dir and a local
user can try, one test per finding of issue 20.

The hostile user is a second uid (no passwd entry) acting through ``setpriv``; the interpreter
lives under /root, so that user's actions are shell commands (ln, mv), not Python. A swap race
is made deterministic by a hook in the daemon (a ``sitecustomize`` on its PYTHONPATH): right
after the daemon first opens or resolves the file under attack, the hostile user swaps it, as
the fastest attacker would. Without root these tests skip.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightd import segment
from weightd.client import AttachError, Client, attach, hf, state_dict
from weightd.errors import CheckpointError, PermissionDenied

from conftest import lazy_module, module_daemon, needs_root, own_model, wait_until, worker_env

transformers = lazy_module("transformers")  # at first use: not at every xdist worker's collection

pytestmark = needs_root

HOOK = """\
import os, subprocess
_TARGET = os.environ.get("WEIGHTD_TEST_SWAP")
if _TARGET:
    _open, _realpath, _fired = os.open, os.path.realpath, []

    def _is_target(path, dir_fd=None):
        try:
            p = os.fsdecode(path)
            if dir_fd is not None and not os.path.isabs(p):
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            return os.path.abspath(p) == _TARGET
        except (OSError, TypeError, ValueError):
            return False

    def _swap():
        if not _fired:
            _fired.append(1)
            subprocess.run(os.environ["WEIGHTD_TEST_SWAP_CMD"], shell=True, check=True)

    def _hooked_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = _open(path, flags, mode, dir_fd=dir_fd)
        if _is_target(path, dir_fd):
            _swap()
        return fd

    def _hooked_realpath(path, *args, **kwargs):
        real = _realpath(path, *args, **kwargs)
        if _is_target(path):
            _swap()
        return real

    os.open, os.path.realpath = _hooked_open, _hooked_realpath
"""


@pytest.fixture
def hostile():
    """A second local uid (no passwd entry) and a way to run shell commands as it."""
    uid = random.randrange(60_000, 64_000)

    def run(cmd: str) -> str:
        return f"setpriv --reuid={uid} --regid={uid} --clear-groups -- sh -c {_quote(cmd)}"

    run.uid = uid
    return run


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def area():
    """A folder other users can reach (pytest's tmp_path is 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="weightd-untrusted-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the tests that load a folder, whole or refused, with no hook or option of
    their own (``served``)."""
    with module_daemon(tmp_path_factory) as d:
        yield d


@pytest.fixture
def served(shared, request):
    """(the module's daemon, the model name this test loads under): unloaded when it ends."""
    with own_model(shared, request) as name:
        yield shared, name


def names(client: Client) -> list[str]:
    return [m["name"] for m in client.list()]


def swap_env(tmp_path: Path, target: Path, command: str) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = worker_env()
    env["PYTHONPATH"] = f"{hook}:{env['PYTHONPATH']}"
    env["WEIGHTD_TEST_SWAP"] = os.path.abspath(target)
    env["WEIGHTD_TEST_SWAP_CMD"] = command
    return env


def gpt2(folder: Path, value: float | None = None, **config) -> dict[str, torch.Tensor]:
    """A tiny GPT-2 folder written by save_pretrained (every weight ``value`` if given)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        **{**dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32), **config}
    )
    model = transformers.GPT2LMHeadModel(cfg)
    if value is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def give(path: Path, uid: int) -> None:
    """Hand a folder (and what is in it) to ``uid``, readable by all, as a user's own folder is."""
    for p in [path, *path.rglob("*")]:
        os.lchown(p, uid, uid)
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


def secret_file(area: Path, name: str, data: bytes) -> Path:
    """A root-only file outside every folder the daemon serves."""
    secret = area / "secret"
    secret.mkdir(exist_ok=True)
    secret.chmod(0o711)  # others may pass, not list
    path = secret / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def swap_to_link(hostile, folder: Path, name: str, target: Path) -> str:
    """The hostile user's atomic swap of ``folder/name`` for a symlink to ``target``."""
    return hostile(f"ln -s {target} {folder}/.swap && mv -T {folder}/.swap {folder}/{name}")


# --- 1. a swap between check and open ------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_file_swapped_after_the_daemon_opened_it_never_serves_what_is_outside(
    name, tmp_path, area, hostile, make_daemon
):
    models = area / "models"
    folder = models / "x"
    models.mkdir()
    inside = gpt2(folder, 1.0)
    (folder / "tokenizer.json").write_text('{"inside": true}')
    give(folder, hostile.uid)
    other = area / "other"
    gpt2(other, 666.0)
    secret = secret_file(
        area,
        name,
        (other / "model.safetensors").read_bytes() if name.endswith("safetensors") else b'{"secret": 1}',
    )

    env = swap_env(tmp_path, folder / name, swap_to_link(hostile, folder, name, secret))
    d = make_daemon("--model-dir", str(models), env=env)
    c = Client(d.socket, timeout=300)
    try:
        c.load(str(folder), "m")
    except (CheckpointError, PermissionDenied) as e:
        assert "changed" in str(e) or "outside" in str(e), str(e)
        served = None
    else:
        served = state_dict("m", socket=d.socket), hf.files("m", socket=d.socket)
    assert (folder / name).is_symlink(), "the hook swapped the file while the daemon loaded it"
    if served is not None:
        tensors, files = served
        assert torch.equal(tensors["transformer.wte.weight"], inside["transformer.wte.weight"])
        assert files["tokenizer.json"] == b'{"inside": true}'


# --- 2. links out of the folder ------------------------------------------------------------


@pytest.mark.parametrize("case", ["shadow", "environ", "root-only config", "module folder", "plain shard"])
def test_a_link_out_of_the_folder_is_refused_naming_it(case, tmp_path, area, hostile, served):
    folder = area / "x"
    if case == "plain shard":  # a folder of weight files, no config.json
        folder.mkdir()
        save_file({"a": torch.ones(4)}, folder / "a.safetensors")
    else:
        gpt2(folder)
    secret = secret_file(area, "private.json", b'{"api_key": "s3cret"}')
    if case == "shadow":
        name, target = "vocab.txt", "/etc/shadow"
    elif case == "environ":
        name, target = "vocab.txt", "/proc/self/environ"
    elif case == "root-only config":
        name, target = "tokenizer_config.json", str(secret)
    elif case == "plain shard":
        save_file({"b": torch.ones(4)}, area / "b.safetensors")
        name, target = (
            "b.safetensors",
            str(secret_file(area, "b.safetensors", (area / "b.safetensors").read_bytes())),
        )
    else:
        (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "1", "path": "1_Pooling"}]))
        module = area / "elsewhere"
        module.mkdir()
        shutil.copy(secret, module / "config.json")
        name, target = "1_Pooling", str(module)
    os.symlink(target, folder / name)
    give(folder, hostile.uid)
    d, model = served
    with pytest.raises((CheckpointError, PermissionDenied)) as e:
        Client(d.socket, timeout=300).load(str(folder), model)
    assert name in str(e.value) and ("outside the folder" in str(e.value) or "/proc" in str(e.value)), str(
        e.value
    )
    assert model not in names(Client(d.socket))


def test_a_hub_cache_snapshot_linking_into_its_blobs_loads(tmp_path, served):
    """The Hub cache's layout: snapshots/<rev>/file -> ../../blobs/<hash>, inside the repo folder."""
    made = tmp_path / "made"
    want = gpt2(made, 3.0)
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(made.iterdir())):
        blob = repo / "blobs" / f"hash{i}"
        shutil.copy(f, blob)
        os.symlink(f"../../blobs/hash{i}", snap / f.name)
    d, name = served
    Client(d.socket, timeout=300).load(str(snap), name)
    got = state_dict(name, socket=d.socket)
    assert torch.equal(got["transformer.wte.weight"], want["transformer.wte.weight"])


# --- 3. a folder that changes during a load ------------------------------------------------


def test_a_config_replaced_during_the_load_fails_it(tmp_path, area, hostile, make_daemon):
    models = area / "models"
    folder = models / "x"
    models.mkdir()
    gpt2(folder, n_layer=4)
    small = area / "small"
    gpt2(small, n_layer=1)
    shutil.copy(small / "config.json", area / "config-1-layer.json")
    give(folder, hostile.uid)
    (area / "config-1-layer.json").chmod(0o644)
    swap = hostile(f"cp {area}/config-1-layer.json {folder}/.c && mv -T {folder}/.c {folder}/config.json")
    env = swap_env(tmp_path, folder / "config.json", swap)
    d = make_daemon("--model-dir", str(models), env=env)
    try:
        Client(d.socket, timeout=300).load(str(folder), "m")
    except CheckpointError as e:
        assert "config.json changed while the folder was being loaded" in str(e), str(e)
        assert Client(d.socket).list() == []
    else:  # served: then the config workers build from and the tensors describe the same model
        described = Client(d.socket).manifest("m").skeleton["hf"]["config"]["n_layer"]
        served = json.loads(hf.files("m", socket=d.socket)["config.json"])["n_layer"]
        layers = {k.split(".")[2] for k in state_dict("m", socket=d.socket) if k.startswith("transformer.h.")}
        assert described == served == len(layers), (described, served, len(layers))
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 1, "the hook swapped the config"


def test_an_oversized_config_is_refused_without_being_read(tmp_path, make_daemon):
    folder = tmp_path / "x"
    gpt2(folder)
    with open(folder / "config.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: a GiB that costs nothing on disk
    d = make_daemon()
    with pytest.raises(CheckpointError, match=r"config.json: 1073741824 bytes, more than the \d+ bytes"):
        Client(d.socket, timeout=300).load(str(folder), "m")
    peak_kib = int(next(x for x in open(f"/proc/{d.proc.pid}/status") if x.startswith("VmHWM")).split()[1])
    assert peak_kib < 512 << 10, f"the daemon peaked at {peak_kib} KiB"


# --- 4. config values set the cost; a load can be stopped -----------------------------------


def test_a_config_describing_a_larger_model_than_its_files_is_refused_naming_both(tmp_path, served):
    folder = tmp_path / "x"
    gpt2(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 3000
    (folder / "config.json").write_text(json.dumps(config))
    d, name = served
    with pytest.raises(CheckpointError) as e:
        Client(d.socket, timeout=600).load(str(folder), name)
    assert re.search(
        r"describes a GPT2LMHeadModel of [\d,]{9,} parameters, but its weight files hold [\d,]{5,7}\b",
        str(e.value),
    ), str(e.value)
    assert name not in names(Client(d.socket))


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if not line.split()[1].startswith("Z")]


@pytest.mark.timeout(300)  # builds and loads a 1000-layer folder
def test_a_load_past_its_deadline_is_cancelled_and_its_loader_killed(tmp_path, served):
    warm = tmp_path / "warm"
    gpt2(warm)
    # a folder whose from_pretrained runs far longer than the deadline of 1 s (1000 layers, every
    # weight present: 3000 took 13-50 s)
    big = tmp_path / "big"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=8, n_embd=4, n_layer=1000, n_head=1, n_positions=4)
    with torch.device("meta"):
        skeleton = transformers.GPT2LMHeadModel(cfg)
    big.mkdir()
    weights = {k: torch.zeros(v.shape) for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, big / "model.safetensors")
    cfg.save_pretrained(big)
    d, name = served
    c = Client(d.socket, timeout=300)
    c.load(str(warm), name)  # the loader process is up: the next load is a fork of it
    (loader_pid,) = _children(d.proc.pid)
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightd",
            "load",
            str(big),
            "--name",
            "big",
            "--timeout",
            "1",
            "--socket",
            d.socket,
        ],
        capture_output=True,
        text=True,
        env=worker_env(),
    )
    assert result.returncode == 14, (result.returncode, result.stderr)  # Cancelled
    assert "deadline" in result.stderr
    assert time.monotonic() - started < 60
    wait_until(lambda: _children(loader_pid) == [], what="the load's process killed")
    assert c.ping() and [m["name"] for m in c.list()] == [name]
    # the daemon itself never imported torch: the loads ran in the loader process
    maps = open(f"/proc/{d.proc.pid}/maps").read()
    assert "libtorch" not in maps and "transformers" not in maps


# --- 5. only the folder's weights for its class ----------------------------------------------


def test_an_adapter_beside_the_weights_is_neither_applied_nor_served(tmp_path, served):
    folder = tmp_path / "x"
    base = gpt2(folder, 1.0)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["c_attn"],
                "base_model_name_or_path": str(folder),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    save_file(
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(2, 16),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(48, 2),
        },
        folder / "adapter_model.safetensors",
    )
    d, name = served
    Client(d.socket, timeout=300).load(str(folder), name)
    got = state_dict(name, socket=d.socket)
    assert set(got) <= set(base) and not [k for k in got if "lora" in k or "base_layer" in k]
    assert torch.equal(got["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    assert "adapter_config.json" not in hf.files(name, socket=d.socket)


def test_attach_refuses_a_module_whose_weights_the_segment_lacks(tmp_path, served):
    folder = tmp_path / "x"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    d, name = served
    Client(d.socket, timeout=300).load(str(folder), name)
    assert type(attach(name, socket=d.socket)).__name__ == "BertForMaskedLM"
    # BertModel has a pooler that the masked-LM folder does not hold: it would be random
    with pytest.raises(AttachError, match=r"BertModel has 2 weights the served model does not hold.*pooler"):
        attach(name, transformers.BertModel, socket=d.socket)


# --- 6. the metrics socket -------------------------------------------------------------------


def test_a_metrics_socket_in_a_folder_another_user_owns_is_refused_and_nothing_followed(
    tmp_path, area, hostile, make_daemon, request
):
    # a folder of theirs in /tmp (where anyone may make one), as a mistyped --metrics path finds
    theirs = Path(tempfile.mkdtemp(prefix="weightd-theirs-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(theirs, ignore_errors=True))
    give(theirs, hostile.uid)
    victim = secret_file(area, "victim", b"root's")
    before = os.stat(victim)
    path = theirs / "metrics.sock"
    # the owner of the folder swaps the socket for a link to a root-only file once it is bound
    env = swap_env(tmp_path, path, swap_to_link(hostile, theirs, "metrics.sock", victim))
    hook = Path(env["PYTHONPATH"].split(":")[0]) / "sitecustomize.py"
    hook.write_text(
        hook.read_text()
        + textwrap.dedent("""
        if _TARGET:
            import socket as _s
            _bind = _s.socket.bind
            def _hooked_bind(self, address):
                _bind(self, address)
                if isinstance(address, str) and _is_target(address):
                    _swap()
            _s.socket.bind = _hooked_bind
        """)
    )
    d = make_daemon("--metrics", f"unix:{path}", "--group", "0", env=env, wait=False)
    code = d.proc.wait(60)
    after = os.stat(victim)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (stat.S_IMODE(before.st_mode), before.st_gid)
    assert code == 13, d.output()  # UnsafePath
    assert f"cannot serve metrics on unix:{path}" in d.output() and "belongs to uid" in d.output()


def _scrape_unix(path: str, timeout: float) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks).decode()


def test_a_trickling_scraper_blocks_no_other_and_is_cut_off(tmp_path, make_daemon):
    path = str(tmp_path / "metrics.sock")
    make_daemon("--metrics", f"unix:{path}")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(path)
    cut = threading.Event()
    stop = threading.Event()

    def trickle():  # one byte of a request every half second, never finishing it
        for ch in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 1000:
            try:
                slow.sendall(bytes([ch]))
            except OSError:
                cut.set()
                return
            if stop.wait(0.5):
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        assert "weightd_shm_free_bytes" in _scrape_unix(path, timeout=8)
        assert cut.wait(60), "the trickling scraper was never cut off"
    finally:
        stop.set()
        t.join()
        slow.close()


def test_metrics_have_no_series_per_generation(tmp_path, make_daemon):
    save_file({"w": torch.ones(16)}, tmp_path / "m.safetensors")
    path = str(tmp_path / "metrics.sock")
    d = make_daemon("--metrics", f"unix:{path}")
    c = Client(d.socket)
    for _ in range(3):
        c.load(str(tmp_path / "m.safetensors"), "m")
    lines = [x for x in _scrape_unix(path, 10).splitlines() if x.startswith("weightd_") and 'model="m"' in x]
    assert lines and not [x for x in lines if "generation=" in x], lines
    assert 'weightd_model_generation{model="m"} 3.0' in lines


# --- 7. restart identity ---------------------------------------------------------------------


def test_a_checkpoint_rewritten_with_its_mtime_set_back_is_loaded_again(tmp_path, make_daemon):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.full((64,), 1.0)}, path)
    d = make_daemon("--model", f"m={path}", keep=True)
    assert d.stop() == 0
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    fresh = tmp_path / "fresh.safetensors"
    save_file({"w": torch.full((64,), 2.0)}, fresh)
    assert len(fresh.read_bytes()) == len(data)
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(fresh.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the mtime set back
    d2 = make_daemon("--model", f"m={path}")
    assert float(state_dict("m", socket=d2.socket)["w"][0]) == 2.0


def test_every_file_a_folder_load_read_is_recorded(tmp_path, served):
    folder = tmp_path / "x"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer.json").write_text("{}")
    d, name = served
    c = Client(d.socket, timeout=300)
    c.load(str(folder), name)
    recorded = {os.path.basename(f["path"]) for f in c.manifest(name, full=True).origin["files"]}
    on_disk = {p.name for p in folder.iterdir()}
    assert "model.safetensors.index.json" in on_disk
    assert on_disk <= recorded, on_disk - recorded
    assert all("ctime_ns" in f for f in c.manifest(name, full=True).origin["files"])


# --- 8. the files folder of workers ------------------------------------------------------------


def test_files_folders_are_shared_per_generation_and_removed_once_it_is_gone(tmp_path, served, workers):
    folder = tmp_path / "x"
    gpt2(folder)
    (folder / "tokenizer.json").write_text('{"v": 1}')
    d, name = served
    c = Client(d.socket, timeout=300)
    c.load(str(folder), name)
    env = dict(worker_env(), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    code = textwrap.dedent(f"""
        import json, sys
        from weightd.client import hf
        print(json.dumps(hf.files_dir({name!r}, socket={d.socket!r})), flush=True)
        sys.stdin.readline()
    """)
    first = workers(code, env=env)
    path = first.read()
    first.proc.send_signal(signal.SIGKILL)  # dies by a signal: no atexit, no cleanup of its own
    first.proc.wait()
    second = workers(code, env=env)
    assert second.read() == path and os.path.isfile(os.path.join(path, "tokenizer.json"))
    second.finish()
    old_segment = c.manifest(name).segment
    (folder / "tokenizer.json").write_text('{"v": 2}')
    c.load(str(folder), name)  # generation 2; generation 1 is unlinked once nobody maps it
    wait_until(lambda: not os.path.exists(segment.Folder().file(old_segment)), what="generation 1 unlinked")
    third = workers(code, env=env)
    new = third.read()
    third.finish()
    assert new != path and open(os.path.join(new, "tokenizer.json")).read() == '{"v": 2}'
    assert not os.path.exists(path), "the folder of the gone generation was removed"
    assert sorted(os.listdir(tmp_path / "run" / "weightd-files")) == [os.path.basename(new)]

"""GPUs: one copy per GPU shared through CUDA IPC, and copies from shared memory.

Marked ``gpu``: skipped where torch.cuda.is_available() is False (conftest), so CPU-only
machines and CI run none of it; the CPU paths are covered everywhere else.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from weightd.client import Client, attach, info, state_dict

from conftest import worker_code, worker_env

pytestmark = pytest.mark.gpu


@pytest.fixture
def model_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(1024, 256, generator=g) for i in range(8)}
    sd["bf16"] = torch.randn(333, dtype=torch.bfloat16, generator=g)
    save_file(sd, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors", sd


def test_two_processes_share_one_gpu_allocation_bit_exact(model_file, make_daemon, workers):
    path, sd = model_file
    d = make_daemon("--model", f"m={path}", "--device", "cuda:0")
    code = worker_code(
        d.socket,
        """
        sd = state_dict("m", socket=SOCK, device="cuda:0")
        torch.cuda.synchronize()
        # memory opened through CUDA IPC is not this process's allocation; a copy would be
        mine = torch.cuda.memory_allocated()
        sums = {k: float(v.double().sum()) for k, v in sd.items()}
        say({"sums": sums, "mine": mine, "device": str(sd["t0"].device)})
        hear()
    """,
    )
    a, b = workers(code), workers(code)
    ra, rb = a.read(), b.read()
    expected = {k: float(v.double().sum()) for k, v in sd.items()}
    assert ra["sums"] == rb["sums"] == expected
    assert ra["device"] == "cuda:0"
    assert ra["mine"] == rb["mine"] == 0, "neither process holds a copy of its own"
    for w in (a, b):
        w.send("bye")
        assert w.finish() == 0


def test_gpu_found_by_uuid_whatever_the_numbering(model_file, make_daemon, workers):
    path, _ = model_file
    d = make_daemon("--model", f"m={path}", "--device", "cuda:0")
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    env = dict(worker_env(), CUDA_VISIBLE_DEVICES=f"GPU-{uuid}" if not uuid.startswith("GPU-") else uuid)
    w = workers(
        worker_code(
            d.socket,
            """
        from weightd import cuda as gpu
        sd = state_dict("m", socket=SOCK, device="cuda:0")
        say({"uuid": gpu.device_uuid(0), "ok": bool(torch.isfinite(sd["t0"]).all())})
    """,
        ),
        env=env,
    )
    r = w.read()
    assert r == {"uuid": uuid, "ok": True}


@pytest.mark.parametrize("gone", ["unloaded", "daemon stopped"])
def test_a_client_holds_its_views_while_the_model_goes(gone, model_file, make_daemon, workers):
    """Unloaded: the views stay readable (PyTorch's IPC counts keep the block). Daemon stopped:
    its allocation ends with it, so the client only lets go, and exits cleanly."""
    path, sd = model_file
    d = make_daemon("--model", f"m={path}", "--device", "cuda:0")
    w = workers(
        worker_code(
            d.socket,
            f"""
        sd = state_dict("m", socket=SOCK, device="cuda:0")
        say("ready")
        hear()
        total = float(sd["t3"].double().sum()) if {gone == "unloaded"} else None
        del sd  # its IPC mapping let go, then a normal exit
        torch.cuda.synchronize()
        say(total)
    """,
        )
    )
    assert w.read() == "ready"
    if gone == "unloaded":
        with Client(d.socket) as c:
            c.unload("m")
    else:
        assert d.stop() == 0, d.output()[-3000:]
    w.send("go")
    assert w.read() == (float(sd["t3"].double().sum()) if gone == "unloaded" else None)
    assert w.finish() == 0


@pytest.mark.xfail(
    strict=True,
    reason="the CUDA driver leaves cuda.shm.<uid>.<pid>.1 (80 KiB) of every process that exported "
    "an IPC handle: seen on an H200, driver 580, torch 2.11; not weightd's file to remove unverified",
)
def test_a_stopped_daemon_leaves_no_driver_files(model_file, make_daemon, workers):
    path, _ = model_file
    d = make_daemon("--model", f"m={path}", "--device", "cuda:0")
    w = workers(worker_code(d.socket, 'state_dict("m", socket=SOCK, device="cuda:0")\nsay("ok")'))
    assert w.read() == "ok" and w.finish() == 0
    assert d.stop() == 0
    assert not d.driver_files()  # (make_daemon removes them when the test ends)


@pytest.mark.parametrize("pin", [False, True])
def test_copy_from_shared_memory_when_the_daemon_has_no_gpu_copy(pin, model_file, make_daemon):
    path, sd = model_file
    d = make_daemon("--model", f"m={path}")  # no --device: the client copies
    got = state_dict("m", socket=d.socket, device="cuda:0", pin=pin)
    assert torch.cuda.memory_allocated() >= sum(v.numel() * v.element_size() for v in sd.values()), (
        "its own copy"
    )
    for k, v in sd.items():
        assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), v)
    model = attach(
        "m",
        model=lambda: torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in sd.items()}),
        socket=d.socket,
        device="cuda:0",
        pin=pin,
    )
    assert info(model).copies == 0 and all(p.is_cuda for p in model.parameters())

"""The client is light: a worker that attaches imports only what attach needs, and the
operator's commands import no torch at all (README, "A light client").

Each case runs in a fresh interpreter and reads its ``sys.modules``: what is imported is
what is paid for, in every fresh worker and every ``weightd ls``. (How long it takes is
measured in ``benchmarks/attach.py --ready``'s import column, not here.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

# Never needed to attach or to get a state dict: the Hugging Face, GPU, Ray and publishing
# parts, pyzmq (Note [the client speaks ZMTP itself]), what ssl/http drag in, the daemon,
# posix_ipc (segments are created and removed with it, never mapped), and the segment's writer
# (weightd.segment: a worker maps through weightd.entry, a third of its size).
NOT_FOR_ATTACH = (
    "zmq",
    "posix_ipc",
    "transformers",
    "ray",
    "ssl",
    "http.client",
    "weightd.client.hf",
    "weightd.client.gpu",
    "weightd.client.ray_zerocopy",
    "weightd.cuda",
    "weightd.layout",
    "weightd.segment",
    "weightd.daemon",
    "weightd.bench",
)
# The operator's commands and the transport: not even torch (the CLI may read the daemon's
# config, as reload and purge do: it sees every wing).
NOT_FOR_OPERATORS = (
    "torch",
    "numpy",
    "zmq",
    "transformers",
    "ray",
    "weightd.client.client",
    "weightd.client.mapping",
    "weightd.client.hf",
    "weightd.client.gpu",
    "weightd.bench",
)


def imported(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def loaded(modules: set[str], names) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_importing_the_client_imports_nothing_until_a_name_is_used():
    mods = imported("import weightd.client")
    assert loaded(mods, ("torch", "zmq", "weightd.client.client", "weightd.segment")) == []


@pytest.fixture(scope="module")
def torch_alone() -> set[str]:
    """What ``import torch`` imports by itself (this torch imports ssl and http.client, say)."""
    return imported("import torch")


def test_what_attach_and_state_dict_import_after_torch(torch_alone):
    mods = imported("import torch\nfrom weightd.client import attach, state_dict, Client") - torch_alone
    assert loaded(mods, NOT_FOR_ATTACH) == []
    assert "weightd.client.mapping" in mods  # the test sees real imports


# What a worker's kernel modules (weightd.manifest, weightd.entry, weightd.protocol) would
# compile or load at import for nothing (Note [what a fresh worker's import pays for] in
# weightd.manifest): a dataclass's generated code, OpenSSL for a digest only peer fills take.
# Checked without torch, which imports both itself.
NOT_AT_IMPORT = ("dataclasses", "hashlib", "_hashlib")


def test_the_kernel_modules_a_worker_loads_compile_nothing_at_import():
    mods = imported("import weightd.client.connection, weightd.entry, weightd.segment, weightd.protocol")
    assert "weightd.manifest" in mods  # the test sees real imports
    assert loaded(mods, NOT_AT_IMPORT) == []


def test_the_connection_imports_no_torch():
    mods = imported("import weightd.client.connection")
    kernel_readers = ("weightd.entry", "weightd.segment", "weightd.layout")
    assert loaded(mods, (*NOT_FOR_OPERATORS, "weightd.daemon", *kernel_readers)) == []


def test_an_attach_over_a_real_daemon_imports_no_more(serve, torch_alone):
    d = serve({"w": torch.arange(8.0)})
    mods = imported(
        f"""
        import torch
        from weightd.client import state_dict
        assert state_dict("m", socket={d.socket!r})["w"].tolist() == list(range(8))
        """
    )
    assert loaded(mods - torch_alone, NOT_FOR_ATTACH) == []


@pytest.mark.parametrize("command", ["ls", "stats", "load", "unload", "reload", "purge"])
def test_the_operators_commands_import_no_torch(command, tmp_path, make_daemon):
    m = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(8.0)}, m)
    d = make_daemon("--model", f"m={m}")
    args = {
        "ls": ["ls"],
        "stats": ["stats"],
        "load": ["load", str(m), "--name", "n"],
        "unload": ["unload", "m"],
        "reload": ["reload", "--model", f"m={m}"],
        # purge refuses while a daemon answers: it still gets as far as asking it
        "purge": ["purge", "--instance", d.instance],
    }[command]
    mods = imported(
        f"""
        import sys
        from weightd.cli import main
        try:
            main({[*args, "--socket", d.socket]!r})
        except SystemExit as e:
            assert e.code in (0, 4), e.code  # 4: purge refused, the daemon is running
        """
    )
    assert loaded(mods, NOT_FOR_OPERATORS) == []

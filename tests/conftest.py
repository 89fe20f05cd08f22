"""Test harness: real daemons on temporary sockets, real worker processes, and hygiene.

Every test gets its own instance name, so its segments are /dev/shm/weightd.<instance>.*;
whatever a test leaves there is removed when it ends (and reported as a failure), and every
process a test starts is stopped, also when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from weightd.bench import spawn

import forks
from hostile import remove_segments, segments  # noqa: F401 (re-exported for the tests)

SHM = Path("/dev/shm")


WEIGHTD = [sys.executable, "-m", "weightd"]  # the CLI, as a user runs it


def run_weightd(*args: str, socket: str | None = None, timeout: float = 60, env: dict | None = None):
    """``weightd ARGS [--socket SOCKET]`` in a subprocess; its CompletedProcess (text)."""
    argv = [*WEIGHTD, *args, *(["--socket", socket] if socket else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


class lazy_module:  # noqa: N801 (used as a module)
    """The module ``name``, imported at its first use, or the calling test file skipped where it is
    not installed, as ``pytest.importorskip`` does. Every xdist worker collects every file, so a
    heavy import at a file's top is paid by all of them. Not importlib's ``LazyLoader``: pytest's
    collection looks at private and dunder attributes of every global (``__test__``, ``_mock_name``),
    which would load it there; those are never the module's."""

    def __init__(self, name: str):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed", allow_module_level=True)
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_") and attr != "__version__":
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


def segment_digest(name: str, directory: str | Path = SHM) -> str:
    """A hash of a whole segment's bytes (``name`` with or without its leading slash)."""
    h = hashlib.sha256()
    with open(Path(directory) / name.lstrip("/"), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def big_model(path: Path, mib: int, *, seed: int | None = None, tensors: int = 8) -> dict:
    """A safetensors file of ``mib`` MiB of float32 in ``tensors`` tensors, random from
    ``seed`` (zeros without one); returns the tensors."""
    import torch
    from safetensors.torch import save_file

    per = mib * (1 << 20) // 4 // tensors
    g = None if seed is None else torch.Generator().manual_seed(seed)
    sd = {
        f"layer{i}.weight": torch.zeros(per) if g is None else torch.randn(per, generator=g)
        for i in range(tensors)
    }
    save_file(sd, str(path))
    return sd


def big_file(path: Path, nbytes: int) -> Path:
    """A safetensors file of ``nbytes`` of uint8 (sparse: quick to make, real to copy)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.write(b"\x07")
        f.truncate(8 + len(header) + nbytes)
    return path


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until it holds; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Daemon(spawn.Daemon):
    """A real ``weightd serve`` process on a temporary socket (the one shared launcher)."""

    def __init__(self, socket: str, instance: str, args: list[str], env: dict | None = None):
        super().__init__(socket, instance, args, env=env)


@pytest.fixture
def instance():
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    left = remove_segments(name)
    assert not left, f"test leaked segments: {left}"


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "weightd.sock")


@pytest.fixture
def make_daemon(sock, instance):
    """``make_daemon("--model", "m=/path")`` starts a daemon and waits until it answers.

    Test daemons remove their segments when they stop (so a leak is a failure), unless
    ``keep=True`` (restart tests: the next daemon adopts them).
    """
    started: list[Daemon] = []

    def make(
        *args: str, wait: bool = True, socket: str | None = None, env: dict | None = None, keep: bool = False
    ) -> Daemon:
        d = Daemon(socket or sock, instance, list(args) + ([] if keep else ["--unlink-on-exit"]), env=env)
        started.append(d)
        return d.start(wait=wait)

    yield make
    for d in started:
        d.stop()
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        d.remove_driver_files()  # GPU machines only (test_gpu.py)


@contextlib.contextmanager
def module_daemon(tmp_path_factory, *args: str, timeout: float = 60):
    """A daemon for a whole test module (in a ``scope="module"`` fixture), for the tests that do
    not need one of their own: its start, and its loader process's for Hugging Face folders
    (which imports transformers: seconds), is paid once. It removes its segments when it stops;
    an unclean stop or a segment left behind fails the module."""
    instance = "t" + uuid.uuid4().hex[:10]
    d = Daemon(str(tmp_path_factory.mktemp("daemon") / "w.sock"), instance, [*args, "--unlink-on-exit"])
    d.start(timeout=timeout)
    try:
        yield d
    finally:
        rc = d.stop()
        left = remove_segments(instance)
        assert rc == 0, d.output()[-3000:]
        assert not left, f"the module's daemon left segments behind: {left}"


@contextlib.contextmanager
def own_model(daemon, request):
    """The model name a test loads under in its module's daemon (its own name, made a model
    name), unloaded when the test ends."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:100]
    try:
        yield name
    finally:
        with daemon.client() as c:
            if name in [m["name"] for m in c.list()]:
                c.unload(name)


@pytest.fixture
def serve(tmp_path, make_daemon):
    """``serve(tensors, name="m", *args)``: the tensors saved as a safetensors file and a daemon
    serving them as model ``name`` (with ``serve`` arguments ``args``); returns the daemon."""

    def start(tensors: dict, name: str = "m", *args: str, **kwargs):
        from safetensors.torch import save_file

        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return make_daemon("--model", f"{name}={path}", *args, **kwargs)

    return start


class Worker:
    """A Python process that runs ``code`` and talks JSON lines over stdin/stdout: forked from
    the session's fork server, which has imported torch already (tests/forks.py), or, with
    ``$WEIGHTD_TEST_FRESH_WORKERS=1`` or ``fresh=True``, a fresh ``python -c``."""

    def __init__(self, code: str, env: dict | None = None, fresh: bool = False):
        code = textwrap.dedent(code)
        if fresh or os.environ.get("WEIGHTD_TEST_FRESH_WORKERS") == "1":
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        else:
            self.proc = forks.Forked(_fork_server(), code, dict(os.environ if env is None else env))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = 60.0) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"worker {self.pid} said nothing in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60.0) -> int:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


_forks: list[forks.Server] = []  # this session's fork server, once a test wants a worker


def _fork_server() -> str:
    if not _forks:
        _forks.append(forks.Server(tempfile.mkdtemp(prefix="weightd-forks-"), worker_env()))
    return _forks[0].ready()


@pytest.fixture
def workers():
    """``workers(code)`` starts a worker process; all are killed when the test ends."""
    started: list[Worker] = []

    def make(code: str, env: dict | None = None) -> Worker:
        w = Worker(code, env=env or worker_env())
        started.append(w)
        return w

    yield make
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        for f in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
            try:
                f.close()
            except (BrokenPipeError, OSError):
                pass


@pytest.fixture
def attached_worker(workers):
    """``attached_worker(socket, body, model="m")``: a worker process that holds ``sd``, model
    ``model``'s state dict from the daemon at ``socket``, then runs ``body`` (with
    ``worker_code``'s helpers): the preamble of every test about what attached workers do."""

    def start(sock: str, body: str = "", model: str = "m") -> Worker:
        return workers(
            worker_code(sock, f"sd = state_dict({model!r}, socket=SOCK)\n" + textwrap.dedent(body))
        )

    return start


def worker_env() -> dict:
    """The test environment, with tests/ importable (for models.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def worker_code(sock: str, body: str) -> str:
    """A worker's program: imports, the socket, JSON-line helpers, then ``body``."""
    return textwrap.dedent(
        f"""
        import json, os, sys, torch
        from weightd.client import attach, state_dict, Client, info
        SOCK = {sock!r}
        def say(obj):
            print(json.dumps(obj), flush=True)
        def hear():
            return json.loads(sys.stdin.readline())
        """
    ) + textwrap.dedent(body)


def mapped_ranges(pid: int | str = "self", needle: str = "weightd.") -> list[tuple[int, int, str]]:
    """Address ranges of a process's mappings whose path contains ``needle``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and needle in parts[5]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5]))
    return out


def as_user(gid: int, groups: list[int], body: str) -> str:
    """Worker code that imports as root, then becomes ``nobody`` before it touches weightd.

    The interpreter here lives under /root, which other users cannot read, so the process
    starts as root and drops its privileges for good before the part under test.
    """
    return f"os.setgroups({groups!r}); os.setgid({gid}); os.setuid(65534)\n" + textwrap.dedent(body)


@pytest.fixture
def shared_dir():
    """A socket directory other users can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="weightd-acl-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")


@pytest.fixture(autouse=True, scope="session")
def _no_stray_env():
    # Tests must never talk to a daemon of the machine by accident.
    os.environ.pop("WEIGHTD_SOCKET", None)
    yield
    # Workers keep a generation's small files in one folder per user (Note [one files folder per
    # user and generation]), removed by the next worker that finds its segment gone. The tests'
    # daemons are all stopped now, so every such folder's segment is gone: sweep them as a worker
    # would, and the per-user root with them when nothing else is in it.
    from weightd.client import hf

    root = hf._files_root()
    hf._sweep(root)
    with contextlib.suppress(OSError):
        os.rmdir(root)
    for server in _forks:
        server.stop()
        shutil.rmtree(os.path.dirname(server.path), ignore_errors=True)


# The longest test files (seconds of the whole suite, measured), run first: with one file per
# xdist worker (--dist loadfile) the files are handed out in collection order, and a long one
# handed out last would run on alone while the other workers sit idle.
LONGEST_FIRST = [
    "test_readme.py",
    "test_ray.py",
    "test_untrusted.py",
    "test_reliability.py",
    "test_own_classes.py",
    "test_fanout.py",
    "test_hf_parity.py",
]


def pytest_collection_modifyitems(config, items):
    """The longest files first (``LONGEST_FIRST``); tests marked ``gpu`` need CUDA: on a machine
    without it they skip, cleanly."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order kept
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def private_shm_refused() -> str | None:
    """Why a private /dev/shm (``in_private_shm``) cannot be had here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True
    )
    return None if r.returncode == 0 else f"cannot mount a private tmpfs: {r.stderr.decode().strip()}"


def in_private_shm(size: int | str, argv: list[str]) -> list[str]:
    """``argv`` run with a fresh tmpfs of ``size`` as its /dev/shm, in a mount namespace of its
    own: the host's /dev/shm is untouched, and the tmpfs (with whatever is in it) goes with the
    namespace's last process."""
    mount = f"mount -t tmpfs -o size={size} tmpfs /dev/shm"
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mount} && exec "$@"',
        "sh",
        *argv,
    ]


def hf_diagnostics(daemon, name: str) -> dict:
    """What the daemon says of a Hugging Face model's load (class, versions, weight files, what
    transformers converted, unexpected and missing keys): in ``stats``, not in attach replies."""
    with daemon.client(timeout=120) as c:  # stats reads every attached process's maps: slow when loaded
        return next(m["hf"] for m in c.stats()["models"] if m["name"] == name and m["current"])

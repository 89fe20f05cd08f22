"""The one launcher of throwaway ``weightd serve`` processes: for the demo, the tests and every
benchmark.

``Daemon`` is a real daemon process on a socket of your choosing, its output in a log file;
``throwaway(models)`` is one on a private socket and a unique instance that removes its
segments on the way out, whatever happens. Every process started here is stopped here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from weightd.errors import DaemonNotRunning, RequestTimeout

if TYPE_CHECKING:
    from weightd.client import Client

# Nothing of weightd.client or weightd.segment at import: benchmark workers import this module
# (multiprocessing unpickles their job from weightd.bench.workers), and they time their own
# import of the client (benchmarks/attach.py --ready).


class Daemon:
    """``weightd serve --socket SOCKET --instance INSTANCE ARGS...`` as a subprocess."""

    def __init__(
        self,
        socket: str,
        instance: str,
        args: list[str] | tuple = (),
        *,
        env: dict | None = None,
        log_dir: str | None = None,
        log: str | os.PathLike | None = None,
        die_with_parent: bool = False,
        argv: list[str] | None = None,
    ):
        self.socket = socket
        self.instance = instance
        self.args = list(args)
        self.argv = argv  # a whole command line instead (a systemd unit's ExecStart=)
        self.env = env
        self.die_with_parent = die_with_parent
        self.log = (
            Path(log)
            if log
            else Path(log_dir or os.path.dirname(socket)) / f"daemon.{time.monotonic_ns()}.log"
        )
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.leftover: list[str] = []  # segments found after it stopped (removed by remove_segments)

    @property
    def command(self) -> list[str]:
        if self.argv is not None:
            return list(self.argv)
        return [
            sys.executable,
            "-m",
            "weightd",
            "serve",
            "--socket",
            self.socket,
            "--instance",
            self.instance,
            *self.args,
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 60.0, until: str = "loaded") -> "Daemon":
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        if wait:
            self.wait_ready(timeout, until)
        return self

    def wait_ready(self, timeout: float = 60.0, until: str = "loaded") -> float:
        """Seconds until the daemon answers a ping (``until="ping"``), or also has every
        preload done (``"loaded"``: what READY=1 tells systemd); raises with its output if it
        exits first."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weightd serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            try:
                from weightd.client import Client

                with Client(self.socket, timeout=2) as c:
                    pending = c.ping().get("preloading", 0)
                if until == "ping" or not pending:
                    return time.monotonic() - t0
                time.sleep(0.02)
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(
                        f"weightd serve still preloading after {timeout:g} s:\n{self.output()[-3000:]}"
                    )
                continue
            except (DaemonNotRunning, RequestTimeout):
                # RequestTimeout: a ping sent just as the socket changed hands (a loaded machine)
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(
                        f"weightd serve not ready after {timeout:g} s:\n{self.output()[-3000:]}"
                    ) from None
                time.sleep(0.02)

    def client(self, **kw) -> Client:
        from weightd.client import Client

        return Client(self.socket, **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the daemon and wait for it (killed if it hangs); returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    @property
    def shm_dir(self) -> str | None:
        """The daemon's ``--shm-dir``, if it was given one."""
        return self.args[self.args.index("--shm-dir") + 1] if "--shm-dir" in self.args else None

    @property
    def folder(self):
        """Where its segments are (``weightd.segment.Folder``)."""
        from weightd import segment

        return segment.Folder(self.shm_dir or segment.SHM_DIR)

    def segments(self) -> list[str]:
        from weightd import segment

        return self.folder.segments(segment.prefix(self.instance))

    def remove_segments(self) -> list[str]:
        """Unlink every segment of this instance; returns their names (for leak reports)."""
        from weightd import segment

        self.leftover = self.segments()
        folder = self.folder
        for name in self.leftover:
            segment.unlink(folder, name)
        return self.leftover

    def driver_files(self) -> list[str]:
        """The CUDA driver's files of this daemon's IPC exports, ``/dev/shm/cuda.shm.<uid>.<pid in
        hex>.<n>``: left at every exit of a daemon with ``--device`` (seen on an H200, driver 580;
        tests/test_gpu.py). The pid names them, so only this daemon's are listed."""
        if self.proc is None:
            return []
        mine = f"{self.proc.pid:x}"
        return sorted(
            f for f in os.listdir("/dev/shm") if f.startswith("cuda.shm.") and f.split(".")[3:4] == [mine]
        )

    def remove_driver_files(self) -> None:
        """Once it has stopped: remove ``driver_files()``, as a test or benchmark cleans up."""
        for f in self.driver_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", f))


@contextlib.contextmanager
def throwaway(
    models: dict[str, str] | None = None, *, args: list[str] | tuple = (), ready_timeout: float = 300.0
):
    """A daemon serving ``models`` ({name: path}) on a private socket; stopped and cleaned after.

    Started with ``--unlink-on-exit`` (a stop frees its segments; by default a daemon leaves them
    for the next one on its socket to adopt), it dies with this process even on SIGKILL, and
    whatever segment of its instance is left on the way out is removed and listed in
    ``Daemon.leftover``.
    """
    tmp = tempfile.mkdtemp(prefix="weightd-")  # short: a unix socket path has ~100 bytes
    instance = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cmd = ["--unlink-on-exit", "--log-level", "warning", *args]
    for name, path in (models or {}).items():
        cmd += ["--model", f"{name}={path}"]
    d = Daemon(os.path.join(tmp, "w.sock"), instance, cmd, die_with_parent=True)
    try:
        d.start(timeout=ready_timeout)
        yield d
    finally:
        try:
            d.stop()
        finally:
            d.remove_segments()
            d.remove_driver_files()
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def huge_tmpfs(size: int, *, huge: str = "always"):
    """A tmpfs mounted ``huge=always`` for ``--shm-dir`` (as root), unmounted after; yields its
    path, or None where mounting is refused (not root): the caller says it skipped."""
    where = tempfile.mkdtemp(prefix="weightd-huge-")
    os.chmod(where, 0o755)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},huge={huge},mode=0755", "tmpfs", where],
            capture_output=True,
            timeout=30,
        ).returncode
        == 0
    )
    try:
        yield where if mounted else None
    finally:
        if mounted:
            for _ in range(50):  # a daemon that just stopped may still hold a file for a moment
                if subprocess.run(["umount", where], capture_output=True, timeout=30).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", where], capture_output=True, timeout=30)
        os.rmdir(where)


def _die_with_parent() -> None:
    """In the daemon's child, before exec: SIGTERM it if we die, even by SIGKILL, so that its
    segments (gigabytes of shared memory that outlive every process) are unlinked."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

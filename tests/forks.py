"""Worker processes forked from one that has imported torch, instead of started afresh.

A worker (conftest's ``Worker``) is a Python process that runs a test's code: a fresh
``python -c`` spends ~2 s of CPU importing torch before its first line, and the suite starts
about a hundred. ``Forks`` starts, once per test session, a server process that imports what
every worker imports (torch, ``weightd.client``'s attach path) and nothing else, then forks
one process per worker: each is a real, separate process with its own pid, pipes, environment
and exit status, which talks to the daemon as any worker does. What is not inherited is the
cost: the test suite is CPU-bound on 2 cores.

Note [a forked worker is a fresh one]: a child gets the environment, ``PYTHONPATH`` entries,
working folder and standard streams it asks for, a ``__main__`` of its own and the signal
dispositions of a fresh interpreter; it runs its code at the top level of the server's
program, so it ends as ``python -c`` does (atexit handlers, a traceback and status 1 on an
uncaught exception, ``sys.exit``'s status). The server is single-threaded when it forks
(apart from BLAS's pool, which registers its own fork handlers, as DataLoader's forked
workers rely on); a test that is about what a fresh process imports starts one itself.

Each request is served by a fork of the server (the waiter) that forks the worker and waits
for it, so the requester learns the worker's exit status, as ``Popen`` would tell it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

# What the server imports before it forks: what worker_code() imports (Note [a forked worker
# is a fresh one]); nothing a test checks is absent.
PRELOAD = """
import json, os, sys, torch
from weightd.client import attach, state_dict, Client, info
"""

# The server's program (``python -c``, as a worker's): serve() returns only in a worker.
PROGRAM = """
import sys, types
import forks
code = forks.serve(sys.argv[1])
main = types.ModuleType("__main__")
sys.modules["__main__"] = main
del sys, types, forks
exec(compile(code, "<string>", "exec"), main.__dict__)
"""


def serve(path: str) -> str:
    """Listen on ``path``; in each worker forked, return the code it runs."""
    exec(PRELOAD, {})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return _waiter(conn)
        conn.close()


def _waiter(conn: socket.socket) -> str:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(data)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # sys.path as python -c builds it from the child's $PYTHONPATH: "" (the working folder),
        # those entries, then the interpreter's own (the server's, less its $PYTHONPATH's)
        ours = _entries(os.environ)
        sys.path[:] = ["", *_entries(request["env"]), *[p for p in sys.path[1:] if p not in ours]]
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        return request["code"]
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _entries(env) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


class Forked:
    """A forked worker, as much of ``subprocess.Popen`` (text mode, three pipes) as tests use."""

    def __init__(self, server: str, code: str, env: dict):
        self.args = ["<forked>", "-c", code]
        self.returncode: int | None = None
        ours, theirs = zip(*(_pipe(to_child=i == 0) for i in range(3)))
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server)
        request = json.dumps({"code": code, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(self._conn, [request], list(theirs))
        for fd in theirs:
            os.close(fd)
        self.stdin = open(ours[0], "w")
        self.stdout = open(ours[1])
        self.stderr = open(ours[2])
        self._buf = b""
        self.pid = int(self._line(timeout=60))

    def _line(self, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError("the fork server's waiter hung up")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still this worker's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _pipe(to_child: bool) -> tuple[int, int]:
    """(our end, the child's end) of a pipe."""
    r, w = os.pipe()
    return (w, r) if to_child else (r, w)


class Server:
    """The fork server of this test session, started on first use."""

    def __init__(self, folder: str, env: dict):
        self.path = os.path.join(folder, "forks.sock")
        self.log = open(os.path.join(folder, "forks.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, self.path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # "ready" once it listens
            stderr=self.log,
            env=env,
        )
        self._ready = False

    def ready(self, timeout: float = 120) -> str:
        if not self._ready:
            if (
                not select.select([self.proc.stdout], [], [], timeout)[0]
                or self.proc.stdout.readline() != b"ready\n"
            ):
                raise RuntimeError(f"the fork server did not start: see {self.log.name}")
            self._ready = True
        return self.path

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()

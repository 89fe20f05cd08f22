"""The process between a Ray daemon actor and its ``weightd serve``: stops the daemon gracefully
when the actor goes, however it goes.

Note [a Ray actor's children are SIGKILLed]
    When a Ray worker process exits, the raylet SIGKILLs its child processes (Ray's
    ``kill_child_processes_on_worker_exit``). A daemon SIGKILLed that way never runs its
    shutdown, so ``--unlink-on-exit`` removes nothing and its segments stay in /dev/shm after
    the cluster is gone. So the actor does not start the daemon as its child: it starts this
    supervisor, which forks away (its first process exits at once, and the rest is no child of
    the actor), starts the daemon as *its* child, and waits for the actor's process to end
    (a pidfd, immune to pid reuse); then it sends the daemon SIGTERM and waits for it.

    python -m weightd.client.ray_zerocopy.supervisor ACTOR_PID LOG -- weightd serve ...

Stdlib only: it must start fast and hold little memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys

STOP_TIMEOUT = 30.0


def main(argv: list[str]) -> int:
    actor_pid, log, _, *cmd = argv
    if os.fork():
        os._exit(0)  # the actor's child ends here; what follows is nobody's child in Ray's eyes
    os.setsid()
    watch = os.pidfd_open(int(actor_pid))
    with open(log, "ab") as out:
        daemon = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    # Our own SIGTERM (shutdown_daemons, or the machine going down) passes on to the daemon.
    signal.signal(signal.SIGTERM, lambda *_: daemon.send_signal(signal.SIGTERM))
    while daemon.poll() is None:
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([watch], [], [], 0.5)
            if ready:  # the actor is gone
                daemon.send_signal(signal.SIGTERM)
                break
    try:
        daemon.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    return 0


def _die_with_parent() -> None:
    # If this supervisor is killed outright, the daemon still gets its SIGTERM.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The README's quickstart, runnable: serve a checkpoint, attach it from workers, publish anew.

    python examples/quickstart.py

Makes a small model and a safetensors checkpoint in a temporary folder, starts
``weightd serve`` on a private socket, attaches the model from three worker processes (each
gets an ``nn.Module`` over the same shared pages), publishes a new generation from this
process and refreshes one worker's module in place. Stops the daemon and removes its segments
on the way out. tests/test_examples.py runs it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 1000, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def worker(sock: str, results, commands) -> None:
    from weightd.client import attach, info, refresh

    model = attach("net", model=Net, socket=sock)  # an nn.Module over the shared pages
    a = info(model)
    results.put(
        (
            os.getpid(),
            a.generation,
            a.copies,
            round(a.attach_seconds * 1e3, 1),
            model.head.weight is model.embed.weight,
        )
    )
    if commands.get(timeout=120) == "refresh":
        refresh(model, socket=sock)  # same module, same Parameter objects, newest generation
        results.put(("refreshed to generation", info(model).generation))


def main() -> int:
    from weightd.client import Client, DaemonNotRunning, publish, state_dict

    tmp = tempfile.mkdtemp(prefix="weightd-quickstart-")
    torch.manual_seed(0)
    net = Net()
    save_file({k: v for k, v in net.state_dict().items() if k != "head.weight"}, f"{tmp}/net.safetensors")
    sock = f"{tmp}/weightd.sock"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightd",
            "serve",
            "--model",
            f"net={tmp}/net.safetensors",
            "--socket",
            sock,
            "--unlink-on-exit",
            "--log-level",
            "warning",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                Client(sock).ping()
                break
            except DaemonNotRunning:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.05)

        ctx = mp.get_context("spawn")
        results, commands = ctx.Queue(), [ctx.Queue() for _ in range(3)]
        procs = [ctx.Process(target=worker, args=(sock, results, c)) for c in commands]
        for p in procs:
            p.start()
        for _ in procs:
            pid, generation, copies, ms, tied = results.get(timeout=120)
            print(
                f"worker {pid}: attached generation {generation} in {ms} ms, {copies} weights copied, "
                f"tied={tied}"
            )

        sd = state_dict("net", socket=sock)
        print(f"state_dict: {len(sd)} tensors over the shared pages")

        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.5)
        r = publish("net", net, socket=sock)  # one copy, no pickle: the new generation
        print(f"published generation {r['generation']}")
        commands[0].put("refresh")
        print("one worker:", *results.get(timeout=60))
        for c in commands[1:]:
            c.put("done")
        for p in procs:
            p.join(60)
        return 0 if all(p.exitcode == 0 for p in procs) else 1
    finally:
        daemon.terminate()
        daemon.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

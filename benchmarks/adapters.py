"""Many LoRA adapters over one base: attach by name from the daemon vs every worker loading them with PEFT.

    python benchmarks/adapters.py                      # 100 adapters, r=16, 4 workers
    python benchmarks/adapters.py --adapters 20 --workers 2
    python benchmarks/adapters.py --hidden 512         # a toy width: objects a quarter of the weights

A Llama base (``save_pretrained``) of a 1B model's width (hidden 2048, 32 heads, 8 key-value
heads: Llama 3.2 1B's attention shapes) but 4 layers and a small vocabulary and MLP, and
``--adapters`` LoRA adapters (r=16 on q, k, v, o; PEFT's own ``save_pretrained``), served by one
``weightd serve`` (base as a model, each adapter with ``load --base``). The width sets how much
an adapter weighs against PEFT's Python objects for it, which are the same for any width (two
``nn.Linear`` and a dropout module per adapter and layer, ~12 KiB): at 2048 an adapter's
weights are ~17x its objects, at 512 ~4x. Then, side by side in one run:

* time to put the first adapter over a worker's attached base (weightd: ``adapters.add(model,
  NAME)``; PEFT: ``PeftModel.from_pretrained(model, FOLDER)``; both wrap and change that model),
  and what ``hf.attach(base, adapter=NAME)`` costs besides (the base attached again);
* time to add one adapter to a worker's model that already has some: ``adapters.add(model,
  NAME)`` (made directly in the layers earlier adapters made, over the mapped weights: Note [a
  further adapter in O(its own size)] in client/adapters.py) against PEFT's
  ``model.load_adapter(FOLDER, NAME)`` from the folder (page cache warm); two ways: each worker
  in turn alone, the others idle (its first adapter and the 2nd to 21st: a worker serving and
  adapters arriving), then all workers at once (the rest; on 2 cores 4 at once take at least
  twice one's time); medians, the last 20, the 90th percentile of all, and the CPU time;
* the node's memory for the adapters, ``--workers`` workers each holding all of them: the sum
  of the workers' private Pss growth (Pss outside shared memory) from the base alone to base +
  every adapter (the same base, attached, both ways); for weightd plus the adapters' segments
  in /dev/shm, counted once and whole (resident whatever the workers touched); against one
  copy of every adapter. (The workers' Pss_Shmem moves by tens of MiB either way meanwhile: the
  base's pages, shared by 4 to 5 processes; counting it made PEFT's figure too low before.)
  Split in two: the adapters' weights (PEFT: every worker's own copy of
  its LoRA parameters; weightd: the segments, plus any weight PEFT copied out of them, counted
  by ``adapters.copied``: none unless a cast) and the rest, PEFT's module objects for each
  adapter in each worker, which both ways carry (/proc/PID/smaps: anonymous memory and heap,
  no segment page copied).

Prints the tables and writes benchmarks/out/adapters.png. Every process started is stopped and
every segment removed, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from weightd.bench import spawn

BASE = dict(
    vocab_size=8000,
    intermediate_size=1408,  # the MLP takes no adapter here: kept small
    num_hidden_layers=4,
    max_position_embeddings=128,
)

WORKER = """
import json, os, sys, time, statistics, torch
from weightd.client import hf, adapters
from weightd.memory import usage
SOCK, WAY, NAMES, FOLDERS = json.loads(sys.argv[1])
FOLDER = dict(zip(NAMES, FOLDERS))
def say(o):
    print(json.dumps(o), flush=True)
def hear():
    return json.loads(sys.stdin.readline())
import peft
model = hf.attach("llama", socket=SOCK)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
say({})
m = None
while True:
    cmd = hear()
    if cmd["op"] == "begin":
        before = usage()
        say({})
    elif cmd["op"] == "add":  # wall and this process's CPU time of each (others may share the cores)
        first, wall, cpu = None, [], []
        for n in cmd["names"]:
            t, c = time.perf_counter(), time.process_time()
            if m is None:  # the first adapter, over the worker's attached base, both ways
                m = adapters.add(model, n, socket=SOCK) if WAY == "weightd" else (
                    peft.PeftModel.from_pretrained(model, FOLDER[n], adapter_name=n))
                first = time.perf_counter() - t
                continue
            if WAY == "weightd":
                adapters.add(m, n, socket=SOCK)
            else:
                m.load_adapter(FOLDER[n], adapter_name=n)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        say({"first": first, "wall": wall, "cpu": cpu})
    else:
        break
m.set_adapter(NAMES[-1])
with torch.no_grad():
    m(torch.tensor([[1, 2, 3]]))
after = usage()
lora = [p for n, p in m.named_parameters() if ".lora_" in n]
copied = sum(adapters.copied(m).values()) if WAY == "weightd" else len(lora)  # PEFT: all its own
if copied not in (0, len(lora)):
    raise SystemExit(f"{copied} of {len(lora)} LoRA weights copied: count their bytes here")
maps, again = [], []
if WAY == "weightd":  # weightd's own part of an add (after the memory): manifest round trip, mapping
    from weightd.client.client import cached_client
    for n in NAMES[1:21]:
        t = time.perf_counter()
        cached_client(SOCK)._map(n, None)
        maps.append(time.perf_counter() - t)
    for _ in range(5):  # what hf.attach(base, adapter=NAME) does besides: the base attached again
        t = time.perf_counter()
        hf.attach("llama", socket=SOCK)
        again.append(time.perf_counter() - t)
say({"private": after.pss_private - before.pss_private,
     "weights": sum(p.numel() * p.element_size() for p in lora) if copied else 0,
     "maps": maps, "again": again})
sys.stdin.readline()
"""

ALONE = 20  # adds each worker makes alone (the others idle), after its first adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048, help="the base's width (64 per head)")
    ap.add_argument("--plot", default=str(Path(__file__).parent / "out" / "adapters.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="weightd-adapters-") as tmp:
        root = Path(tmp)
        names, folders, adapter_bytes = make(root, args.adapters, args.rank, args.hidden)
        d = spawn.Daemon(
            str(root / "weightd.sock"),
            "bench-adapters",
            ["--model", f"llama={root / 'llama'}", "--unlink-on-exit"],
        )
        procs: list[subprocess.Popen] = []
        try:
            d.start()
            t0 = time.perf_counter()
            with d.client() as c:
                for n, f in zip(names, folders):
                    c.load(str(f), n, base="llama")
            load_seconds = time.perf_counter() - t0
            with d.client() as c:
                shm = sum(m["size"] for m in c.list() if m.get("base"))  # the adapters' segments
            results = {}
            for way in ("peft", "weightd"):
                results[way] = run_workers(way, d.socket, names, folders, args.workers, procs)
            report(args, adapter_bytes, load_seconds, results, shm)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            d.stop()
            d.remove_segments()


def make(root: Path, count: int, rank: int, hidden: int):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    heads = hidden // 64
    config = transformers.LlamaConfig(
        **BASE, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4)
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    base = transformers.LlamaForCausalLM.from_pretrained(root / "llama")
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    names, folders = [], []
    for i in range(count):
        torch.manual_seed(i + 1)
        model = peft.get_peft_model(base, config)
        model.save_pretrained(root / f"a{i}")
        base = model.unload()  # the base without this adapter's layers, for the next one
        names.append(f"a{i}")
        folders.append(root / f"a{i}")
    adapter_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    return names, folders, adapter_bytes


def run_workers(way: str, sock: str, names, folders, n: int, procs) -> dict:
    """Each worker in turn, the others idle: its first adapter and ALONE more; then all of them
    at once: the rest."""
    code = textwrap.dedent(WORKER)
    arg = json.dumps([sock, way, names, [str(f) for f in folders]])
    started = []
    for _ in range(n):
        p = subprocess.Popen(
            [sys.executable, "-c", code, arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(p)
        started.append(p)

    def send(p, **cmd):
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    def read(p):
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a {way} worker died")
        return json.loads(line)

    for p in started:  # every worker has the base before any loads adapters
        read(p)
    for p in started:
        send(p, op="begin")
    for p in started:
        read(p)
    alone = []
    for p in started:
        send(p, op="add", names=names[: ALONE + 1])
        alone.append(read(p))
    for p in started:
        send(p, op="add", names=names[ALONE + 1 :])
    together = [read(p) for p in started]
    for p in started:
        send(p, op="end")
    out = [read(p) for p in started]
    for p in started:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(60)
    every = [t for o in alone + together for t in o["wall"]]
    late = [t for o in together for t in o["wall"][-ALONE:]]
    return {
        # the workers' private growth. Their Pss_Shmem moves by tens of MiB either way while they
        # run (the base's pages, shared by 4 to 5 processes): nothing of either way's adapters
        "private": sum(o["private"] for o in out),
        "weights": sum(o["weights"] for o in out),  # the LoRA weights the workers hold as their own
        "first_ms": statistics.median(o["first"] for o in alone) * 1e3,
        "alone_ms": statistics.median(t for o in alone for t in o["wall"]) * 1e3,
        "alone_cpu_ms": statistics.median(t for o in alone for t in o["cpu"]) * 1e3,
        "together_ms": statistics.median(t for o in together for t in o["wall"]) * 1e3,
        "together_cpu_ms": statistics.median(t for o in together for t in o["cpu"]) * 1e3,
        "late_ms": statistics.median(late) * 1e3,
        "p90_ms": statistics.quantiles(every, n=10)[-1] * 1e3,
        "map_ms": statistics.median([t for o in out for t in o["maps"]] or [0.0]) * 1e3,
        "again_ms": statistics.median([t for o in out for t in o["again"]] or [0.0]) * 1e3,
    }


def report(args, adapter_bytes: int, load_seconds: float, results: dict, shm: int) -> None:
    mib = 2**20
    peft_, wd = results["peft"], results["weightd"]
    # weightd: what the workers grew by privately (PEFT's layer objects, nothing of the weights),
    # plus the adapters' segments, resident in /dev/shm once whatever the workers touched
    wd = {**wd, "grown": wd["private"] + shm}
    peft_ = {**peft_, "grown": peft_["private"]}
    print(
        f"\n{args.adapters} LoRA adapters (r={args.rank}, q/k/v/o) over one Llama base (hidden "
        f"{args.hidden}), {args.workers} workers"
    )
    print(
        f"one copy of every adapter: {adapter_bytes / mib:.1f} MiB; the daemon loaded them in "
        f"{load_seconds:.2f} s"
    )
    print("\n| | PEFT load_adapter from the folder | weightd adapters.add (by name) | weightd / PEFT |")
    print("| --- | ---: | ---: | ---: |")
    w, k = args.workers, ALONE + 1
    rows = [
        ("first adapter over the worker's attached base, one worker alone (median)", "first_ms"),
        (f"add one adapter (adapters 2 to {k}), one worker alone, the others idle (median)", "alone_ms"),
        ("  the same: CPU time of the worker (median)", "alone_cpu_ms"),
        (
            f"add one adapter (adapters {k + 1} to {args.adapters}), {w} workers at once (median)",
            "together_ms",
        ),
        ("  the same: CPU time of a worker (median)", "together_cpu_ms"),
        (f"add one adapter (the last {ALONE}), {w} workers at once (median)", "late_ms"),
        ("add one adapter, every one (90th percentile)", "p90_ms"),
    ]
    for label, key in rows:
        print(f"| {label} | {peft_[key]:.2f} ms | {wd[key]:.2f} ms | {wd[key] / peft_[key]:.2f}x |")
    print(
        f"| of an add, weightd's part: manifest round trip + mapping (median) | - | {wd['map_ms']:.2f} ms | |"
    )
    print(
        f"| hf.attach(base, adapter=NAME) adds: the base attached again (median) | - "
        f"| {wd['again_ms']:.2f} ms | |"
    )
    # the split: the adapters' weights, and the rest (PEFT's module objects in every worker)
    peft_["held"] = peft_["weights"]
    wd["held"] = shm + wd["weights"]  # the segments, plus any weight PEFT copied out of them
    for way in (peft_, wd):
        way["objects"] = way["grown"] - way["held"]
    for label, key in (
        (f"node memory for the adapters, {args.workers} workers", "grown"),
        ("of which the adapters' weights", "held"),
    ):
        print(
            f"| {label} | {peft_[key] / mib:.1f} MiB ({peft_[key] / adapter_bytes:.2f} copies) | "
            f"{wd[key] / mib:.1f} MiB ({wd[key] / adapter_bytes:.2f} copies) | {wd[key] / peft_[key]:.2f}x |"
        )
    # a private growth below the weights held: no split to show
    rest = f"{peft_['objects'] / w / mib:.1f} MiB" if peft_["objects"] > 0 else "- (growth < weights)"
    print(
        f"| of which the rest: PEFT's module objects, per worker | {rest} | "
        f"{wd['objects'] / w / mib:.1f} MiB | |"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(["PEFT", "weightd"], [peft_["alone_ms"], wd["alone_ms"]], color=["#999", "#36c"])
    a.set_ylabel("ms")
    a.set_title("add one adapter, one worker alone")
    grown = [peft_["grown"] / adapter_bytes, wd["grown"] / adapter_bytes]
    held = [min(way["held"], way["grown"]) / adapter_bytes for way in (peft_, wd)]  # as measured
    b.bar(["PEFT", "weightd"], held, color=["#999", "#36c"], label="adapter weights")
    objects = [g - h for g, h in zip(grown, held)]
    b.bar(["PEFT", "weightd"], objects, bottom=held, color="#e93", label="PEFT's module objects")
    b.legend(fontsize=8)
    b.axhline(1, color="k", lw=0.5)
    b.set_ylabel("copies of every adapter")
    b.set_title(f"node memory, {args.workers} workers")
    fig.suptitle(f"{args.adapters} LoRA adapters (r={args.rank}) over one base (hidden {args.hidden})")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

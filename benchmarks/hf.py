"""Hugging Face folders: a ready model in a fresh worker, ``attach(NAME)`` vs ``from_pretrained(FOLDER)``.

    python benchmarks/hf.py              # llama (bf16), qwen2 (fp16), mixtral (bf16 MoE), ~1 GiB each
    python benchmarks/hf.py --models llama --gib 0.25 --repeats 2

For each architecture, a folder written by transformers' own ``save_pretrained`` (kept in
``--dir`` for the next run), served by one ``weightd serve``. Then, side by side in one run:

* time to a ready model in a fresh worker (a new process, imports done before the clock
  starts, as in a worker that serves the model): ``from_pretrained(FOLDER)``, the same with
  ``device_map="cpu"``, and ``attach(NAME)``; plus the first answer (a forward of 8 tokens);
  median of ``--repeats`` fresh workers each;
* memory of ``--workers`` workers each way, all holding the model with every weight byte
  read: the sum of their ``Pss`` from /proc/PID/smaps_rollup, against the model's size;
* the cold-worker figure: importing torch, transformers and the model's modeling module,
  which both ways pay once per process;
* the daemon's side: its load time (``from_pretrained`` plus the segment written) and how
  much transformers converted (MoE experts fused) rather than took from the files.

Prints the tables and writes a PNG (``--plot``). Every process started is stopped and every
segment removed, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

from weightd import memory
from weightd.bench import spawn
from weightd.bench import workers as harness

FROM_PRETRAINED = "from_pretrained"
DEVICE_MAP = 'from_pretrained(device_map="cpu")'
ATTACH = "weightd attach"
NOTHING = "imports only"  # a worker's own memory, subtracted to get what the model costs
METHODS = (FROM_PRETRAINED, DEVICE_MAP, ATTACH)

# name: (config class, model class, dtype, config at 1 GiB; scaled by --gib through the layer count)
MODELS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        "bfloat16",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_attention_heads=16,
            num_key_value_heads=4,
            num_hidden_layers=9,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        "float16",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5504,
            num_attention_heads=16,
            num_key_value_heads=4,
            num_hidden_layers=10,
            tie_word_embeddings=True,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        "bfloat16",
        dict(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_attention_heads=16,
            num_key_value_heads=4,
            num_hidden_layers=6,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
}


# --- folders ---------------------------------------------------------------------------------


def make_folder(root: Path, name: str, gib: float) -> Path:
    """The model's folder, written by save_pretrained once and reused while its config holds."""
    import torch
    import transformers

    config_cls, model_cls, dtype, kwargs = MODELS[name]
    kwargs = dict(kwargs, num_hidden_layers=max(1, round(kwargs["num_hidden_layers"] * gib)))
    folder = root / f"{name}-{gib:g}"
    stamp = folder / "weightd-bench.json"
    want = {"config": kwargs, "dtype": dtype, "transformers": transformers.__version__}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    config = getattr(transformers, config_cls)(**kwargs, dtype=dtype)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    stamp.write_text(json.dumps(want))
    return folder


# --- one worker ------------------------------------------------------------------------------


def worker(conn, method: str, folder: str, model_cls: str, name: str, socket: str, touch: bool) -> None:
    """A fresh process: import, wait for the gate, get the model, answer once, report, hold."""
    t0 = time.perf_counter()
    import torch
    import transformers

    cls = getattr(transformers, model_cls)  # imports the modeling module
    from weightd.client import attach

    imports = time.perf_counter() - t0
    conn.send(("ready", imports))
    conn.recv()  # the gate
    t0 = time.perf_counter()
    if method == NOTHING:
        conn.send(("done", {"ready": 0.0, "first": 0.0, "checksum": 0.0}))
        conn.recv()
        return
    if method == ATTACH:
        model = attach(name, socket=socket)
    elif method == DEVICE_MAP:
        model = cls.from_pretrained(folder, device_map="cpu")
    else:
        model = cls.from_pretrained(folder)
    ready = time.perf_counter() - t0
    assert not model.training
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    first = time.perf_counter() - t0
    if touch:  # every weight byte read, so that memory counts what a busy worker holds
        with torch.no_grad():
            for t in model.state_dict().values():
                t.float().sum() if t.dtype.is_floating_point else t.sum()
    conn.send(("done", {"ready": ready, "first": first, "checksum": float(logits.float().sum())}))
    conn.recv()  # held until the parent has read its memory


def run_workers(n: int, method: str, folder: Path, model_cls: str, name: str, socket: str, touch: bool):
    """``n`` fresh workers at once; returns their timings and their memory while all hold the model."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker, args=(child, method, str(folder), model_cls, name, socket, touch), daemon=True
            )
            p.start()
            procs.append((p, parent))
        imports = [expect(c, p, "ready", 300) for p, c in procs]
        for _, c in procs:
            c.send("go")
        done = [expect(c, p, "done", 600) for p, c in procs]
        usage = [memory.usage(p.pid) for p, _ in procs]
        for _, c in procs:
            c.send("bye")
        for p, _ in procs:
            p.join(30)
        return imports, done, usage
    finally:
        for p, _ in procs:
            if p.is_alive():
                p.kill()
                p.join()


def expect(conn, proc, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"worker {proc.pid} exited with {proc.exitcode} before it reported {what!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {proc.pid} did not report {what!r} within {timeout:g} s")
    tag, value = conn.recv()
    assert tag == what, (tag, what)
    return value


# --- the run ---------------------------------------------------------------------------------


def run(args) -> dict:
    from weightd.client import Client

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    out = {"models": {}, "workers": args.workers}
    folders = {name: make_folder(root, name, args.gib) for name in args.models}
    warm = root / "warm-up"
    if not (warm / "config.json").is_file():
        import transformers

        tiny = transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        transformers.LlamaForCausalLM(tiny).save_pretrained(warm)
    with spawn.throwaway() as d:
        client = Client(d.socket, timeout=600)
        # The daemon imports torch and transformers with its first Hugging Face folder: timed apart.
        t0 = time.perf_counter()
        client.load(str(warm), "warm-up")
        out["daemon_imports"] = time.perf_counter() - t0
        client.unload("warm-up")
        for name, folder in folders.items():
            nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            t0 = time.perf_counter()
            client.load(str(folder), name)
            load = time.perf_counter() - t0
            # The same bytes as a plain safetensors file (no transformers): what the conversion adds.
            raw = sorted(folder.glob("*.safetensors"))
            t0 = time.perf_counter()
            client.load(str(raw[0]), f"{name}-raw")
            raw_load = time.perf_counter() - t0 if len(raw) == 1 else None
            client.unload(f"{name}-raw")
            hf = client.manifest(name).skeleton["hf"]
            sd_bytes = client.manifest(name).nbytes
            converted = hf.get("converted_bytes", 0)
            model_cls = hf["class"]
            row = {
                "bytes": nbytes,
                "daemon_load": load,
                "raw_load": raw_load,
                "converted": converted,
                "segment": sd_bytes,
                "times": {},
                "pss": {},
                "imports": [],
            }
            for method in METHODS:
                samples = []
                for _ in range(args.repeats):
                    imports, done, _ = run_workers(1, method, folder, model_cls, name, d.socket, touch=False)
                    samples.append(done[0])
                    row["imports"] += imports
                row["times"][method] = {
                    k: statistics.median(s[k] for s in samples) for k in ("ready", "first")
                }
                row.setdefault("checksums", {})[method] = samples[0]["checksum"]
                print(
                    f"{name}: {method}: ready {harness.ms(row['times'][method]['ready'])}, "
                    f"first answer {harness.ms(row['times'][method]['first'])}",
                    flush=True,
                )
            for method in (NOTHING, FROM_PRETRAINED, ATTACH):
                _, _, usage = run_workers(args.workers, method, folder, model_cls, name, d.socket, touch=True)
                row["pss"][method] = {
                    "pss": sum(u.pss for u in usage),
                    "private": sum(u.pss_private for u in usage),
                }
                print(
                    f"{name}: {args.workers} x {method}: Pss {harness.mib(row['pss'][method]['pss'])}",
                    flush=True,
                )
            daemon_usage = memory.usage(d.pid)
            row["daemon_pss"] = daemon_usage.pss
            out["models"][name] = row
        client.close()
    if d.leftover:
        print(f"removed {len(d.leftover)} segments the daemon left", file=sys.stderr)
    return out


def report(out: dict) -> None:
    n = out["workers"]
    rows = [
        [
            "model",
            "size",
            "daemon load",
            "as a plain file",
            "converted in it",
            "from_pretrained",
            'device_map="cpu"',
            "attach",
            "attach / fp",
            "first answer fp",
            "first answer attach",
        ]
    ]
    for name, r in out["models"].items():
        t = r["times"]
        rows.append(
            [
                name,
                harness.mib(r["bytes"]),
                harness.ms(r["daemon_load"]),
                "-" if r["raw_load"] is None else harness.ms(r["raw_load"]),
                harness.mib(r["converted"]),
                harness.ms(t[FROM_PRETRAINED]["ready"]),
                harness.ms(t[DEVICE_MAP]["ready"]),
                harness.ms(t[ATTACH]["ready"]),
                f"{t[ATTACH]['ready'] / t[FROM_PRETRAINED]['ready']:.2f}x",
                harness.ms(t[FROM_PRETRAINED]["first"]),
                harness.ms(t[ATTACH]["first"]),
            ]
        )
    print("\nTime to a ready model in a fresh worker (imports done; median of fresh workers)")
    print(harness.table(rows))
    print(
        "(daemon load: from_pretrained in the daemon plus the segment written; before them, the daemon's "
        f"first Hugging Face load (a tiny folder) took {harness.ms(out['daemon_imports'])}: "
        "it imports torch and transformers)"
    )
    rows = [
        [
            "model",
            "size",
            f"{n} x imports only",
            f"{n} x from_pretrained",
            "model part / size",
            f"{n} x attach",
            "model part / size",
            "attach / fp",
            "daemon Pss",
        ]
    ]
    for name, r in out["models"].items():
        base = r["pss"][NOTHING]["pss"]
        fp, at = r["pss"][FROM_PRETRAINED]["pss"], r["pss"][ATTACH]["pss"]
        rows.append(
            [
                name,
                harness.mib(r["bytes"]),
                harness.mib(base),
                harness.mib(fp),
                f"{(fp - base) / r['bytes']:.2f}x",
                harness.mib(at),
                f"{(at - base) / r['bytes']:.2f}x",
                f"{at / fp:.2f}x",
                harness.mib(r["daemon_pss"]),
            ]
        )
    print(
        f"\nMemory of {n} workers holding the model, every weight read (sum of Pss; the model part is the"
        " sum less that of as many workers that only imported)"
    )
    print(harness.table(rows))
    imports = [s for r in out["models"].values() for s in r["imports"]]
    print(
        f"\nCold worker: importing torch, transformers and the modeling module: median "
        f"{harness.ms(statistics.median(imports))} (paid by both ways, once per process)"
    )


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["models"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, method in enumerate(METHODS):
        a.bar(
            [k + (i - 1) * width for k in range(len(names))],
            [out["models"][m]["times"][method]["ready"] * 1e3 for m in names],
            width,
            label=method,
        )
    a.set_xticks(range(len(names)), names)
    a.set_ylabel("ms to a ready model (fresh worker)")
    a.legend(fontsize=8)
    for i, method in enumerate((NOTHING, FROM_PRETRAINED, ATTACH)):
        b.bar(
            [k + (i - 1) * width for k in range(len(names))],
            [out["models"][m]["pss"][method]["pss"] / 2**20 for m in names],
            width,
            label=f"{out['workers']} x {method}",
        )
    b.plot(
        range(len(names)),
        [(out["models"][m]["bytes"] + out["models"][m]["pss"][NOTHING]["pss"]) / 2**20 for m in names],
        "k_",
        markersize=30,
        label="imports only + one model",
    )
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("MiB (sum of Pss)")
    b.legend(fontsize=8)
    fig.suptitle("Hugging Face folders: weightd attach vs from_pretrained")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    p.add_argument("--gib", type=float, default=1.0, help="scale of each model (~GiB)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="fresh workers per way and model (median)")
    p.add_argument("--dir", default="/tmp/weightd-bench-hf", help="where the folders are written (reused)")
    p.add_argument("--plot", default="benchmarks/results/hf.png")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    with harness.sigterm_exits():
        out = run(args)
    report(out)
    if args.plot:
        plot(out, Path(args.plot))
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reliability under load, faults and hostile input: the long versions of tests/test_reliability.py.

    python benchmarks/stress.py            # a few minutes on a 2-core machine
    python benchmarks/stress.py --quick    # a smoke run (seconds)

1. **Load**: 64 client processes x 200 attach/detach cycles against a daemon serving three
   models (one of them attached as an ``nn.Module``) while a fourth is loaded and a fifth
   unloaded. Every read is checked bit-exact; every failure must be a typed weightd error;
   every call has a deadline. Records requests/s, p50/p99 attach latency, and the daemon's
   memory before and after.
2. **Fuzz**: hypothesis throws raw ZeroMQ messages (random frames, wrong JSON, deep nesting,
   long strings, hostile names and paths, replayed ids, oversized frames) at the read and admin
   sockets of one daemon; every reply must be typed, the daemon must keep serving bit-exact and
   its memory stay flat.
3. **Corpus**: every corrupt checkpoint of tests/hostile.py is refused with a CheckpointError
   naming the file and the problem; no segment is left; no pickle runs.
4. **Kill**: SIGKILL the daemon at random moments of loads, publishes and unloads; after each
   restart every served model is bit-exact and /dev/shm holds exactly the served segments.

Prints a table and writes benchmarks/out/stress.json. Exits 1 if any property failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from weightd.client import Client, publish, state_dict  # noqa: E402
from weightd.errors import CheckpointError  # noqa: E402

import hostile  # noqa: E402

MIB = 1 << 20
OUT = ROOT / "benchmarks" / "out"


def log(msg: str) -> None:
    print(msg, flush=True)


def new_daemon(
    tmp: Path, args: list[str], *, instance: str | None = None, sock: str | None = None
) -> hostile.Daemon:
    instance = instance or f"stress-{uuid.uuid4().hex[:8]}"
    return hostile.Daemon(
        sock or str(tmp / f"{instance}.sock"), instance, args + ["--log-level", "info"], str(tmp)
    ).start()


def finish(d: hostile.Daemon, problems: list[str], what: str) -> None:
    rc = d.stop()
    left = hostile.remove_segments(d.instance)
    if rc != 0:
        problems.append(f"{what}: daemon exited {rc}")
    if left:
        problems.append(f"{what}: leaked segments {left}")


# --- 1. load -------------------------------------------------------------------------------------


def load(tmp: Path, clients: int, cycles: int, problems: list[str]) -> dict:
    files, expected, args = hostile.load_models(tmp, kib=512, dim=128)
    d = new_daemon(tmp, ["--unlink-on-exit", *args])
    try:
        publish("c", hostile.model_tensors(12, 512), socket=d.socket)
        # as many clients as the run (ZeroMQ's buffers grow with the peers connected at once)
        warm = hostile.run_load(
            d.socket,
            d.instance,
            expected,
            clients=clients,
            cycles=5,
            names=["a", "b", "c", "lin"],
            module_name="lin",
            module_dim=128,
        )
        if warm.untyped or warm.bad:
            problems.append(f"load warm-up: {warm.untyped[:1]} {warm.bad[:3]}")
        before = hostile.daemon_memory(d.proc.pid)

        def during():
            time.sleep(0.5)  # well inside the run
            with Client(d.socket, timeout=60) as c:
                t0 = time.perf_counter()
                c.load(str(files["d"]), "d")
                t1 = time.perf_counter()
                time.sleep(0.5)
                c.unload("x")
                return {"load_d_s": t1 - t0, "unload_x_at_s": time.perf_counter() - t0 + 0.5}

        r = hostile.run_load(
            d.socket,
            d.instance,
            expected,
            clients=clients,
            cycles=cycles,
            names=["a", "b", "c", "lin", "d", "x"],
            during=during,
            timeout=60,
            deadline=600,
            module_name="lin",
            module_dim=128,
            seed=1,
        )
        after = hostile.daemon_memory(d.proc.pid)
        with Client(d.socket) as c:
            listed = {m["name"]: m["segment"].lstrip("/") for m in c.list()}
            for name in ("a", "b", "c", "d", "lin"):
                if hostile.digests(c.state_dict(name)) != expected[name]:
                    problems.append(f"load: {name} not bit-exact afterwards")
        if r.untyped:
            problems.append(f"load: untyped failures, e.g. {r.untyped[0][-800:]}")
        if r.hung:
            problems.append(f"load: clients {r.hung} hung")
        if r.bad:
            problems.append(f"load: {len(r.bad)} reads not bit-exact: {Counter(r.bad)}")
        if set(r.typed) - {"not_found", "bad_segment"}:
            problems.append(f"load: unexpected errors {dict(r.typed)}")
        if r.attaches + sum(r.typed.values()) != clients * cycles:
            problems.append(
                f"load: {clients * cycles - r.attaches - sum(r.typed.values())} attaches unaccounted for"
            )
        if r.left_mapped:
            problems.append(f"load: {r.left_mapped} mappings left after detach")
        if after["private_dirty"] - before["private_dirty"] > 4 * MIB:
            problems.append(
                f"load: daemon private dirty memory grew "
                f"{(after['private_dirty'] - before['private_dirty']) / MIB:.1f} MiB"
            )
        if sorted(listed) != ["a", "b", "c", "d", "lin"] or set(hostile.segments(d.instance)) != set(
            listed.values()
        ):
            problems.append(f"load: served {sorted(listed)}, segments {hostile.segments(d.instance)}")
    finally:
        finish(d, problems, "load")
    return {
        "clients": clients,
        "cycles": cycles,
        "seconds": r.seconds,
        "attaches": r.attaches,
        "modules": r.modules,
        "typed_errors": dict(r.typed),
        "per_model": dict(r.ok),
        "requests_per_s": r.rps,
        "p50_ms": r.pct(0.50) * 1e3,
        "p99_ms": r.pct(0.99) * 1e3,
        "max_ms": max(r.latencies) * 1e3 if r.latencies else None,
        "bad": len(r.bad),
        "untyped": len(r.untyped),
        "hung": len(r.hung),
        "during": r.during,
        "daemon_before": before,
        "daemon_after": after,
    }


# --- 2. fuzz -------------------------------------------------------------------------------------


def fuzz(tmp: Path, examples: int, problems: list[str]) -> dict:
    models = tmp / "fuzz-models"
    models.mkdir()
    good = hostile.write_model(models / "good.safetensors", seed=1)
    hostile.write_model(tmp / "outside.safetensors", seed=2)
    os.symlink(tmp / "outside.safetensors", models / "link.safetensors")
    (models / "trunc.safetensors").write_bytes((models / "good.safetensors").read_bytes()[:1000])
    d = new_daemon(
        tmp,
        ["--unlink-on-exit", "--model", f"good={models / 'good.safetensors'}", "--model-dir", str(models)],
    )
    stats = Counter()
    try:
        for _ in range(300):
            hostile.raw_request(d.socket, [b"w", b'{"v":1,"op":"manifest","name":"good"}'])
        before = hostile.daemon_memory(d.proc.pid)
        paths = [
            str(models / "good.safetensors"),
            str(models / "link.safetensors"),
            str(models / "trunc.safetensors"),
            str(models / ".." / "outside.safetensors"),
            str(tmp / "outside.safetensors"),
        ]
        t0 = time.perf_counter()
        try:
            hostile.fuzz(d.socket, paths, max_examples=examples, stats=stats)()
        except Exception as e:  # hypothesis re-raises the shrunk failing example
            problems.append(f"fuzz: {type(e).__name__}: {str(e)[:2000]}")
        seconds = time.perf_counter() - t0
        after = hostile.daemon_memory(d.proc.pid)
        if d.proc.poll() is not None:
            problems.append(f"fuzz: the daemon died ({d.proc.returncode})")
        elif hostile.digests(state_dict("good", socket=d.socket)) != good:
            problems.append("fuzz: good is not bit-exact afterwards")
        if after["private_dirty"] - before["private_dirty"] > 8 * MIB:
            problems.append(
                f"fuzz: daemon private dirty memory grew "
                f"{(after['private_dirty'] - before['private_dirty']) / MIB:.1f} MiB"
            )
        with Client(d.socket) as c:
            for m in c.list():
                if m["name"] != "good":
                    if hostile.digests(c.state_dict(m["name"])) != good:
                        problems.append(f"fuzz: model {m['name']} a fuzzed load made is not bit-exact")
                    c.unload(m["name"])
        internal = d.output().count("internal error")
        if internal:
            problems.append(f"fuzz: {internal} internal errors in the daemon's log")
    finally:
        finish(d, problems, "fuzz")
    return {
        "examples": examples,
        "messages": stats["messages"],
        "batches": stats["batches"],
        "seconds": seconds,
        "replies": {k: v for k, v in stats.items() if k not in ("messages", "batches")},
        "daemon_before": before,
        "daemon_after": after,
    }


# --- 3. corpus -----------------------------------------------------------------------------------


def corpus(tmp: Path, problems: list[str]) -> dict:
    marker = tmp / "PWNED"
    cases = hostile.build_corpus(tmp / "corpus", marker)
    good = hostile.write_model(tmp / "served.safetensors", seed=3)
    d = new_daemon(tmp, ["--unlink-on-exit", "--model", f"good={tmp / 'served.safetensors'}"])
    kinds = Counter()
    try:
        with Client(d.socket, timeout=60) as c:
            before = hostile.segments(d.instance)
            for case in cases:
                try:
                    c.load(str(case.path), "bad")
                    problems.append(f"corpus: {case.id} was accepted")
                    c.unload("bad")
                except CheckpointError as e:
                    if str(case.path) not in str(e) or not re.search(case.problem, str(e)):
                        problems.append(f"corpus: {case.id}: {e}")
                except Exception as e:
                    problems.append(f"corpus: {case.id}: {type(e).__name__}: {e}")
                kinds[case.path.suffix or "folder"] += 1
                if hostile.segments(d.instance) != before:
                    problems.append(f"corpus: {case.id} left a segment")
            if hostile.digests(c.state_dict("good")) != good or [m["name"] for m in c.list()] != ["good"]:
                problems.append("corpus: the served model was disturbed")
        if marker.exists():
            problems.append("corpus: a pickle ran code")
    finally:
        finish(d, problems, "corpus")
    return {"cases": len(cases), "by_kind": dict(kinds)}


# --- 4. kill -------------------------------------------------------------------------------------


def kill(tmp: Path, rounds: int, seed: int, problems: list[str]) -> dict:
    files = {
        "base": str(tmp / "base.safetensors"),
        "unload": str(tmp / "u.safetensors"),
        "big": str(tmp / "big.safetensors"),
        "publish_kib": 32 * 1024,
        "digests": {},
    }
    files["digests"]["base"] = hostile.write_model(Path(files["base"]), seed=21)
    files["digests"]["U"] = hostile.write_model(Path(files["unload"]), seed=22)
    files["digests"]["L"] = hostile.big_model(Path(files["big"]), 128)
    instance, sock = f"stress-kill-{uuid.uuid4().hex[:8]}", str(tmp / "kill.sock")
    started = []

    def start():
        started.append(hostile.Daemon(sock, instance, ["--log-level", "info"], str(tmp)).start())
        return started[-1]

    t0 = time.perf_counter()
    try:
        out = hostile.kill_sweep(start, files, rounds=rounds, rng=random.Random(seed), log=log)
        problems.extend(f"kill: {p}" for p in out["problems"])
        out["daemon"].stop()
        last = new_daemon(tmp, ["--unlink-on-exit"], instance=instance, sock=sock)
        finish(last, problems, "kill")
    finally:
        for d in started:
            if d.proc and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        if hostile.remove_segments(instance):
            problems.append("kill: segments left after the sweep")
    return {
        "rounds": rounds,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "tally": dict(out["tally"]),
        "windows_ms": {k: v * 1e3 for k, v in out["windows"].items()},
    }


# --- main ----------------------------------------------------------------------------------------


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    v = max(len(b) for _, b in rows)
    lines = [f"{'figure'.ljust(w)}  {'value'.rjust(v)}", f"{'-' * w}  {'-' * v}"]
    lines += [f"{a.ljust(w)}  {b.rjust(v)}" for a, b in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: small numbers everywhere")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--fuzz-examples", type=int, default=1500)
    ap.add_argument("--kill-rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if a.quick:
        a.clients, a.cycles, a.fuzz_examples, a.kill_rounds = 8, 20, 100, 3
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    tmp = Path(tempfile.mkdtemp(prefix="weightd-stress-"))
    problems: list[str] = []
    res = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "args": vars(a),
        "seed": seed,
    }
    t0 = time.perf_counter()
    try:
        log(f"load: {a.clients} clients x {a.cycles} attach/detach cycles ...")
        (tmp / "load").mkdir()
        res["load"] = load(tmp / "load", a.clients, a.cycles, problems)
        log(f"fuzz: {a.fuzz_examples} hypothesis examples on both sockets ...")
        res["fuzz"] = fuzz(tmp, a.fuzz_examples, problems)
        log("corpus: every corrupt checkpoint ...")
        res["corpus"] = corpus(tmp, problems)
        log(f"kill: {a.kill_rounds} SIGKILL rounds (seed {seed}) ...")
        res["kill"] = kill(tmp, a.kill_rounds, seed, problems)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    res["problems"] = problems
    L, F, C, K = res["load"], res["fuzz"], res["corpus"], res["kill"]
    typed = ", ".join(f"{k} {v}" for k, v in sorted(L["typed_errors"].items())) or "none"
    rows = [
        ("load: clients x attach/detach cycles", f"{L['clients']} x {L['cycles']}"),
        ("load: attaches (nn.Module ones)", f"{L['attaches']:,} ({L['modules']:,})"),
        ("load: typed errors (model loading/unloaded)", typed),
        ("load: untyped errors / hung / not bit-exact", f"{L['untyped']} / {L['hung']} / {L['bad']}"),
        ("load: requests per second", f"{L['requests_per_s']:,.0f}"),
        ("load: attach latency p50 / p99", f"{L['p50_ms']:.2f} / {L['p99_ms']:.2f} ms"),
        (
            "load: daemon Pss before -> after",
            f"{L['daemon_before']['pss'] / MIB:.1f} -> {L['daemon_after']['pss'] / MIB:.1f} MiB",
        ),
        (
            "load: daemon private before -> after",
            f"{L['daemon_before']['private'] / MIB:.1f} -> {L['daemon_after']['private'] / MIB:.1f} MiB",
        ),
        ("fuzz: hypothesis examples (messages)", f"{F['examples']:,} ({F['messages']:,})"),
        (
            "fuzz: typed error replies / ok replies",
            f"{sum(v for k, v in F['replies'].items() if k not in ('ok', 'oversized')):,} / "
            f"{F['replies'].get('ok', 0):,}",
        ),
        ("fuzz: oversized frames (peer dropped)", f"{F['replies'].get('oversized', 0):,}"),
        (
            "fuzz: daemon private before -> after",
            f"{F['daemon_before']['private'] / MIB:.1f} -> {F['daemon_after']['private'] / MIB:.1f} MiB",
        ),
        (
            "corpus: corrupt checkpoints refused",
            f"{C['cases']} ({', '.join(f'{k} {v}' for k, v in sorted(C['by_kind'].items()))})",
        ),
        (
            "kill: SIGKILL rounds (load/publish/unload)",
            f"{K['rounds']} ({K['tally'].get('load', 0)}/{K['tally'].get('publish', 0)}/"
            f"{K['tally'].get('unload', 0)})",
        ),
        ("kill: models checked bit-exact after restart", f"{K['tally'].get('models checked bit-exact', 0)}"),
        ("kill: unfinished segments swept at restart", f"{K['tally'].get('unfinished segments swept', 0)}"),
        ("problems", str(len(problems))),
        ("total time", f"{res['seconds']:.0f} s"),
    ]
    print()
    print(table(rows))
    for p in problems:
        print("PROBLEM:", p)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "stress.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwrote {OUT / 'stress.json'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

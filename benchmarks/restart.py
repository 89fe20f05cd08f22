"""Restart as systemd does it, serving while loading, and stops mid-load.

    python benchmarks/restart.py           # 2 x 2 GiB restart, 4 x 1 GiB serve-while-loading (~3 min)
    python benchmarks/restart.py --quick   # 2 x 256 MiB, 4 x 128 MiB (~40 s)

1. Restart with the models preloaded by ``--model`` (as the unit runs it: the same command line
   after a crash or a stop): a daemon loads two safetensors files (4 GiB), is stopped
   (SIGKILL or SIGTERM, alternating), and the same command starts again. Timed from ``Popen``
   until both models' ``state_dict`` return (markers checked), against an empty daemon (no
   ``--model``) from ``Popen`` to its first ping: the difference is what the restart costs beyond
   starting Python. Also timed: the same restart after the files were touched (new mtime:
   "changed"), which loads them again as new generations: what every restart cost before the
   manifest recorded its sources. /dev/shm bytes of the instance after each restart are
   recorded (one copy expected for the unchanged restart).

2. Serve while loading: a fresh daemon with four 1 GiB ``--model`` preloads. Timed from
   ``Popen``: first ping, first model attachable (``state_dict`` of the first, which waits for
   it), and all four attachable (what READY=1 tells systemd).

3. Stops: SIGTERM during a 2 GiB preload, from the signal to the process's exit (its
   half-written segment removed); and ``weightd load`` of a 2 GiB file when its daemon is
   SIGKILLed, from the kill to the command's exit with its error.

Writes benchmarks/out/restart.json and benchmarks/out/restart.png. Checkpoints are sparse files
(quick to make; the kernel still copies every page into /dev/shm). Every daemon is stopped and
every segment of its instances removed, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from weightd import segment
from weightd.bench import spawn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
GiB = 1 << 30
MiB = 1 << 20


def sparse_safetensors(path: Path, nbytes: int, marker: int) -> Path:
    """A safetensors file of one uint8 tensor, its first byte ``marker``, the rest a hole."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes([marker]))
        f.truncate(8 + len(header) + nbytes)
    return path


class Bench:
    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="wd-restart-"))
        self.daemons: list[spawn.Daemon] = []

    def daemon(self, what: str, models: dict[str, Path], *extra: str) -> spawn.Daemon:
        """The same command line every time for one ``what`` (socket and instance)."""
        args = ["--log-level", "info", *extra]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        d = spawn.Daemon(
            str(self.tmp / f"{what}.sock"),
            f"bench-restart-{os.getpid()}-{what}",
            args,
            log=self.tmp / f"{what}.log",
            die_with_parent=True,
        )
        self.daemons.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.daemons:
            d.stop(signal.SIGKILL)
        for d in self.daemons:
            d.remove_segments()
        shutil.rmtree(self.tmp, ignore_errors=True)


def shm_bytes(d: spawn.Daemon) -> int:
    total = 0
    for name in d.segments():
        try:
            total += os.stat(d.folder.file(name)).st_size
        except FileNotFoundError:
            pass
    return total


def attachable(sock: str, names: list[str], markers: list[int]) -> None:
    from weightd.client import Client

    with Client(sock, timeout=600) as c:
        got = [int(c.state_dict(n)["w"][0]) for n in names]
    if got != markers:
        raise RuntimeError(f"the models hold markers {got}, not {markers}")


def part_restart(b: Bench, args, res: dict) -> None:
    size = (256 * MiB) if args.quick else 2 * GiB
    names = ["alpha", "beta"]
    files = {n: sparse_safetensors(b.tmp / f"{n}.safetensors", size, k) for k, n in enumerate(names, 1)}
    d = b.daemon("models", files)
    d.start(timeout=600)
    rows = []
    for i in range(args.restarts * 2):
        sig = (signal.SIGKILL, signal.SIGTERM)[i % 2]
        e = b.daemon("empty", {})
        t0 = time.monotonic()
        e.start(until="ping")
        empty_s = time.monotonic() - t0
        e.stop()

        d.stop(sig)
        d = b.daemon("models", files)
        t0 = time.monotonic()
        d.start(until="ping")
        attachable(d.socket, names, [1, 2])
        serving_s = time.monotonic() - t0
        d.wait_ready()
        rows.append(
            {
                "signal": signal.Signals(sig).name,
                "empty_s": empty_s,
                "serving_s": serving_s,
                "shm_bytes": shm_bytes(d),
                "segments": len(d.segments()),
            }
        )
        print(
            f"  restart after {rows[-1]['signal']}: both attachable {serving_s:.3f} s, empty {empty_s:.3f} s",
            flush=True,
        )
    changed = []
    for _ in range(args.restarts):
        d.stop(signal.SIGKILL)
        for p in files.values():
            os.utime(p)  # changed: a new mtime
        d = b.daemon("models", files)
        t0 = time.monotonic()
        d.start(until="ping")
        attachable(d.socket, names, [1, 2])  # the adopted generations, served while the new ones load
        old_s = time.monotonic() - t0
        d.wait_ready()  # the new generations loaded
        changed.append(
            {"serving_s": time.monotonic() - t0, "old_serving_s": old_s, "shm_bytes_peak": shm_bytes(d)}
        )
        print(
            f"  restart with changed files: old generations attachable {old_s:.3f} s, new loaded "
            f"{changed[-1]['serving_s']:.3f} s",
            flush=True,
        )
    d.stop()
    d.remove_segments()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    res["restart"] = {
        "model_bytes": size * len(names),
        "rows": rows,
        "changed": changed,
        "empty_median_s": med(rows, "empty_s"),
        "unchanged_median_s": med(rows, "serving_s"),
        "changed_median_s": med(changed, "serving_s"),
        "changed_old_median_s": med(changed, "old_serving_s"),
        "changed_shm_bytes": max(r["shm_bytes_peak"] for r in changed),
        "unchanged_shm_bytes": max(r["shm_bytes"] for r in rows),
        "segments_after_restart": max(r["segments"] for r in rows),
    }


def part_serve_while_loading(b: Bench, args, res: dict) -> None:
    size = (128 * MiB) if args.quick else GiB
    names = [f"m{i}" for i in range(1, 5)]
    files = {n: sparse_safetensors(b.tmp / f"{n}.safetensors", size, k) for k, n in enumerate(names, 1)}
    rows = []
    for _ in range(args.restarts):
        d = b.daemon(f"fresh-{uuid.uuid4().hex[:6]}", files, "--unlink-on-exit")
        t0 = time.monotonic()
        d.start(until="ping")
        ping_s = time.monotonic() - t0
        attachable(d.socket, names[:1], [1])
        first_s = time.monotonic() - t0
        from weightd.client import Client

        with Client(d.socket) as c:
            still = sum(1 for m in c.list() if m["state"] == "loading")
        attachable(d.socket, names, [1, 2, 3, 4])
        all_s = time.monotonic() - t0
        d.stop()
        d.remove_segments()
        rows.append({"ping_s": ping_s, "first_s": first_s, "all_s": all_s, "still_loading_at_first": still})
        print(
            f"  4 models: ping {ping_s:.3f} s, first attachable {first_s:.3f} s ({still} still loading), "
            f"all {all_s:.3f} s",
            flush=True,
        )

    def med(key):
        return statistics.median(r[key] for r in rows)

    res["serve_while_loading"] = {
        "model_bytes": size,
        "models": len(names),
        "rows": rows,
        "ping_median_s": med("ping_s"),
        "first_median_s": med("first_s"),
        "all_median_s": med("all_s"),
    }


def part_stops(b: Bench, args, res: dict) -> None:
    from weightd.client import Client

    size = (512 * MiB) if args.quick else 2 * GiB
    big = sparse_safetensors(b.tmp / "big.safetensors", size, 1)

    def under_way(sock: str) -> bool:
        try:
            with Client(sock, timeout=2) as c:
                return any(m["state"] == "loading" and m["done"] > 0 for m in c.list())
        except Exception:
            return False

    def wait(pred, timeout=120):
        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("timed out")
            time.sleep(0.01)

    sigterm = []
    for _ in range(args.restarts):
        d = b.daemon(f"stop-{uuid.uuid4().hex[:6]}", {"big": big})
        d.start(until="ping")
        wait(lambda d=d: under_way(d.socket))
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(60)
        sigterm.append({"exit_s": time.monotonic() - t0, "left_segments": len(d.segments())})
        d.remove_segments()
        print(
            f"  SIGTERM during a {size / GiB:.1f} GiB preload: exit after "
            f"{sigterm[-1]['exit_s'] * 1e3:.0f} ms, "
            f"{sigterm[-1]['left_segments']} segments left",
            flush=True,
        )
    died = []
    for _ in range(args.restarts):
        d = b.daemon(f"die-{uuid.uuid4().hex[:6]}", {}, "--unlink-on-exit")
        d.start()
        cli = subprocess.Popen(
            [sys.executable, "-m", "weightd", "load", str(big), "--socket", d.socket],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait(lambda d=d: under_way(d.socket))
            d.proc.kill()
            t0 = time.monotonic()
            _, err = cli.communicate(timeout=60)
            died.append(
                {"exit_s": time.monotonic() - t0, "status": cli.returncode, "error": err.strip()[-200:]}
            )
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        d.stop()
        d.remove_segments()
        print(
            f"  weightd load, daemon SIGKILLed: exit {died[-1]['status']} after "
            f"{died[-1]['exit_s'] * 1e3:.0f} ms",
            flush=True,
        )
    res["stops"] = {
        "model_bytes": size,
        "sigterm": sigterm,
        "sigterm_median_s": statistics.median(r["exit_s"] for r in sigterm),
        "load_sees_death": died,
        "load_sees_death_median_s": statistics.median(r["exit_s"] for r in died),
    }


def report(res: dict) -> list[str]:
    r, s, st = res["restart"], res["serve_while_loading"], res["stops"]
    e, a = r["empty_median_s"], s["all_median_s"]
    lines = [
        f"restart with {r['model_bytes'] / GiB:.1f} GiB preloaded via --model (median of {len(r['rows'])}, "
        "from Popen):",
        f"  {'':44s} {'seconds':>9s} {'x empty':>8s} {'/dev/shm':>10s}",
        f"  {'empty daemon, first ping':44s} {e:9.3f} {1.0:8.2f} {'':>10s}",
        f"  {'restart, files unchanged: both attachable':44s} {r['unchanged_median_s']:9.3f} "
        f"{r['unchanged_median_s'] / e:8.2f} {r['unchanged_shm_bytes'] / GiB:8.2f} GiB",
        f"  {'restart, files changed: new ones loaded':44s} {r['changed_median_s']:9.3f} "
        f"{r['changed_median_s'] / e:8.2f} {r['changed_shm_bytes'] / GiB:8.2f} GiB",
        f"  {'  (old generations attachable meanwhile)':44s} {r['changed_old_median_s']:9.3f} "
        f"{r['changed_old_median_s'] / e:8.2f}",
        f"  unchanged restart beyond an empty start: {r['unchanged_median_s'] - e:+.3f} s; "
        f"{r['segments_after_restart']} segments for 2 models",
        "",
        f"serve while loading: {s['models']} x {s['model_bytes'] / GiB:.2f} GiB preloads, fresh start "
        f"(median of {len(s['rows'])}, from Popen):",
        f"  {'first ping':44s} {s['ping_median_s']:9.3f} {s['ping_median_s'] / a:8.2f} x all",
        f"  {'first model attachable':44s} {s['first_median_s']:9.3f} {s['first_median_s'] / a:8.2f} x all",
        f"  {'all four attachable (READY=1)':44s} {s['all_median_s']:9.3f} {1.0:8.2f} x all",
        "",
        f"stops ({st['model_bytes'] / GiB:.1f} GiB checkpoint, median of {len(st['sigterm'])}):",
        f"  {'SIGTERM during the preload -> exit':44s} {st['sigterm_median_s'] * 1e3:7.0f} ms "
        f"(segments left: {max(x['left_segments'] for x in st['sigterm'])})",
        f"  {'daemon SIGKILLed -> `weightd load` exits':44s} {st['load_sees_death_median_s'] * 1e3:7.0f} ms "
        f"(exit status {st['load_sees_death'][0]['status']})",
    ]
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, s, st = res["restart"], res["serve_while_loading"], res["stops"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        (
            ["empty daemon\n(ping)", "restart,\nunchanged", "restart,\nchanged files"],
            [r["empty_median_s"], r["unchanged_median_s"], r["changed_median_s"]],
            ["tab:gray", "tab:blue", "tab:orange"],
            "{:.2f} s",
            "s from Popen to both attachable (median)",
            f"restart with {r['model_bytes'] / GiB:.0f} GiB via --model",
        ),
        (
            ["first ping", "first of 4\nattachable", "all 4\n(READY=1)"],
            [s["ping_median_s"], s["first_median_s"], s["all_median_s"]],
            ["tab:gray", "tab:blue", "tab:blue"],
            "{:.2f} s",
            "s from Popen (median)",
            f"serve while loading: 4 x {s['model_bytes'] / GiB:.2f} GiB",
        ),
        (
            ["SIGTERM mid-preload\n-> exit", "daemon killed\n-> weightd load exits"],
            [st["sigterm_median_s"] * 1e3, st["load_sees_death_median_s"] * 1e3],
            ["tab:blue", "tab:blue"],
            "{:.0f} ms",
            "ms (median)",
            f"stops during a {st['model_bytes'] / GiB:.1f} GiB load",
        ),
    ]
    for ax, (labels, vals, colors, fmt, ylabel, title) in zip(axes, panels):
        ax.bar(labels, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, fewer repeats")
    ap.add_argument("--restarts", type=int, default=None, help="repeats per measurement [3; quick: 2]")
    args = ap.parse_args(argv)
    args.restarts = args.restarts or (2 if args.quick else 3)
    need = (4 if args.quick else 12) * GiB // (8 if args.quick else 1)
    if segment.Folder().free_bytes() < need:
        print(f"need {need / GiB:.1f} GiB free in /dev/shm", file=sys.stderr)
        return 2
    b = Bench()
    res: dict = {"quick": args.quick, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        print("1. restart with --model preloads", flush=True)
        part_restart(b, args, res)
        print("2. serve while loading", flush=True)
        part_serve_while_loading(b, args, res)
        print("3. stops mid-load", flush=True)
        part_stops(b, args, res)
    finally:
        b.cleanup()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "restart.json").write_text(json.dumps(res, indent=2))
    plot(res, OUT / "restart.png")
    print()
    print("\n".join(report(res)))
    print(f"\nwrote {OUT / 'restart.json'} and {OUT / 'restart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

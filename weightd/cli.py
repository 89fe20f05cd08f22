"""The ``weightd`` command. The only module that sees both the daemon and the client, and the
only place where typed errors become exit codes.

Every option is also an environment variable: ``WEIGHTD_<COMMAND>_<OPTION>``, OPTION being the
long option's name in capitals with dashes as underscores (``serve --model-dir`` is
``WEIGHTD_SERVE_MODEL_DIR``, ``ls --json`` is ``WEIGHTD_LS_JSON``), named by
``_name_environment_variables`` for every command at once. A few options read a shared
variable after their own: ``--socket`` then ``$WEIGHTD_SOCKET``; reload's ``--model`` and
``--factory`` then serve's (``$WEIGHTD_SERVE_MODEL``). In a variable of a repeatable option,
whitespace separates the values, quoted as a shell would (``shlex``):
``WEIGHTD_SERVE_MODEL="a=/m/a.safetensors 'b=/m/my model'"``; on the command line a value is
never split.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from datetime import datetime

import click

from weightd import __version__, protocol
from weightd.errors import DaemonNotRunning, WeightdError


def _fail(e: WeightdError) -> None:
    click.echo(f"weightd: error [{e.code}]: {e}", err=True)
    sys.exit(e.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WeightdError as e:
            _fail(e)


socket_option = click.option(
    "--socket",
    envvar=protocol.ENV_SOCKET,
    default=None,
    help="The daemon's socket [default: $WEIGHTD_SOCKET, /run/weightd/weightd.sock, "
    "$XDG_RUNTIME_DIR/weightd.sock, /tmp/weightd-$UID/weightd.sock].",
)


class ShellWords(click.ParamType):
    """A value of a repeatable option; in its environment variable, the values are separated by
    whitespace and quoted as in a shell (``shlex``), so a path may hold a space."""

    name = "TEXT"

    def split_envvar_value(self, rv: str) -> list[str]:
        try:
            return shlex.split(rv)
        except ValueError as e:  # an unclosed quote
            raise click.BadParameter(
                f"{rv!r}: {e}: quote each value as in a shell, e.g. 'a=/m/my model'"
            ) from None

    def convert(self, value, param, ctx):
        return str(value)


def models_option(help_text: str):
    """``--model [NAME=]PATH``, repeatable; reload reads serve's variable too."""
    return click.option(
        "--model",
        "models",
        multiple=True,
        type=ShellWords(),
        metavar="[NAME=]PATH",
        envvar="WEIGHTD_SERVE_MODEL",
        help=help_text,
    )


def factories_option(help_text: str | None = None):
    return click.option(
        "--factory",
        "factories",
        multiple=True,
        type=ShellWords(),
        metavar="NAME=MODULE:FUNCTION",
        envvar="WEIGHTD_SERVE_FACTORY",
        help=help_text,
    )


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


class SegmentMode(click.ParamType):
    """Octal permission bits for the segments: the owner (the daemon) reads and writes, nobody
    else may write (a writer would change the weights every attached worker runs)."""

    name = "MODE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            mode = value
        else:
            text = str(value).strip().lower().removeprefix("0o")
            try:
                mode = int(text, 8)
            except ValueError:
                self.fail(f"{value!r} is not an octal mode such as 640 (group reads) or 600", param, ctx)
        if not 0 <= mode <= 0o777:
            self.fail(f"{value!r} is not an octal mode such as 640 (group reads) or 600", param, ctx)
        if mode & 0o022:
            self.fail(
                f"{mode:o} lets other users write the segments, and with them the weights every attached "
                "worker runs: use 640 (the group reads) or 644 (everyone reads)",
                param,
                ctx,
            )
        if mode & 0o600 != 0o600:
            self.fail(
                f"{mode:o}: the daemon must read and write its own segments: use 6xx (640, 600)", param, ctx
            )
        return mode


class ByteCount(click.ParamType):
    """A positive number of bytes: 68719476736, or with a binary unit: 64G, 512M, 64GiB."""

    name = "BYTES"
    UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
            unit = text[-1:] if text[-1:] in self.UNITS else ""
            try:
                n = int(text[: len(text) - len(unit)]) * self.UNITS[unit]
            except ValueError:
                self.fail(f"{value!r} is not a number of bytes such as 68719476736 or 64G", param, ctx)
        if n <= 0:
            # 0 would refuse every load; "no budget" is leaving the option out
            self.fail(
                f"{value!r}: the budget must be at least 1 byte (such as 64G); leave --max-bytes out for "
                "none",
                param,
                ctx,
            )
        return n


class GroupId(click.ParamType):
    """A group by name or number."""

    name = "GROUP"

    def convert(self, value, param, ctx):
        import grp

        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            self.fail(
                f"no group named {value!r} on this machine: give an existing group's name or its gid",
                param,
                ctx,
            )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightd")
def main() -> None:
    """weightd: load model weights once per node into shared memory; attach zero-copy anywhere."""


@main.command()
@models_option(
    "A checkpoint to load at start: .safetensors, .pt/.pth/.bin or a Hugging Face folder. Repeatable; "
    "NAME defaults to the file or folder name less its extension (.safetensors, .pt, .pth, .bin)."
)
@factories_option(
    "How clients build model NAME's module when they attach without model=; for a Hugging Face folder, "
    "the class (package.module:Class) the daemon loads it with. Repeatable."
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=ShellWords(),
    metavar="NAME=BASE:PATH",
    help="A PEFT adapter folder to serve as NAME over the preloaded model BASE (attach it with "
    "hf.attach(BASE, adapter=NAME)). Repeatable.",
)
@socket_option
@click.option(
    "--instance",
    default=None,
    help="Segment names are weightd.INSTANCE.*  [default: a hash of the socket path]",
)
@click.option(
    "--mode",
    type=SegmentMode(),
    default="640",
    show_default=True,
    help="Permission bits (octal) of the segments, exactly (whatever the umask). Nobody but the daemon "
    "may write them: 640 lets the group read, 644 everyone.",
)
@click.option(
    "--group",
    type=GroupId(),
    default=None,
    help="Group (name or gid) that may attach: owns the segments and the read socket "
    "[default: the daemon's].",
)
@click.option(
    "--max-bytes",
    type=ByteCount(),
    default=None,
    help="Refuse loads that would take the models past this many bytes (or 512M, 64G, 1T). "
    "[default: no budget but the free space of /dev/shm]",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also accept whole pickled nn.Modules. Unpickling runs any code the file names: only for files you "
    "made yourself.",
)
@click.option(
    "--model-dir",
    "model_dirs",
    multiple=True,
    type=ShellWords(),
    metavar="DIR",
    help="Confine `weightd load` requests to checkpoints inside DIR (symlinks and '..' resolved). "
    "Repeatable. [default: any path the daemon can read]",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    type=ShellWords(),
    metavar="cuda:N",
    help="Also keep one copy of every model on this GPU, shared with clients through CUDA IPC. Repeatable.",
)
@click.option(
    "--unlink-on-exit",
    is_flag=True,
    help="Remove the segments when the daemon stops. By default they stay, and the next daemon on this "
    "socket adopts them at once instead of reloading.",
)
@click.option(
    "--metrics",
    default=None,
    metavar="ADDRESS",
    callback=lambda ctx, param, value: _metrics_address(value),
    help="Serve Prometheus metrics at PORT (on 127.0.0.1), HOST:PORT or unix:PATH. Read-only; shows "
    "what `ls` and `stats` show, without paths or pids. [default: off]",
)
@click.option(
    "--keep-going",
    is_flag=True,
    help="A preload that fails is logged and shown in `ls` as failed, and the other models are served. "
    "[default: the daemon stops, with the error's exit status; the systemd unit passes --keep-going]",
)
@click.option(
    "--check",
    is_flag=True,
    help="Load every --model, then exit: 0 if all are ready, else the first failure's exit status. The "
    "segments stay for the daemon that starts next to adopt (for CI, or a unit's ExecStartPre).",
)
@click.option(
    "--shm-dir",
    default=None,
    metavar="DIR",
    help="Keep segments in DIR, a tmpfs the clients see too: one mounted huge=always gives workers "
    "2 MiB pages (systemd/mnt-weightd.mount). Clients learn it from the daemon. [default: /dev/shm]",
)
@click.option(
    "--load-readers",
    type=click.IntRange(1, 64),
    default=None,
    help="Reader threads that stream checkpoints into segments (README: Loading). [default: 16]",
)
@click.option(
    "--load-chunk",
    type=ByteCount(),
    default=None,
    help="Bytes a reader copies at a time. [default: 8M]",
)
@click.option(
    "--load-direct",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="O_DIRECT reads: auto uses them for what is not in the page cache (measured faster on "
    "the development VM's disk); never reads through the page cache, with readahead (README: Loading).",
)
@click.option(
    "--load-parallel",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Loads of different models that may run side by side (models on different disks).",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.option(
    "--log-format",
    default="human",
    show_default=True,
    type=click.Choice(["human", "json"]),
    help="json: one JSON object per line (time, level, message, pid, model, generation), for journald "
    "and log shippers.",
)
def serve(
    models,
    factories,
    adapters,
    socket,
    instance,
    mode,
    group,
    max_bytes,
    allow_pickle,
    model_dirs,
    devices,
    unlink_on_exit,
    metrics,
    keep_going,
    check,
    shm_dir,
    load_readers,
    load_chunk,
    load_direct,
    load_parallel,
    log_level,
    log_format,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from weightd.daemon import logs
    from weightd.daemon.config import Config
    from weightd.daemon.server import Server

    logs.configure(log_level, log_format)
    specs = _model_specs(models, factories) + _adapter_specs(adapters)
    config = Config(
        models=specs,
        socket=socket,
        instance=instance,
        mode=mode,
        max_bytes=max_bytes,
        allow_pickle=allow_pickle,
        unlink_on_exit=unlink_on_exit,
        group=group,
        devices=list(devices),
        model_dirs=list(model_dirs),
        metrics=metrics,
        keep_going=keep_going,
        check=check,
        shm_dir=shm_dir,
        # the defaults are the daemon's own (weightd.daemon.stream): one number, in one place
        **({} if load_readers is None else {"load_readers": load_readers}),
        **({} if load_chunk is None else {"load_chunk": load_chunk}),
        load_direct=load_direct,
        load_parallel=load_parallel,
    )
    server = Server(config)
    server.run()
    if server.abandoned:
        # A load thread that never returned (Server.force_exit) would be joined at interpreter
        # exit, for ever: end here, the log flushed first.
        logging.shutdown()
        os._exit(1)


@main.command(name="ls")
@socket_option
@json_option
def ls(socket, as_json) -> None:
    """List the models the daemon serves.

    A model whose segment someone removed from /dev/shm is no longer served: the daemon drops
    it within a second or two, with a warning in its log (load it again to serve it).
    """
    models = _ask(socket, lambda c: c.list(), as_json)
    if models is None:
        return
    rows = [("NAME", "GEN", "SIZE", "TENSORS", "STATE", "LOADED", "RATE", "SOURCE")]
    failures = []
    for m in _adapters_under_bases(models):
        if m.get("state") == "loading":
            pct = 100 * m["done"] / m["total"] if m["total"] else 0
            rows.append(
                (m["name"], "-", _size(m["total"]), "-", f"loading {pct:.0f}%", "-", "-", m["source"])
            )
            continue
        if m.get("state") == "failed":
            rows.append((m["name"], "-", "-", "-", "failed", "-", "-", "-"))
            failures.append(f"{m['name']}: failed: [{m['error']['code']}] {m['error']['message']}")
            continue
        rows.append(
            (
                m.get("shown", m["name"]),
                str(m["generation"]),
                _size(m["nbytes"]),
                str(m["tensors"]),
                "ready (adopted)" if m.get("adopted") else "ready",
                _when(m["created"]),
                _rate(m.get("load")),
                m["source"],
            )
        )
    _table(rows)
    for line in failures:
        click.echo(line)


def _rate(load: dict | None) -> str:
    """How a model's bytes came in (weightd.daemon.stream.Report): rate, readers, path."""
    if not load:
        return "-"
    return f"{load['gbps']:.2f} GB/s, {load['readers']} readers, {load['path']}"


@main.command()
@socket_option
@json_option
def stats(socket, as_json) -> None:
    """Models, the processes attached to each and their memory, /dev/shm, and the daemon itself."""
    s = _ask(socket, lambda c: {k: v for k, v in c.stats().items() if k not in ("v", "ok")}, as_json)
    if s is None:
        return
    # Note [memory mapped by one process is not private]: a segment page only one process maps
    # is still shared memory (the next attach shares it); only pages it wrote are its own.
    rows = [("NAME", "GEN", "SIZE", "LOADED", "PID", "PSS", "MAPPED ALONE", "COPIED", "SEGMENT")]
    for m in s["models"]:
        gen = str(m["generation"]) + ("" if m["current"] else " (old)")
        rows.append((m["name"], gen, _size(m["nbytes"]), _when(m["created"]), "", "", "", "", m["segment"]))
        for a in m["attached"]:
            rows.append(
                (
                    *("", "", "", "", str(a["pid"])),
                    *(_size(a["shared"]), _size(a["mapped_alone"]), _size(a["copied"]), ""),
                )
            )
    for m in s["loading"]:
        rows.append((m["name"], "loading", _size(m["total"]), "", "", "", "", "", ""))
    for m in s.get("failed", []):
        rows.append((m["name"], "failed", "", "", "", "", "", "", ""))
    for r in s.get("publishing", []):
        rows.append(
            (
                r["name"],
                "publishing",
                _size(r["nbytes"]),
                _when(r["created"]),
                str(r["pid"] or "?"),
                "",
                "",
                "",
                r["segment"],
            )
        )
    _table(rows)
    if any(m["attached"] for m in s["models"]):
        click.echo(
            "PSS: the process's share of the segment's pages; MAPPED ALONE: pages of it no other process "
            "maps now (still shared memory); COPIED: pages it wrote, its own copies"
        )
    for m in s["models"]:
        adopted = " (adopted from the previous daemon)" if m.get("adopted") else ""
        load = m.get("load")
        how = f", {_size(load['bytes'])} in {load['seconds']:.2f} s, {_rate(load)}" if load else ""
        click.echo(f"{m['name']} generation {m['generation']}: from {m['source']}{adopted}{how}")
    for m in s.get("failed", []):
        click.echo(f"{m['name']}: failed: [{m['error']['code']}] {m['error']['message']}")
    for m in s["models"]:
        hidden = m.get("not_visible", {})
        parts = [
            _count(
                hidden.get("other_pid_namespace", 0),
                "process in another PID namespace",
                "processes in other PID namespaces",
            ),
            _count(hidden.get("unreadable", 0), "process of another user", "processes of other users"),
        ]
        parts = [p for p in parts if p]
        if parts:
            click.echo(
                f"{m['name']} generation {m['generation']}: also asked for by {' and '.join(parts)}, "
                "which the daemon cannot see: their memory is not counted above"
            )
    shm, d = s["shm"], s["daemon"]
    where = shm.get("directory", "/dev/shm")
    pages = sorted({m["page_size"] for m in s["models"] if m.get("page_size")})
    paged = f", segments on {' and '.join(_size(p) for p in pages)} pages" if pages else ""
    click.echo(
        f"{where}: {_size(shm['used'])} used of {_size(shm['size'])}, {_size(shm['free'])} free{paged}"
    )
    if shm.get("warning"):
        click.echo(f"weightd: warning: {shm['warning']}", err=True)
    click.echo(
        f"daemon: pid {d['pid']}, weightd {d['version']}, up {d['uptime']:.0f} s, Pss {_size(d['pss'])}, "
        f"{_size(d['mapped_alone'])} of it mapped by no other process"
    )


@main.command()
@click.argument("path")
@click.option(
    "--name",
    default=None,
    help="Model name [default: the file or folder name without its checkpoint extension].",
)
@click.option(
    "--factory",
    default=None,
    metavar="MODULE:FUNCTION",
    help="How clients build the module; for a Hugging Face folder, the class that loads it "
    "(package.module:Class).",
)
@click.option(
    "--base",
    default=None,
    metavar="NAME",
    help="PATH is a PEFT adapter folder: serve it over the loaded model NAME (checked against it).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the load may take; past them the daemon cancels it. [default: no limit]",
)
@socket_option
@json_option
def load(path, name, factory, base, timeout, socket, as_json) -> None:
    """Have the running daemon load PATH (a new generation if NAME is loaded).

    Exits at once with an error if the daemon stops or dies meanwhile.
    """
    from weightd.client.connection import Connection

    with Connection(socket, timeout=timeout) as c:
        if sys.stderr.isatty() and not as_json:
            with click.progressbar(length=1, label=f"loading {path}", file=sys.stderr) as bar:
                t0 = time.monotonic()

                def progress(done, total):
                    bar.length = max(total, 1)
                    rate = done / max(time.monotonic() - t0, 1e-6)
                    left = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
                    bar.label = f"loading {path} ({rate / 1e9:.2f} GB/s{left})"
                    bar.update(done - bar.pos)

                model = c.load(path, name, factory=factory, progress=progress, timeout=timeout, base=base)
        else:
            model = c.load(path, name, factory=factory, timeout=timeout, base=base)
    click.echo(
        json.dumps(model, indent=2)
        if as_json
        else f"loaded {model['name']} generation {model['generation']} ({_size(model['nbytes'])})"
    )


@main.command()
@click.argument("name")
@socket_option
@json_option
def unload(name, socket, as_json) -> None:
    """Remove model NAME; attached workers keep what they mapped."""
    from weightd.client.connection import Connection

    with Connection(socket) as c:
        model = c.unload(name)
    click.echo(
        json.dumps(model, indent=2)
        if as_json
        else f"cancelled the load of {model['name']}"
        if model.get("state") == "cancelled"
        else f"unloaded {model['name']} generation {model['generation']}"
    )


@main.command()
@models_option("The models serve would preload (default: $WEIGHTD_SERVE_MODEL, as for serve).")
@factories_option()
@socket_option
def reload(models, factories, socket) -> None:
    """Load the models of --model / $WEIGHTD_SERVE_MODEL that are new or whose files changed.

    What systemd's ExecReload runs after you add a model to the EnvironmentFile or rewrite a
    checkpoint. A model whose files are unchanged since its generation was loaded is left
    alone (and in use). Goes on past an entry that fails, reports each failure, and exits
    with the first failure's status.
    """
    from weightd.client.connection import Connection

    specs = _model_specs(models, factories)
    failures: list[WeightdError] = []
    with Connection(socket) as c:
        for spec in specs:
            name = spec.model_name
            try:
                model, reused = c.reload_one(spec.path, name, factory=spec.factory)
            except WeightdError as e:
                if isinstance(e, DaemonNotRunning):
                    raise
                click.echo(f"weightd: error [{e.code}]: {name}: {e}", err=True)
                failures.append(e)
                continue
            what = "unchanged" if reused else "loaded"
            click.echo(f"{what} {model['name']} generation {model['generation']} ({_size(model['nbytes'])})")
    if failures:
        click.echo(f"weightd: {len(failures)} of {len(specs)} models failed to load", err=True)
        sys.exit(failures[0].exit_code)


@main.command()
@socket_option
@click.option("--instance", default=None, help="[default: a hash of the socket path, as for serve]")
@click.option("--shm-dir", default=None, metavar="DIR", help="Where the daemon kept them (as for serve).")
def purge(socket, instance, shm_dir) -> None:
    """Free the memory of a stopped daemon: remove its instance's segments from /dev/shm.

    Refuses while a daemon answers on the socket (use `weightd unload` there). Workers still
    attached keep their mappings; the memory goes when they let go.
    """
    from weightd import segment
    from weightd.client.connection import Connection
    from weightd.daemon.config import Config
    from weightd.errors import AlreadyRunning, DaemonNotRunning, PermissionDenied

    config = Config(socket=socket, instance=instance, shm_dir=shm_dir)
    folder = segment.Folder.probe(config.shm_dir)
    try:
        with Connection(config.socket, timeout=2) as c:
            pid = c.ping()["pid"]
        raise AlreadyRunning(
            f"weightd is running on {config.socket} (pid {pid}): stop it first, or unload models there"
        )
    except DaemonNotRunning:
        pass
    # The daemon's user owns its lock file; segments of anyone else are not its.
    try:
        owner = os.lstat(config.socket + ".lock").st_uid
    except OSError:
        owner = os.geteuid()
    removed, planted, denied = segment.purge(folder, segment.prefix(config.instance), owner)
    for problem in planted:
        click.echo(f"weightd: warning: skipping a name others may have planted: {problem}", err=True)
    if denied:
        message = (
            f"{denied} segments of instance {config.instance} belong to uid {owner}, and you are uid "
            f"{os.geteuid()}: run purge as uid {owner} or root"
        )
        if not removed:
            raise PermissionDenied(message)
        click.echo(f"weightd: warning: {message}", err=True)
    names, freed = [n for n, _ in removed], sum(size for _, size in removed)
    click.echo(f"removed {len(names)} segments ({_size(freed)}) of instance {config.instance}")


@main.command()
@click.option("--workers", default=4, show_default=True, help="Worker processes to attach.")
@click.option("--size-mib", default=256, show_default=True, help="Size of the built-in demo model.")
def demo(workers, size_mib) -> None:
    """Build a model, serve it, attach from several workers, print memory and latency."""
    from weightd.bench.demo import run

    run(workers=workers, size_mib=size_mib)


def _metrics_address(value: str | None) -> str | None:
    if value is None:
        return None
    from weightd.daemon.metrics import parse_address

    try:
        return str(parse_address(value))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _model_specs(models, factories):
    from weightd.daemon.config import ModelSpec, check_unique_names

    specs = [ModelSpec.parse(m) for m in models]
    check_unique_names(specs)  # serve's Config checks again; reload has none
    by_name = {}
    for item in factories:
        name, sep, factory = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write NAME=package.module:function", param_hint="--factory")
        by_name[name] = factory
    for spec in specs:
        spec.factory = by_name.pop(spec.model_name, None)
    if by_name:
        raise click.BadParameter(f"no --model named {', '.join(by_name)}", param_hint="--factory")
    return specs


def _adapters_under_bases(models: list[dict]) -> list[dict]:
    """``ls``'s order: each model followed by the PEFT adapters over it (indented); adapters
    whose base is not served come last, saying so."""
    adapters = [m for m in models if m.get("base")]
    out, placed = [], set()
    for m in models:
        if m.get("base"):
            continue
        out.append(m)
        for a in adapters:
            if a["base"] == m["name"] and m.get("state", "ready") == "ready":
                out.append({**a, "shown": f"└─ {a['name']}"})
                placed.add(a["name"])
    out += [
        {**a, "shown": f"{a['name']} (adapter of {a['base']}, not served)"}
        for a in adapters
        if a["name"] not in placed
    ]
    return out


def _adapter_specs(adapters):
    """``--adapter NAME=BASE:PATH``: preloads after the models, in order, so their base is there."""
    from weightd.daemon.config import ModelSpec

    specs = []
    for item in adapters:
        name, sep, rest = item.partition("=")
        base, sep2, path = rest.partition(":")
        if not (sep and sep2 and name and base and path):
            raise click.BadParameter(f"{item!r}: write NAME=BASE:PATH", param_hint="--adapter")
        specs.append(ModelSpec(path=path, name=name, base=base))
    return specs


def _ask(socket, call, as_json: bool):
    """``call(client)`` on the daemon at ``socket``; with --json the answer is printed and this
    returns None, for the command to stop there."""
    from weightd.client.connection import Connection

    with Connection(socket) as c:
        answer = call(c)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return None
    return answer


def _count(n: int, one: str, many: str) -> str:
    return "" if not n else f"1 {one}" if n == 1 else f"{n} {many}"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


ENV_PREFIX = "WEIGHTD"


def environment_variable(command: str, option: click.Option) -> str:
    """``WEIGHTD_<COMMAND>_<OPTION>``: the long option's name in capitals, dashes as underscores."""
    long = max(option.opts, key=len).lstrip("-")
    return f"{ENV_PREFIX}_{command}_{long}".upper().replace("-", "_")


def _name_environment_variables(group: click.Group) -> None:
    """Give every option of every command its variable (README: the rule), then any shared one
    it read before (``$WEIGHTD_SOCKET``, serve's ``$WEIGHTD_SERVE_MODEL`` for reload)."""
    for command_name, command in group.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or not param.expose_value:
                continue
            shared = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            own = environment_variable(command_name, param)
            param.envvar = [own, *(v for v in shared if v != own)]
            param.show_envvar = True


_name_environment_variables(main)


if __name__ == "__main__":
    main()

"""The ``weightd`` command. The only module that sees both the daemon and the client, and the
only place where typed errors become exit codes.

Every option is also an environment variable: ``WEIGHTD_<COMMAND>_<OPTION>`` (click's
``auto_envvar_prefix``), e.g. ``WEIGHTD_SERVE_MODEL="a=/m/a.safetensors b=/m/b"``; the socket
is ``$WEIGHTD_SOCKET`` for every command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime

import click

from weightd import __version__, protocol
from weightd.errors import WeightdError


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
    help="The daemon's socket [default: $WEIGHTD_SOCKET, /run/weightd/weightd.sock, $XDG_RUNTIME_DIR/weightd.sock, /tmp/weightd-$UID/weightd.sock].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "WEIGHTD", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightd")
def main() -> None:
    """weightd: load model weights once per node into shared memory; attach zero-copy anywhere."""


@main.command()
@click.option("--model", "models", multiple=True, metavar="[NAME=]PATH", envvar="WEIGHTD_SERVE_MODEL",
              help="A checkpoint to load at start: .safetensors, .pt/.pth/.bin or a Hugging Face folder. Repeatable; NAME defaults to the file or folder stem.")
@click.option("--factory", "factories", multiple=True, metavar="NAME=MODULE:FUNCTION", envvar="WEIGHTD_SERVE_FACTORY",
              help="How clients build model NAME's module when they attach without model=. Repeatable.")
@socket_option
@click.option("--instance", default=None, help="Segment names are weightd.INSTANCE.*  [default: a hash of the socket path]")
@click.option("--mode", default="640", show_default=True, help="Permission bits (octal) of the segments.")
@click.option("--max-bytes", type=int, default=None, help="Refuse loads that would take the models past this many bytes.")
@click.option("--allow-pickle", is_flag=True,
              help="Also accept whole pickled nn.Modules. Unpickling runs any code the file names: only for files you made yourself.")
@click.option("--unlink-on-exit", is_flag=True,
              help="Remove the segments when the daemon stops. By default they stay, and the next daemon on this socket adopts them at once instead of reloading.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
def serve(models, factories, socket, instance, mode, max_bytes, allow_pickle, unlink_on_exit, log_level) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from weightd.config import Config, ModelSpec
    from weightd.server import Server
    from weightd.store import default_name

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s weightd[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    specs = [ModelSpec.parse(m) for text in models for m in text.split()]
    by_name = {}
    for text in factories:
        name, sep, factory = text.partition("=")
        if not sep:
            raise click.BadParameter(f"{text!r}: write NAME=package.module:function", param_hint="--factory")
        by_name[name] = factory
    for spec in specs:
        spec.factory = by_name.pop(spec.name or default_name(spec.path), None)
    if by_name:
        raise click.BadParameter(f"no --model named {', '.join(by_name)}", param_hint="--factory")
    config = Config(models=specs, socket=socket, instance=instance, mode=int(mode, 8), max_bytes=max_bytes,
                    allow_pickle=allow_pickle, unlink_on_exit=unlink_on_exit)
    Server(config).run()


@main.command(name="ls")
@socket_option
@json_option
def ls(socket, as_json) -> None:
    """List the models the daemon serves."""
    from weightd.client import Client

    with Client(socket) as c:
        models = c.list()
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    rows = [("NAME", "GEN", "SIZE", "TENSORS", "LOADED", "SEGMENT")]
    for m in models:
        loaded = datetime.fromtimestamp(m["created"]).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((m["name"], str(m["generation"]), _size(m["nbytes"]), str(m["tensors"]), loaded, m["segment"]))
    _table(rows)


@main.command()
@click.argument("path")
@click.option("--name", default=None, help="Model name [default: the file or folder stem].")
@click.option("--factory", default=None, metavar="MODULE:FUNCTION", help="How clients build the module.")
@socket_option
@json_option
def load(path, name, factory, socket, as_json) -> None:
    """Have the running daemon load PATH (a new generation if NAME is loaded)."""
    from weightd.client import Client

    with Client(socket) as c:
        model = c.load(path, name, factory=factory)
    click.echo(json.dumps(model, indent=2) if as_json else f"loaded {model['name']} generation {model['generation']} ({_size(model['nbytes'])})")


@main.command()
@click.argument("name")
@socket_option
@json_option
def unload(name, socket, as_json) -> None:
    """Remove model NAME; attached workers keep what they mapped."""
    from weightd.client import Client

    with Client(socket) as c:
        model = c.unload(name)
    click.echo(json.dumps(model, indent=2) if as_json else f"unloaded {model['name']} generation {model['generation']}")


@main.command()
@socket_option
@click.option("--instance", default=None, help="[default: a hash of the socket path, as for serve]")
def purge(socket, instance) -> None:
    """Free the memory of a stopped daemon: remove its instance's segments from /dev/shm.

    Refuses while a daemon answers on the socket (use `weightd unload` there). Workers still
    attached keep their mappings; the memory goes when they let go.
    """
    from weightd import segment
    from weightd.client import Client
    from weightd.config import Config
    from weightd.errors import AlreadyRunning, DaemonNotRunning

    config = Config(socket=socket, instance=instance)
    try:
        with Client(config.socket, timeout=2) as c:
            pid = c.ping()["pid"]
        raise AlreadyRunning(f"weightd is running on {config.socket} (pid {pid}): stop it first, or unload models there")
    except DaemonNotRunning:
        pass
    names = segment.list_segments(f"weightd.{config.instance}.")
    freed = 0
    for name in names:
        freed += os.stat("/dev/shm" + name).st_size
        segment.unlink(name)
    click.echo(f"removed {len(names)} segments ({_size(freed)}) of instance {config.instance}")


@main.command()
@click.option("--workers", default=4, show_default=True, help="Worker processes to attach.")
@click.option("--size-mib", default=256, show_default=True, help="Size of the built-in demo model.")
def demo(workers, size_mib) -> None:
    """Build a model, serve it, attach from several workers, print memory and latency."""
    from weightd.demo import run

    run(workers=workers, size_mib=size_mib)


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


if __name__ == "__main__":
    main()

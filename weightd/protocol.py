"""The wire protocol between clients and the daemon, shared by both sides.

A request is a ZeroMQ multipart message from a DEALER socket::

    [request-id, header]

``request-id`` is opaque bytes the reply echoes (at most 64 bytes), ``header`` is a UTF-8 JSON
object ``{"v": PROTOCOL_VERSION, "op": ..., ...fields}``. The ROUTER socket of the daemon sees
the peer's routing identity in front of those frames. A reply is ``[request-id, header]`` with
``{"v": ..., "ok": true, ...}`` or ``{"v": ..., "ok": false, "error": {"code", "message"}}``.

Replies carry names and metadata only; tensor bytes travel through shared memory. Nothing that
arrives on a socket is ever unpickled: JSON in, JSON out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from weightd import errors
from weightd.errors import ProtocolError, RequestTimeout

if TYPE_CHECKING:  # the daemon's sockets; a client passes its own DEALER (weightd.client.zmtp)
    import zmq

PROTOCOL_VERSION = 1

# The largest request the daemon accepts (ZMQ_MAXMSGSIZE): requests are a few hundred bytes,
# so anything near this is hostile or a bug, and ZeroMQ drops the peer before buffering it.
MAX_REQUEST_BYTES = 1 << 20
MAX_REQUEST_ID_BYTES = 64

# The one registry of operations: each op's name and who may call it. READ: anyone who can
# reach the read socket (an allow-list: any other op is refused there); ADMIN: changes what is
# loaded, served on the admin socket only. The daemon answers op X with ``Handlers.X`` (checked
# when it starts), the client calls it through ``Connection.call``; a new op is one line here.
READ, ADMIN = "read", "admin"
OPS: dict[str, str] = {
    "ping": READ,
    "list": READ,
    "stats": READ,
    "manifest": READ,
    "load": ADMIN,
    "loading": ADMIN,  # the manifest and watermark of a load still writing its segment (a peer copies it)
    "unload": ADMIN,
    "publish_begin": ADMIN,
    "publish_commit": ADMIN,
}
READ_OPS = frozenset(op for op, who in OPS.items() if who == READ)
ADMIN_OPS = frozenset(op for op, who in OPS.items() if who == ADMIN)

# A model name: 1-128 of these, the first a letter or digit. Sets, not a regular expression:
# compiling one is paid by every fresh worker (Note [what a fresh worker's import pays for]).
_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _NAME_FIRST | frozenset("._-")

ENV_SOCKET = "WEIGHTD_SOCKET"
SYSTEM_SOCKET = "/run/weightd/weightd.sock"


def default_socket() -> str:
    """Where clients and the daemon meet when no socket is named.

    In order: ``$WEIGHTD_SOCKET``; ``/run/weightd/weightd.sock`` when its directory exists (the
    systemd unit's ``RuntimeDirectory``); ``$XDG_RUNTIME_DIR/weightd.sock``; and
    ``/tmp/weightd-<uid>/weightd.sock``. One fixed path per node and user, so every process
    on the node finds the same daemon without configuration.
    """
    env = os.environ.get(ENV_SOCKET)
    if env:
        return env
    if Path(SYSTEM_SOCKET).parent.is_dir():
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return str(Path(runtime) / "weightd.sock")
    return f"/tmp/weightd-{os.getuid()}/weightd.sock"


def admin_socket(socket_path: str) -> str:
    """The admin socket beside a daemon's socket: ``weightd.sock`` -> ``weightd.admin.sock``."""
    base = socket_path[:-5] if socket_path.endswith(".sock") else socket_path
    return base + ".admin.sock"


def endpoint(socket_path: str) -> str:
    return f"ipc://{socket_path}"


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def request(op: str, **fields) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "op": op, **fields})


def ok(**fields) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "ok": True, **fields})


def error(err) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "ok": False, "error": err.to_wire()})


def decode(frame: bytes, what: str = "message") -> dict:
    """Parse one JSON header frame, refusing anything that is not a versioned JSON object."""
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"{what} header is not UTF-8 JSON ({e})") from None
    except RecursionError:
        raise ProtocolError(f"{what} header nests too deeply to be a weightd message") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} header must be a JSON object, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} speaks protocol version {version!r}, this side speaks {PROTOCOL_VERSION}: "
            "run the same weightd version in the daemon and the clients"
        )
    return obj


def field(obj: dict, key: str, kind: type | tuple, *, required: bool = True, default=None):
    """One typed field of a request; a wrong type is the sender's error, never a crash here."""
    if key not in obj or obj[key] is None:
        if required:
            raise ProtocolError(f"request is missing the field {key!r}")
        return default
    value = obj[key]
    # bool is an int in Python; a JSON true is never a valid generation number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    if isinstance(value, str):
        # Names, paths and segments: a NUL or a lone surrogate is never one, and would make
        # the OS calls that use the value raise where nobody expects it.
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ProtocolError(f"field {key!r} is not valid Unicode: {value!r:.80}") from None
        if "\x00" in value:
            raise ProtocolError(f"field {key!r} holds a NUL character: {value!r:.80}")
    return value


def is_name(name) -> bool:
    """Whether ``name`` is a model name both sides accept: 1-128 of ASCII letters, digits, '.',
    '_', '-', starting with a letter or digit."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 128
        and name[0] in _NAME_FIRST
        and _NAME_CHARS.issuperset(name)
    )


def check_name(name: str) -> str:
    """A model name both sides accept (``is_name``), or a ProtocolError."""
    if not is_name(name):
        raise ProtocolError(
            f"bad model name {name!r:.80}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --- the one request round trip ----------------------------------------------------------------

ALIVE_SECONDS = 0.5  # how often a caller waiting on a reply checks that the daemon is still there


def round_trip(
    sock: zmq.Socket,
    rid: bytes,
    op: str,
    fields: dict,
    *,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
    silent: Callable[[], None] | None = None,
    where: str = "the daemon",
    alive: Callable[[], None] | None = None,
) -> dict:
    """Send one request on a connected DEALER socket and return its reply's header.

    ``timeout`` bounds the silence between messages: a long load that keeps reporting progress
    (``progress(done, total)``) is not cut off. Replies to other request ids (late answers to
    requests that already timed out) are dropped. A reply with ``ok: false`` raises the typed
    error the daemon sent; silence raises ``RequestTimeout``, after ``silent()``, which may
    raise a more precise error (the daemon is gone). ``alive()``, called every
    ``ALIVE_SECONDS`` of silence, raises as soon as the daemon is seen to be gone (a long
    load waits no longer than that for a daemon that died).
    """
    sock.send_multipart([rid, request(op, **fields)])
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(min(remaining, ALIVE_SECONDS) * 1000):
            if time.monotonic() < deadline:
                if alive is not None:
                    alive()
                continue
            if silent is not None:
                silent()
            raise RequestTimeout(
                f"{where} did not answer {op!r} within {timeout:g} s: it may be busy; "
                "raise timeout= or $WEIGHTD_TIMEOUT"
            )
        frames = sock.recv_multipart()
        if len(frames) != 2 or frames[0] != rid:
            continue
        reply = decode(frames[1], "reply")
        if not reply.get("ok"):
            raise errors.from_wire(reply.get("error"))
        if "progress" in reply:
            if progress is not None:
                progress(int(reply["progress"]["done"]), int(reply["progress"]["total"]))
            deadline = time.monotonic() + timeout
            continue
        return reply

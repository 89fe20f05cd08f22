"""Request handlers: a decoded request in, a reply out.

``Handlers.handle(frames, peer)`` checks the frames, decodes the header, checks that the op may
be served on the socket it came in on (``protocol.OPS``, the one registry: its read ops are an
allow-list for the read socket; the admin socket serves every op), and calls the op's handler,
the method of the same name. Handlers return the
encoded reply, or None when the reply comes later (a load, answered by ``Loads.report``).
Every error becomes a typed error reply; a bug becomes an ``internal`` one, and the daemon
keeps serving.
"""

from __future__ import annotations

import logging
import os
import time

from weightd import __version__, memory, protocol, segment
from weightd.daemon import files
from weightd.daemon.config import Config, default_name
from weightd.daemon.endpoints import Peer
from weightd.daemon.loads import Loads
from weightd.daemon.store import Store
from weightd.errors import InternalError, ModelNotFound, PermissionDenied, ProtocolError, WeightdError

log = logging.getLogger("weightd")

MANIFEST_CACHE = 256  # encoded manifest replies kept (attach is the hot path)
UNSEEN_KEPT = 4096  # clients counted per generation that the daemon has no pid for


class Handlers:
    def __init__(self, config: Config, store: Store, loads: Loads, metrics=None):
        self.config = config
        self.store = store
        self.loads = loads
        self.started = time.time()
        self._manifest_replies: dict[tuple[str, int, bool], bytes] = {}
        self.metrics = metrics  # weightd.daemon.metrics.Metrics with serve --metrics: counts each request
        # Op X is answered by method X: the registry is protocol.OPS, and an op without its
        # handler is a bug caught here, at start-up, not by the first request for it.
        missing = [op for op in protocol.OPS if not callable(getattr(self, op, None))]
        if missing:
            raise TypeError(f"protocol.OPS names ops Handlers does not answer: {', '.join(missing)}")
        self._ops = {op: getattr(self, op) for op in protocol.OPS}

    def handle(self, frames: list[bytes], peer: Peer) -> bytes | None:
        """The reply to one request (``frames``: request id, header), or None if it comes later."""
        started = time.perf_counter()
        op, outcome = "invalid", "ok"  # the metrics' labels: a known op, and ok or the error's code
        try:
            if len(frames[0]) > protocol.MAX_REQUEST_ID_BYTES:
                raise ProtocolError(f"request id is longer than {protocol.MAX_REQUEST_ID_BYTES} bytes")
            if len(frames) != 2:
                raise ProtocolError(f"a request is [request-id, header]; got {len(frames) - 1} frames")
            req = protocol.decode(frames[1], "request")
            name = protocol.field(req, "op", str)
            handler = self._ops.get(name)
            if handler is None:
                raise ProtocolError(
                    f"unknown op {name!r:.40}; this daemon knows {', '.join(sorted(self._ops))}"
                )
            op = name
            if op not in protocol.READ_OPS and not peer.admin:
                raise PermissionDenied(
                    f"{op!r} changes what is loaded, so it is served on the admin socket "
                    f"{protocol.admin_socket(self.config.socket)} only: run it as the daemon's user or root"
                )
            reply = handler(req, peer)
        except WeightdError as e:
            outcome, reply = e.code, protocol.error(e)
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("internal error")
            err = InternalError(f"internal error in weightd: {type(e).__name__}: {e}")
            outcome, reply = err.code, protocol.error(err)
        if self.metrics is not None and reply is not None:  # a load is counted when it is answered
            self.metrics.request(op, outcome, time.perf_counter() - started)
        return reply

    # --- read ops ---

    def ping(self, req, peer) -> bytes:
        return protocol.ok(
            pid=os.getpid(),
            uid=os.geteuid(),  # what clients also learn from the kernel (SO_PEERCRED)
            version=__version__,
            instance=self.config.instance,
            socket=self.config.socket,
            uptime=time.time() - self.started,
            models=len(self.store.list()),
            # preloads not finished yet: READY=1 for systemd, and spawn.Daemon's wait, once 0
            preloading=self.preloading(),
        )

    def preloading(self) -> int:
        return self.loads.preloading()

    def list(self, req, peer) -> bytes:
        return protocol.ok(models=self.store.list() + self.loads.states())

    def stats(self, req, peer) -> bytes:
        models = []
        folder = self.store.folder
        where, asked = folder.path, folder.huge_asked
        small = 0  # segments that got 4 KiB pages
        for model in self.store.segments():
            entry = model.summary()
            entry["current"] = self.store.is_current(model)
            entry["page_size"] = model.manifest.page_size  # read back (Note [huge pages]); 0: unknown
            hf = (model.manifest.skeleton or {}).get("hf")
            if isinstance(hf, dict):  # the Hugging Face diagnostics, which attach replies leave out
                entry["hf"] = hf
            small += 0 < model.manifest.page_size < segment.HUGE_PAGE and model.size >= segment.HUGE_PAGE
            entry["attached"] = []
            unreadable = 0
            for pid in sorted(model.attached):
                use = memory.mapping_usage(pid, folder.file(model.manifest.segment))
                if use is not None:
                    entry["attached"].append(
                        {
                            "pid": pid,
                            "shared": use.pss,  # its share (Pss) of the segment's pages
                            "rss": use.rss,
                            # Note [memory mapped by one process is not private]: pages it wrote
                            # (its own copies), and shared pages no other process maps now.
                            "copied": use.anonymous,
                            "mapped_alone": max(use.private - use.anonymous, 0),
                            "huge": use.huge,  # of rss, on huge-page entries
                        }
                    )
                elif _unreadable(pid):
                    unreadable += 1
            # What the daemon cannot see: clients in a PID namespace it has no view into (the
            # kernel gives it no pid for them), and processes of other users whose memory maps
            # only root may read. Their mappings are not listed and their memory is not counted.
            entry["not_visible"] = {"other_pid_namespace": len(model.unseen), "unreadable": unreadable}
            models.append(entry)
        me = memory.usage()
        shm = dict(memory.shm_usage(where), directory=where, huge_pages_asked=asked)
        if asked and small:
            shm["warning"] = segment.huge_page_warning(where, asked)
        return protocol.ok(
            models=models,
            loading=[m for m in self.loads.states() if m["state"] == "loading"],
            failed=[m for m in self.loads.states() if m["state"] == "failed"],
            publishing=self.store.reservations(),
            shm=shm,
            daemon={
                "pid": os.getpid(),
                "rss": me.rss,
                "pss": me.pss,
                "mapped_alone": me.private,  # no other process maps it (heap, and any segment it alone maps)
                "uptime": time.time() - self.started,
                "version": __version__,
            },
        )

    def manifest(self, req, peer) -> bytes | None:
        name = protocol.field(req, "name", str)
        generation = protocol.field(req, "generation", int, required=False)
        announced = protocol.field(req, "pid", int, required=False)
        device = protocol.field(req, "device", str, required=False)
        # full: the whole manifest (origin, Hugging Face diagnostics), for a copy of the segment;
        # an attach gets what a client reads (Manifest.to_client_dict)
        full = protocol.field(req, "full", bool, required=False, default=False)
        # How long the caller waits for a model still loading (its own deadline, less a margin
        # for this answer to reach it); absent: answer at once.
        wait = protocol.field(req, "wait", (int, float), required=False, default=0)
        # The kernel's pid of the sender, in this daemon's namespace (a client in a container
        # announces its own namespace's pid); 0 when the daemon cannot see the sender at all.
        pid = (peer.pid or None) if announced is not None else None
        try:
            model = self.store.get(name, generation, pid)
        except ModelNotFound:
            if generation is not None:
                raise
            if self.loads.loading(name):
                if wait <= 0:
                    raise self.loads.still_loading(name) from None
                req = {k: v for k, v in req.items() if k != "wait"}
                self.loads.park(peer, name, min(float(wait), 3600.0), lambda: self.handle_parked(req, peer))
                return None  # answered by Loads.report once loaded, or at the deadline
            failed = self.loads.failed.get(name)
            if failed is not None:
                raise ModelNotFound(
                    f"model {name!r} failed to load: {failed['message']} (fix it, then `weightd load` or "
                    "`weightd reload`)"
                ) from None
            raise
        if announced is not None and not peer.pid and len(model.unseen) < UNSEEN_KEPT:
            model.unseen.add((peer.uid, announced))
        if device is not None and device in model.gpu:
            # Each export is counted by PyTorch, so it is made per request, never cached.
            return protocol.ok(
                size=model.size, manifest=model.manifest.to_client_dict(), cuda=model.gpu[device].export()
            )
        key = (name, model.manifest.generation, full)
        reply = self._manifest_replies.get(key)
        if reply is None:
            if len(self._manifest_replies) > MANIFEST_CACHE:
                self._manifest_replies.clear()
            m = model.manifest.to_dict() if full else model.manifest.to_client_dict()
            reply = protocol.ok(size=model.size, manifest=m)
            self._manifest_replies[key] = reply
        return reply

    def handle_parked(self, req: dict, peer) -> bytes:
        """The answer to a parked manifest request, now that its model's load ended."""
        try:
            reply = self.manifest(req, peer)
        except WeightdError as e:
            reply = protocol.error(e)
        return reply if reply is not None else protocol.error(self.loads.still_loading(req["name"]))

    # --- admin ops ---

    def load(self, req, peer) -> bytes | None:
        path = self._allowed(protocol.field(req, "path", str))
        name = protocol.check_name(protocol.field(req, "name", str, required=False) or default_name(path))
        factory = protocol.field(req, "factory", str, required=False)
        base = protocol.field(req, "base", str, required=False)  # a PEFT adapter over that model
        # reuse: a reload entry, which keeps the served generation if its source is unchanged
        # (Note [a preload is adopted, not reloaded] in store.py)
        reuse = protocol.field(req, "reuse", bool, required=False, default=False)
        # the requester's deadline for the whole load, in seconds from now: past it the load
        # is not started, or is cancelled
        deadline = protocol.field(req, "deadline", (int, float), required=False)
        if reuse and not self.loads.loading(name):
            same = self.store.unchanged(name, path, factory, base)
            if same is not None:
                return protocol.ok(model=same.summary(), reused=True)
        within = self.config.model_dirs or None
        self.loads.submit(
            peer,
            name,
            path,
            factory=factory,
            base=base,
            within=within,
            deadline=None if deadline is None else time.monotonic() + float(deadline),
            reuse=reuse,
        )
        return None  # answered by Loads.report: progress while it runs, then the result

    def loading(self, req, peer) -> bytes:
        """The whole manifest of the load of ``name`` that is writing its segment now, unsealed,
        and its watermark (``mark``: every byte of the data area below it is final), for a node
        that copies it while it streams (Note [the watermark] in weightd.segment)."""
        name = protocol.field(req, "name", str)
        found = self.store.streaming(name)
        if found is None:
            raise ModelNotFound(f"no load of {name!r} is writing its segment now")
        return protocol.ok(manifest=found[0].to_dict(), mark=found[1])

    def _allowed(self, path: str) -> str:
        """With --model-dir, a load request may only name a checkpoint inside those folders
        (and every file the load reads is checked again: a shard may be a symlink)."""
        if not self.config.model_dirs:
            return path
        return files.check_within(path, self.config.model_dirs)

    def unload(self, req, peer) -> bytes:
        name = protocol.field(req, "name", str)
        # A load of that name under way is stopped (its half-written segment removed), and
        # whatever generation is served goes too.
        stopped = self.loads.cancel_name(name, "the model was unloaded while it loaded")
        try:
            model = self.store.unload(name)
        except ModelNotFound:
            if not stopped:
                raise
            return protocol.ok(model={"name": name, "generation": None, "state": "cancelled"}, cancelled=True)
        return protocol.ok(model=model.summary(), cancelled=stopped)

    def publish_begin(self, req, peer) -> bytes:
        manifest, reused = self.store.begin_publish(
            protocol.field(req, "name", str),
            protocol.field(req, "nbytes", int),
            pid=peer.pid,
            # a peer fill: the source's layout digest and where the bytes come from (Publishes.begin)
            layout=protocol.field(req, "layout", str, required=False),
            via=protocol.field(req, "via", str, required=False),
        )
        return protocol.ok(
            segment=manifest.segment,
            directory=manifest.directory,
            # so the publisher rounds the segment to whole huge pages there (Folder.rounded_size)
            huge_pages_asked=self.store.folder.huge_asked,
            reuse=reused,  # the segment exists (a retired generation's pages): write it, not create it
            generation=manifest.generation,
            uuid=manifest.uuid,
            created=manifest.created,
            mode=self.store.mode,
            owner=[os.geteuid(), self.store.gid],
        )

    def publish_commit(self, req, peer) -> bytes:
        name = protocol.field(req, "segment", str)
        if protocol.field(req, "abort", bool, required=False, default=False):
            # the publisher gives up (a peer fill that cannot finish): nothing of it is served
            return protocol.ok(abandoned=self.store.abandon(name))
        model = self.store.commit(name)
        if self.metrics is not None:
            self.metrics.published(model.manifest.name)
        return protocol.ok(model=model.summary())


def _unreadable(pid: int) -> bool:
    """Whether ``pid`` runs but its memory maps are closed to this daemon (another user's)."""
    try:
        with open(f"/proc/{pid}/smaps"):
            return False
    except PermissionError:
        return True
    except OSError:
        return False

"""A model generation the daemon serves: its manifest, its segment's size, who asked for it,
its GPU copies and how it was loaded. The store keeps them (store.py), under its lock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from weightd.manifest import Manifest


@dataclass
class Model:
    manifest: Manifest
    size: int  # bytes of the segment
    attached: set[int] = field(default_factory=set)  # pids (in the daemon's namespace) that asked for it
    # (uid, pid it announced) of clients the daemon has no pid for: in a PID namespace it cannot
    # see into. Counted for `stats`; whether they still map the segment is unknowable here.
    unseen: set[tuple[int, int]] = field(default_factory=set)
    gpu: dict = field(default_factory=dict)  # GPU uuid -> weightd.daemon.gpu.GpuCopy (serve --device)
    touched: float = field(default_factory=time.monotonic)  # when it was last asked for or retired
    adopted: bool = False  # left by a previous daemon of this instance, served without a reload
    load: dict | None = (
        None  # how its bytes came in (weightd.daemon.stream.Report), when this daemon loaded it
    )

    def summary(self) -> dict:
        m = self.manifest
        return {
            "state": "ready",
            "adopted": self.adopted,
            "name": m.name,
            "generation": m.generation,
            "segment": m.segment,
            "nbytes": m.nbytes,
            "size": self.size,
            "tensors": len(m.tensors),
            "source": m.source,
            "format": m.format,
            "created": m.created,
            "load": self.load,
            **({"via": m.origin["via"]} if (m.origin or {}).get("via") else {}),
            # a PEFT adapter: the model it goes over (weightd/daemon/adapters.py)
            **({"base": m.skeleton["adapter"]["base"]} if "adapter" in (m.skeleton or {}) else {}),
        }

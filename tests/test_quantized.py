"""Quantized Hugging Face folders: served bit-exact with the packed weights shared, or refused.

Every folder is made by the libraries themselves: transformers' ``from_pretrained`` with a
``quantization_config`` (bitsandbytes 8-bit and 4-bit on its CPU backend, torchao int8
weight-only), then ``save_pretrained``; the GGUF file by the gguf package's own writer. A
served one must attach as ``from_pretrained(folder)`` gives it (the same layer and tensor
types, logits bit for bit) with the packed weights in shared memory; the others must be
refused with ``UnsupportedFormat`` naming the format, and nothing served.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from conftest import lazy_module  # noqa: E402

transformers = lazy_module("transformers")  # at first use: not at every xdist worker's collection
# module fixtures save and load real models, and workers import torch and transformers:
# minutes on a loaded machine
pytestmark = pytest.mark.timeout(600)

from weightd.client import Client, attach, info  # noqa: E402
from weightd.errors import CheckpointError, UnsupportedFormat  # noqa: E402

from conftest import Daemon, remove_segments  # noqa: E402

CONFIG = dict(
    vocab_size=128,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4]])


def quantization(kind: str):
    if kind == "bnb-4bit":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if kind == "bnb-8bit":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if kind == "torchao-int8":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    if kind == "torchao-int4":  # the int4 that runs on a CPU: one int4 value per int8 byte
        pytest.importorskip("torchao")
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return transformers.TorchAoConfig(
            IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        )
    raise AssertionError(kind)


SERVED = ["bnb-4bit", "bnb-8bit", "torchao-int8", "torchao-int4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for kind in SERVED:
        q = transformers.LlamaForCausalLM.from_pretrained(
            root / "base", quantization_config=quantization(kind), device_map="cpu"
        )
        q.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def daemon(folders, tmp_path_factory):
    instance = "t" + uuid.uuid4().hex[:10]
    sock = str(tmp_path_factory.mktemp("sock") / "weightd.sock")
    args = [a for name, f in folders.items() for a in ("--model", f"{name}={f}")]
    d = Daemon(sock, instance, args + ["--unlink-on-exit"]).start()
    yield d
    d.stop()
    assert not remove_segments(instance), "the daemon left segments behind"


@pytest.mark.parametrize("kind", SERVED)
def test_a_quantized_folder_attaches_as_from_pretrained(kind, folders, daemon):
    ref = transformers.LlamaForCausalLM.from_pretrained(folders[kind], device_map="cpu")
    model = attach(kind, socket=daemon.socket)
    assert type(model) is type(ref) and not model.training
    layers = [(n, type(m).__name__) for n, m in model.named_modules()]
    assert layers == [(n, type(m).__name__) for n, m in ref.named_modules()]
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k, v in ref_sd.items():
        assert type(sd[k]) is type(v) and sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)
        assert torch.equal(
            model.generate(TOKENS, max_new_tokens=5, do_sample=False),
            ref.generate(TOKENS, max_new_tokens=5, do_sample=False),
        )
    print(kind, "copies", info(model).copies)


@pytest.mark.parametrize("kind", SERVED)
def test_the_packed_weights_are_shared(kind, folders, daemon, workers):
    """Pss: the segment of a 4-bit model is about a quarter of the bf16 one's, and a worker
    holds its packed weights (and quantization state) in the segment, not in copies, also after
    a forward pass, except where the library itself repacks them for this CPU (bitsandbytes
    4-bit on CPUs with AVX512-BF16: at the first forward, as it does after from_pretrained)."""
    code = f"""
import json, os, torch
from weightd.client import attach, info, Client
from weightd.memory import mapping_usage
from conftest import mapped_ranges
m = attach({kind!r}, socket={daemon.socket!r}, populate=True)
seg = Client({daemon.socket!r}).manifest({kind!r}).segment.lstrip("/")
layer = m.model.layers[0].mlp.up_proj
def plain(w):
    if hasattr(w, "__tensor_flatten__"):  # torchao: the subclass's memory is its inner tensors
        return [getattr(w, a) for a in w.__tensor_flatten__()[0]]
    return [w.data] + ([w.quant_state.absmax] if hasattr(w, "quant_state") else [])
held = plain(layer.weight)
def shared():
    ranges = [(lo, hi) for lo, hi, _ in mapped_ranges()]
    return all(any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges) for t in held)
before = shared()
with torch.no_grad():
    m(torch.tensor({TOKENS.tolist()}))
held = plain(layer.weight)
u = mapping_usage(os.getpid(), seg)
repacks = bool(getattr(layer, "support_avx512bf16_for_cpu", False)) and {kind!r} == "bnb-4bit"
print(json.dumps({{"before": before, "after": shared(), "copies": info(m).copies, "rss": u.rss,
    "repacks": repacks}}), flush=True)
"""
    got = workers(code).read()
    assert got["copies"] == 0 and got["before"], got
    assert got["after"] or got["repacks"], got
    sizes = {m["name"]: m["nbytes"] for m in Client(daemon.socket).list()}
    ratio = sizes[kind] / sizes["base"]
    print(kind, "segment over the bf16 one", round(ratio, 3), got)
    # torchao's CPU int4 (IntxUnpackedToInt8Tensor) keeps each int4 value in a byte: half of bf16
    assert ratio < {"bnb-4bit": 0.35, "bnb-8bit": 0.6, "torchao-int8": 0.6, "torchao-int4": 0.6}[kind], ratio
    # populate=True: every page of the segment mapped, in shared memory (Rss: Pss would also
    # depend on which other processes map the segment at that moment)
    assert got["rss"] >= 0.9 * sizes[kind]


def test_gguf_is_refused_naming_the_format(tmp_path, daemon):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.randn(16, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with Client(daemon.socket) as c:
        with pytest.raises(UnsupportedFormat, match="GGUF.*dequantiz"):
            c.load(str(path), "tiny")
        assert "tiny" not in {m["name"] for m in c.list()}


@pytest.mark.parametrize(
    "method, why",
    [("fp8", "needs a GPU"), ("compressed-tensors", "compressed modules"), ("gptq", "GPU kernel")],
)
def test_formats_not_served_are_refused_before_loading(method, why, folders, tmp_path, daemon):
    """A folder whose config names a quantization weightd does not serve: refused, typed, naming
    the format and the reason, before transformers reads a byte (the config alone decides)."""
    import json
    import shutil

    folder = tmp_path / method
    shutil.copytree(folders["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (folder / "config.json").write_text(json.dumps(config))
    with Client(daemon.socket) as c:
        with pytest.raises(UnsupportedFormat, match=f"a {method} quantized checkpoint.*{why}") as e:
            c.load(str(folder), method)
        assert isinstance(e.value, CheckpointError) and e.value.code == "unsupported_format"
        assert method not in {m["name"] for m in c.list()}

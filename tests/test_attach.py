"""Attach and state_dict against a real daemon: formats, dtypes, layout, modules, no copies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weightd.client import AttachError, attach, detach, info, state_dict
from weightd.manifest import DTYPE_SIZES

from conftest import mapped_ranges, module_daemon, own_model
from models import TinyLM, build_tiny, trained_tiny


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in DTYPE_SIZES:
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        raw = torch.randint(0, 256, (7, 5 * dtype.itemsize), dtype=torch.uint8, generator=g)
        out[name] = (
            raw.view(dtype) if name != "bool" else raw.view(torch.bool).clone().fill_(True) & (raw % 2 == 0)
        )
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the tests that need only a model of their own in it (``loaded``): a daemon
    that reads a torch.save checkpoint imports torch (~2 s of CPU), once here, not once a test."""
    with module_daemon(tmp_path_factory) as d:
        yield d


@pytest.fixture
def loaded(shared, request):
    """``loaded(path)``: the checkpoint loaded in the module's daemon under this test's own model
    name; returns (the daemon, that name). Unloaded when the test ends."""
    with own_model(shared, request) as name:

        def load(path):
            with shared.client(timeout=120) as c:
                c.load(str(path), name)
            return shared, name

        yield load


def test_every_dtype_round_trips_bit_exact_from_pt(tmp_path, loaded):
    tensors = all_dtypes()
    torch.save(tensors, tmp_path / "all.pt")
    d, name = loaded(tmp_path / "all.pt")
    sd = state_dict(name, socket=d.socket)
    assert sorted(sd) == sorted(tensors)
    for k, t in tensors.items():
        assert same_bytes(sd[k], t), k


def test_safetensors_dtypes_round_trip_bit_exact(tmp_path, make_daemon):
    # Every dtype the safetensors format can hold (it has no complex128, uint64 in old versions...)
    names = [
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
        "uint16",
        "uint32",
        "uint64",
    ]
    tensors = {k: v for k, v in all_dtypes().items() if k in names}
    save_file(tensors, tmp_path / "st.safetensors")
    d = make_daemon("--model", str(tmp_path / "st.safetensors"))  # name defaults to the stem
    sd = state_dict("st", socket=d.socket)
    for k, t in tensors.items():
        assert same_bytes(sd[k], t), k


def test_sharded_safetensors_with_index(tmp_path, make_daemon):
    m = trained_tiny()
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "head.weight"}
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    d = make_daemon("--model", f"lm={tmp_path}")
    model = attach("lm", model=build_tiny, socket=d.socket)
    assert model.head.weight is model.embed.weight
    ids = torch.arange(10)
    assert torch.equal(model(ids), m(ids))


def test_tied_weights_views_and_slices_keep_their_storage(tmp_path, loaded):
    base = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    views = {"base": base, "rows": base[2:5], "t": base.t(), "col": base[:, 3], "also_base": base}
    torch.save(views, tmp_path / "v.pt")
    d, name = loaded(tmp_path / "v.pt")
    sd = state_dict(name, socket=d.socket)
    ptrs = {k: t.untyped_storage().data_ptr() for k, t in sd.items()}
    assert len(set(ptrs.values())) == 1, "all five share one storage"
    for k, t in views.items():
        assert sd[k].storage_offset() == t.storage_offset(), k
        assert sd[k].stride() == t.stride(), k
        assert torch.equal(sd[k], t), k
    # ...and that storage is in the segment once
    with d.client() as c:
        assert next(m for m in c.list() if m["name"] == name)["nbytes"] == base.numel() * 4


def test_attached_module_is_zero_copy_tied_and_complete(tmp_path, loaded):
    src = trained_tiny()
    torch.save(src.state_dict(), tmp_path / "lm.pt")  # head.weight and embed.weight share a storage
    d, name = loaded(tmp_path / "lm.pt")
    model = attach(name, model=build_tiny, socket=d.socket)

    assert model.head.weight is model.embed.weight
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in model.parameters())
    assert "inv_freq" not in model.state_dict() and torch.equal(model.inv_freq, src.inv_freq)
    assert model.scale.item() == 0.25
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.arange(20) % 64
    assert torch.equal(model(ids), src(ids))

    # No weight is copied: every persistent tensor lies inside a mapping of the segment, as the
    # kernel (not weightd) reports it in /proc/self/maps.
    a = info(model)
    assert a.copies == 0 and a.name == name and a.generation == 1
    ranges = [(lo, hi) for lo, hi, path in mapped_ranges() if a.segment.lstrip("/") in path]
    assert ranges, "the segment is mapped"
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        assert any(lo <= ptr and ptr + t.numel() * t.element_size() <= hi for lo, hi in ranges), name


def test_requires_grad_on_request_and_fine_tuning_stays_private(tmp_path, loaded):
    torch.save(trained_tiny().state_dict(), tmp_path / "lm.pt")
    d, name = loaded(tmp_path / "lm.pt")
    model = attach(name, model=build_tiny, socket=d.socket, requires_grad=True)
    assert all(p.requires_grad for p in model.parameters())
    before = state_dict(name, socket=d.socket)["blocks.0.1.weight"].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.arange(8)).sum().backward()
    opt.step()
    assert not torch.equal(model.blocks[0][1].weight, before)
    assert torch.equal(state_dict(name, socket=d.socket)["blocks.0.1.weight"], before)


def test_module_given_as_instance_on_cpu_or_meta(tmp_path, loaded):
    src = trained_tiny()
    torch.save(src.state_dict(), tmp_path / "lm.pt")
    d, name = loaded(tmp_path / "lm.pt")
    on_cpu = attach(name, model=TinyLM(), socket=d.socket)
    assert torch.equal(on_cpu.blocks[1][1].bias, src.blocks[1][1].bias) and info(on_cpu).copies == 0
    with torch.device("meta"):
        on_meta = TinyLM()
    # built on meta, its non-persistent buffer has no value anywhere: a clear error, not a meta tensor
    with pytest.raises(AttachError, match="inv_freq"):
        attach(name, model=on_meta, socket=d.socket)


def test_factory_given_at_load_time_builds_the_skeleton(tmp_path, make_daemon):
    src = trained_tiny()
    torch.save(src.state_dict(), tmp_path / "lm.pt")
    d = make_daemon("--model", f"lm={tmp_path / 'lm.pt'}", "--factory", "lm=models:build_tiny")
    model = attach("lm", socket=d.socket)
    assert isinstance(model, TinyLM) and model.head.weight is model.embed.weight
    assert torch.equal(model(torch.arange(5)), src(torch.arange(5)))


def test_no_skeleton_is_a_clear_error(tmp_path, loaded):
    torch.save(trained_tiny().state_dict(), tmp_path / "lm.pt")
    d, name = loaded(tmp_path / "lm.pt")
    with pytest.raises(AttachError, match="pass model="):
        attach(name, socket=d.socket)


def test_wrong_skeleton_names_the_keys(tmp_path, loaded):
    torch.save(trained_tiny().state_dict(), tmp_path / "lm.pt")
    d, name = loaded(tmp_path / "lm.pt")
    with pytest.raises(AttachError, match="no place in the module"):
        attach(name, model=lambda: nn.Linear(3, 3), socket=d.socket)
    partial = attach(
        name, model=lambda: nn.ModuleDict({"embed": nn.Embedding(64, 32)}), socket=d.socket, strict=False
    )
    assert partial["embed"].weight.shape == (64, 32)


def test_huggingface_folder_builds_from_config(tmp_path, make_daemon):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    src = transformers.GPT2LMHeadModel(cfg).eval()
    src.save_pretrained(tmp_path / "gpt2-tiny")  # safetensors, lm_head dropped as tied
    d = make_daemon("--model", str(tmp_path / "gpt2-tiny"))
    model = attach("gpt2-tiny", socket=d.socket).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, src(ids).logits)
    assert info(model).copies == 0


def test_detach_lets_go_of_the_mapping_and_keeps_the_structure(tmp_path, loaded):
    torch.save(trained_tiny().state_dict(), tmp_path / "lm.pt")
    d, name = loaded(tmp_path / "lm.pt")
    model = attach(name, model=build_tiny, socket=d.socket)
    segment = info(model).segment.lstrip("/")
    assert any(segment in path for _, _, path in mapped_ranges())
    detach(model)
    import gc

    gc.collect()
    assert not any(segment in path for _, _, path in mapped_ranges()), "unmapped with the last tensor"
    assert model.head.weight is model.embed.weight and model.head.weight.is_meta
    assert info(model) is None
    again = attach(name, model=model, socket=d.socket)  # the same skeleton, attached again
    assert again is model and not model.embed.weight.is_meta

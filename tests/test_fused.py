"""Note [fused tensors are file ranges] (weightd/daemon/fused.py), in this process: the ranges
guessed for a real MoE folder are the bytes from_pretrained fuses, and the comparison that decides
whether they are served says no to a single byte changed."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import ARCHS, save  # noqa: E402

from weightd.daemon import fused, loader  # noqa: E402


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_the_guess_is_what_from_pretrained_fuses(name, tmp_path):
    folder = save(name, tmp_path / name)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    _, meta, meta_model = loader._implied(torch, transformers, cls, config)
    guess = fused.likely(meta_model, meta, loader._headers(str(folder), weights), None)
    model = cls.from_pretrained(folder)
    state = model.state_dict()
    converted = [k for k in state if ".experts." in k and "proj" in k]
    assert converted and sorted(guess) == sorted(converted)
    fds = [os.open(folder / w, os.O_RDONLY) for w in weights]
    files = fused.Files(fds, guess)
    try:
        for key in converted:
            t = state[key].contiguous()
            itemsize, parts = guess[key]
            assert itemsize == t.element_size() and sum(p[2] for p in parts) == t.nbytes
            assert files.same(t.data_ptr(), parts)
            changed = t.clone()
            changed.view(-1)[t.numel() // 2] += 1  # one element in the middle
            assert not files.same(changed.data_ptr(), parts)
            assert not files.same(t.data_ptr(), list(reversed(parts)))  # the order matters
    finally:
        files.close()
        for fd in fds:
            os.close(fd)


def test_a_cast_on_load_is_not_guessed(tmp_path):
    folder = save("mixtral", tmp_path / "mixtral")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    _, meta, meta_model = loader._implied(torch, transformers, transformers.MixtralForCausalLM, config)
    headers = loader._headers(str(folder), weights)
    assert fused.likely(meta_model, meta, headers, None)
    assert not fused.likely(meta_model, meta, headers, "bfloat16")  # the files are float32


def test_bf16_experts_come_from_the_files_and_a_cast_does_not(make_daemon, tmp_path):
    """What MoE checkpoints ship in: bf16, the config saying so. Its experts are copied from the
    files; the same files under a config that asks for float32 are cast, so they go through the
    loader's memfd. Both attach as from_pretrained gives them."""
    import json

    from conftest import hf_diagnostics

    torch.manual_seed(1)
    config = transformers.MixtralConfig(**ARCHS["mixtral"][2], dtype="bfloat16")
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16").rename(tmp_path / "cast")
    transformers.MixtralForCausalLM.from_pretrained(tmp_path / "cast").save_pretrained(tmp_path / "bf16")
    raw = json.loads((tmp_path / "cast" / "config.json").read_text())
    (tmp_path / "cast" / "config.json").write_text(json.dumps(dict(raw, dtype="float32")))
    d = make_daemon("--model", f"bf16={tmp_path / 'bf16'}", "--model", f"cast={tmp_path / 'cast'}")
    for name, dtype, from_files in (("bf16", torch.bfloat16, True), ("cast", torch.float32, False)):
        expected = transformers.MixtralForCausalLM.from_pretrained(tmp_path / name).state_dict()
        with d.client() as c:
            got = c.state_dict(name)
            assert set(got) == set(expected)
            for k, v in expected.items():
                assert got[k].dtype == v.dtype == dtype and torch.equal(got[k], v), k
            del got
        meta = hf_diagnostics(d, name)
        assert meta["converted_bytes"] > 0
        assert meta["fused_from_files"] == (meta["converted_bytes"] if from_files else 0), name

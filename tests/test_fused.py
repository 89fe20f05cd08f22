"""Note [fused tensors are file ranges] (weightd/daemon/fused.py), in this process: the ranges
guessed for a real MoE folder are the bytes from_pretrained fuses, and the comparison that decides
whether they are served says no to a single byte changed."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import save  # noqa: E402

from weightd.daemon import fused, loader  # noqa: E402


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_the_guess_is_what_from_pretrained_fuses(name, tmp_path):
    folder = save(name, tmp_path / name)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    _, _, meta_model = loader._implied(torch, transformers, cls, config)
    guess = fused.likely(transformers, meta_model, loader._headers(str(folder), weights), None)
    model = cls.from_pretrained(folder)
    state = model.state_dict()
    converted = [k for k in state if ".experts." in k and "proj" in k]
    assert converted and sorted(guess) == sorted(converted)
    fds = [os.open(folder / w, os.O_RDONLY) for w in weights]
    try:
        for key in converted:
            t = state[key].contiguous()
            itemsize, parts = guess[key]
            assert itemsize == t.element_size() and sum(p[2] for p in parts) == t.nbytes
            assert fused.same(t.data_ptr(), parts, fds)
            changed = t.clone()
            changed.view(-1)[t.numel() // 2] += 1  # one element in the middle
            assert not fused.same(changed.data_ptr(), parts, fds)
            assert not fused.same(t.data_ptr(), list(reversed(parts)), fds)  # the order matters
    finally:
        for fd in fds:
            os.close(fd)


def test_a_cast_on_load_is_not_guessed(tmp_path):
    folder = save("mixtral", tmp_path / "mixtral")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    _, _, meta_model = loader._implied(torch, transformers, transformers.MixtralForCausalLM, config)
    headers = loader._headers(str(folder), weights)
    assert fused.likely(transformers, meta_model, headers, None)
    assert not fused.likely(transformers, meta_model, headers, "bfloat16")  # the files are float32

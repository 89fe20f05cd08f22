"""Note [fused tensors are file ranges] (weightd/daemon/fused.py), in this process: the ranges
guessed for a real MoE folder are the bytes from_pretrained fuses, and the comparison that decides
whether they are served says no to a single byte changed."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import ARCHS, TEXT, save  # noqa: E402

from weightd.daemon import fused, loader  # noqa: E402


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_the_guess_is_what_from_pretrained_fuses(name, tmp_path):
    folder = save(name, tmp_path / name)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    _, meta, meta_model = loader._implied(torch, transformers, cls, config)
    headers = loader._headers(str(folder), weights)
    guess = fused.likely(fused.names(meta_model, meta, headers), meta, headers, None)
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
    named = fused.names(meta_model, meta, headers)
    assert fused.likely(named, meta, headers, None)
    assert not fused.likely(named, meta, headers, "bfloat16")  # the files are float32


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
        assert meta["fusion_skipped"] == meta["fused_from_files"], name  # Note [the fusion not computed]


def _guessed(folder):
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    _, meta, meta_model = loader._implied(torch, transformers, cls, config)
    fds = [os.open(folder / w, os.O_RDONLY) for w in weights]
    headers = loader._headers(str(folder), weights)
    return cls, fds, fused.likely(fused.names(meta_model, meta, headers), meta, headers, None)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_the_fusion_is_not_computed_where_the_guess_is_what_transformers_collected(name, tmp_path):
    """Note [the fusion not computed]: with the ranges transformers collected for a target
    guessed right, the target holds a stand-in (its bytes are the ranges'); a guess that is not
    what transformers collected (one reversed) is computed by transformers as without the wrapper;
    and a stand-in transformers replaced afterwards is seen."""
    from transformers.core_model_loading import WeightConverter

    folder = save(name, tmp_path / name)
    cls, fds, guess = _guessed(folder)
    wrong = sorted(guess)[0]
    guesses = dict(guess, **{wrong: [guess[wrong][0], list(reversed(guess[wrong][1]))]})
    reference = cls.from_pretrained(folder).state_dict()
    original = WeightConverter.convert
    files = fused.Files(fds, guess)
    try:
        unfused = fused.Unfused(guesses, loader._Locate(fds))
        with unfused:
            model = cls.from_pretrained(folder)
        assert WeightConverter.convert is original
        state = model.state_dict()
        held, whole = unfused.placed(state)
        assert whole and held == set(guess) - {wrong}
        for k, t in state.items():
            assert t.shape == reference[k].shape and t.dtype == reference[k].dtype, k
            if k not in held:  # (a stand-in is never read: PROT_NONE)
                assert torch.equal(t, reference[k]), k
            else:  # what it stands for: the ranges, which are what from_pretrained fuses
                assert files.same(reference[k].contiguous().data_ptr(), guess[k][1]), k
        module, _, attr = sorted(held)[0].rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(reference[sorted(held)[0]].clone()))
        now = unfused.placed(model.state_dict())  # (pytest's report of a failure must not read one)
        assert now == (held - {sorted(held)[0]}, False)
    finally:
        files.close()
        for fd in fds:
            os.close(fd)


def test_operations_that_do_otherwise_are_left_to_transformers(tmp_path, monkeypatch):
    """A transformers whose MergeModulelist stacks otherwise than the guess assumes (here: the
    experts reversed) is found out on numbered tensors (``_proven``): nothing is skipped, and the
    model is what that transformers computes."""
    from transformers.core_model_loading import MergeModulelist

    folder = save("mixtral", tmp_path / "mixtral")
    cls, fds, guess = _guessed(folder)
    stack = MergeModulelist.convert

    def reversed_stack(self, input_dict, *args, **kwargs):
        return stack(self, {k: list(reversed(v)) for k, v in input_dict.items()}, *args, **kwargs)

    monkeypatch.setattr(MergeModulelist, "convert", reversed_stack)
    try:
        expected = cls.from_pretrained(folder).state_dict()
        unfused = fused.Unfused(guess, loader._Locate(fds))
        with unfused:
            state = cls.from_pretrained(folder).state_dict()
        placed = unfused.placed(state)  # (pytest's report of a failure must not read a stand-in)
        assert placed == (set(), True)
        assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_stand_in_cannot_be_read():
    """What a stand-in is over: any read kills the process (SIGSEGV) rather than give zeros."""
    import signal
    import subprocess
    import sys

    code = "import ctypes; from weightd.daemon import fused; ctypes.string_at(fused._untouchable(1 << 20), 1)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGSEGV


def test_whole_tensors_concatenated_are_served_from_the_files(make_daemon, tmp_path):
    """``Concatenate(dim=0)`` alone (OLMo-Hybrid's q, k and v convolutions saved apart, joined
    on load) puts whole tensors end to end, as the experts' stack does: guessed, proven, not
    computed, and what attaches is what from_pretrained gives."""
    from conftest import hf_diagnostics

    torch.manual_seed(2)
    config = transformers.OlmoHybridConfig(**TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    transformers.OlmoHybridForCausalLM(config).save_pretrained(tmp_path / "hybrid")
    cls, fds, guess = _guessed(tmp_path / "hybrid")
    for fd in fds:
        os.close(fd)
    assert guess and all(k.endswith("linear_attn.conv1d.weight") for k in guess)
    d = make_daemon("--model", f"hybrid={tmp_path / 'hybrid'}")
    expected = cls.from_pretrained(tmp_path / "hybrid").state_dict()
    with d.client() as c:
        got = c.state_dict("hybrid")
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k
        del got
    meta = hf_diagnostics(d, "hybrid")
    assert meta["fusion_skipped"] == meta["fused_from_files"] == meta["converted_bytes"] > 0

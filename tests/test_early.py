"""A Hugging Face folder's weights copied while ``from_pretrained`` runs (Note [copying while
from_pretrained runs], weightd/daemon/early.py): what the early copy guessed and the answer did
not keep gives its pages back, and a stop while it runs leaves nothing."""

from __future__ import annotations

import os
import signal
import time

import torch
from safetensors.torch import load_file, save_file

from weightd.client import Client

from conftest import lazy_module, wait_until

transformers = lazy_module("transformers")

MiB = 1 << 20


def _llama(folder, *, layers: int, hidden: int, vocab: int, tie: bool):
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def test_a_guessed_tensor_from_pretrained_does_not_keep_gives_its_pages_back(make_daemon, tmp_path):
    # A tied lm_head written into the file anyway, equal to the embeddings (as some tools do):
    # its name, dtype and shape are the model's, so it is copied early; from_pretrained ties it
    # to the embeddings instead.
    folder = tmp_path / "tied"
    _llama(folder, layers=1, hidden=64, vocab=32768, tie=True)  # 8 MiB embeddings
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    d = make_daemon("--model", f"tied={folder}", "--log-level", "info")
    expected = transformers.LlamaForCausalLM.from_pretrained(folder).state_dict()
    with Client(d.socket) as c:
        (name,) = d.segments()
        used = os.stat(d.folder.file(name)).st_blocks * 512
        got = c.state_dict("tied")
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k
        assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()
        del got
    files = (folder / "model.safetensors").stat().st_size
    assert used < files - 3 * MiB, (
        f"the segment holds {used} bytes of a {files}-byte file: the dead copy stayed"
    )
    assert "copied early and not kept by from_pretrained, given back" in d.output()


def test_a_stop_while_the_early_copy_runs_leaves_nothing(make_daemon, tmp_path):
    folder = tmp_path / "big"
    _llama(folder, layers=2, hidden=1024, vocab=32000, tie=False)  # ~330 MiB
    # one reader: the early copy takes long enough to be caught under way
    d = make_daemon("--model", f"big={folder}", "--load-readers", "1", wait=False)
    wait_until(
        lambda: d.proc.poll() is not None or d.segments(), timeout=120, what="the early copy's segment"
    )
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    seconds = time.monotonic() - t0
    assert seconds < 3.0, f"SIGTERM took {seconds:.2f} s to act during an early copy"
    assert d.segments() == []
    assert "cancelled" in d.output()


def test_what_the_loader_process_says_early_is_checked_as_its_answer_is(tmp_path):
    from weightd.daemon import hf
    from weightd.errors import CheckpointError

    save_file({"a": torch.zeros(1024), "b": torch.zeros(1024)}, tmp_path / "model.safetensors")
    opened = hf._Opened(tmp_path, None)
    try:
        opened.open("model.safetensors")
        size = (tmp_path / "model.safetensors").stat().st_size

        class Told:
            def __init__(self):
                self.calls = []

            def views(self, blobs):
                self.calls.append(("views", [(b.source, n) for b, n in blobs]))

            def converted(self, fd, total):
                self.calls.append(("converted", total))

            def written(self, upto):
                self.calls.append(("written", upto))

        told = Told()
        weights = ["model.safetensors"]
        assert hf._early(told, opened, weights, {"early": [[0, 96, 4096, 4]]}, [], None, 1 << 30) is None
        fd = opened.fds["model.safetensors"]
        assert told.calls == [("views", [((fd, 96, 4096), 4)])]
        # a tensor fused from whole file tensors: its ranges end to end (Note [fused tensors are
        # file ranges] in weightd/daemon/fused.py)
        fused = [[4, [[0, 96 + 2048, 2048], [0, 96, 2048]]]]
        hf._early(told, opened, weights, {"early": [], "fused": fused}, [], None, 1 << 30)
        assert told.calls[-1] == ("views", [(((fd, 96 + 2048, 2048), (fd, 96, 2048)), 4)])
        for wrong in (
            {"early": [[0, 96, 4096, 4]], "fused": [[4, [[0, 96, 2048]]]]},  # a range twice
            {"early": [], "fused": [[3, [[0, 96, 2048]]]]},  # no dtype is 3 bytes
            {"early": [], "fused": [[4, []]]},  # no parts
            {"early": [], "fused": [[4, [[0, size - 8, 4096]]]]},  # past the file's end
            {"early": [], "fused": [[4, [[0, 96, 2048, 1]]]]},  # not a range
            {"early": [], "fused": "all"},
        ):
            try:
                hf._early(told, opened, weights, wrong, [], None, 1 << 30)
            except CheckpointError as e:
                assert "described its early copy wrongly" in str(e)
            else:
                raise AssertionError(f"{wrong!r} was taken")
        for wrong in (
            [[1, 96, 4096, 4]],  # no such file
            [[0, size - 8, 4096, 4]],  # past its end
            [[0, 96, 4096, 3]],  # no dtype is 3 bytes
            [[0, 96, 4096, 4], [0, 96, 4096, 4]],  # twice
            [[0, 8, size - 8, 4], [0, 16, size - 16, 4]],  # more bytes than the file has
            "all",
        ):
            try:
                hf._early(told, opened, weights, {"early": wrong}, [], None, 1 << 30)
            except CheckpointError as e:
                assert "described its early copy wrongly" in str(e)
            else:
                raise AssertionError(f"{wrong!r} was taken")
        # written before any memfd, or a memfd larger than the loader's memory, is refused
        for message, fds, limit in (
            ({"written": 10}, [], 1 << 30),
            ({"converted": 1 << 31}, [os.memfd_create("t")], 1 << 30),
        ):
            try:
                hf._early(told, opened, weights, message, fds, None, limit)
            except CheckpointError:
                pass
            else:
                raise AssertionError(f"{message!r} was taken")
        fd = os.memfd_create("t")
        assert hf._early(told, opened, weights, {"converted": 100}, [fd], None, 1 << 30) == fd
        assert hf._early(told, opened, weights, {"written": 64}, [], fd, 1 << 30) == fd
        assert told.calls[-2:] == [("converted", 100), ("written", 64)]
        os.close(fd)
    finally:
        opened.close()


def test_an_answer_of_fused_ranges_is_checked_and_copied_in_order(tmp_path):
    """A storage the loader answers as file ranges end to end (Note [fused tensors are file
    ranges]) is copied in their order, and refused where they are not the file's or do not add
    up to its size."""
    from weightd import segment
    from weightd.daemon import hf
    from weightd.errors import CheckpointError

    a, b = torch.arange(512, dtype=torch.float32), -torch.arange(512, dtype=torch.float32)
    save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    opened = hf._Opened(tmp_path, None)
    try:
        opened.open("model.safetensors")
        data = 8 + int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
        weights = ["model.safetensors"]
        parts = [[0, data + 2048, 2048], [0, data, 2048]]  # b then a
        tensor = ["ba", 0, 0, "float32", [1024], [1]]
        blobs, _ = hf._blobs(
            opened, {"blobs": [{"nbytes": 4096, "parts": parts}], "tensors": [tensor]}, weights, None
        )
        folder = segment.Folder(str(tmp_path / "shm"))
        os.makedirs(folder.path, exist_ok=True)
        seg = segment.Segment.create(folder, "/weightd.test.fused", segment.DATA_OFFSET + 4096, 0o600, None)
        try:
            blobs[0].fill(seg, segment.DATA_OFFSET)
            got = os.pread(seg.fd, 4096, segment.DATA_OFFSET)
            assert got == b.numpy().tobytes() + a.numpy().tobytes()
        finally:
            seg.destroy(wait=False)
        for wrong in (
            {"nbytes": 4097, "parts": parts},  # not what its ranges add up to
            {"nbytes": 4096, "parts": [[0, data + 2048, 4096]]},  # past the file's end
            {"nbytes": 4096, "parts": [[1, data, 4096]]},  # no such file
            {"nbytes": 4096, "parts": []},
        ):
            try:
                hf._blobs(opened, {"blobs": [wrong], "tensors": [tensor]}, weights, None)
            except CheckpointError as e:
                assert "described storage 0 wrongly" in str(e)
            else:
                raise AssertionError(f"{wrong!r} was taken")
    finally:
        opened.close()


def test_the_daemons_first_guess_reads_only_what_a_header_promises():
    """Note [the daemon's first guess]: tensors of the config's dtype in file order, up to
    ``FIRST_GUESS_BYTES``; no expert's; nothing for a quantized folder, a config without a
    dtype, or a header whose tensors overlap."""
    from weightd.daemon import early

    def header(*tensors):
        out, at = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, nbytes in tensors:
            out[name] = {"dtype": dtype, "shape": [nbytes], "data_offsets": [at, at + nbytes]}
            at += nbytes
        return out

    big = early.FIRST_GUESS_BYTES // 2 - 8  # b, c, d and e make FIRST_GUESS_BYTES: f is past it
    headers = [
        (0, 100, header(("b", "F32", 8), ("a", "BF16", 16), ("m.experts.3.w1", "F32", 32))),
        (1, 200, header(("c", "F32", big), ("d", "F32", big), ("e", "F32", 8), ("f", "F32", 8))),
    ]
    f32 = {"dtype": "float32"}
    assert early.first_guess(headers, f32) == [
        [0, 100, 8, 4],
        [1, 200, big, 4],
        [1, 200 + big, big, 4],
        [1, 200 + 2 * big, 8, 4],
    ]
    assert early.first_guess(headers, {"torch_dtype": "bfloat16"}) == [[0, 108, 16, 2]]
    assert early.first_guess(headers, {}) == []
    assert early.first_guess(headers, {"dtype": ["float32"]}) == []
    assert early.first_guess(headers, dict(f32, quantization_config={"quant_method": "fp8"})) == []
    overlapping = header(("x", "F32", 64))
    overlapping["y"] = {"dtype": "F32", "shape": [8], "data_offsets": [32, 40]}
    assert early.first_guess([(0, 8, overlapping)], f32) == []
    # a header is JSON a local user wrote: values of any type are passed over, never raised on
    odd = header(("g", "F32", 8))
    odd.update(
        h={"dtype": ["F32"], "shape": [2], "data_offsets": [8, 16]},
        i={"dtype": {"F32": 1}, "shape": [2], "data_offsets": [16, 24]},
        j={"dtype": "F32", "shape": [2], "data_offsets": ["24", 32]},
        k={"dtype": "F32", "shape": [2], "data_offsets": [True, 40]},
        l=["F32"],
    )
    assert early.first_guess([(0, 8, odd)], f32) == [[0, 8, 8, 4]]

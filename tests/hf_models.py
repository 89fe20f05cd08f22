"""Tiny Hugging Face models of many architectures, built with transformers' own classes.

Each entry: the config class, the model class, config keywords (tiny), what the model eats,
and how the folder is written (transformers' own save_pretrained, sharded, or an old-style
pytorch_model.bin written the way transformers 4 wrote it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
LLAMA_LIKE = dict(TEXT, num_key_value_heads=2)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MOE = dict(LLAMA_LIKE, intermediate_size=32)
# the encoder-decoder families (bart, marian, whisper) name their sizes alike
ENC_DEC = dict(
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
)

# name: (config class, model class, config kwargs, input kind, save as)
ARCHS: dict[str, tuple[str, str, dict, str, str]] = {
    # encoder-only
    "bert": ("BertConfig", "BertForMaskedLM", TEXT, "text", "safetensors"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(TEXT, max_position_embeddings=70), "text", "bin"),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
        "text",
        "safetensors",
    ),
    "electra": (
        "ElectraConfig",
        "ElectraForSequenceClassification",
        dict(TEXT, embedding_size=16),
        "text",
        "sharded",
    ),
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2ForMaskedLM",
        dict(TEXT, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"]),
        "text",
        "safetensors",
    ),
    # an embedding model saved as its authors name it: Wqkv cut into q, k and v on load (Chunk)
    "nomic-bert": ("NomicBertConfig", "NomicBertModel", TEXT, "text", "safetensors"),
    "albert": ("AlbertConfig", "AlbertForMaskedLM", dict(TEXT, embedding_size=16), "text", "safetensors"),
    # decoder-only
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        "text",
        "safetensors",
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA_LIKE, tie_word_embeddings=False),
        "text",
        "sharded",
    ),
    "llama-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA_LIKE, tie_word_embeddings=True),
        "text",
        "bin",
    ),
    # saved in float32 with dtype bfloat16 in its config: from_pretrained casts at load
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(LLAMA_LIKE, dtype="bfloat16"),
        "text",
        "safetensors",
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE, "text", "safetensors"),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(TEXT, dtype="float16"), "text", "safetensors"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, head_dim=8), "text", "safetensors"),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "text",
        "bin-sharded",
    ),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", TEXT, "text", "safetensors"),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "text",
        "safetensors",
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4),
        "text",
        "safetensors",
    ),
    # encoder-decoder
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
        "seq2seq",
        "safetensors",
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            vocab_size=99,
            d_model=32,
            **ENC_DEC,
            max_position_embeddings=64,
        ),
        "seq2seq",
        "safetensors",
    ),
    "marian": (
        "MarianConfig",
        "MarianMTModel",
        dict(
            vocab_size=99,
            d_model=32,
            **ENC_DEC,
            max_position_embeddings=64,
            pad_token_id=98,
            decoder_start_token_id=98,
        ),
        "seq2seq",
        "safetensors",
    ),
    # vision
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(VISION, intermediate_size=64, num_labels=3),
        "image",
        "safetensors",
    ),
    # saved under names transformers renames on load, a fused MLP cut in two (Chunk)
    "dinov2": (
        "Dinov2Config",
        "Dinov2Model",
        dict(VISION, mlp_ratio=2, use_swiglu_ffn=True),
        "image",
        "safetensors",
    ),
    "convnext": (
        "ConvNextConfig",
        "ConvNextForImageClassification",
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, num_stages=2),
        "image",
        "safetensors",
    ),
    "resnet": (
        "ResNetConfig",
        "ResNetForImageClassification",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        "image",
        "bin",
    ),
    # audio
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2ForCTC",
        dict(
            vocab_size=20,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
        "audio",
        "safetensors",
    ),
    "whisper": (
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            vocab_size=99,
            d_model=32,
            **ENC_DEC,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
        "whisper",
        "safetensors",
    ),
    # mixture of experts: checkpoints hold per-expert weights, transformers fuses them at load
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(MOE, num_local_experts=4, num_experts_per_tok=2),
        "text",
        "safetensors",
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            MOE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        "text",
        "sharded",
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
        "text",
        "safetensors",
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(MOE, num_experts=4, num_experts_per_tok=2),
        "text",
        "safetensors",
    ),
}

GENERATES = {"text", "seq2seq", "whisper"}


def build(name: str):
    import transformers

    config_cls, model_cls, kwargs, _, _ = ARCHS[name]
    torch.manual_seed(sum(map(ord, name)))
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # weights that init leaves at 0 or 1 (biases, norms) made distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save(name: str, folder: Path) -> Path:
    """Write the folder the way ARCHS says: always with transformers' own files."""
    model = build(name)
    how = ARCHS[name][4]
    if how == "safetensors":
        model.save_pretrained(folder)
    elif how == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif how == "bin":
        # What transformers 4 wrote with safe_serialization=False: the state dict without the
        # tied copies, pickled by torch.save (loaded back with weights_only=True).
        model.save_pretrained(folder)
        tied = set(model.all_tied_weights_keys)
        torch.save(
            {k: v for k, v in model.state_dict().items() if k not in tied}, folder / "pytorch_model.bin"
        )
        (folder / "model.safetensors").unlink()
    elif how == "bin-sharded":
        # Sharded pytorch_model-0000N-of-0000M.bin with pytorch_model.bin.index.json, as transformers 4 wrote.
        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        tied = set(model.all_tied_weights_keys)
        sd = {k: v.clone() for k, v in model.state_dict().items() if k not in tied}
        keys = sorted(sd)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2],
        }
        for fname, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, folder / fname)
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    dtype = ARCHS[name][2].get("dtype")
    if dtype is not None:
        # save_pretrained writes the weights' own dtype: a folder whose config asks for another
        # one (as many on the Hub do, e.g. float32 files with "dtype": "bfloat16").
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def inputs(name: str, model) -> dict:
    kind = ARCHS[name][3]
    g = torch.Generator().manual_seed(1)
    if kind in ("text", "seq2seq"):
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab - 2, (2, 7), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, vocab - 2, (2, 5), generator=g)
        return out
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 800, generator=g)}
    if kind == "whisper":
        cfg = model.config
        return {
            "input_features": torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g),
            "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]]),
        }
    raise AssertionError(kind)


def main_output(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(f"no logits in {type(out).__name__}")


def write_old_bert(folder: Path) -> Path:
    """A BERT folder as transformers 3/4 wrote it: ``embeddings.position_ids`` saved as a weight."""
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(3)
    cfg = transformers.BertConfig(**TEXT)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings).unsqueeze(0)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "4.6.0"
    (folder / "config.json").write_text(json.dumps(config))
    return folder

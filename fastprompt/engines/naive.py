"""The reference engine: the post's notebook loop, exactly.

Whole right-padded sequences run through the Hugging Face model with ``inputs_embeds``; the prompt is
written over its slot; logits are computed at every position; the loss is the masked token-mean
cross-entropy over the target tokens. fp32, or the post's bf16 autocast. Every fast engine is tested
against this one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import eval_mode
from ..template import Encoded
from .base import Engine, target_count


class NaiveEngine(Engine):
    name = "naive"

    def __init__(self, model, encoder, precision="fp32"):
        if precision not in ("fp32", "autocast"):
            raise ConfigError("the naive engine runs the post's loop: precision fp32 or autocast (bf16 is for the generic and fused engines)")
        super().__init__(model, encoder, precision)
        self.pad_id = 0

    def batch_tensors(self, batch: Sequence[Encoded]):
        """``ids``, ``attention_mask``, ``labels`` (-100 off target) and ``slot`` (prompt row or -1): (B, T)."""
        B, T = len(batch), max(len(e.ids) for e in batch)
        L = self.encoder.prompt_len
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        slot = torch.full((B, T), -1, dtype=torch.long)
        for b, e in enumerate(batch):
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids)
            mask[b, :n] = 1
            labels[b, e.target_start - 1 : n - 1] = ids[b, e.target_start : n]  # logits at t predict t + 1
            slot[b, e.prompt_start : e.prompt_start + L] = torch.arange(L)
        return [t.to(self.device, non_blocking=True) for t in (ids, mask, labels, slot)]

    def loss_terms(self, prompt, batch):
        ids, mask, labels, slot = self.batch_tensors(batch)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, d)
        in_prompt = (slot >= 0).unsqueeze(-1)
        embeds = torch.where(in_prompt, prompt.to(embeds.dtype)[slot.clamp(min=0)], embeds)
        with eval_mode(self.model), self.autocast():
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        ce_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return ce_sum, target_count(batch)

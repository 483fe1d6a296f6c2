"""Greedy decoding of the target word after a prompted prefix (for samples, exact match, parrot rate)."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .models import eval_mode


@torch.no_grad()
def greedy_words(model, tokenizer, prefixes: Sequence[tuple[tuple[int, ...], int | None]], prompt: torch.Tensor,
                 max_new_tokens: int = 6, autocast: bool = False, batch_size: int = 64) -> list[str]:
    """The greedily decoded word after each prefix ``(ids, prompt_start)``: tokens are generated until a
    token starts a new word (leading whitespace after the first token), a newline, EOS, or the limit."""
    out: list[str] = []
    for i in range(0, len(prefixes), batch_size):
        out += _greedy_batch(model, tokenizer, prefixes[i : i + batch_size], prompt, max_new_tokens, autocast)
    return out


def _greedy_batch(model, tokenizer, prefixes, prompt, max_new_tokens, autocast):
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    B, T = len(prefixes), max(len(ids) for ids, _ in prefixes)
    L = prompt.shape[0]
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    for b, (seq, prompt_start) in enumerate(prefixes):  # left padding: generation appends on the right
        ids[b, T - len(seq) :] = torch.tensor(seq)
        mask[b, T - len(seq) :] = 1
        if prompt_start is not None:
            start = T - len(seq) + prompt_start
            slot[b, start : start + L] = torch.arange(L)
    ids, mask, slot = ids.to(device), mask.to(device), slot.to(device)
    embeds = embed(ids)
    embeds = torch.where((slot >= 0).unsqueeze(-1), prompt.to(device, embeds.dtype)[slot.clamp(min=0)], embeds)
    eos = tokenizer.eos_token_id
    generated = [[] for _ in range(B)]
    done = [False] * B
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    # logits at the last position only (Gemma's 262k vocabulary at every position dominated the time)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with eval_mode(model), ctx:
        for _ in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                           **last_only).logits
            next_ids = logits[:, -1].float().argmax(-1)
            for b, tok in enumerate(next_ids.tolist()):
                if done[b]:
                    continue
                piece = tokenizer.decode([tok])
                if tok == eos or "\n" in piece or (generated[b] and piece[:1].isspace()):
                    done[b] = True
                else:
                    generated[b].append(tok)
            if all(done):
                break
            embeds = torch.cat([embeds, embed(next_ids).unsqueeze(1).to(embeds.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
    return [tokenizer.decode(g).strip() for g in generated]

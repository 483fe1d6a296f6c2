"""Nearest vocabulary tokens to prompt vectors: the post's readout (cosine similarity) and Euclidean distance.
Used by the methods' ``readout`` (``nearest.txt``) and by ``python -m fastprompt.interpret``."""
from __future__ import annotations

import torch

from .errors import FastpromptError
from .models import embedding_table


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, model, tokenizer, k: int = 5, metric: str = "cosine"):
    """For each prompt vector, the ``k`` nearest tokens: lists of ``(token_id, token, score)``.
    ``cosine``: cosine similarity (higher is nearer, the post's method); ``euclidean``: L2 distance."""
    table = embedding_table(model).detach().float()
    p = prompt.detach().float().to(table.device)
    if metric == "cosine":
        scores = torch.nn.functional.normalize(p, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        values, ids = scores.topk(k, dim=-1)
    elif metric == "euclidean":
        candidates = torch.cdist(p, table).topk(min(k + 8, table.shape[0]), dim=-1, largest=False).indices  # (L, k + 8)
        exact = (p[:, None] - table[candidates]).norm(dim=-1)  # direct differences: 0 for a vocabulary row
        values, order = exact.topk(k, dim=-1, largest=False)  # (cdist's matmul form rounds to ~1e-4)
        ids = candidates.gather(-1, order)
    else:
        raise FastpromptError(f"unknown metric {metric!r}: use cosine or euclidean")
    return [[(int(i), tokenizer.decode([int(i)]), float(v)) for i, v in zip(row_ids, row_values)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def format_nearest(prompt, model, tokenizer, k: int = 5, metric: str = "cosine") -> str:
    name = "cosine similarity" if metric == "cosine" else "euclidean distance"
    lines = []
    for position, row in enumerate(nearest_tokens(prompt, model, tokenizer, k, metric)):
        lines.append(f"prompt position {position}:")
        lines += [f"  token_id: {i}, token: {t!r}, {name}: {v:.4f}" for i, t, v in row]
    return "\n".join(lines) + "\n"

"""Read a prompt back as vocabulary tokens: the nearest embedding-table rows to each prompt vector.

    python -m fastprompt.interpret PROMPT.safetensors [--model tiny] [--k 5] [--metric cosine|euclidean]
"""
from __future__ import annotations

import argparse
import sys

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
        scores = torch.cdist(p, table)
        values, ids = scores.topk(k, dim=-1, largest=False)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprompt.interpret", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="a prompt.safetensors written by fastprompt")
    parser.add_argument("--model", default=None, help="model name or path (default: the one in the file)")
    parser.add_argument("--k", type=int, default=5, help="tokens per prompt position")
    parser.add_argument("--metric", choices=["cosine", "euclidean", "both"], default="both")
    args = parser.parse_args(argv)
    try:
        from .models import load_model
        from .prompt import read_prompt

        prompt, meta = read_prompt(args.prompt)
        model, tokenizer = load_model(args.model or meta.get("model") or "gpt2-large")
        hidden = model.get_input_embeddings().weight.shape[1]
        if prompt.shape[1] != hidden:
            raise FastpromptError(f"{args.prompt} has hidden size {prompt.shape[1]}, the model has {hidden}")
        for metric in (["cosine", "euclidean"] if args.metric == "both" else [args.metric]):
            print(f"# nearest tokens by {metric}")
            print(format_nearest(prompt, model, tokenizer, args.k, metric))
    except FastpromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

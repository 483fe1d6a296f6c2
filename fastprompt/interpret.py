"""Read a prompt back as vocabulary tokens: the nearest embedding-table rows to each prompt vector.

    python -m fastprompt.interpret PROMPT.safetensors [--model tiny] [--k 5] [--metric cosine|euclidean]

Any method's file: soft (nearest tokens), hard (its token ids and text, then nearest tokens: each vector
is a vocabulary row, cosine 1.0, distance 0), relaxed (the most probable tokens per position, then the
nearest tokens to the mixture), prefix (per-layer K/V: shapes and norms; no token readout exists).
"""
from __future__ import annotations

import argparse
import json
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
        candidates = torch.cdist(p, table).topk(k + 8, dim=-1, largest=False).indices  # (L, k + 8)
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


def _relaxed_readout(logits, meta, tokenizer, k):
    tau = 1.0
    options = json.loads(meta.get("method_options", "{}"))
    if options:
        from .methods import RelaxedMethod

        probe = RelaxedMethod.__new__(RelaxedMethod)  # only the temperature schedule is needed
        probe.tau_start, probe.tau_end = options["tau_start"], options["tau_end"]
        probe.step, probe.total_steps = int(meta.get("method_step", 0)), int(meta.get("method_total_steps", 0))
        tau = probe.tau
    values, ids = torch.softmax(logits / tau, dim=-1).topk(k, dim=-1)
    lines = [f"# most probable tokens (softmax(logits / tau), tau {tau:.4g})"]
    for position, (row_ids, row_values) in enumerate(zip(ids.tolist(), values.tolist())):
        lines.append(f"prompt position {position}:")
        lines += [f"  token_id: {i}, token: {tokenizer.decode([i])!r}, probability: {v:.4f}"
                  for i, v in zip(row_ids, row_values)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprompt.interpret", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="a prompt.safetensors written by fastprompt")
    parser.add_argument("--model", default=None, help="model name or path (default: the one in the file)")
    parser.add_argument("--k", type=int, default=5, help="tokens per prompt position")
    parser.add_argument("--metric", choices=["cosine", "euclidean", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1337,
                        help="weights seed of a random model (tiny, random:*): the training run's --seed (default 1337)")
    args = parser.parse_args(argv)
    try:
        from .methods import read_method_file, saved_method
        from .models import load_model
        from .prompt import read_prompt

        method = saved_method(args.prompt)
        if method == "soft":
            prompt, meta = read_prompt(args.prompt)
        else:
            tensors, meta = read_method_file(args.prompt)
            prompt = tensors.get("prompt")
        model, tokenizer = load_model(args.model or meta.get("model") or "gpt2-large", seed=args.seed)
        if method != "soft":
            print(f"# method: {method}")
            if "token_ids" in meta:
                ids = json.loads(meta["token_ids"])
                print(f"tokens: {tokenizer.decode(ids)!r}\nids: {ids}\n")
            if method == "relaxed":
                print(_relaxed_readout(tensors["logits"], meta, tokenizer, args.k))
            if method == "prefix":
                kv = tensors["prefix"]
                print(f"prefix K/V {tuple(kv.shape)} (n_layer, K/V, prompt_len, heads, head_dim): attention keys "
                      "and values at every layer, not input embeddings; no vocabulary readout")
                return 0
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

"""Read a prompt back as vocabulary tokens: the nearest embedding-table rows to each prompt vector.

    python -m fastprompt.interpret PROMPT.safetensors [--model tiny] [--k 5] [--metric cosine|euclidean]

Any method's file: soft (nearest tokens), hard (its token ids and text, then nearest tokens: each vector
is a vocabulary row, cosine 1.0, distance 0), relaxed (the most probable tokens per position, then the
nearest tokens to the mixture), prefix (per-layer K/V: shapes and norms; no token readout exists).
"""
from __future__ import annotations

import sys
import torch

from .errors import ConfigError, FastpromptError, PromptFileError, UsageParser, check_seed
from .nearest import format_nearest
from .promptfile import method_record  # noqa: F401  (the check lives with the file format)


def _relaxed_readout(logits, options, step, total_steps, tokenizer, k):
    tau = 1.0
    if options:
        from .methods.relaxed import RelaxedMethod

        probe = RelaxedMethod.__new__(RelaxedMethod)  # only the temperature schedule is needed
        probe.tau_start, probe.tau_end = options["tau_start"], options["tau_end"]
        probe.step, probe.total_steps = step, total_steps
        tau = probe.tau
    values, ids = torch.softmax(logits / tau, dim=-1).topk(k, dim=-1)
    lines = [f"# most probable tokens (softmax(logits / tau), tau {tau:.4g})"]
    for position, (row_ids, row_values) in enumerate(zip(ids.tolist(), values.tolist())):
        lines.append(f"prompt position {position}:")
        lines += [f"  token_id: {i}, token: {tokenizer.decode([i])!r}, probability: {v:.4f}"
                  for i, v in zip(row_ids, row_values)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from .console import safe_streams

    with safe_streams():  # unencodable characters escaped; a stdout that cannot be written dropped
        return _main(argv)


def _main(argv) -> int:
    parser = UsageParser(prog="python -m fastprompt.interpret", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="a prompt.safetensors written by fastprompt")
    parser.add_argument("--model", default=None, help="model name or path (default: the one in the file)")
    parser.add_argument("--k", type=int, default=5, help="tokens per prompt position")
    parser.add_argument("--metric", choices=["cosine", "euclidean", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1337,
                        help="weights seed of a random model (tiny, random:*): the training run's --seed (default 1337)")
    try:
        args = parser.parse_args(argv)
        check_seed(args.seed)
        if args.k < 1:
            raise ConfigError(f"--k must be at least 1, got {args.k}")
        interpret(args)
    except FastpromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def interpret(args) -> None:
    from .models import load_model
    from .promptfile import read_prompt_file

    tensors, meta = read_prompt_file(args.prompt)
    method = meta.get("method", "soft")
    record = method_record(args.prompt, method, tensors, meta)
    prompt = tensors.get("prompt")
    model, tokenizer = load_model(args.model or meta.get("model") or "gpt2-large", seed=args.seed)
    vocab, hidden = model.get_input_embeddings().weight.shape
    if args.k > vocab:
        raise ConfigError(f"--k must be at most the vocabulary size, {vocab}; got {args.k}")
    if method != "soft":
        print(f"# method: {method}")
        ids = record["token_ids"]
        if ids is not None:
            if not all(0 <= i < vocab for i in ids):
                raise PromptFileError(f"{args.prompt}: token_ids lie outside this model's vocabulary of {vocab}")
            print(f"tokens: {tokenizer.decode(ids)!r}\nids: {ids}\n")
        if method == "relaxed":
            logits = tensors["logits"]
            if logits.shape[1] != vocab:
                raise PromptFileError(f"{args.prompt} holds logits over {logits.shape[1]} tokens, the model has {vocab}")
            print(_relaxed_readout(logits, record["options"], record["step"], record["total_steps"], tokenizer,
                                   args.k))
        if method == "prefix":
            kv = tensors["prefix"]
            print(f"prefix K/V {tuple(kv.shape)} (n_layer, K/V, prompt_len, heads, head_dim): attention keys "
                  "and values at every layer, not input embeddings; no vocabulary readout")
            return
    if prompt.shape[1] != hidden:
        raise PromptFileError(f"{args.prompt} has hidden size {prompt.shape[1]}, the model has {hidden}")
    for metric in (["cosine", "euclidean"] if args.metric == "both" else [args.metric]):
        print(f"# nearest tokens by {metric}")
        print(format_nearest(prompt, model, tokenizer, args.k, metric))


if __name__ == "__main__":
    sys.exit(main())

"""Run by tests/test_sharding.py under torchrun: every engine path and method on sharded weights against the
same computation on an unsharded copy of the model in this process; one JSON line a case on rank 0."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import rel_err, tiny_causal_lm, tiny_gpt2, tokenizer  # noqa: E402

from fastprompt import PromptTuner  # noqa: E402
from fastprompt.engines import generic  # noqa: E402
from fastprompt.distributed import ShardedDataParallelEngine  # noqa: E402
from fastprompt.sharding import load_sharded, shard_model, sharded_weights  # noqa: E402

AFTER_FIELD = "{input} means {prompt} so {target}"
CASES = [  # (model, engine, method, template, engine options)
    ("gpt2", "generic", "soft", None, {"layout": "packed"}),
    ("gpt2", "generic", "soft", None, {"layout": "padded"}),  # the trunk's K/V reach the suffixes by the cache
    ("gpt2", "generic", "soft", None, {"layout": "packed", "pack_rows": 8}),  # several packs, trunk apart
    ("gpt2", "generic", "soft", AFTER_FIELD, {}),
    ("gpt2", "naive", "soft", None, {}),
    ("gpt2", "generic", "relaxed", None, {}),
    ("gpt2", "generic", "hard", None, {}),
    ("gpt2", "generic", "prefix", None, {}),
    ("gpt2", "generic", "prefix", AFTER_FIELD, {}),  # the naive reference forward, block by block
    ("gpt2", "naive", "prefix", None, {}),
    ("llama", "generic", "soft", None, {"layout": "packed"}),
    ("llama", "generic", "soft", None, {"layout": "padded"}),
    ("gpt2-dir", "generic", "soft", None, {}),  # built on the meta device, each rank reading its chunks
    ("llama-dir", "generic", "soft", None, {"layout": "padded"}),
    # the packed engine: each layer gathered by sharding.LayerGather, forward and backward
    ("gpt2", "fused", "soft", None, {}),
    ("gpt2", "fused", "prefix", None, {}),
    ("gpt2", "fused", "prefix", AFTER_FIELD, {}),  # the prefix's rows inside every suffix
    ("llama", "fused", "soft", None, {}),
    ("llama", "fused", "prefix", None, {}),
    ("llama-dir", "auto", "relaxed", None, {}),  # auto is fused here too
    ("gemma3", "fused", "soft", None, {}),  # four norms a block, a sliding layer, soft-capped logits
]
ONLY = [e for e in os.environ.get("SHARD_ENGINES", "").split(",") if e]  # a subset by engine, to debug
PAIRS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"), ("yes", "no"),
         ("in", "out")]  # batch 7: 4 + 3 over 2 ranks, 2 + 2 + 3 over 3


def model(kind):
    return tiny_gpt2() if kind.startswith("gpt2") else tiny_causal_lm(kind.removesuffix("-dir"))


def sharded(kind, rank):
    """The model of ``kind`` with sharded layers: sharded in place, or (``-dir``) saved by rank 0 and loaded
    by ``load_sharded`` from the directory."""
    if not kind.endswith("-dir"):
        m = model(kind)
        return m, shard_model(m)
    directory = os.path.join(os.environ["SHARD_TMP"], kind)
    if rank == 0:
        model(kind).save_pretrained(directory)
        tokenizer().save_pretrained(directory)
    dist.barrier()
    m, _ = load_sharded(directory)
    return m, sharded_weights(m)


def all_sharded(weights, m):
    """Every layer parameter and every table (the embedding, the LM head) sharded: nothing left gathered."""
    from torch.distributed.tensor import DTensor

    tables = [m.get_input_embeddings().weight, m.get_output_embeddings().weight]
    return (all(isinstance(p, DTensor) for layer in weights.layers for p in layer.parameters())
            and all(isinstance(p, DTensor) for p in tables) and all(t.count == 0 for t in weights.tables))


def tuner(m, engine, method, template, options):
    kwargs = {"template": template} if template else {}
    return PromptTuner(m, tokenizer(), prompt_len=3, engine=engine, precision="fp32", method=method, seed=5,
                       **options, **kwargs)


def count_gathers(weights):
    """A counter of the layers' all-gathers (``FSDPModule.unshard`` calls)."""
    counts = [0]
    for layer in weights.layers:
        def unshard(*args, _real=layer.unshard, **kwargs):
            counts[0] += 1
            return _real(*args, **kwargs)
        layer.unshard = unshard
    return counts


def one_pass_checks(one, many, weights, batch):
    """The sharded fused engine's ``loss_terms_many``: 4 prompts without grad (GCG's candidates) gather every
    layer as often as one prompt does, at the unsharded losses; two prompts with grad where one batch of one
    example leaves a rank an empty shard (every rank computes the whole batches) at the unsharded losses and
    gradients. Returns ``([gathers of one prompt, of 4], worst relative error)``."""
    counts = count_gathers(weights)
    scales = (1.0, 0.5, -0.3, 2.0)
    with torch.no_grad():
        want = [one.engine.loss_terms(one.prompt * s, batch)[0] for s in scales]
        start = counts[0]
        many.engine.loss_terms(many.prompt, batch)
        single = counts[0] - start
        start = counts[0]
        terms = many.engine.loss_terms_many([many.prompt * s for s in scales], [batch] * len(scales))
        several = counts[0] - start
    worst = max(rel_err(ce, w) for (ce, _), w in zip(terms, want))
    replicated = many.engine.replicated_batches
    worst = max(worst, many_error(one, many, [batch[:1], batch]))
    assert many.engine.replicated_batches == replicated + 1  # the empty shard: the whole batches on every rank
    return [single, several], worst


def many_error(one, many, batches):
    """Two prompts (the prompt and half of it) on ``batches`` through both engines' ``loss_terms_many``: the
    worst relative error of the sharded losses and gradients. One backward a side (a one-pass engine's K
    losses share a graph; prompt k's loss reads x_k only)."""
    xs_one, xs_many = [one.prompt * 1.0, one.prompt * 0.5], [many.prompt * 1.0, many.prompt * 0.5]
    terms_one = one.engine.loss_terms_many(xs_one, batches)
    terms_many = many.engine.loss_terms_many(xs_many, batches)
    grads_one = torch.autograd.grad(sum(ce for ce, _ in terms_one), xs_one)
    grads_many = torch.autograd.grad(sum(ce for ce, _ in terms_many), xs_many)
    worst = 0.0
    for (ce_a, n_a), (ce_b, n_b), g_a, g_b in zip(terms_one, terms_many, grads_one, grads_many):
        assert n_a == n_b
        worst = max(worst, rel_err(ce_b, ce_a), rel_err(g_b, g_a))
    return worst


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    examples = [{"input": a, "target": b} for a, b in PAIRS]
    for kind, engine, method, template, options in CASES:
        if ONLY and engine not in ONLY:
            continue
        shown, options = options, dict(options)
        generic.PACK_ROWS = options.pop("pack_rows", 512)
        one = tuner(model(kind), engine, method, template, options)
        sharded_model, weights = sharded(kind, rank)
        many = tuner(sharded_model, engine, method, template, options)
        init = rel_err(many.prompt, one.prompt)
        tied = sharded_model.get_output_embeddings().weight is sharded_model.get_input_embeddings().weight
        assert len(weights.tables) == (1 if tied else 2), (kind, len(weights.tables))
        assert many.engine.name == one.engine.name, (many.engine.name, one.engine.name)
        many.engine = ShardedDataParallelEngine(many.engine, weights, rank, world)
        batch = one.encode(examples)
        worst, freed = 0.0, True
        for step in range(3):  # the first batch runs whole on every rank (layout undecided), then by shards
            for t in (one, many):
                t.prompt.grad = None
            loss_one = one.loss(batch)
            grad_one, = torch.autograd.grad(loss_one, one.prompt)
            loss_many = many.loss(batch)
            freed = freed and all_sharded(weights, sharded_model)  # no layer held gathered between forward and backward
            grad_many, = torch.autograd.grad(loss_many, many.prompt)
            freed = freed and all_sharded(weights, sharded_model)
            worst = max(worst, rel_err(loss_many, loss_one), rel_err(grad_many, grad_one))
            with torch.no_grad():  # the same next prompt on both, moved by the gradient
                one.prompt -= 0.5 * grad_one / grad_one.norm()
                many.prompt.copy_(one.prompt)
        many_err = None
        if method == "soft":  # K prompts through loss_terms_many
            many_err = many_error(one, many, [batch, batch])
            freed = freed and all_sharded(weights, sharded_model)
        replicated = many.engine.replicated_batches
        gathers = None
        if engine == "fused" and method == "soft":  # K prompts in one pass: each layer gathered once for all K
            gathers, err = one_pass_checks(one, many, weights, batch)
            many_err = max(many_err, err)
            freed = freed and all_sharded(weights, sharded_model)
        with torch.no_grad():
            eval_one, eval_many = one.evaluate(examples, generation=True), many.evaluate(examples, generation=True)
        if rank == 0:
            print(json.dumps({"case": [kind, engine, method, template, shown], "engine": many.engine.name, "init": init, "worst": worst,
                              "replicated": replicated, "freed": freed, "many": many_err, "gathers": gathers, "eval": [eval_one, eval_many],
                              "tables": len(weights.tables), "tied": tied}),
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

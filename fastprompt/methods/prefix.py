"""Prefix-tuning (Li & Liang 2021; the post's closing edit): trainable key/value vectors at every layer.

Instead of ``L`` input embeddings, the prompt is ``L`` key/value rows at every attention layer,
``(n_layer, 2, L, n_kv_head, head_dim)``, standing where ``{prompt}`` stands: the positions
``prompt_start .. prompt_start + L - 1`` of the sequence hold no token, only these K/V, and later tokens
keep their positions (as they would after an ``L``-token soft prompt). The prefix rows have no queries,
so nothing is ever predicted from them: a template whose ``{target}`` directly follows ``{prompt}`` is
refused.

Every model with a family (families/: GPT-2, the Llama kind, Gemma 3). Keys are what a layer hands its
KV cache: for GPT-2 (learned absolute positions) a key means the same wherever it stands; for rotary models
they are stored *after* q/k norm and RoPE, i.e. as the cache holds them (docs/ARCHITECTURE.md, 'Prefix K/V
on rotary models', says why). The method hands the engines ``PromptInputs(layer_kv=...)``; every engine
runs it (docs/ARCHITECTURE.md, 'The engine contract'): naive through ``engines/naive.py: layer_kv_logits``
(the reference: K/V written over every layer's at the slot), generic with the K/V appended to its context
cache, fused with them written over the slot's rows in its packed block.

Initialisation (``init``): the K/V a soft prompt of the same ``init`` (random / vocab / text:WORDS)
produces at the slot, in its fixed context. So ``init="text:antonyms"`` starts exactly at the
hand-written prompt (a test checks it). Li & Liang reparametrise the prefix through an MLP for stability;
here it is trained directly.
"""
from __future__ import annotations

import torch

from ..engines.base import PromptInputs
from ..engines.naive import gpt2_reference_forward, layer_kv_logits, slot_kv_forward
from ..errors import ConfigError, PromptFileError
from ..families import BY_MODEL_TYPE
from ..generate import ends_word, greedy_words, slot_is_shared
from ..models import eval_mode, is_gpt2_family
from .base import Method
from .init import init_prompt


def prefix_shape(model, prompt_len: int) -> tuple[int, int, int, int, int]:
    """``(n_layer, 2, L, n_kv_head, head_dim)``: every layer's cache heads (GQA: the K/V heads)."""
    c = model.config
    if is_gpt2_family(model):
        return (c.n_layer, 2, prompt_len, c.n_head, c.n_embd // c.n_head)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return (c.num_hidden_layers, 2, prompt_len, getattr(c, "num_key_value_heads", None) or heads, head_dim)


# ------------------------------------------------------------------------------------- method
class PrefixMethod(Method):
    """``prompt`` is the per-layer prefix K/V, (n_layer, 2, L, n_head, head_dim); see the module docstring."""

    name = "prefix"

    def __init__(self, model, tokenizer, encoder):
        super().__init__(model, tokenizer, encoder)
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in BY_MODEL_TYPE:
            raise ConfigError(f"--method prefix supports the model types with a family ({', '.join(sorted(BY_MODEL_TYPE))}; "
                              f"got model type {model_type!r})")
        for e_piece, nxt in zip(encoder.template.pieces, encoder.template.pieces[1:]):
            if e_piece.kind == "prompt" and nxt.kind == "field" and nxt.name == "target":
                raise ConfigError("--method prefix: the prefix rows have no queries, so {target} cannot directly "
                                  "follow {prompt}; put text or a field between them")

    def param_shape(self):
        return prefix_shape(self.model, self.prompt_len)

    @torch.no_grad()
    def init(self, init, seed, absorb_space):
        """The K/V of a soft prompt with the same ``init`` at the slot, in its fixed context."""
        prompt = init_prompt(self.model, self.tokenizer, self.prompt_len, init, seed, absorb_space=absorb_space)
        enc, L = self.encoder, self.prompt_len
        dev = next(self.model.parameters()).device
        if enc.prompt_start is not None:  # the fixed text before the prompt, then the prompt
            start = enc.prompt_start
            ids = torch.tensor([enc.shared_ids[: start + L]], device=dev)
        else:  # a field precedes the prompt: no fixed context; the prompt alone at its first position
            start, ids = 0, torch.zeros((1, L), dtype=torch.long, device=dev)
        with eval_mode(self.model):
            embeds = self.model.get_input_embeddings()(ids).float().clone()
            embeds[0, start : start + L] = prompt.to(dev, embeds.dtype)
            T = ids.shape[1]
            if is_gpt2_family(self.model):
                _, kv = gpt2_reference_forward(self.model, embeds, torch.arange(T, device=dev)[None],
                                            torch.ones((1, T), dtype=torch.bool, device=dev), capture=True)
            else:  # the K/V each layer hands its cache (after q/k norm and RoPE)
                kv = []
                slot = torch.full((1, T), -1, dtype=torch.long, device=dev)
                slot_kv_forward(self.model, embeds.to(self.model.dtype), torch.ones((1, T), dtype=torch.long, device=dev),
                                slot, capture=kv)
        out = torch.stack([torch.stack([k[0, :, start : start + L].transpose(0, 1),
                                        v[0, :, start : start + L].transpose(0, 1)]) for k, v in kv])
        return out.float().cpu()  # (n_layer, 2, L, Hkv, hd)

    def embeddings(self, params, train=False):
        raise ConfigError("a prefix is per-layer K/V: it has no (L, d) input embeddings")

    def inputs(self, params, train=False):
        return PromptInputs(layer_kv=params)

    def readout(self, params, k=5):
        kv = params.detach().float()
        norms = kv.flatten(3).norm(dim=-1).mean(-1)  # (n_layer, 2)
        lines = [f"prefix K/V {tuple(kv.shape)} (n_layer, K/V, prompt_len, heads, head_dim): no vocabulary "
                 "readout (they are attention keys and values, not input embeddings)"]
        lines += [f"  layer {i}: mean |K| {n[0]:.4f}, mean |V| {n[1]:.4f}" for i, n in enumerate(norms.tolist())]
        return "\n".join(lines) + "\n"

    @torch.no_grad()
    def greedy(self, params, prefixes, max_new_tokens, autocast, progress=None):
        """The cached decoder with the K/V in the shared tokens' cache where the slot lies among them (every
        template whose prompt precedes its fields); else every sequence re-run per token (``_greedy_batch``)."""
        if slot_is_shared(prefixes, self.prompt_len):
            return greedy_words(self.model, self.tokenizer, prefixes, None, max_new_tokens, autocast,
                                progress=progress, layer_kv=params.detach())
        out = []
        for i in range(0, len(prefixes), 64):
            out += self._greedy_batch(params.detach(), prefixes[i : i + 64], max_new_tokens, autocast)
            if progress is not None:
                progress(len(prefixes[i : i + 64]))
        return out

    def _greedy_batch(self, kv, prefixes, max_new_tokens, autocast):
        """Left-padded greedy decoding through the reference forward (``layer_kv_logits``, recomputed each token)."""
        model, tok, L = self.model, self.tokenizer, self.prompt_len
        dev = next(model.parameters()).device
        B, T = len(prefixes), max(len(ids) for ids, _ in prefixes)
        ids = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        slot = torch.full((B, T), -1, dtype=torch.long)
        for b, (seq, prompt_start) in enumerate(prefixes):
            ids[b, T - len(seq):] = torch.tensor(seq)
            mask[b, T - len(seq):] = True
            start = T - len(seq) + prompt_start
            slot[b, start : start + L] = torch.arange(L)
        ids, mask, slot = ids.to(dev), mask.to(dev), slot.to(dev)
        generated, done = [[] for _ in range(B)], [False] * B
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)
        with eval_mode(model), ctx:
            for _ in range(max_new_tokens):
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
                logits = layer_kv_logits(model, ids, mask, slot, kv.to(dev), position_ids=positions)
                next_ids = logits[:, -1].float().argmax(-1)
                for b, t in enumerate(next_ids.tolist()):
                    if done[b]:
                        continue
                    if ends_word(tok, t, generated[b]):
                        done[b] = True
                    else:
                        generated[b].append(t)
                if all(done):
                    break
                ids = torch.cat([ids, next_ids[:, None]], 1)
                mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.bool, device=dev)], 1)
                slot = torch.cat([slot, torch.full((B, 1), -1, dtype=torch.long, device=dev)], 1)
        return [tok.decode(g).strip() for g in generated]

    def metadata(self, params):
        n_layer, _, _, heads, head_dim = prefix_shape(self.model, self.prompt_len)
        meta = super().metadata(params)
        meta.update({"n_layer": n_layer, "n_head": heads, "head_dim": head_dim})
        return meta

    def tensors(self, params):
        return {"prefix": params.detach().float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        if "prefix" not in tensors:
            raise PromptFileError("a prefix prompt file must hold the 'prefix' tensor")
        return tensors["prefix"]

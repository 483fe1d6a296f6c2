"""The packed engine (``fused``): any supported family's forward over one packed row block (docs/ARCHITECTURE.md,
'What a step leaves out', 'Families').

Rows of a step (``layout.PackedBatch``), for an encoder with ``n_context = P0`` and ``n_shared = S`` and
examples of lengths ``n_b``:

    context positions [0, P0)        fixed text before the prompt and every field: K/V computed once per
                                     engine (lazily, no grad) and prepended to every layer's keys
    trunk   positions [P0, S)        the example-independent span (the prompt, where it stands before the
                                     first field): once per step, at batch 1
    suffix  positions [S, n_b - 1)   per example, packed one after another without padding; the last
                                     token is never an input. Where a field precedes the prompt, the
                                     prompt rows sit inside every suffix.

The model runs through its family's description (``families.read_weights``: a ``ModelWeights`` of norms,
attention settings, MLPs); this module never names a family. A block:

    y = norm_attn(h);  q, k, v = y @ W_qkv (+ b);  q, k = q_norm(q), k_norm(k) per head;  RoPE(q, k) at the
    rows' positions (one call over q and k side by side where there is no q/k norm);  o = attention over the
    tree (GQA: the op reads each K/V head for its H / Hkv query heads, never repeated; a sliding window on
    layers that have one);  a = o @ W_o (+ b), normalised where the family says (Gemma);  h = h + a;
    y = norm_mlp(h);  m = MLP(y) (GELU, or gated: SwiGLU / GeGLU), normalised where the family says;  h = h + m

Attention follows the tree (``ops.tree_attention``): trunk rows are causal among context+trunk keys; a
suffix row sees the context, the trunk and its own earlier rows. After the last layer's attention only the
rows that predict a target token go on (output projection, MLP, final norm, LM head + CE, soft-capped where
the family says): ``lm_head_ce`` sees exactly ``sum_b |target_b|`` rows. Weights are read from the Hugging
Face model as detached views (never modified; q/k/v and gate/up of ``nn.Linear`` families concatenated once);
``precision="bf16"`` keeps one bf16 copy, made here. Ops come from ``ops.get_ops`` so the Triton / CUDA
kernels replace the torch ones behind the same signatures.

Prefix-tuning (``PromptInputs.layer_kv``, ``(n_layer, 2, L, Hkv, D)``): the slot's rows are ordinary rows of
the block (placeholder tokens), and every layer's K/V at those rows are overwritten by the given ones after
q/k norm and RoPE, i.e. keys as the model's cache holds them (``index_copy``: the gradient of a K/V row is the
sum over its copies). What those rows compute is seen by nothing but themselves, so this is exactly the naive
engine's reference forward, on the packed layout, wherever the slot stands.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError, NonFiniteError
from ..models import eval_mode, table_weight
from ..families import read_weights
from ..families.base import GELU_TANH, ModelWeights, Norm, Reader  # noqa: F401  (GELU_TANH: the old name's home)
from ..layout import PackedBatch, PackedMany
from ..template import Encoded, TemplateEncoder
from .base import Engine, PromptInputs, as_inputs
from ..nvtx import nvtx_range
from ..sharding import layer_gather
from .ops import get_ops, rotary_tables


# ------------------------------------------------------------------------------------------- engine
class FusedEngine(Engine):
    name = "fused"

    def __init__(self, model, encoder: TemplateEncoder, precision: str = "fp32", kernels: str = "auto",
                 cuda_graphs: str = "auto", self_check: bool = True):
        super().__init__(model, encoder, precision)
        self.kernels = kernels
        if cuda_graphs == "on" and self.device.type != "cuda":
            raise ConfigError("--cuda-graphs on needs a CUDA device; use auto or off on the CPU")
        self.cuda_graphs = cuda_graphs
        self.ops = get_ops(kernels, self.device, torch.bfloat16 if precision in ("bf16", "autocast") else None)
        self.weights: ModelWeights = read_weights(model, torch.bfloat16 if precision == "bf16" else None)
        # sharded layers (--shard-weights): self.weights is a skeleton, each layer read while gathered
        self.layers = layer_gather(model, torch.bfloat16 if precision == "bf16" else None)
        self._context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked = not self_check

    def pass_settings(self) -> tuple:
        return (self.ops.name, self.cuda_graphs)

    def describe(self) -> str:
        graphs = "on" if self.graphs_enabled() else "off"
        return (f"{self.name} ({self.precision}, {self.weights.family}, kernels={self.ops.name}, "
                f"attention={self.ops.sources.get('tree_attention', 'torch')}, cuda-graphs={graphs})")

    # ------------------------------------------------------------------------------------ public
    def graphs_enabled(self) -> bool:
        """Whole-step CUDA graphs: ``on``, or ``auto`` on a CUDA device."""
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and self.device.type == "cuda")

    def static_batch(self, batch: Sequence[Encoded], batch_size: int):
        """``batch`` packed and padded to its bucket (engines/graphs.py), for a step on static shapes."""
        from .graphs import pad_packed, static_shape

        packed = self.pack(batch)
        shape = static_shape(packed, batch_size, self.encoder.prompt_start is not None, self.encoder.prompt_len)
        return pad_packed(packed, shape)

    def static_loss(self, inputs: PromptInputs, static) -> torch.Tensor:
        """Summed target CE of a padded batch (``static_batch``): no host sync, capturable."""
        return self.packed_loss(inputs, static.packed, static.target_weight)

    def prepare(self, inputs: PromptInputs, example: Encoded, encoder: TemplateEncoder | None = None) -> None:
        """Once (before the first loss, and before a step is captured): the comparison with the model (on
        ``example``, encoded by ``encoder``: this engine's by default) and the constant context's K/V."""
        if not self._checked:
            self.check_against_model(inputs, example, encoder)
        with self.autocast():  # as packed_loss builds it: the same K/V dtype whichever comes first
            self.context_kv()

    def pack(self, batch: Sequence[Encoded]) -> PackedBatch:
        return PackedBatch.build(self.encoder, batch, self.device)

    def rows_per_example(self, batch: Sequence[Encoded]) -> float:
        """Rows computed per example per step (trunk rows amortised over the batch; the context is free)."""
        S = self.encoder.n_shared
        n_rows = (S - self.encoder.n_context) + sum(len(e.ids) - 1 - S for e in batch)
        return n_rows / len(batch)

    def loss_terms(self, inputs, batch: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
        inputs = as_inputs(inputs)
        packed = self.pack(batch)
        self.prepare(inputs, batch[0])
        return self.packed_loss(inputs, packed), packed.n_targets

    many_in_one_pass = True
    many_lengths = True  # loss_terms_many takes prompts of several lengths (one encoder each) in one pass

    def loss_terms_many(self, inputs, batches, encoders=None) -> list[tuple[torch.Tensor, int]]:
        """K prompts in one pass over the weights (docs/ARCHITECTURE.md, 'K prompts in one pass'): their groups
        of rows side by side (``layout.PackedMany``), each prompt's summed CE from its own target rows. The
        prompts have the same kind of input (all ``embeds`` or all ``layer_kv``); ``encoders[k]`` encoded
        ``batches[k]`` (default: this engine's encoder for every prompt), an encoder of this template for
        prompt ``k``'s length: prompts of different lengths share the pass."""
        if len(inputs) != len(batches):
            raise ValueError(f"{len(inputs)} prompts but {len(batches)} batches")
        inputs = [as_inputs(x) for x in inputs]
        kinds = {x.embeds is None for x in inputs}
        if len(kinds) != 1:
            raise ConfigError("loss_terms_many takes prompts of one kind: all embeds or all layer_kv")
        encoders = [self.encoder] * len(inputs) if encoders is None else list(encoders)
        if len(encoders) != len(inputs):
            raise ValueError(f"{len(inputs)} prompts but {len(encoders)} encoders")
        for k, (x, enc) in enumerate(zip(inputs, encoders)):
            n = x.tensor.shape[0 if x.embeds is not None else 2]
            if n != enc.prompt_len:
                what = "the engine's" if enc is self.encoder else "its encoder's"
                raise ConfigError(f"prompt {k} has {n} vectors, not {what} prompt length {enc.prompt_len}")
            if enc is not self.encoder and enc.template.text != self.encoder.template.text:
                raise ConfigError(f"prompt {k}'s encoder is for another template ({enc.template.text!r}): the "
                                  f"prompts of one pass share this engine's template {self.encoder.template.text!r}")
        many = PackedMany.build(encoders, batches, self.device)
        self.prepare(inputs[0], batches[0][0], encoders[0])
        with self.autocast(), nvtx_range("forward"):
            if inputs[0].embeds is not None:
                x = self.embed(torch.cat([p.embeds for p in inputs]), many.packed)  # prompts stacked (sum L, d)
                layer_kv = None
            else:
                x = self.embed(None, many.packed)
                layer_kv = torch.cat([p.layer_kv for p in inputs], dim=2)  # (n_layer, 2, sum L, Hkv, D)
            h = self.blocks(x, self.context_kv(), many.packed, layer_kv=layer_kv, many=many)
            loss = self.lm_head_ce(h, many.packed.target_ids)  # (n_targets of all groups,) fp32
        return [(part.sum(), n) for part, n in zip(loss.split(many.target_counts), many.target_counts)]

    def packed_loss(self, inputs: PromptInputs, packed: PackedBatch,
                    target_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Summed target CE of a packed batch; ``target_weight`` (n_targets,) masks padded target rows."""
        with self.autocast(), nvtx_range("forward"):
            context_kv = self.context_kv()
            x = self.embed(inputs.embeds, packed)  # (rows, d)
            h = self.blocks(x, context_kv, packed, layer_kv=inputs.layer_kv)  # (n_targets, d) after ln_f
            loss = self.lm_head_ce(h, packed.target_ids)  # (n_targets,) fp32
        return loss.sum() if target_weight is None else (loss * target_weight).sum()

    def check_against_model(self, inputs: PromptInputs, example: Encoded,
                            encoder: TemplateEncoder | None = None) -> None:
        """Once per engine: our logits at one example's target rows must be the model's own (its forward
        may differ from vanilla GPT-2: a subclass, an output transform). One unbatched forward, no grad;
        for ``layer_kv`` inputs with the placeholder token's embedding as the prompt (the forward is the same)."""
        encoder = self.encoder if encoder is None else encoder
        packed = PackedBatch.build(encoder, [example], self.device)
        L, start = encoder.prompt_len, example.prompt_start
        prompt = inputs.embeds
        if prompt is None:
            prompt = self.model.get_input_embeddings()(torch.zeros(L, dtype=torch.long, device=self.device)).float()
        with torch.no_grad(), self.autocast():
            h = self.blocks(self.embed(prompt.detach(), packed), self.context_kv(), packed)  # (n_targets, d)
            ours = (h @ self.table("lm_head").to(h.dtype).t()).float()  # (n_targets, V)
            if self.weights.softcap:
                ours = torch.tanh(ours / self.weights.softcap) * self.weights.softcap
            wte = self.model.get_input_embeddings()
            embeds = wte(torch.tensor([example.ids], device=self.device))  # (1, T, d)
            embeds[0, start : start + L] = prompt.detach().to(embeds.dtype)
            with eval_mode(self.model):
                full = self.model(inputs_embeds=embeds, use_cache=False).logits[0].float()
        full = full[example.target_start - 1 : len(example.ids) - 1]  # (n_targets, V)
        if not (torch.isfinite(full).all() and torch.isfinite(ours).all()):  # a non-finite input, not a wrong model
            raise NonFiniteError(f"the model's logits hold NaN/inf for this prompt (its largest value is "
                                 f"{prompt.detach().abs().max().item():.3g}); check the initial prompt")
        exact = (self.precision == "fp32" and full.dtype == ours.dtype == torch.float32
                 and (self.device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"))
        tol = 1e-3 if exact else 5e-2  # loose enough for TF32/bf16 rounding, far below a real transform
        err = (full - ours).abs().max().item()
        if not err <= tol * (1.0 + full.abs().max().item()):
            raise ConfigError(
                f"the fused engine's {self.weights.family} forward does not reproduce the logits of "
                f"{type(self.model).__name__} (max difference {err:.3g}): the model is not a plain "
                f"{self.weights.family}; use engine='generic' or 'naive'")
        self._checked = True

    # ----------------------------------------------------------------------------------- forward
    def embed(self, prompt: torch.Tensor | None, packed: PackedBatch) -> torch.Tensor:
        """Input rows: token embeddings (times the family's scale), the ``(L, d)`` prompt at its rows (None:
        placeholders), then learned positions where the family has them."""
        W = self.weights
        x = self.table("embed")[packed.token_ids]  # (rows, d); no grad: a detached view
        if W.embed_scale is not None:
            x = x * W.embed_scale
        if prompt is not None and packed.prompt_rows.numel():
            vectors = prompt[packed.prompt_slots].to(x.dtype)  # (n_prompt_rows, d); grad sums over copies
            x = x.index_copy(0, packed.prompt_rows, vectors)
        return x if W.positions is None else x + W.positions[packed.positions]

    def lm_head_ce(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n_targets,) fp32 CE of the (soft-capped) logits ``h @ lm_head^T``."""
        W = self.weights
        head = self.table("lm_head")
        if W.softcap:
            return self.ops.lm_head_ce_softcap(h, head, targets, W.softcap).float()
        return self.ops.lm_head_ce(h, head, targets).float()

    def table(self, name: str) -> torch.Tensor:
        """``self.weights.embed`` or ``.lm_head``; where --shard-weights shards the table (the read is a meta
        skeleton) gathered whole for this use (``models.table_weight``; freed when the caller is done)."""
        t = getattr(self.weights, name)
        if not t.is_meta:
            return t
        module = self.model.get_input_embeddings() if name == "embed" else self.model.get_output_embeddings()
        return Reader(torch.bfloat16 if self.precision == "bf16" else None)(table_weight(module))

    def context_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) of the constant context, each (n_context, Hkv, D): computed once, no grad."""
        if self._context_kv is None:
            if self.encoder.n_context == 0:  # the template starts with the prompt: nothing constant to cache
                self._context_kv = []
                return self._context_kv
            packed = PackedBatch.context(self.encoder, self.device)
            with torch.no_grad():
                x = self.embed(None, packed)
                kv = self.blocks(x, None, packed, collect_kv=True)
            self._context_kv = [(k.detach().contiguous(), v.detach().contiguous()) for k, v in kv]
        return self._context_kv

    def _norm(self, x, residual, norm: Norm):
        """(y, h): h = x + residual (or x), y = norm(h): LayerNorm or RMSNorm, through the ops."""
        if norm.rms:
            return self.ops.add_rms_norm(x, residual, norm.weight, norm.eps, norm.offset)
        return self.ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)

    def _rotary_tables(self, packed: PackedBatch) -> dict:
        """(cos, sin) (rows, D) per distinct RoPE of the model (Gemma: one per layer type), at the rows' positions."""
        tables = {}
        for block in self.weights.blocks:
            r = block.attn.rotary
            if r is not None and _rope_key(r) not in tables:
                tables[_rope_key(r)] = rotary_tables(packed.positions, r.inv_freq, r.scaling)
        return tables

    def block(self, i: int):
        """Layer ``i``'s weights: ``self.weights.blocks[i]``, or read while gathered (sharded layers)."""
        return self.weights.blocks[i] if self.layers is None else self.layers.block(i)

    def blocks(self, *args, **kwargs):
        if self.layers is None:
            return self._blocks(*args, **kwargs)
        try:
            return self._blocks(*args, **kwargs)
        finally:  # the forward's gathered layers freed (the backward gathers them again: sharding.LayerGather)
            self.layers.release()

    def _blocks(self, x, context_kv, packed: PackedBatch, collect_kv: bool = False, layer_kv=None,
                many: PackedMany | None = None):
        """The transformer over the packed rows. Returns the final norm at the target rows (n_targets, d), or
        with ``collect_kv`` each layer's (K, V) of the rows (for the context cache). ``layer_kv``
        (n_layer, 2, L, Hkv, D): K/V written over the prompt rows' at every layer (see the module docstring).
        ``many``: ``packed`` is ``many.packed``, K prompts' groups side by side; every per-row op runs on all
        rows at once (one read of the weights), attention per group (a group sees the context and itself)."""
        ops, W = self.ops, self.weights
        rows = x.shape[0]
        n_layer = W.n_layer
        tables = self._rotary_tables(packed)
        groups = [(0, rows, packed)] if many is None else [
            (many.row_offsets[g], many.row_offsets[g + 1], group) for g, group in enumerate(many.groups)]
        key_positions: dict[int, torch.Tensor] = {}
        collected = []
        y, h = self._norm(x, None, self.block(0).attn_norm)  # h: residual stream (rows, d)
        for i in range(n_layer):
            block = self.block(i)
            last = i == n_layer - 1
            a = block.attn
            H, G, D = a.n_head, a.n_kv_head, a.head_dim
            qkv = ops.linear(y, a.qkv_w, a.qkv_b)  # (rows, (H + 2G) D)
            q = qkv[:, : H * D].view(rows, H, D)
            k = qkv[:, H * D : (H + G) * D].view(rows, G, D)
            v = qkv[:, (H + G) * D :].view(rows, G, D)
            if a.q_norm is not None:
                q = self._norm(q, None, a.q_norm)[0]
                k = self._norm(k, None, a.k_norm)[0]
            if a.rotary is not None:
                cos, sin = tables[_rope_key(a.rotary)]
                if a.q_norm is None:  # q and k side by side in qkv: one rotary over both (half the ops)
                    qk = ops.rotary(qkv[:, : (H + G) * D].view(rows, H + G, D), cos, sin)
                    q, k = qk[:, :H], qk[:, H:]
                else:
                    q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
            if collect_kv:
                collected.append((k, v))
                if last:
                    return collected
            if layer_kv is not None and packed.prompt_rows.numel():
                k = k.index_copy(0, packed.prompt_rows, layer_kv[i, 0][packed.prompt_slots].to(k.dtype))
                v = v.index_copy(0, packed.prompt_rows, layer_kv[i, 1][packed.prompt_slots].to(v.dtype))
            context = context_kv[i] if context_kv is not None and packed.n_context else None
            outs = [self._attend(a, q[s:e], k[s:e], v[s:e], context, group, key_positions, g)
                    for g, (s, e, group) in enumerate(groups)]
            o = (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(rows, H * D)
            if last:  # from here on every op is per row: keep only the rows that predict a target
                o = o.index_select(0, packed.target_rows)  # (n_targets, H D)
                h = h.index_select(0, packed.target_rows)
            o = ops.linear(o, a.out_w, a.out_b)  # (rows, d)
            if block.attn_out_norm is not None:
                o = self._norm(o, None, block.attn_out_norm)[0]
            y, h = self._norm(o, h, block.mlp_norm)
            m = block.mlp
            if m.gated:
                u = ops.gated_act(ops.linear(y, m.up_w, m.up_b), m.activation)  # (rows, I)
            else:
                u = ops.bias_gelu(ops.linear(y, m.up_w), m.up_b)  # (rows, I)
            u = ops.linear(u, m.down_w, m.down_b)
            if block.mlp_out_norm is not None:
                u = self._norm(u, None, block.mlp_out_norm)[0]
            y, h = self._norm(u, h, W.final_norm if last else self.block(i + 1).attn_norm)
        return y


    def _attend(self, a, q, k, v, context, packed: PackedBatch, key_positions: dict, group: int):
        """Tree attention of one block of rows (one prompt's group): the context's K/V prepended (GQA: the op
        reads each K/V head for its query heads), a sliding window where the layer has one. (rows, H, D)."""
        if context is not None:
            pk, pv = context
            k = torch.cat([pk.to(k.dtype), k])  # (n_context + rows, G, D)
            v = torch.cat([pv.to(v.dtype), v])
        if a.window is None:
            return self.ops.tree_attention(q, k, v, packed.n_trunk_keys, packed.cu_seqlens, a.scale)
        if group not in key_positions:
            key_positions[group] = packed.key_positions()
        return self.ops.window_attention(q, k, v, packed.n_trunk_keys, packed.cu_seqlens, a.scale, a.window,
                                         key_positions[group])


def _rope_key(rotary) -> tuple:
    """One cos/sin table per distinct RoPE: every layer's ``inv_freq`` is a view of the same buffer."""
    return (rotary.inv_freq.data_ptr(), rotary.inv_freq.shape[0], rotary.scaling)

"""The fused engine: our own GPT-2 forward over one packed row block (docs/ARCHITECTURE.md, 'What a step leaves out').

Rows of a step, for an encoder with ``n_context = P0`` and ``n_shared = S`` and examples of lengths ``n_b``:

    context positions [0, P0)        fixed text before the prompt and every field: K/V computed once per
                                     engine (lazily, no grad) and prepended to every layer's keys
    trunk   positions [P0, S)        the example-independent span (the prompt, where it stands before the
                                     first field): once per step, at batch 1
    suffix  positions [S, n_b - 1)   per example, packed one after another without padding; the last
                                     token is never an input. Where a field precedes the prompt, the
                                     prompt rows sit inside every suffix.

Attention follows the tree (``ops.tree_attention``): trunk rows are causal among context+trunk keys; a
suffix row sees the context, the trunk and its own earlier rows. After the last layer's attention only the
rows that predict a target token go on (c_proj, MLP, ln_f, LM head + CE): ``lm_head_ce`` sees exactly
``sum_b |target_b|`` rows. Weights are read from the Hugging Face model as detached views (never
modified); ``precision="bf16"`` keeps one bf16 copy, made here. Ops come from ``ops.get_ops`` so the
Triton / CUDA kernels replace the torch ones behind the same signatures.

Prefix-tuning (``PromptInputs.layer_kv``): the slot's rows are ordinary rows of the block (placeholder
tokens), and every layer's K/V at those rows are overwritten by the given ones (``index_copy``: the
gradient of a K/V row is the sum over its copies). What those rows compute is seen by nothing but
themselves, so this is exactly the naive engine's reference forward, on the packed layout, wherever the
slot stands (in the trunk, or in every suffix after a field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ..errors import ConfigError, DataError, NonFiniteError
from ..models import eval_mode
from ..template import Encoded, TemplateEncoder
from .base import Engine, PromptInputs, as_inputs
from ..nvtx import nvtx_range
from .ops import get_ops

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


# ------------------------------------------------------------------------------------ packed batch
@dataclass
class PackedBatch:
    """Index tensors of one step's packed row block (query rows: trunk rows, then each suffix)."""

    token_ids: torch.Tensor  # (rows,) input token ids; the placeholder at prompt rows
    positions: torch.Tensor  # (rows,) absolute positions (wpe)
    prompt_rows: torch.Tensor  # (n_prompt_rows,) rows that take a prompt vector: L (trunk) or B * L (suffix)
    prompt_slots: torch.Tensor  # (n_prompt_rows,) which prompt vector
    cu_seqlens: torch.Tensor  # (B + 1,) key-row offsets of the suffixes; cu[0] = n_trunk_keys
    target_rows: torch.Tensor  # (n_targets,) rows whose output predicts a target token (trunk rows repeat)
    target_ids: torch.Tensor  # (n_targets,) the token each predicts
    n_context: int  # constant context rows (keys only)
    n_trunk_rows: int  # shared query rows
    n_examples: int

    @property
    def n_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def n_trunk_keys(self) -> int:
        return self.n_context + self.n_trunk_rows

    @property
    def n_targets(self) -> int:
        return self.target_ids.shape[0]

    @classmethod
    def build(cls, encoder: TemplateEncoder, batch: Sequence[Encoded], device) -> "PackedBatch":
        """Host-side indices for ``batch``, moved to ``device`` in one transfer."""
        if len(batch) == 0:
            raise DataError("empty batch")
        P0, S, L = encoder.n_context, encoder.n_shared, encoder.prompt_len
        shared = encoder.shared_ids
        token_ids = list(shared[P0:S])
        positions = list(range(P0, S))
        prompt_rows: list[int] = []
        prompt_slots: list[int] = []
        if encoder.prompt_start is not None:  # the prompt is in the trunk, which starts with it
            prompt_rows += range(encoder.prompt_start - P0, encoder.prompt_start - P0 + L)
            prompt_slots += range(L)
        n_trunk_rows = len(token_ids)
        cu_seqlens = [S]
        target_rows: list[int] = []
        target_ids: list[int] = []
        for b, e in enumerate(batch):
            n = len(e.ids)
            if e.target_start is None or e.target_start < S or e.target_start >= n or e.ids[:S] != shared:
                raise DataError(f"example {b} was not encoded for this engine's template and prompt length")
            offset = len(token_ids)  # query row of position S
            token_ids += e.ids[S : n - 1]
            positions += range(S, n - 1)
            if e.prompt_start >= S:  # a field precedes the prompt: it lives in every suffix
                prompt_rows += range(offset + e.prompt_start - S, offset + e.prompt_start - S + L)
                prompt_slots += range(L)
            for t in range(e.target_start - 1, n - 1):  # the output at position t predicts ids[t + 1]
                target_rows.append(t - P0 if t < S else offset + t - S)
                target_ids.append(e.ids[t + 1])
            cu_seqlens.append(P0 + len(token_ids))
        parts = (token_ids, positions, prompt_rows, prompt_slots, cu_seqlens, target_rows, target_ids)
        flat = torch.tensor([v for part in parts for v in part], dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        tensors = flat.split([len(part) for part in parts])
        return cls(*tensors, n_context=P0, n_trunk_rows=n_trunk_rows, n_examples=len(batch))


# ------------------------------------------------------------------------------------------ weights
class LayerWeights(NamedTuple):
    ln_1: tuple  # (weight (d,), bias (d,), eps)
    attn_w: torch.Tensor  # (d, 3d)  Conv1D layout (in, out)
    attn_b: torch.Tensor  # (3d,)
    attn_proj_w: torch.Tensor  # (d, d)
    attn_proj_b: torch.Tensor  # (d,)
    ln_2: tuple
    fc_w: torch.Tensor  # (d, 4d)
    fc_b: torch.Tensor  # (4d,)
    mlp_proj_w: torch.Tensor  # (4d, d)
    mlp_proj_b: torch.Tensor  # (d,)


class GPT2Weights(NamedTuple):
    wte: torch.Tensor  # (V, d)
    wpe: torch.Tensor  # (n_positions, d)
    layers: tuple
    ln_f: tuple
    lm_head: torch.Tensor  # (V, d), tied to wte in GPT-2
    n_head: int
    scales: tuple  # per-layer attention scale


def read_gpt2_weights(model, dtype: torch.dtype | None = None) -> GPT2Weights:
    """Detached views of a Hugging Face GPT-2's weights (copies in ``dtype`` when it differs)."""
    config = model.config

    def w(t):
        t = t.detach()
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def ln(m):
        return (w(m.weight), w(m.bias), m.eps)

    act = getattr(config, "activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise ConfigError(f"the fused engine implements GPT-2's tanh GELU, not {act!r}: use engine='generic'")
    if getattr(config, "add_cross_attention", False):
        raise ConfigError("the fused engine does not support GPT-2 with cross-attention: use engine='generic'")
    tr = model.transformer
    n_head = config.n_head
    head_dim = config.n_embd // n_head
    layers, scales = [], []
    for i, block in enumerate(tr.h):
        layers.append(LayerWeights(
            ln(block.ln_1), w(block.attn.c_attn.weight), w(block.attn.c_attn.bias),
            w(block.attn.c_proj.weight), w(block.attn.c_proj.bias), ln(block.ln_2),
            w(block.mlp.c_fc.weight), w(block.mlp.c_fc.bias), w(block.mlp.c_proj.weight), w(block.mlp.c_proj.bias),
        ))
        scale = 1.0 / math.sqrt(head_dim) if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        scales.append(scale)
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "bias", None) is not None:
        raise ConfigError("the fused engine expects an LM head without bias (GPT-2): use engine='generic'")
    lm_head = w(head.weight) if head is not None and head.weight is not tr.wte.weight else None
    wte = w(tr.wte.weight)
    return GPT2Weights(wte, w(tr.wpe.weight), tuple(layers), ln(tr.ln_f), wte if lm_head is None else lm_head,
                       n_head, tuple(scales))


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
        self.weights = read_gpt2_weights(model, torch.bfloat16 if precision == "bf16" else None)
        self._context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked = not self_check

    def describe(self) -> str:
        graphs = "on" if self.graphs_enabled() else "off"
        return (f"{self.name} ({self.precision}, kernels={self.ops.name}, "
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

    def prepare(self, inputs: PromptInputs, example: Encoded) -> None:
        """Once (before the first loss, and before a step is captured): the comparison with the model and the
        constant context's K/V."""
        if not self._checked:
            self.check_against_model(inputs, example)
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

    def packed_loss(self, inputs: PromptInputs, packed: PackedBatch,
                    target_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Summed target CE of a packed batch; ``target_weight`` (n_targets,) masks padded target rows."""
        with self.autocast(), nvtx_range("forward"):
            context_kv = self.context_kv()
            x = self.embed(inputs.embeds, packed)  # (rows, d)
            h = self.blocks(x, context_kv, packed, layer_kv=inputs.layer_kv)  # (n_targets, d) after ln_f
            loss = self.ops.lm_head_ce(h, self.weights.lm_head, packed.target_ids).float()  # (n_targets,) fp32
        return loss.sum() if target_weight is None else (loss * target_weight).sum()

    def check_against_model(self, inputs: PromptInputs, example: Encoded) -> None:
        """Once per engine: our logits at one example's target rows must be the model's own (its forward
        may differ from vanilla GPT-2: a subclass, an output transform). One unbatched forward, no grad;
        for ``layer_kv`` inputs with the placeholder token's embedding as the prompt (the forward is the same)."""
        packed = self.pack([example])
        L, start = self.encoder.prompt_len, example.prompt_start
        prompt = inputs.embeds
        if prompt is None:
            prompt = self.model.get_input_embeddings()(torch.zeros(L, dtype=torch.long, device=self.device)).float()
        with torch.no_grad(), self.autocast():
            h = self.blocks(self.embed(prompt.detach(), packed), self.context_kv(), packed)  # (n_targets, d)
            ours = (h @ self.weights.lm_head.to(h.dtype).t()).float()  # (n_targets, V)
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
                f"the fused engine's GPT-2 forward does not reproduce the logits of {type(self.model).__name__} "
                f"(max difference {err:.3g}): the model is not a plain GPT-2; use engine='generic' or 'naive'")
        self._checked = True

    # ----------------------------------------------------------------------------------- forward
    def embed(self, prompt: torch.Tensor | None, packed: PackedBatch) -> torch.Tensor:
        """Input rows: token and position embeddings, the ``(L, d)`` prompt at its rows (None: placeholders)."""
        W = self.weights
        x = W.wte[packed.token_ids]  # (rows, d); no grad: wte is a detached view
        if prompt is not None and packed.prompt_rows.numel():
            vectors = prompt[packed.prompt_slots].to(x.dtype)  # (n_prompt_rows, d); grad sums over copies
            x = x.index_copy(0, packed.prompt_rows, vectors)
        return x + W.wpe[packed.positions]

    def context_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) of the constant context, each (n_context, H, D): computed once, no grad."""
        if self._context_kv is None:
            P0 = self.encoder.n_context
            if P0 == 0:  # the template starts with the prompt: nothing constant to cache
                self._context_kv = []
                return self._context_kv
            ids = torch.tensor(self.encoder.shared_ids[:P0], dtype=torch.long, device=self.device)
            packed = PackedBatch(
                ids, torch.arange(P0, device=self.device), ids[:0], ids[:0],
                torch.tensor([P0, P0], dtype=torch.long, device=self.device),  # one empty suffix
                ids[:0], ids[:0], n_context=0, n_trunk_rows=P0, n_examples=1,
            )
            with torch.no_grad():
                x = self.embed(None, packed)
                kv = self.blocks(x, None, packed, collect_kv=True)
            self._context_kv = [(k.detach().contiguous(), v.detach().contiguous()) for k, v in kv]
        return self._context_kv

    def blocks(self, x, context_kv, packed: PackedBatch, collect_kv: bool = False, layer_kv=None):
        """The transformer over the packed rows. Returns ln_f(h) at the target rows (n_targets, d), or with
        ``collect_kv`` each layer's (K, V) of the rows (for the context cache). ``layer_kv`` (n_layer, 2, L, H, D):
        K/V written over the prompt rows' at every layer (see the module docstring)."""
        ops, W = self.ops, self.weights
        rows, d = x.shape
        H = W.n_head
        D = d // H
        n_layer = len(W.layers)
        collected = []
        y, h = ops.add_layer_norm(x, None, *W.layers[0].ln_1)  # h: residual stream (rows, d)
        for i, layer in enumerate(W.layers):
            last = i == n_layer - 1
            qkv = ops.linear(y, layer.attn_w, layer.attn_b)  # (rows, 3d)
            q, k, v = qkv.view(rows, 3, H, D).unbind(1)  # each (rows, H, D)
            if collect_kv:
                collected.append((k, v))
                if last:
                    return collected
            if layer_kv is not None and packed.prompt_rows.numel():
                k = k.index_copy(0, packed.prompt_rows, layer_kv[i, 0][packed.prompt_slots].to(k.dtype))
                v = v.index_copy(0, packed.prompt_rows, layer_kv[i, 1][packed.prompt_slots].to(v.dtype))
            if context_kv is not None and packed.n_context:
                pk, pv = context_kv[i]
                k = torch.cat([pk.to(k.dtype), k])  # (n_context + rows, H, D)
                v = torch.cat([pv.to(v.dtype), v])
            o = ops.tree_attention(q, k, v, packed.n_trunk_keys, packed.cu_seqlens, W.scales[i])
            o = o.reshape(rows, d)
            if last:  # from here on every op is per row: keep only the rows that predict a target
                o = o.index_select(0, packed.target_rows)  # (n_targets, d)
                h = h.index_select(0, packed.target_rows)
            a = ops.linear(o, layer.attn_proj_w, layer.attn_proj_b)
            y, h = ops.add_layer_norm(a, h, *layer.ln_2)
            m = ops.bias_gelu(ops.linear(y, layer.fc_w), layer.fc_b)  # (rows, 4d)
            m = ops.linear(m, layer.mlp_proj_w, layer.mlp_proj_b)
            y, h = ops.add_layer_norm(m, h, *(W.ln_f if last else W.layers[i + 1].ln_1))
        return y

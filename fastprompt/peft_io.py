"""The Hugging Face stack in and out (issue 14): PEFT adapters written and trained, prompts for ``generate``.

PEFT's prompt learning puts its ``num_virtual_tokens`` before everything the tokenizer produced, start
token included. fastprompt's layout is the same exactly when the prompt is the first thing in the sequence:
``{prompt}`` first in the template and no start token from the tokenizer (``TemplateEncoder.prompt_start
== 0``). Other templates are refused, in and out.

The prompt in fastprompt and in PEFT (``prompt_embeddings`` in ``adapter_model.safetensors``; in a live
model ``peft_model.prompt_encoder[adapter].embedding.weight``), L = prompt length:

    soft, relaxed, hard  (L, d)                 PROMPT_TUNING, (L, token_dim = d), the same tensor
        PEFT concatenates the rows to the output of the model's word-embedding module, the space fastprompt's
        prompt lives in (``models.embedding_table``): a model that scales its embeddings (Gemma) needs no
        rescaling. relaxed / hard save their effective prompt, the ``(L, d)`` rows the model sees.
    prefix  (n_layer, 2, L, H, hd)              PREFIX_TUNING, (L, n_layer * 2 * H * hd), no projection
        PEFT views a row as (n_layer * 2, H, hd), index ``2 * layer + (0 key | 1 value)``, and hands the
        K/V to the model as a cache of length L, so the text's positions start at L: as after fastprompt's
        prefix at positions 0 .. L-1 (GPT-2's keys carry no position).

``save_peft`` writes the two files of an adapter (no model card) through a temporary directory and a
rename. ``tuner_from_peft`` builds a tuner on the PEFT model's base model (frozen by PEFT, never changed)
starting from the PEFT prompt; its ``fit`` writes the trained prompt back into the PEFT model.
``inputs_embeds`` is the prompt spliced into left-padded token embeddings, for ``model.generate``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

from .errors import ConfigError
from .models import is_gpt2_family
from .promptfile import atomic_write_dir

PEFT_HINT = "pip install 'fastprompt[peft]'"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")  # what PEFT writes


def require_peft(what: str):
    """The ``peft`` module, or a one-line ``ConfigError`` naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{what} needs the optional package peft: {PEFT_HINT}") from None
    return peft


def check_prepended(encoder, why: str) -> None:
    """PEFT can express the template only where the prompt is the first thing in the sequence."""
    if encoder.prompt_start == 0:
        return
    text = encoder.template.text
    if not text.startswith("{prompt}"):
        raise ConfigError(f"{why}: PEFT puts its virtual tokens before all text, so {{prompt}} must come first "
                          f"in the template (got {text!r})")
    raise ConfigError(f"{why}: PEFT puts its virtual tokens before all text, but this tokenizer puts its start "
                      "token before {prompt}")


def _peft_type(method_name: str) -> str:
    return "PREFIX_TUNING" if method_name == "prefix" else "PROMPT_TUNING"


# ------------------------------------------------------------------------------------------ layouts
def to_peft_rows(method, params: torch.Tensor) -> torch.Tensor:
    """fastprompt's trained tensor -> PEFT's ``(L, token_dim)`` or ``(L, n_layer * 2 * d)`` rows (fp32, a copy)."""
    params = params.detach().float()
    if method.name == "prefix":
        n_layer, _, L, H, hd = params.shape
        return params.permute(2, 0, 1, 3, 4).reshape(L, n_layer * 2 * H * hd)  # (L, layer, K/V, H, hd)
    return method.embeddings(params).float().clone()  # (L, d): the rows the model sees


def from_peft_rows(kind: str, rows: torch.Tensor, model) -> torch.Tensor:
    """PEFT's rows -> fastprompt's trained tensor: ``(L, d)``, or ``(n_layer, 2, L, H, hd)`` for prefixes."""
    rows = rows.detach().float()
    if kind == "PROMPT_TUNING":
        return rows.clone()
    c = model.config
    L = rows.shape[0]
    return rows.reshape(L, c.n_layer, 2, c.n_head, c.n_embd // c.n_head).permute(1, 2, 0, 3, 4).contiguous()


# ------------------------------------------------------------------------------------ adapters out
def check_adapter_dir(path: str, out: str | None = None) -> None:
    """``path`` may be new, empty, or an adapter directory (which is replaced); nothing else is overwritten,
    never through a link, never ``out`` (the run's --out) or a directory holding it (``outputs.check_output_dir``)."""
    from .outputs import check_output_dir

    check_output_dir(path, "--peft-out", out, allowed=ADAPTER_FILES)


def check_peft_out(tuner, path: str, out: str | None = None) -> None:
    """Everything ``save_peft`` would refuse, checked without writing (the CLI calls it before training)."""
    check_adapter_dir(path, out)
    require_peft("writing a PEFT adapter")
    check_prepended(tuner.encoder, "cannot write a PEFT adapter")
    if tuner.method.name == "prefix" and not is_gpt2_family(tuner.model):
        raise ConfigError("a prefix goes out as a PEFT adapter for the GPT-2 family only so far (PEFT's layout of "
                          "K/V heads for GQA and rotary models is not mapped); save it with fastprompt's prompt file")


def adapter_config(tuner):
    """The ``PromptTuningConfig`` / ``PrefixTuningConfig`` of the tuner's prompt, for inference."""
    peft = require_peft("writing a PEFT adapter")
    c = tuner.model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    d = int(tuner.model.get_input_embeddings().weight.shape[1])
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=tuner.prompt_len, token_dim=d,
                  num_transformer_submodules=1, num_layers=int(c.num_hidden_layers),
                  num_attention_heads=int(c.num_attention_heads), inference_mode=True,
                  base_model_name_or_path=str(getattr(tuner.model.config, "_name_or_path", "") or "") or None)
    if tuner.method.name == "prefix":
        return peft.PrefixTuningConfig(encoder_hidden_size=d, prefix_projection=False, **common)
    return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **common)


def save_peft(tuner, path: str) -> None:
    """Write the tuner's prompt as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), atomically; ``PeftModel.from_pretrained(base, path)`` serves it."""
    from safetensors.torch import save_file

    check_peft_out(tuner, path)
    config = adapter_config(tuner)
    rows = to_peft_rows(tuner.method, tuner.prompt).cpu().contiguous()
    if not torch.isfinite(rows).all():
        raise ConfigError("the prompt holds NaN/inf: no PEFT adapter written")

    def write(tmp: str) -> None:
        config.save_pretrained(tmp)  # adapter_config.json, PEFT's own serialisation
        save_file({"prompt_embeddings": rows}, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})

    atomic_write_dir(path, write)


# ------------------------------------------------------------------------------------- adapters in
class PeftLink:
    """The prompt of a live PEFT prompt-tuning / prefix-tuning model: read once, written back on request."""

    def __init__(self, peft_model):
        peft = require_peft("PromptTuner.from_peft")
        if not isinstance(peft_model, peft.PeftModel):
            raise ConfigError(f"from_peft needs a peft.PeftModel (get_peft_model or PeftModel.from_pretrained), "
                              f"got {type(peft_model).__name__}")
        self.peft_model = peft_model
        self.adapter = peft_model.active_adapter
        config = peft_model.peft_config[self.adapter]
        self.kind = str(getattr(config.peft_type, "value", config.peft_type))
        if self.kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
            raise ConfigError(f"from_peft trains PROMPT_TUNING and PREFIX_TUNING adapters, not {self.kind}")
        if config.num_transformer_submodules not in (None, 1):
            raise ConfigError("from_peft trains decoder-only models (num_transformer_submodules 1), not "
                              f"{config.num_transformer_submodules}")
        if self.kind == "PREFIX_TUNING" and config.prefix_projection:
            raise ConfigError("from_peft: this prefix is produced by a trainable MLP (prefix_projection=True); "
                              "fastprompt trains the K/V themselves: use prefix_projection=False")
        self.base = peft_model.get_base_model()
        if self.kind == "PREFIX_TUNING" and not is_gpt2_family(self.base):
            raise ConfigError("from_peft trains prefix tuning for the GPT-2 family only (got model type "
                              f"{getattr(self.base.config, 'model_type', '?')!r}); prompt tuning for any model")
        self.prompt_len = int(config.num_virtual_tokens)
        self.weight = peft_model.prompt_encoder[self.adapter].embedding.weight  # (L, token_dim | n_layer*2*d)
        d = int(self.base.get_input_embeddings().weight.shape[1])
        width = d if self.kind == "PROMPT_TUNING" else 2 * self.base.config.n_layer * d
        if tuple(self.weight.shape) != (self.prompt_len, width) or (
                self.kind == "PREFIX_TUNING" and config.num_attention_heads != self.base.config.n_head):
            raise ConfigError(f"from_peft: the {self.kind} prompt {tuple(self.weight.shape)} does not fit the base "
                              f"model (expected ({self.prompt_len}, {width}) and the model's attention heads)")

    @property
    def method(self) -> str:
        return "prefix" if self.kind == "PREFIX_TUNING" else "soft"

    def read(self) -> torch.Tensor:
        return from_peft_rows(self.kind, self.weight, self.base)

    @torch.no_grad()
    def write(self, method, params: torch.Tensor) -> None:
        self.weight.copy_(to_peft_rows(method, params).to(self.weight.device, self.weight.dtype))


class PeftLinked:
    """Mixed into ``PromptTuner`` by ``from_peft``: ``fit`` ends by writing the prompt back into the PEFT model
    (also when it stops early: the PEFT model then holds the steps taken)."""

    peft_link: PeftLink

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        finally:
            self.write_peft()

    def write_peft(self) -> None:
        """Copy the current prompt into the PEFT model's prompt encoder."""
        self.peft_link.write(self.method, self.prompt)


@functools.lru_cache(maxsize=None)
def _linked_class(cls):
    return type(f"Peft{cls.__name__}", (PeftLinked, cls), {"__module__": __name__, "__doc__": cls.__doc__})


NOT_FROM_PEFT = ("prompt_len", "prompt", "method", "init", "method_options")


def tuner_from_peft(cls, peft_model, tokenizer, template, **kwargs):
    """A ``cls`` tuner on ``peft_model``'s base model, starting from its prompt (see ``PromptTuner.from_peft``)."""
    given = [k for k in NOT_FROM_PEFT if k in kwargs]
    if given:
        raise ConfigError(f"from_peft takes the prompt, its length and its method from the PEFT model: do not "
                          f"pass {', '.join(given)}")
    link = PeftLink(peft_model)
    tuner = _linked_class(cls)(link.base, tokenizer, template, link.prompt_len, prompt=link.read(),
                               method=link.method, **kwargs)
    check_prepended(tuner.encoder, "from_peft")
    tuner.peft_link = link
    return tuner


# ------------------------------------------------------------------------------------ generate
@torch.no_grad()
def inputs_embeds(tuner, inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds (B, T, d), attention_mask (B, T))``: each input's template up to ``{target}``, left
    padded, the trained prompt in its slot, for ``model.generate(inputs_embeds=..., attention_mask=...)``."""
    if tuner.method.name == "prefix":
        raise ConfigError("a prefix prompt is per-layer keys and values, not input embeddings: generate with "
                          "tuner.generate, or save_peft and PEFT's model")
    encoded = tuner.encode_inputs(inputs)
    model = tuner.model
    device = next(model.parameters()).device
    L = tuner.prompt_len
    B, T = len(encoded), max(e.target_start for e in encoded)
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    for b, e in enumerate(encoded):
        pad = T - e.target_start
        ids[b, pad:] = torch.tensor(e.ids[: e.target_start])
        mask[b, pad:] = 1
        slot[b, pad + e.prompt_start : pad + e.prompt_start + L] = torch.arange(L)
    ids, mask, slot = ids.to(device), mask.to(device), slot.to(device)
    embeds = model.get_input_embeddings()(ids)  # (B, T, d), in the model's dtype
    prompt = tuner.method.embeddings(tuner.prompt.detach()).to(device, embeds.dtype)  # (L, d)
    embeds = torch.where((slot >= 0).unsqueeze(-1), prompt[slot.clamp(min=0)], embeds)
    return embeds, mask

"""Vocabulary relaxation: a distribution over the vocabulary at every prompt position (the post's "Better
interpretability"), annealed towards single tokens."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError, PromptFileError
from ..models import embedding_table
from .base import Method
from .init import init_ids


class RelaxedMethod(Method):
    """Vocabulary relaxation: per prompt position a distribution over the vocabulary,
    ``prompt = softmax(theta / tau) @ E`` with ``theta`` (L, V) trainable logits.

    Why the post's version stalled: it initialised ``theta`` with std 6. The largest of 50,257 such logits
    is ~4.1 std (~25) and leads the runner-up by ~1.3: the softmax is nearly one-hot on a handful of
    tokens and the remaining ~50,000 have probabilities below e^-20. The softmax Jacobian
    ``p_v (delta_vw - p_w)`` vanishes at a one-hot, so those logits get gradients ~1e-9 to 1e-20 —
    at or below Adam's eps (1e-8), where Adam's step shrinks from ``lr`` to ``lr * g / eps`` — and the
    few live logits move by at most ``lr = 1e-3`` a step, so reordering logits that are units apart takes
    thousands of steps. The prompt stays at its initial mixture.

    What converges here:
      * ``init_std`` small (default 0.01): a near-uniform softmax, whose Jacobian ``~1/V`` is the same for
        every token, so every token gets a gradient (Adam rescales it to ``~lr``); ``text:WORDS`` / ``vocab``
        inits put ``init_peak`` (default log V: about half the mass) on the chosen tokens.
      * ``lr_scale`` (default 100): ``theta`` is learned at ``lr * lr_scale``. Adam moves each logit by
        ~its learning rate per step and a token needs a lead of ~log V (~11) to dominate, so the prompt's
        default 1e-3 would need ~10^4 steps.
      * temperature annealing, ``tau_start`` -> ``tau_end`` (default 1 -> 0.1, geometric over the steps
        ``fit`` plans): the mixture is free early and driven towards single tokens late.
      * ``gumbel=True``: straight-through Gumbel-softmax (Jang et al. 2017) during training: the forward
        uses the one-hot ``argmax(theta + g)`` (a real token), the backward the softmax's gradient.

    Evaluation uses the deterministic mixture at the current temperature; ``token_ids`` is the argmax
    readout, which ``fastprompt.report.hard_prompt_metrics`` evaluates as a hard prompt.
    """

    name = "relaxed"

    def __init__(self, model, tokenizer, encoder, tau_start: float = 1.0, tau_end: float = 0.1,
                 init_std: float = 0.01, init_peak: float | None = None, lr_scale: float = 100.0,
                 gumbel: bool = False):
        super().__init__(model, tokenizer, encoder)
        if not (tau_start > 0 and tau_end > 0 and init_std >= 0 and lr_scale > 0):
            raise ConfigError("relaxed: tau_start, tau_end and lr_scale must be > 0, init_std >= 0")
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.init_std, self.lr_scale, self.gumbel = float(init_std), float(lr_scale), bool(gumbel)
        self.vocab = embedding_table(model).shape[0]
        self.init_peak = float(init_peak) if init_peak is not None else math.log(self.vocab)
        self._table = None
        self._tau = None  # the temperature as a device tensor, for the training step (``tau_tensor``)

    def table(self) -> torch.Tensor:
        """E (V, d) fp32 on the model's device, detached (the model is frozen)."""
        if self._table is None:
            self._table = embedding_table(self.model).detach().float()
        return self._table

    def init(self, init, seed, absorb_space):
        ids = init_ids(self.tokenizer, init, self.prompt_len, self.vocab, seed, absorb_space)
        g = torch.Generator().manual_seed(seed)
        theta = self.init_std * torch.randn(self.prompt_len, self.vocab, generator=g)
        if ids is not None:
            theta[torch.arange(self.prompt_len), torch.tensor(ids)] += self.init_peak
        return theta

    def param_shape(self):
        return (self.prompt_len, self.vocab)

    @property
    def tau(self) -> float:
        """Geometric interpolation tau_start -> tau_end over the planned steps (tau_end after them)."""
        if self.total_steps <= 0:
            return self.tau_start if self.step == 0 else self.tau_end
        frac = min(1.0, self.step / self.total_steps)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(theta.float() / self.tau, dim=-1)  # (L, V)

    def tau_tensor(self, device) -> torch.Tensor:
        """``tau`` in a device tensor, updated in place by ``plan`` and ``after_step`` (outside a captured step)."""
        if self._tau is None or self._tau.device != torch.device(device):
            self._tau = torch.tensor(self.tau, dtype=torch.float32, device=device)
        return self._tau

    def plan(self, steps):
        super().plan(steps)
        self._refresh_tau()

    def after_step(self, params):
        super().after_step(params)
        self._refresh_tau()

    def _refresh_tau(self) -> None:
        """The device tensor follows the schedule (in place: a captured step reads it)."""
        if self._tau is not None:
            self._tau.fill_(self.tau)

    def embeddings(self, theta, train=False):
        E = self.table().to(theta.device)
        tau = self.tau_tensor(theta.device) if train else self.tau
        if train and self.gumbel:
            u = torch.rand_like(theta).clamp_(1e-10, 1 - 1e-10)
            soft = torch.softmax((theta - torch.log(-torch.log(u))) / tau, dim=-1)
            hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
            weights = hard + (soft - soft.detach())  # straight-through
        else:
            weights = torch.softmax(theta.float() / tau, dim=-1)  # (L, V)
        return weights @ E  # (L, d)

    def param_groups(self, params, lr):
        return [{"params": [params], "lr": lr * self.lr_scale}]

    def token_ids(self, theta):
        return theta.detach().argmax(-1).tolist()

    def readout(self, theta, k=5):
        probs = self.probabilities(theta.detach())
        values, ids = probs.topk(k, dim=-1)
        lines = [f"relaxed prompt (tau {self.tau:.4g}); argmax tokens: {self.tokenizer.decode(self.token_ids(theta))!r} "
                 f"ids {self.token_ids(theta)}"]
        for position, (row_ids, row_values) in enumerate(zip(ids.tolist(), values.tolist())):
            lines.append(f"prompt position {position}:")
            lines += [f"  token_id: {i}, token: {self.tokenizer.decode([i])!r}, probability: {v:.4f}"
                      for i, v in zip(row_ids, row_values)]
        return "\n".join(lines) + "\n"

    def options(self):
        return {"tau_start": self.tau_start, "tau_end": self.tau_end, "init_std": self.init_std,
                "init_peak": self.init_peak, "lr_scale": self.lr_scale, "gumbel": self.gumbel}

    def tensors(self, theta):
        return {"prompt": self.embeddings(theta.detach()).float().cpu(), "logits": theta.detach().float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        if "logits" not in tensors:
            raise PromptFileError("a relaxed prompt file must hold the 'logits' tensor")
        return tensors["logits"]

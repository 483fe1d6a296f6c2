"""Shared test fixtures: tiny random models and relative-error helpers."""
from __future__ import annotations

import functools

import torch

from fastprompt.models import gpt2_tokenizer, random_gpt2


@functools.lru_cache(maxsize=None)
def tokenizer():
    return gpt2_tokenizer()


def tiny_gpt2(seed: int = 0, **overrides):
    config = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)
    config.update(overrides)
    return random_gpt2(config, seed=seed).eval().requires_grad_(False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

"""The soft prompt (the post's method): the trained ``(L, d)`` tensor *is* the prompt."""
from __future__ import annotations

import torch

from ..errors import PromptFileError
from .base import Method
from .init import init_prompt


class SoftMethod(Method):
    """Soft prompt: ``P`` (L, d) trained in the space of the input embeddings, handed to the engine as is."""

    name = "soft"
    embedding_rows = True

    def init(self, init: str, seed: int, absorb_space: bool) -> torch.Tensor:
        return init_prompt(self.model, self.tokenizer, self.prompt_len, init, seed, absorb_space=absorb_space)

    def param_shape(self) -> tuple[int, ...]:
        return (self.prompt_len, self.hidden)

    def embeddings(self, params: torch.Tensor, train: bool = False) -> torch.Tensor:
        return params

    def tensors(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Always ``prompt``: the effective ``(L, d)`` prompt, readable by any consumer."""
        return {"prompt": self.embeddings(params.detach()).float()}

    @classmethod
    def params_from(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if "prompt" not in tensors:
            raise PromptFileError("the prompt file has no 'prompt' tensor")
        return tensors["prompt"]

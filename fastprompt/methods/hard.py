"""PEZ hard prompts: a soft prompt trained through its projection onto the vocabulary."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models import embedding_table
from .soft import SoftMethod


class HardMethod(SoftMethod):
    """PEZ hard prompts (Wen et al. 2023, "Hard Prompts Made Easy"): continuous vectors ``P`` (L, d) are
    trained, but every forward uses their projection onto the vocabulary, ``E[nearest(P)]`` (a real token
    sequence); the gradient taken at the projection updates ``P`` (straight-through:
    ``P + (proj - P).detach()``). Nearest by cosine similarity (PEZ) or ``metric="euclidean"``.
    ``lr_scale`` multiplies the learning rate of ``P``. The trained prompt is ``token_ids`` (text and ids).
    """

    name = "hard"

    def __init__(self, model, tokenizer, encoder, metric: str = "cosine", lr_scale: float = 1.0):
        super().__init__(model, tokenizer, encoder)
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"hard: unknown metric {metric!r}: use cosine or euclidean")
        if not lr_scale > 0:
            raise ConfigError("hard: lr_scale must be > 0")
        self.metric, self.lr_scale = metric, float(lr_scale)
        self._table = None
        self._normed = None

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = embedding_table(self.model).detach().float()
            self._normed = torch.nn.functional.normalize(self._table, dim=-1)
        return self._table

    @torch.no_grad()
    def nearest(self, P: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (L,) nearest to each row of ``P``."""
        E = self.table()
        P = P.detach().float().to(E.device)
        if self.metric == "cosine":
            return (torch.nn.functional.normalize(P, dim=-1) @ self._normed.T).argmax(-1)
        return torch.cdist(P, E).argmin(-1)

    def embeddings(self, P, train=False):
        proj = self.table()[self.nearest(P)].to(P.device)  # (L, d)
        return P + (proj - P).detach()  # value: the projection; gradient: to P

    def param_groups(self, params, lr):
        return [{"params": [params], "lr": lr * self.lr_scale}]

    def token_ids(self, P):
        return self.nearest(P).tolist()

    def readout(self, P, k=5):
        ids = self.token_ids(P)
        head = f"hard prompt: {self.tokenizer.decode(ids)!r} ids {ids}\n"
        return head + super().readout(P, k)

    def options(self):
        return {"metric": self.metric, "lr_scale": self.lr_scale}

    def tensors(self, P):
        proj = self.table()[self.nearest(P)]  # exactly the vocabulary rows
        return {"prompt": proj.float().cpu(), "continuous": P.detach().float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        return tensors["continuous"] if "continuous" in tensors else super().params_from(tensors)

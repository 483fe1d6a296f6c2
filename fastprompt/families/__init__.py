"""Model families of the packed engine (docs/ARCHITECTURE.md, 'Families'): each maps a Hugging Face model
onto the shared pieces of ``base.py``; ``family_of`` picks one by ``config.model_type``."""
from __future__ import annotations

from . import gemma3, gpt2, llama
from .base import FamilyError, ModelWeights, Reader

FAMILIES = (gpt2, llama, gemma3)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}


def family_of(model):
    """The family module of ``model``, or a ``FamilyError`` saying which model types have one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise FamilyError(f"the packed engine has no family for model_type={model_type!r} (families: "
                          f"{', '.join(sorted(BY_MODEL_TYPE))}): use engine='generic'")
    return family


def read_weights(model, dtype=None) -> ModelWeights:
    """``model``'s weights as its family reads them (``FamilyError`` for a setting it does not implement)."""
    return family_of(model).read(model, dtype)


def read_block(model, i: int, dtype=None):
    """Layer ``i`` of ``model`` as its family reads it (a ``families.base.Block``), for a model whose
    ``read_weights`` succeeded: the fused engine on sharded weights reads each layer while it is gathered."""
    return family_of(model).read_block(model, i, Reader(dtype))


def unsupported_reason(model) -> str | None:
    """Why the packed engine cannot run ``model`` (the ``FamilyError`` message), or None. Reads views only
    (``dtype`` None: no copy besides the concatenated q/k/v and gate/up weights, dropped at once)."""
    try:
        read_weights(model)
    except FamilyError as e:
        return str(e)
    return None


__all__ = ["FAMILIES", "FamilyError", "ModelWeights", "family_of", "read_block", "read_weights", "unsupported_reason"]

"""Model families of the packed engine (docs/ARCHITECTURE.md, 'Families'): each maps a Hugging Face model
onto the shared pieces of ``base.py``; ``family_of`` picks one by ``config.model_type``."""
from __future__ import annotations

import weakref

import torch

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
    """``model``'s weights as its family reads them (``FamilyError`` for a setting it does not implement).
    Engines over one model share one read (its concatenated q/k/v and gate/up copies, a bf16 copy: a sweep's
    engine per prompt length holds them once) while one of them still holds it and no parameter or buffer
    has changed since: the same storage and the same in-place version counter (``load_state_dict``,
    ``copy_`` and any in-place op move it), else the model is read again."""
    signature = _signature(model)
    held = _READ.get(model, {}).get(dtype) if signature is not None else None
    weights = held[1]() if held is not None and held[0] == signature else None
    if weights is None:
        weights = family_of(model).read(model, dtype)
        if signature is not None:
            _READ.setdefault(model, {})[dtype] = (signature, weakref.ref(weights))
    return weights


# model -> {dtype: (signature, weak reference to its ModelWeights)}: the read lives as long as an engine holds it
_READ: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(model) -> tuple | None:
    """Every parameter's and buffer's storage, in-place version, dtype and shape; None for sharded weights
    (a DTensor: the engine reads each layer while it is gathered, nothing to share)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
    else:
        DTensor = ()  # noqa: N806
    out = []
    for t in (*model.parameters(), *model.buffers()):
        if isinstance(t, DTensor):
            return None
        out.append((t.data_ptr(), t._version, t.dtype, tuple(t.shape)))
    return tuple(out)


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

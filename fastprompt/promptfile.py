"""Prompt files, every method's: written (``save_prompt_file``), read (``read_prompt_file``) and checked
against a model (``check_fits``) here only; ``atomic_write_dir`` (files: ``outputs.atomic_write``).

A prompt file is safetensors: the method's tensors (``Method.tensors``: a soft prompt's are ``{"prompt": P}``)
and string metadata (model, template, prompt length, hidden size, method, its options and schedule state;
non-strings as JSON). A legacy ``torch.save`` tensor (.pt) reads as a soft prompt."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import torch

from .errors import PromptFileError
from .outputs import atomic_write, umask  # noqa: F401  (atomic_write: every output goes through it)

FORMAT_VERSION = "1"
NDIM = {"prompt": 2, "logits": 2, "continuous": 2, "prefix": 5}  # the tensors methods save (Method.tensors)


def atomic_write_dir(path: str, write) -> None:
    """``write(tmp_dir)`` fills a new directory beside ``path``, then it is renamed to ``path``: a reader sees
    the old directory or the new one, whole. An existing ``path`` is renamed aside first and deleted after
    the new one is in place (a crash between the two renames leaves it as ``.*.tmpdir.old`` beside ``path``)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".", suffix=".tmpdir")  # not ".tmp": resume deletes those files
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: the mode makedirs gives every other directory
        write(tmp)
        if not os.path.isdir(path):
            os.rename(tmp, path)
            return
        old = tmp + ".old"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)
            raise
        shutil.rmtree(old)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def save_prompt_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """fp32 ``tensors`` and ``metadata`` (non-strings as JSON) as a safetensors prompt file, atomically."""
    from safetensors.torch import save_file

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    meta["format"] = f"fastprompt-prompt-{FORMAT_VERSION}"
    cpu = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def read_prompt_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a prompt file, every tensor fp32, dense, real, finite and of its ``NDIM``.
    A legacy ``torch.save`` tensor (.pt, .pth, .bin) is ``{"prompt": tensor}`` without metadata, loaded with
    ``weights_only=True``: nothing is unpickled beyond plain tensors."""
    if not os.path.isfile(path):
        raise PromptFileError(f"no prompt file at {path}")
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols etc.: our one line says it all
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PromptFileError(f"{path} is not a plain tensor file ({type(e).__name__}); it was not loaded "
                                  "(fastprompt reads tensors only, never other pickled objects)") from None
        if isinstance(obj, dict) and "prompt" in obj:
            obj = obj["prompt"]
        if not torch.is_tensor(obj):
            raise PromptFileError(f"{path} does not hold a (prompt_len, hidden) tensor")
        tensors, metadata = {"prompt": obj}, {}
    else:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise PromptFileError(f"{path} is not a valid safetensors prompt file ({str(e)[:120]})") from None
    return {name: _checked(t, name, path) for name, t in tensors.items()}, metadata


def _checked(t: torch.Tensor, name: str, path: str) -> torch.Tensor:
    """A saved tensor as fp32: dense, real, finite and of its ``NDIM``, or ``PromptFileError``."""
    if t.layout != torch.strided or t.is_complex() or t.dtype == torch.bool:
        raise PromptFileError(f"{path}: tensor {name!r} must be dense and real, got {t.dtype} {t.layout}")
    if name in NDIM and t.dim() != NDIM[name]:
        raise PromptFileError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {NDIM[name]} dimensions")
    t = t.float()
    if not torch.isfinite(t).all():
        raise PromptFileError(f"{path}: tensor {name!r} holds NaN/inf values")
    return t


def check_fits(path: str, model, *, hidden: int | None = None, saved_model: str = "", hint: str = "") -> None:
    """Refuse what was saved for another model: ``hidden`` (the saved hidden size, where known) against the
    model's, and ``saved_model`` (its name, where given) against the model's name, both without the hub
    organisation ('openai-community/gpt2' == 'gpt2'). ``hint`` ends the model-name message."""
    this_hidden = int(model.get_input_embeddings().weight.shape[1])
    if hidden is not None and hidden != this_hidden:
        raise PromptFileError(f"{path} was made for hidden size {hidden}, this model has {this_hidden}")
    saved = _short(str(saved_model or ""))
    this = _short(str(getattr(model.config, "_name_or_path", "") or ""))
    if saved and this and saved != this:
        raise PromptFileError(f"{path} was made for model {saved!r}, not {this!r}{hint}")


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1]

"""Prompt files, every method's: written (``save_prompt_file``), read (``read_prompt_file``) and checked
against a model (``check_fits``) here only; ``atomic_write_dir`` (files: ``outputs.atomic_write``).

A prompt file is safetensors: the method's tensors (``Method.tensors``: a soft prompt's are ``{"prompt": P}``)
and string metadata (model, template, prompt length, hidden size, method, its options and schedule state;
non-strings as JSON). A legacy ``torch.save`` tensor (.pt) reads as a soft prompt."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import warnings
from typing import Any

import torch

from .errors import PromptFileError
from .outputs import atomic_write, umask  # noqa: F401  (atomic_write: every output goes through it)

FORMAT_VERSION = "1"
NDIM = {"prompt": 2, "logits": 2, "continuous": 2, "prefix": 5, "ids": 1}  # the tensors methods save (Method.tensors)


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
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise PromptFileError(f"no prompt file at {path}") from None
    if not stat.S_ISREG(mode):  # a FIFO would be opened and waited on
        from .outputs import kind

        raise PromptFileError(f"{path} is {kind(mode)}, not a prompt file")
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


STEP_LIMIT = 2**53  # schedule steps beyond it are nonsense (and overflow where they become floats)
TAU_RANGE = (1e-30, 1e30)
# The tensors each method's file must hold (the methods' names: tests/test_methods.py holds them equal to
# methods.METHODS; this module sits below the methods, which read files through it).
METHOD_TENSORS = {"soft": ("prompt",), "relaxed": ("prompt", "logits"), "hard": ("prompt",), "prefix": ("prefix",),
                  "gcg": ("prompt", "ids")}


def method_record(path: str, method: str, tensors: dict, meta: dict[str, str]) -> dict[str, Any]:
    """A prompt file's method metadata, parsed and checked: ``options``, ``step``, ``total_steps``,
    ``token_ids`` (or None). ``PromptFileError`` for what a hand edit or another tool could leave."""
    if not isinstance(method, str) or method not in METHOD_TENSORS:
        raise PromptFileError(f"{path}: unknown method {method!r} in its metadata (known: {', '.join(METHOD_TENSORS)})")
    need = METHOD_TENSORS[method]
    for name in need:
        if name not in tensors:
            raise PromptFileError(f"{path}: a {method} prompt file must hold the {name!r} tensor")
    record: dict[str, Any] = {}
    try:
        options = json.loads(meta.get("method_options", "{}"))
        step, total = (json.loads(meta.get(key, "0")) for key in ("method_step", "method_total_steps"))
        ids = json.loads(meta["token_ids"]) if "token_ids" in meta else None
    except (ValueError, RecursionError):
        raise PromptFileError(f"{path}: its method metadata is not valid JSON") from None
    if not isinstance(options, dict):
        raise PromptFileError(f"{path}: method_options must be a JSON object")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < STEP_LIMIT for x in (step, total)):
        raise PromptFileError(f"{path}: method_step and method_total_steps must be integers from 0 to 2**53")
    if method == "relaxed" and options:
        taus = [options.get("tau_start"), options.get("tau_end")]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and TAU_RANGE[0] <= t <= TAU_RANGE[1]
                   for t in taus):
            raise PromptFileError(f"{path}: relaxed method_options need tau_start and tau_end > 0 (from 1e-30 to "
                                  "1e30)")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in ids)):
        raise PromptFileError(f"{path}: token_ids must be a JSON list of integers")
    for key, (low, high) in (("prompt_len", (1, 4096)), ("hidden_size", (1, 1 << 17))):
        if key in meta:
            try:
                value = json.loads(meta[key])
            except (ValueError, RecursionError):
                value = meta[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise PromptFileError(f"{path}: {key} in its metadata must be an integer from {low} to {high}, "
                                      f"got {meta[key][:20]!r}")
    record.update(options=options, step=step, total_steps=total, token_ids=ids)
    return record



def _checked(t: torch.Tensor, name: str, path: str) -> torch.Tensor:
    """A saved tensor as fp32: dense, real, finite and of its ``NDIM``, or ``PromptFileError``."""
    if t.layout != torch.strided or t.is_complex() or t.dtype == torch.bool:
        raise PromptFileError(f"{path}: tensor {name!r} must be dense and real, got {t.dtype} {t.layout}")
    if name in NDIM and t.dim() != NDIM[name]:
        raise PromptFileError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {NDIM[name]} dimensions")
    if t.dim() == 0 or 0 in t.shape:
        raise PromptFileError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}: it holds no vectors")
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

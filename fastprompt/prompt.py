"""Prompt initialisation and safe (safetensors) storage."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import torch

from .errors import ConfigError, PromptFileError
from .models import embedding_table

FORMAT_VERSION = "1"


def init_prompt(model, tokenizer, prompt_len: int, init: str = "random", seed: int = 1337,
                absorb_space: bool = True) -> torch.Tensor:
    """An fp32 ``(prompt_len, d)`` prompt on the CPU.

    ``random``: the post's in-distribution init, normal with the embedding table's per-dimension mean and
    std. ``text:WORDS``: the embeddings of WORDS (with the space the slot absorbs), cut or repeated to
    length. ``vocab``: embeddings of random vocabulary tokens. ``file:PATH``: the prompt saved at PATH
    (safetensors, or a legacy ``torch.save(tensor)`` .pt), refused when made for another hidden size, model
    or prompt length.
    """
    if init.startswith("file:"):
        return prompt_from_file(init[len("file:"):], model, prompt_len)
    table = embedding_table(model).detach().float().cpu()  # (V, d)
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        mean, std = table.mean(0), table.std(0)
        return mean + std * torch.randn(prompt_len, table.shape[1], generator=generator)
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (prompt_len,), generator=generator)
        return table[ids].clone()
    if init.startswith("text:"):
        words = init[len("text:"):]
        if not words.strip():
            raise ConfigError("--init text: needs words after the colon, e.g. text:antonyms")
        text = (" " + words.lstrip()) if absorb_space else words
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"--init {init!r} tokenises to nothing")
        ids = (ids * prompt_len)[:prompt_len]
        return table[torch.tensor(ids)].clone()
    raise ConfigError(f"unknown prompt init {init!r}: use random, vocab, text:WORDS or file:PROMPT.safetensors")


def prompt_from_file(path: str, model, prompt_len: int) -> torch.Tensor:
    """A saved prompt to start from (``--init file:PATH``), checked against ``model`` and ``prompt_len``."""
    if not path:
        raise ConfigError("--init file: needs a path, e.g. file:runs/x/prompt.safetensors")
    prompt, meta = read_prompt(path)
    hidden = model.get_input_embeddings().weight.shape[1]
    if prompt.shape[1] != hidden:
        raise PromptFileError(f"{path} was made for hidden size {prompt.shape[1]}, this model has {hidden}")
    saved = str(meta.get("model", "") or "").rstrip("/").split("/")[-1]
    this = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    if saved and this and saved != this:
        raise PromptFileError(f"{path} was made for model {saved!r}, not {this!r}")
    if prompt.shape[0] != prompt_len:
        raise PromptFileError(f"{path} holds a prompt of length {prompt.shape[0]}; pass --prompt-len {prompt.shape[0]}")
    return prompt.clone()


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader sees the old file or the new one, whole."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: the mode open() gives every other output
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_dir(path: str, write) -> None:
    """``write(tmp_dir)`` fills a new directory beside ``path``, then it is renamed to ``path``: a reader sees
    the old directory or the new one, whole. An existing ``path`` is renamed aside first and deleted after
    the new one is in place (a crash between the two renames leaves it as ``.*.tmpdir.old`` beside ``path``)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".", suffix=".tmpdir")  # not ".tmp": resume deletes those files
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: the mode makedirs gives every other directory
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


def _umask() -> int:
    """The process's umask (read by setting it and back: Python offers no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """fp32 tensors and string metadata (non-strings as JSON) as a safetensors prompt file, atomically."""
    from safetensors.torch import save_file

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    meta["format"] = f"fastprompt-prompt-{FORMAT_VERSION}"
    cpu = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def save_prompt(path: str, prompt: torch.Tensor, metadata: dict[str, object]) -> None:
    """Write ``prompt`` and its metadata to a safetensors file atomically (temp file + rename)."""
    save_tensors(path, {"prompt": prompt}, metadata)


def read_prompt(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    """``(prompt, metadata)`` from a safetensors file, or from a legacy ``torch.save(tensor)`` .pt file
    (loaded with ``weights_only=True``: nothing is unpickled beyond plain tensors)."""
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
        return _checked_prompt(obj, path), {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if "prompt" not in f.keys():
                raise PromptFileError(f"{path} has no 'prompt' tensor")
            prompt = f.get_tensor("prompt")
    except PromptFileError:
        raise
    except Exception as e:
        raise PromptFileError(f"{path} is not a valid safetensors prompt file ({str(e)[:120]})") from None
    return _checked_prompt(prompt, path), metadata


def _checked_prompt(t: torch.Tensor, path: str) -> torch.Tensor:
    """A saved prompt as fp32: dense, real, 2-D and finite, or ``PromptFileError``."""
    if t.layout != torch.strided or t.is_complex() or t.dtype == torch.bool or t.dim() != 2:
        raise PromptFileError(f"{path}: the prompt must be a dense real (prompt_len, hidden) tensor, got "
                              f"{t.dtype} {tuple(t.shape)}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise PromptFileError(f"{path}: the prompt holds NaN/inf values")
    return t

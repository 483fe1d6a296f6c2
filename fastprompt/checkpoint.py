"""Training checkpoints in ``--out``: everything a run needs to continue exactly, with no pickle anywhere.

    checkpoint.safetensors   tensors: ``param.{i}`` (what the optimizer trains, ``PromptTuner.prompt``),
                             ``optim.{i}.{key}`` (Adam's exp_avg, exp_avg_sq, step), ``rng.torch``,
                             ``rng.cuda.{i}``; metadata ``fastprompt_checkpoint``: the JSON state below.
                             Written to a temp file and renamed over the old one: it is the checkpoint.
    checkpoint.json          the same JSON state for people and tools, written (atomically) right after.

JSON state: ``epoch`` (0-based epoch in progress; all earlier epochs are done and in ``history``), ``step``
(batches of that epoch already done), ``ce_sum`` / ``n_tokens`` (their summed loss), ``history``, the
optimizer's param groups and scalar state, the method's schedule, the run's config and the model.

Batches are a function of (seed, epoch) (``PromptTuner.batches``) and python's ``random`` is not used
otherwise, so a resumed run skips the ``step`` batches already done and continues bit for bit.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from . import __version__
from .errors import ConfigError, NonFiniteError, PromptFileError
from .prompt import atomic_write

FORMAT = "fastprompt-checkpoint-1"
TENSORS = "checkpoint.safetensors"
SIDECAR = "checkpoint.json"
# Options that change what a resumed run computes; the others (epochs, engine, device, ...) may change.
MUST_MATCH = ("model", "data", "template", "prompt_len", "init", "batch_size", "lr", "train_size", "test_size",
              "seed", "method", "method_opt")


# ------------------------------------------------------------------------------------------ writing
def state_tensors(tuner) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, json_state)`` of the tuner's trainable tensors, optimizer and RNGs."""
    tensors: dict[str, torch.Tensor] = {}
    params = [p for group in tuner.optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
    sd = tuner.optimizer.state_dict()
    state_json: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        entry: dict[str, Any] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"optim.{pid}.{key}"}
            else:
                entry[key] = value
        state_json[str(pid)] = entry
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
        n_cuda = torch.cuda.device_count()
    meta = {"optimizer": {"param_groups": sd["param_groups"], "state": state_json}, "n_params": len(params),
            "cuda_rng_states": n_cuda}
    return tensors, meta


def save_checkpoint(out: str, tuner, *, epoch: int, step: int, ce_sum: float, n_tokens: int,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``checkpoint.safetensors`` + ``checkpoint.json`` in ``out`` atomically; returns the JSON state.

    Refuses (``NonFiniteError``) to write non-finite tensors: the last good checkpoint stays."""
    from safetensors.torch import save_file

    tensors, meta = state_tensors(tuner)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{name} holds NaN/inf at epoch {epoch + 1}, step {step}: checkpoint not written")
    method = getattr(tuner, "method", None)
    state = {
        "format": FORMAT, "fastprompt_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "epoch": epoch, "step": step, "ce_sum": float(ce_sum), "n_tokens": int(n_tokens),
        "history": tuner.history, "method": {"name": getattr(method, "name", "soft"),
                                             "step": getattr(method, "step", 0),
                                             "total_steps": getattr(method, "total_steps", 0)},
        "model": str(getattr(tuner.model.config, "_name_or_path", "") or ""),
        "hidden_size": int(tuner.model.get_input_embeddings().weight.shape[1]),
        "prompt_len": tuner.prompt_len, "template": tuner.template.text, "seed": tuner.seed,
        "config": config or {}, **meta,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    text = json.dumps(state, sort_keys=True)
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, TENSORS),
                  lambda tmp: save_file(tensors, tmp, metadata={"fastprompt_checkpoint": text}))
    atomic_write(os.path.join(out, SIDECAR),
                  lambda tmp: _write_text(tmp, json.dumps(state, indent=1, sort_keys=True)))
    return state


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ------------------------------------------------------------------------------------------ reading
def exists(out: str) -> bool:
    return os.path.isfile(os.path.join(out, TENSORS))


def load_checkpoint(out: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` from ``out/checkpoint.safetensors`` (safetensors and JSON only: nothing is
    unpickled). ``PromptFileError`` for a missing, corrupt or foreign file."""
    from safetensors import safe_open

    path = os.path.join(out, TENSORS)
    if not os.path.isfile(path):
        raise PromptFileError(f"nothing to resume: no {TENSORS} in {out}")
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("fastprompt_checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PromptFileError(f"{path} is not a valid safetensors checkpoint ({str(e).strip()[:120]})") from None
    try:
        state = json.loads(text) if text else None
    except ValueError:
        state = None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PromptFileError(f"{path} is not a fastprompt checkpoint (no {FORMAT} state in its metadata)")
    try:
        n_params, epoch, step = int(state["n_params"]), int(state["epoch"]), int(state["step"])
        history = state["history"]
        assert isinstance(history, list) and len(history) == epoch and step >= 0
        assert all(f"param.{i}" in tensors for i in range(n_params))
    except (KeyError, TypeError, ValueError, AssertionError):
        raise PromptFileError(f"{path}: the checkpoint's state is incomplete or inconsistent") from None
    return tensors, state


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """The resumed run must compute what the checkpointed one did (``MUST_MATCH`` options)."""
    saved = state.get("config") or {}
    for key in MUST_MATCH:
        if key in saved and key in config and saved[key] != config[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{path} was written with {flag} {saved[key]!r}, this run has {config[key]!r}: "
                              f"resume with the same {flag}, or start afresh in another --out")


def restore(tuner, tensors: dict[str, torch.Tensor], state: dict[str, Any], lr: float,
            path: str = "checkpoint") -> None:
    """Put the checkpoint into ``tuner``: trainable tensors, optimizer, RNGs, history, method schedule and
    the resume point of the epoch in progress (consumed by the next ``fit``)."""
    hidden = int(tuner.model.get_input_embeddings().weight.shape[1])
    if state.get("hidden_size") not in (None, hidden):
        raise PromptFileError(f"{path} was made for hidden size {state['hidden_size']}, this model has {hidden}")
    if tuner.optimizer is None:
        tuner.optimizer = tuner.make_optimizer(lr)
    params = [p for group in tuner.optimizer.param_groups for p in group["params"]]
    if len(params) != int(state["n_params"]):
        raise PromptFileError(f"{path} holds {state['n_params']} trained tensors, this run trains {len(params)}")
    for i, p in enumerate(params):
        saved = tensors[f"param.{i}"]
        if tuple(saved.shape) != tuple(p.shape):
            raise PromptFileError(f"{path}: trained tensor {i} has shape {tuple(saved.shape)}, this run's has "
                                  f"{tuple(p.shape)} (another prompt length, method or model)")
    try:
        opt = state["optimizer"]
        groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                  for g in opt["param_groups"]]
        opt_state = {int(pid): {k: (tensors[v["tensor"]].clone() if isinstance(v, dict) else v)
                                for k, v in entry.items()} for pid, entry in opt["state"].items()}
        tuner.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as e:
        raise PromptFileError(f"{path}: the optimizer state does not fit this run ({str(e)[:120]})") from None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.dtype))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(int(state.get("cuda_rng_states", 0)))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    tuner.history = list(state["history"])
    method = getattr(tuner, "method", None)
    if method is not None and hasattr(method, "step"):
        method.step = int(state["method"].get("step", 0))
        method.total_steps = int(state["method"].get("total_steps", 0))
    tuner.resume_at = {"step": int(state["step"]), "ce_sum": float(state["ce_sum"]), "n_tokens": int(state["n_tokens"])}


def remove(out: str) -> None:
    """Delete the checkpoint in ``out`` (a fresh run with ``--overwrite``)."""
    for name in (TENSORS, SIDECAR):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)

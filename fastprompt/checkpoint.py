"""Training checkpoints in ``--out``: everything a run needs to continue exactly, with no pickle anywhere.

    checkpoint.safetensors   tensors: ``param.{i}`` (what the optimizer trains, ``PromptTuner.prompt``),
                             ``optim.{i}.{key}`` (Adam's exp_avg, exp_avg_sq, step), ``rng.torch``,
                             ``rng.cuda.{i}``; metadata ``fastprompt_checkpoint``: the JSON state below.
                             Written to a temp file and renamed over the old one: it is the checkpoint.
    checkpoint.json          the same JSON state for people and tools, written (atomically) right after.

JSON state: ``epoch`` (0-based epoch in progress; all earlier epochs are done and in ``history``), ``step``
(batches of that epoch already done), ``ce_sum`` / ``n_tokens`` (their summed loss), ``history``, the
optimizer's param groups and scalar state, the method's schedule, the run's config (with the data file's
sha256) and the model, and ``checksum``: sha256 over every tensor (name, dtype, shape, bytes) and the rest
of the JSON state. ``load_checkpoint`` checks it all (checksum, every tensor's shape, dtype and finiteness,
the optimizer's and the RNG's state, the history) before a run writes anything: a damaged checkpoint, even
one of finite garbage, is refused with one line.

Batches are a function of (seed, epoch) (``PromptTuner.batches``) and python's ``random`` is not used
otherwise, so a resumed run skips the ``step`` batches already done and continues bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import torch

from . import __version__
from .errors import NonFiniteError, PromptFileError
from .options import check_resume, resume_keys
from .promptfile import atomic_write, check_fits

FORMAT = "fastprompt-checkpoint-1"
TENSORS = "checkpoint.safetensors"
SIDECAR = "checkpoint.json"
# Options that change what a resumed run computes, as fastprompt/options.py declares them (resume=MATCH or
# CONTENT); the others (epochs, engine, device, ...) may change.
MUST_MATCH = resume_keys()


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
    state["checksum"] = checksum(tensors, state)
    text = json.dumps(state, sort_keys=True)
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, TENSORS),
                  lambda tmp: save_file(tensors, tmp, metadata={"fastprompt_checkpoint": text}))
    atomic_write(os.path.join(out, SIDECAR),
                  lambda tmp: _write_text(tmp, json.dumps(state, indent=1, sort_keys=True)))
    return state


def checksum(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
    """sha256 of the tensors (sorted by name: name, dtype, shape, raw bytes) and of the JSON state without
    its ``checksum`` (canonical: sorted keys; json round-trips it exactly)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    rest = {k: v for k, v in state.items() if k != "checksum"}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


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
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PromptFileError(f"{path} is not a fastprompt checkpoint (no {FORMAT} state in its metadata)")
    if state.get("checksum") != checksum(tensors, state):
        why = "it has no checksum" if "checksum" not in state else "its checksum does not match its contents"
        raise PromptFileError(f"{path} is damaged ({why}: edited, truncated or corrupt); it cannot be resumed")
    problem = validate(tensors, state)
    if problem:
        raise PromptFileError(f"{path}: the checkpoint's state is inconsistent ({problem}); it cannot be resumed")
    return tensors, state


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint whose checksum matched (a bug, or a hand-made file), or None: its keys,
    types and ranges (``schema.checkpoint_fields``), then every count, shape, dtype and reference that
    ``restore`` and the next step rely on."""
    from . import schema

    problem = schema.check_record(state, schema.checkpoint_fields(schema.config_fields(required=MUST_MATCH)),
                                  "the state")
    if problem:
        return problem
    n_params, epoch, step = state.get("n_params"), state.get("epoch"), state.get("step")
    if not (_is_int(n_params, 1) and _is_int(epoch) and _is_int(step)):
        return "n_params, epoch and step must be non-negative integers"
    if not (_is_number(state.get("ce_sum")) and math.isfinite(state["ce_sum"]) and _is_int(state.get("n_tokens"))):
        return "ce_sum must be a finite number and n_tokens a non-negative integer"
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch:
        return f"history must list the {epoch} finished epochs"
    for i, record in enumerate(history):
        if not (isinstance(record, dict) and record.get("epoch") == i + 1 and _is_number(record.get("train_loss"))):
            return f"history entry {i} is not epoch {i + 1}'s record"
    shapes = state.get("tensors")
    if not isinstance(shapes, dict) or set(shapes) != set(tensors):
        return "its tensor list does not match the tensors in the file"
    for name, t in tensors.items():
        if list(t.shape) != shapes[name]:
            return f"tensor {name} has shape {list(t.shape)}, the state says {shapes[name]}"
    param_shapes = []
    for i in range(n_params):
        p = tensors.get(f"param.{i}")
        if p is None or p.dtype != torch.float32 or p.dim() < 1 or not torch.isfinite(p).all():
            return f"param.{i} must be a finite fp32 tensor"
        param_shapes.append(p.shape)
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "rng.torch is not a torch CPU generator state"
    n_cuda = state.get("cuda_rng_states", 0)
    if not _is_int(n_cuda) or any(tensors.get(f"rng.cuda.{i}") is None or tensors[f"rng.cuda.{i}"].dtype != torch.uint8
                                  or tensors[f"rng.cuda.{i}"].dim() != 1 for i in range(n_cuda)):
        return "the CUDA generator states are incomplete"
    method = state.get("method")
    if not (isinstance(method, dict) and isinstance(method.get("name"), str) and _is_int(method.get("step"))
            and _is_int(method.get("total_steps"))):
        return "the method's schedule (name, step, total_steps) is missing"
    return _validate_optimizer(tensors, state.get("optimizer"), param_shapes)


ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")  # what torch's Adam keeps per parameter with the run's settings


def _validate_optimizer(tensors, opt, param_shapes) -> str | None:
    """Adam's param groups and per-parameter state (exp_avg, exp_avg_sq: the parameter's shape, finite,
    exp_avg_sq >= 0; step: a finite scalar >= 0)."""
    if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and isinstance(opt.get("state"), dict)):
        return "the optimizer state is missing"
    seen: list[int] = []
    for group in opt["param_groups"]:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_int(i) for i in group["params"])):
            return "an optimizer param group has no parameter list"
        lr, betas, eps = group.get("lr"), group.get("betas"), group.get("eps")
        if not (_is_number(lr) and lr > 0 and math.isfinite(lr) and _is_number(eps) and eps >= 0
                and isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            return "an optimizer param group has a bad lr, betas or eps"
        seen += group["params"]
    if sorted(seen) != list(range(len(param_shapes))):
        return "the optimizer's param groups do not cover the trained tensors once each"
    for pid, entry in opt["state"].items():
        if not (pid.isdigit() and int(pid) < len(param_shapes) and isinstance(entry, dict)):
            return f"optimizer state {pid!r} belongs to no trained tensor"
        shape = param_shapes[int(pid)]
        unknown = sorted(set(entry) - set(ADAM_STATE))
        if unknown:
            return f"optimizer state {pid} holds {unknown[0]!r}, which this run's Adam never keeps"
        for key in ADAM_STATE:
            ref = entry.get(key)
            t = tensors.get(ref["tensor"]) if isinstance(ref, dict) and isinstance(ref.get("tensor"), str) else None
            if t is None or t.dtype != torch.float32 or not torch.isfinite(t).all():
                return f"optimizer state {pid}: {key} is missing or not a finite fp32 tensor"
            if (t.shape != shape) if key != "step" else (t.dim() != 0 or t.item() < 0):
                return f"optimizer state {pid}: {key} has shape {list(t.shape)}, the trained tensor {list(shape)}"
        if (tensors[entry["exp_avg_sq"]["tensor"]] < 0).any():
            return f"optimizer state {pid}: exp_avg_sq is negative"
    return None


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """The resumed run must compute what the checkpointed one did (``MUST_MATCH`` options: each by value, the
    data files by their sha256; ``options.check_resume``)."""
    check_resume(state.get("config") or {}, config, path)


def restore(tuner, tensors: dict[str, torch.Tensor], state: dict[str, Any], lr: float,
            path: str = "checkpoint") -> None:
    """Put the checkpoint into ``tuner``: trainable tensors, optimizer, RNGs, history, method schedule and
    the resume point of the epoch in progress (consumed by the next ``fit``)."""
    check_fits(path, tuner.model, hidden=state.get("hidden_size"))
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
    opt = state["optimizer"]
    groups = tuner.optimizer.state_dict()["param_groups"]  # the settings come from this run's options
    check_optimizer(opt["param_groups"], groups, path)
    try:
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


# Settings of the device, not of the math: a checkpoint written on a GPU (capturable Adam) resumes on the CPU.
DEVICE_SETTINGS = ("capturable",)


def check_optimizer(saved: list, groups: list[dict[str, Any]], path: str) -> None:
    """The checkpoint's optimizer settings must be this run's own (``groups``: what its options give), key
    for key: none missing, none the run does not use (amsgrad, maximize, ... as this run sets them), no other
    value. The run then uses its own; nothing is taken from the file."""
    if len(saved) != len(groups):
        raise PromptFileError(f"{path}: the checkpoint has {len(saved)} optimizer param groups, this run "
                              f"{len(groups)}; it cannot be resumed")
    for i, (mine, theirs) in enumerate(zip(groups, saved)):
        for key in theirs:
            if key not in mine:
                raise PromptFileError(f"{path}: optimizer setting {key!r} (param group {i}) is not one this run's "
                                      "Adam has; it cannot be resumed")
        for key, want in mine.items():
            if key not in theirs:
                raise PromptFileError(f"{path}: the checkpoint has no optimizer setting {key!r} (param group {i}); "
                                      "it cannot be resumed")
            got = theirs[key]
            if key in DEVICE_SETTINGS:
                if not isinstance(got, bool):
                    raise PromptFileError(f"{path}: optimizer setting {key!r} must be true or false, got {got!r}")
                continue
            if not _same(got, want):
                raise PromptFileError(f"{path}: optimizer setting {key!r} is {got!r} in the checkpoint, this run's "
                                      f"options give {_plain(want)!r}; it cannot be resumed")


def _same(got, want) -> bool:
    if isinstance(want, bool) or want is None:
        return got is want
    if isinstance(want, (int, float)):
        return _is_number(got) and float(got) == float(want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    return type(got) is type(want) and got == want


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def remove(out: str) -> None:
    """Delete the checkpoint in ``out`` (a fresh run with ``--overwrite``)."""
    for name in (TENSORS, SIDECAR):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)

"""Multi-process data parallel training: ``torchrun --nproc_per_node N -m fastprompt.train ...``.

Every process holds the frozen model and the prompt; each global batch (the same on every rank: batches
are a function of seed and epoch) is cut into ``N`` contiguous shards, one a rank. The loss of a batch is

    loss = sum_r ce_r / n,    ce_r: the summed target cross-entropy of rank r's shard, n: the batch's tokens

``n`` is known on every rank without communication (it is the whole batch's target count), so rank r
backpropagates ``ce_r / n`` and the prompt's gradient is the all-reduced sum over ranks: exactly the
single-process gradient of the token-weighted mean (only the order of float additions differs). Both
reductions are autograd functions around the engine, so ``train_step``, ``loss`` and ``evaluate`` are
unchanged: ``_SumForward`` all-reduces ``ce_r`` (backward: identity, every rank's upstream is ``1/n``),
``_SumBackward`` is the identity on the prompt whose backward all-reduces the gradient. Every rank then
takes the same Adam step on the same numbers. gloo on CPU, nccl on CUDA; rank 0 alone logs and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .engines.base import as_inputs, target_count
from .errors import ConfigError


class _SumForward(torch.autograd.Function):
    """``sum_r x_r`` over the group; backward passes the gradient through (each rank's own term)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity; backward all-reduces the gradient (the prompt's gradient summed over the ranks' shards)."""

    @staticmethod
    def forward(ctx, prompt, group):
        ctx.group = group
        return prompt.view_as(prompt)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _summed_backward(inputs: list, group, wrap=None) -> list:
    """The K prompts' inputs through one ``_SumBackward``: their tensors flattened side by side, so the
    backward all-reduces every prompt's gradient at once. ``wrap``: one more identity on the flat tensor,
    whose backward runs once every prompt's gradient is complete (sharded weights: free the layers)."""
    flat = _SumBackward.apply(torch.cat([x.tensor.reshape(-1) for x in inputs]), group)
    if wrap is not None:
        flat = wrap(flat)
    out, start = [], 0
    for x in inputs:
        n = x.tensor.numel()
        out.append(x.map(lambda t, s=start, n=n: flat[s : s + n].view_as(t)))
        start += n
    return out


def _joins(engine, other) -> bool:
    """``Engine.joins`` of a wrapper: another wrapper of its kind around an engine that joins the inner one."""
    return other is engine or (type(other) is type(engine) and engine.inner.joins(other.inner))


# a wrapper's K-prompt pass is its inner engine's (``Engine.many_in_one_pass``, ``Engine.many_lengths``)
_inner_many_in_one_pass = property(lambda self: bool(getattr(self.inner, "many_in_one_pass", False)))
_inner_many_lengths = property(lambda self: bool(getattr(self.inner, "many_lengths", False)))


class DataParallelEngine:
    """Wraps an engine: ``loss_terms`` on this rank's shard, summed over ranks (see the module docstring)."""

    def __init__(self, inner, rank: int, world_size: int, group=None):
        self.inner, self.rank, self.world_size, self.group = inner, rank, world_size, group

    def shard(self, batch: Sequence[Any]) -> Sequence[Any]:
        n = len(batch)
        return batch[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]

    def loss_terms(self, inputs, batch):
        shard = self.shard(batch)
        inputs = as_inputs(inputs).map(lambda t: _SumBackward.apply(t, self.group))
        if shard:
            ce_local, _ = self.inner.loss_terms(inputs, shard)
        else:  # fewer examples than ranks: this rank adds 0 but still joins both all-reduces
            ce_local = (inputs.tensor * 0).sum().float()
        return _SumForward.apply(ce_local, self.group), target_count(batch)

    def loss_terms_many(self, inputs, batches, encoders=None):
        """K prompts: this rank's shard of every batch through the inner engine's one pass where it has one
        (``encoders``: as the inner engine takes them), the K summed CEs all-reduced together; one
        ``loss_terms`` each elsewhere. The K prompts' tensors pass one ``_SumBackward`` side by side (one
        all-reduce of all their gradients), so every rank runs the same collectives in the same order, an
        empty shard (fewer examples than ranks) included."""
        if len(inputs) != len(batches):
            raise ValueError(f"{len(inputs)} prompts but {len(batches)} batches")
        if not self.many_in_one_pass:
            return _many(self, inputs, batches)
        inputs = _summed_backward([as_inputs(x) for x in inputs], self.group)
        shards = [self.shard(b) for b in batches]
        live = [k for k, shard in enumerate(shards) if shard]
        ces = [(x.tensor * 0).sum().float() for x in inputs]  # an empty shard adds 0 (and still joins)
        if live:
            terms = self.inner.loss_terms_many([inputs[k] for k in live], [shards[k] for k in live],
                                               None if encoders is None else [encoders[k] for k in live])
            for k, (ce, _) in zip(live, terms):
                ces[k] = ce
        total = _SumForward.apply(torch.stack(ces), self.group)
        return [(total[k], target_count(batch)) for k, batch in enumerate(batches)]

    many_in_one_pass, many_lengths, joins = _inner_many_in_one_pass, _inner_many_lengths, _joins

    def describe(self) -> str:
        return f"{self.inner.describe()} x {self.world_size} processes"

    def graphs_enabled(self) -> bool:
        """No captured whole steps: the inner engine's CUDA graph would skip the gradient all-reduce."""
        return False

    def __getattr__(self, name):  # name, device, precision, ... of the wrapped engine
        return getattr(self.inner, name)


def _many(engine, inputs, batches):
    if len(inputs) != len(batches):
        raise ValueError(f"{len(inputs)} prompts but {len(batches)} batches")
    return [engine.loss_terms(x, b) for x, b in zip(inputs, batches)]


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, tuner) -> None:
        from .sharding import sharded_weights

        if self.active and not isinstance(tuner.engine, (DataParallelEngine, ShardedDataParallelEngine)):
            weights = sharded_weights(tuner.model)  # --shard-weights: fastprompt/sharding.py
            tuner.engine = DataParallelEngine(tuner.engine, self.rank, self.world_size) if weights is None else \
                ShardedDataParallelEngine(tuner.engine, weights, self.rank, self.world_size)

    def unwrap(self, tuner) -> None:

        if isinstance(tuner.engine, (DataParallelEngine, ShardedDataParallelEngine)):
            tuner.engine = tuner.engine.inner

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def info(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


# A collective that waits longer than this for another rank raises on the waiting rank (gloo: at once where the
# other process has died; nccl: through its watchdog) instead of hanging: FASTPROMPT_DIST_TIMEOUT seconds.
DEFAULT_TIMEOUT_S = 600


def timeout_seconds() -> float:
    value = os.environ.get("FASTPROMPT_DIST_TIMEOUT", "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"FASTPROMPT_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ConfigError(f"FASTPROMPT_DIST_TIMEOUT must be > 0 seconds, got {value!r}")
    return seconds


def lost_peer(exc: BaseException) -> str | None:
    """Where ``exc`` is a collective that failed because another rank died or stopped answering (gloo:
    "Connection closed by peer", a timeout; nccl: a DistError), one line saying so; else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    known = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "gloo", "NCCL")
    if not (isinstance(exc, getattr(dist, "DistError", ())) or (isinstance(exc, RuntimeError)
                                                                  and any(k in text for k in known))):
        return None
    reason = "timed out waiting for another process" if "imed out" in text else "another process failed or was killed"
    return (f"rank {dist.get_rank()} of {dist.get_world_size()}: {reason} (torchrun's report names the first failure; "
            f"FASTPROMPT_DIST_TIMEOUT={timeout_seconds():g} s); continue from the last checkpoint with --resume "
            f"[{text[:160]}]")


LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every process (with MASTER_ADDR/PORT)


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, ``(0, 1, 0)`` without it. Some of
    its variables without the others, values that are no integers or out of range, or a group without
    ``MASTER_ADDR``/``MASTER_PORT`` are a ``ConfigError`` (a stray ``RANK=1`` would silence the run)."""
    present = [k for k in LAUNCH if os.environ.get(k, "") != ""]
    if not present:
        return 0, 1, 0
    missing = [k for k in LAUNCH if k not in present]
    if missing:
        raise ConfigError(f"{', '.join(f'{k}={os.environ[k]}' for k in present)} is set without "
                          f"{', '.join(missing)}: start data-parallel runs with torchrun, or unset it")
    values = {}
    for key in LAUNCH:
        try:
            values[key] = int(os.environ[key])
        except ValueError:
            raise ConfigError(f"{key}={os.environ[key][:20]!r} is not an integer (torchrun's environment)") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if not (world >= 1 and 0 <= rank < world and 0 <= local < world):
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK, LOCAL_RANK < "
                          "WORLD_SIZE")
    if world > 1:
        lacking = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if lacking:
            raise ConfigError(f"WORLD_SIZE={world} without {', '.join(lacking)}: start data-parallel runs with "
                              "torchrun")
    return rank, world, local


def launch_rank() -> int | None:
    """This process's rank, None where torchrun's environment is broken (the error then comes from ``setup``,
    printed: a broken environment must not silence it)."""
    try:
        return launch_env()[0]
    except ConfigError:
        return None


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT:
    ``launch_env``), and this rank's device (``cuda:LOCAL_RANK`` on GPUs). A single process: no group.
    Collectives time out after ``FASTPROMPT_DIST_TIMEOUT`` seconds (default 600)."""
    rank, world, local_rank = launch_env()
    if world <= 1:
        return Context(), device
    import torch.distributed as dist

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_seconds()))
    return Context(rank, world, local_rank, backend), device


# ------------------------------------------------------------------------ over sharded weights
def path_signature(engine, inputs, batch: Sequence[Any]):
    """What decides the sequence of layer forwards (hence of all-gathers) ``engine.loss_terms`` takes on
    ``batch``; None where it may still change (the generic layout check not done yet)."""
    from .engines.generic import GenericEngine, _pack_shape

    if not batch:
        return None
    if isinstance(engine, GenericEngine):
        if inputs.layer_kv is not None and engine.encoder.prompt_start is None:
            return ("naive",)  # the naive reference forward: one pass, whatever the batch
        if engine._packed is None or not engine._checked:
            return None
        lens = engine.suffix_lens(batch)
        one_pack = bool(engine._packed) and max(lens) > 0 and _pack_shape(lens)[0] == 1
        return ("generic", bool(engine._packed), max(lens) > 0, one_pack)
    return (type(engine).__name__,)  # naive: one forward of the whole (padded) batch


class ShardedDataParallelEngine:
    """Data parallel ``loss_terms`` over sharded weights (``sharding.ShardedWeights``; fastprompt/sharding.py's
    docstring: side channels, lockstep)."""

    def __init__(self, inner, weights, rank: int, world_size: int, group=None):
        self.inner, self.weights = inner, weights
        self.rank, self.world_size, self.group = rank, world_size, group
        self.replicated_batches = 0  # batches every rank computed whole (see the module docstring)

    def loss_terms(self, inputs, batch):
        from .sharding import _ReshardAfterBackward

        inputs = as_inputs(inputs)
        shards = [DataParallelEngine(None, r, self.world_size).shard(batch) for r in range(self.world_size)]
        paths = {path_signature(self.inner, inputs, s) for s in shards}
        replicated = None in paths or len(paths) != 1
        mine = batch if replicated else shards[self.rank]
        self.replicated_batches += replicated
        inputs = inputs.map(lambda t: _ReshardAfterBackward.apply(_SumBackward.apply(t, self.group), self.weights))
        with self.weights.saving():
            ce_local, _ = self.inner.loss_terms(inputs, mine)
        if replicated and self.rank != 0:
            ce_local = ce_local * 0.0  # rank 0 counts the batch; the others took the same path for nothing
        if not (torch.is_grad_enabled() and ce_local.requires_grad):
            self.weights.reshard()
        return _SumForward.apply(ce_local, self.group), target_count(batch)

    def loss_terms_many(self, inputs, batches, encoders=None):
        """K prompts in the inner engine's one pass where it has one (the fused engine): every layer gathered
        once for all K, not once a prompt (GCG's candidates, a sweep's points). Every rank computes its
        shard of every batch; where one of the shards is empty, every rank computes the whole batches and
        ranks other than 0 count zero (lockstep, as ``loss_terms``). The K summed CEs are all-reduced
        together and the K gradients in one all-reduce. Elsewhere one sharded ``loss_terms`` a prompt."""
        if len(inputs) != len(batches):
            raise ValueError(f"{len(inputs)} prompts but {len(batches)} batches")
        if not self.many_in_one_pass:
            return _many(self, inputs, batches)
        from .sharding import _ReshardAfterBackward

        inputs = _summed_backward([as_inputs(x) for x in inputs], self.group,
                                  wrap=lambda t: _ReshardAfterBackward.apply(t, self.weights))
        shards = [[DataParallelEngine(None, r, self.world_size).shard(b) for r in range(self.world_size)]
                  for b in batches]
        paths = {path_signature(self.inner, x, s) for x, per in zip(inputs, shards) for s in per}
        replicated = None in paths or len(paths) != 1
        mine = list(batches) if replicated else [per[self.rank] for per in shards]
        self.replicated_batches += replicated
        with self.weights.saving():
            terms = self.inner.loss_terms_many(inputs, mine, encoders)
        ces = [ce * 0.0 if replicated and self.rank != 0 else ce for ce, _ in terms]
        if not (torch.is_grad_enabled() and any(ce.requires_grad for ce in ces)):
            self.weights.reshard()
        total = _SumForward.apply(torch.stack(ces), self.group)
        return [(total[k], target_count(batch)) for k, batch in enumerate(batches)]

    many_in_one_pass, many_lengths, joins = _inner_many_in_one_pass, _inner_many_lengths, _joins

    def describe(self) -> str:
        return f"{self.inner.describe()} x {self.world_size} processes, weights sharded"

    def graphs_enabled(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.inner, name)

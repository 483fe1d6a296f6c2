"""One training step for every method and engine (docs/ARCHITECTURE.md, 'The training step and CUDA graphs').

    inputs = method.inputs(params, train=True)          the trained tensor as the engine's input
    ce_sum, n_tokens                                    eager: engine.loss_terms(inputs, batch)
                                                        static: engine.static_loss(inputs, padded batch)
    grad = d(ce_sum / n_tokens) / d params
    Adam step; where the loss or gradient is not finite, the params and Adam's state are put back
    (``torch.where``; no host sync but Adam's own where its step counter lives on the CPU) and a device-side
    streak counts the steps in a row

Eager (every engine): the batch as it is; the streak is read back after every step (one host sync) into
the tuner's ``NonFiniteGuard``, and the method's schedule advances only on an applied step.

Static (engines whose ``graphs_enabled()`` is true: the fused engine with ``--cuda-graphs``): the batch
padded to a bucket by the engine (``static_batch``), whose loss is the unpadded one; on CUDA the whole
step (method inputs, forward, backward, guarded Adam) is captured as one graph per bucket after a warm-up
on a side stream whose effect is undone, and later steps copy their indices into the bucket's static
buffers and replay. The streak, and its longest run since the last read, are read back every
``SYNC_EVERY`` steps (the three-in-a-row stop can come up to that many steps late, but a run of bad steps
ended by a good one before the read still stops training) and the schedule advances every step. A method's per-step values (the relaxed
temperature) live in device tensors it updates in ``after_step``, outside the graph. If capture fails, one
warning, and the run continues with the same static step uncaptured.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .guard import NonFiniteGuard
from .nvtx import nvtx_range
from .template import Encoded

SYNC_EVERY = 16


class TrainStep:
    """``step(batch) -> ce_sum``: one Adam step of ``params`` (a device scalar; 0 for a skipped step)."""

    def __init__(self, method, engine, params: torch.nn.Parameter, optimizer: torch.optim.Optimizer,
                 guard: NonFiniteGuard, batch_size: int, static: bool | None = None, capture: bool | None = None):
        self.method, self.engine, self.params, self.optimizer, self.guard = method, engine, params, optimizer, guard
        self.batch_size = batch_size
        self.static = engine.graphs_enabled() if static is None else static
        self.capture = self.static and params.device.type == "cuda" if capture is None else capture
        self.device = params.device
        self.streak = torch.zeros((), dtype=torch.int32, device=self.device)  # non-finite steps in a row
        self.skipped = torch.zeros((), dtype=torch.int32, device=self.device)  # non-finite steps in all
        self.worst = torch.zeros((), dtype=torch.int32, device=self.device)  # longest streak since the last read
        self.grad = torch.zeros_like(params)  # static gradient buffer: params.grad is this tensor
        self.graphs: dict = {}  # bucket shape -> (graph, static batch, static ce_sum)
        self.pool = None
        self.failed = False
        self._prepared = False
        self._unsynced = 0

    # ------------------------------------------------------------------------------------- the step
    def __call__(self, batch: Sequence[Encoded]) -> torch.Tensor:
        if not self.static:
            ce = self._body(lambda inputs: self.engine.loss_terms(inputs, batch))
            self.finish_eager()
            return ce
        if not self._prepared:  # one-time checks and constants, never inside a graph
            with torch.no_grad():
                self.engine.prepare(self.method.inputs(self.params), batch[0])
            self._prepared = True
        static = self.engine.static_batch(batch, self.batch_size)
        ce = None
        if self.capture and not self.failed:
            try:
                ce = self._replay(static)
            except Exception as e:  # capture is an optimisation: fall back, loudly, once
                self.failed = True
                self.graphs.clear()
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                              "continuing without CUDA graphs", RuntimeWarning, stacklevel=2)
                torch.cuda.synchronize(self.device)
        if ce is None:
            ce = torch.zeros((), device=self.device)
            self._static_body(static, ce)
        self.method.after_step(self.params)
        self._unsynced += 1
        if self._unsynced >= SYNC_EVERY:
            self._sync()
        return ce

    def finish_eager(self) -> None:
        """After an eager step: the streak into the guard (a host sync); the schedule advances on an applied step."""
        self._sync()
        if self.guard.streak == 0:
            self.method.after_step(self.params)

    def _body(self, loss) -> torch.Tensor:
        """Method inputs, ``loss(inputs) -> (ce_sum, n_tokens)``, gradient, guarded Adam: no host sync."""
        with nvtx_range("step"):
            ce_sum, n_tokens = loss(self.method.inputs(self.params, train=True))
            with nvtx_range("backward"):
                (grad,) = torch.autograd.grad(ce_sum / n_tokens, self.params)
            return self.apply(ce_sum, grad)

    def apply(self, ce_sum: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The guarded Adam step with ``grad``: not applied where ``ce_sum`` or ``grad`` is not finite.
        Returns ``ce_sum`` detached (0 for a skipped step)."""
        with nvtx_range("update"):
            ok = torch.isfinite(ce_sum) & torch.isfinite(grad).all()
            self.grad.copy_(grad)
            self.params.grad = self.grad
            state = self._state()
            before = [t.clone() for t in state]
            self.optimizer.step()
            for t, old in zip(state, before):  # a NaN/inf step is not applied
                t.copy_(torch.where(ok.to(t.device), t, old))
            self.streak.copy_(torch.where(ok, torch.zeros_like(self.streak), self.streak + 1))
            self.worst.copy_(torch.maximum(self.worst, self.streak))
            self.skipped.add_((~ok).to(self.skipped.dtype))
            return torch.where(ok, ce_sum.detach(), torch.zeros_like(ce_sum))

    def _static_body(self, static, ce_out: torch.Tensor) -> None:
        ce_out.copy_(self._body(lambda inputs: (self.engine.static_loss(inputs, static), static.n_tokens)))

    def _state(self) -> list[torch.Tensor]:
        state = self.optimizer.state.get(self.params)
        if not state:  # Adam's lazy state, created now so that a graph sees fixed tensors
            capturable = self.optimizer.defaults.get("capturable", False)
            self.optimizer.state[self.params] = state = {
                "step": torch.zeros((), dtype=torch.float32, device=self.device if capturable else "cpu"),
                "exp_avg": torch.zeros_like(self.params, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(self.params, memory_format=torch.preserve_format),
            }
        return [self.params.data, state["exp_avg"], state["exp_avg_sq"], state["step"]]

    def _sync(self) -> None:
        """The device-side counts into the tuner's guard (a host sync). A streak that reached the guard's limit
        since the last read is reported even if a good step has ended it since (the run must stop)."""
        streak, worst, skipped = torch.stack([self.streak, self.worst, self.skipped]).tolist()  # one transfer
        self.guard.streak = worst if worst >= self.guard.limit else streak
        self.guard.skipped = skipped
        self.worst.zero_()
        self._unsynced = 0

    # ----------------------------------------------------------------------------------- CUDA graphs
    def _replay(self, static) -> torch.Tensor:
        entry = self.graphs.get(static.shape)
        if entry is None:
            entry = self.graphs[static.shape] = self._capture(static)
        graph, inputs, ce_out = entry
        inputs.copy_(static)
        graph.replay()
        return ce_out.clone()

    def _capture(self, static):
        """Warm up on a side stream (the warm-up's update is undone), then capture one step."""
        inputs = static.clone()
        ce_out = torch.zeros((), device=self.device)
        counters = [self.streak, self.skipped, self.worst]
        saved = [t.clone() for t in self._state() + counters]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles Triton kernels, initialises cuBLAS workspaces
                self._static_body(inputs, ce_out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._static_body(inputs, ce_out)
        self._restore(saved)  # capture ran nothing, but be explicit: the replay does the real step
        return graph, inputs, ce_out

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, old in zip(self._state() + [self.streak, self.skipped, self.worst], saved):
            t.copy_(old)


def shares_one_pass(lead, engines) -> bool:
    """Whether prompts on ``engines`` (``lead``'s, or engines that join it) share one pass of ``lead``'s: it
    packs several prompts, and they are all its own or it also takes other prompt lengths."""
    return bool(lead.many_in_one_pass and (all(e is lead for e in engines) or lead.many_lengths))


class ManyStep:
    """One step of K prompts (docs/ARCHITECTURE.md, 'K prompts in one pass'): ``steps`` are the prompts'
    own ``TrainStep`` (own method, optimizer, learning rate, guard) on ``engine`` or engines that join it
    (``Engine.joins``: the same model and template, another prompt length). One ``engine.loss_terms_many``
    forward and one backward for all (prompt ``k``'s gradient is that of its own loss: the groups of rows do
    not see each other), then each prompt's guarded Adam step (``TrainStep.apply``): a NaN/inf prompt is
    skipped alone. Where ``engine`` has no pass for several lengths, each length's prompts take their own
    engine's ``loss_terms_many``. Eager only (no CUDA graphs)."""

    def __init__(self, engine, steps: Sequence[TrainStep]):
        self.engine, self.steps = engine, list(steps)

    def one_pass(self) -> bool:
        """True where every prompt of the step shares one pass over the weights."""
        return shares_one_pass(self.engine, [s.engine for s in self.steps])

    def __call__(self, batches: Sequence[Sequence[Encoded]]) -> list[torch.Tensor]:
        with nvtx_range("step"):
            inputs = [s.method.inputs(s.params, train=True) for s in self.steps]
            terms = self._terms(inputs, batches)
            with nvtx_range("backward"):
                grads = torch.autograd.grad(sum(ce / n for ce, n in terms), [s.params for s in self.steps])
            ces = [s.apply(ce, g) for s, (ce, _), g in zip(self.steps, terms, grads)]
        for s in self.steps:
            s.finish_eager()
        return ces

    def _terms(self, inputs, batches):
        if all(s.engine is self.engine for s in self.steps):
            return self.engine.loss_terms_many(inputs, batches)
        if self.one_pass():
            return self.engine.loss_terms_many(inputs, batches, encoders=[s.engine.encoder for s in self.steps])
        terms: list = [None] * len(self.steps)
        engines: dict[int, list[int]] = {}
        for k, s in enumerate(self.steps):
            engines.setdefault(id(s.engine), []).append(k)
        for ks in engines.values():
            engine = self.steps[ks[0]].engine
            for k, t in zip(ks, engine.loss_terms_many([inputs[k] for k in ks], [batches[k] for k in ks])):
                terms[k] = t
        return terms

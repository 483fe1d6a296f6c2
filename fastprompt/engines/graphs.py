"""The fused engine's whole training step on static shapes, captured as CUDA graphs
(docs/ARCHITECTURE.md, 'The training step and CUDA graphs').

A step's packed batch has data-dependent sizes (rows, target rows). ``pad_packed`` rounds them up to a
*bucket* so that a handful of shapes cover a whole run:

    rows      one padding segment at the end (its own branch of the tree: it attends to the trunk and
              itself, nothing attends to it, it predicts nothing); cu_seqlens gets empty segments up to
              the batch size, so its length is fixed too
    targets   extra target rows point at row 0 with weight 0
    prompt    extra prompt rows (a field before the prompt, partial batch) write into the padding row

The padded step computes exactly the unpadded step's loss and gradient (tested on the CPU). On CUDA,
``StaticStep`` captures forward, backward (``torch.autograd.grad``) and the Adam update
(``torch.optim.Adam(capturable=True)``) as one graph per bucket, after a warm-up on a side stream whose
effect on the prompt and optimizer is undone; each later step copies its indices into the bucket's static
buffers and replays. No host syncs inside: a NaN/inf step is skipped on the device (the prompt and Adam
state are restored with ``torch.where``) and counted in a device-side streak the tuner reads back every 16
steps (``PromptTuner._graphed_step``: the three-in-a-row stop can thus come up to 16 steps late). If capture fails, a one-line warning is printed and the run
continues uncaptured.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from ..nvtx import nvtx_range
from ..template import Encoded


def bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a multiple of a quarter of its power of two (at least ``minimum``): under 25%
    padding above 64, a handful of sizes per octave."""
    if n <= minimum:
        return minimum
    granule = max(minimum, 1 << (n.bit_length() - 3))
    return -(-n // granule) * granule


@dataclass(frozen=True)
class StaticShape:
    rows: int  # packed query rows, the padding segment included (>= real rows + 1)
    targets: int  # target rows
    prompt_rows: int  # rows that take a prompt vector
    examples: int  # segments before the padding segment (the batch size)


@dataclass
class StaticBatch:
    """A padded packed batch plus what the padded loss needs."""

    packed: object  # fused.PackedBatch with static shapes
    target_weight: torch.Tensor  # (targets,) 1 for real target rows, 0 for padding
    n_tokens: torch.Tensor  # () float: real target tokens


def static_shape(packed, batch_size: int, prompt_in_trunk: bool, prompt_len: int) -> StaticShape:
    """The bucket of ``packed``: rows (plus one padding row) and targets rounded up; prompt rows fixed."""
    prompt_rows = prompt_len if prompt_in_trunk else prompt_len * batch_size
    return StaticShape(bucket(packed.n_rows + 1), bucket(packed.n_targets), prompt_rows, batch_size)


def pad_packed(packed, shape: StaticShape) -> StaticBatch:
    """``packed`` padded to ``shape`` (see the module docstring); device ops, no host sync."""
    device = packed.token_ids.device
    rows, n_targets = packed.n_rows, packed.n_targets
    n_examples = packed.cu_seqlens.shape[0] - 1
    pad_rows, pad_targets = shape.rows - rows, shape.targets - n_targets
    pad_prompt, pad_examples = shape.prompt_rows - packed.prompt_rows.shape[0], shape.examples - n_examples
    if pad_rows < 1 or pad_targets < 0 or pad_prompt < 0 or pad_examples < 0:
        raise ValueError(f"batch does not fit static shape {shape}")

    def cat(t, n, value):
        return torch.cat([t, torch.full((n,), value, dtype=t.dtype, device=device)])

    cu = packed.cu_seqlens
    cu = torch.cat([cu, cu[-1:].expand(pad_examples), cu.new_full((1,), packed.n_prefix + shape.rows)])
    padded = type(packed)(  # fused.PackedBatch (not imported: fused imports this module)
        token_ids=cat(packed.token_ids, pad_rows, 0),
        positions=cat(packed.positions, pad_rows, 0),
        prompt_rows=cat(packed.prompt_rows, pad_prompt, rows),  # row `rows`: the first padding row
        prompt_slots=cat(packed.prompt_slots, pad_prompt, 0),
        cu_seqlens=cu,
        target_rows=cat(packed.target_rows, pad_targets, 0),
        target_ids=cat(packed.target_ids, pad_targets, 0),
        n_prefix=packed.n_prefix, n_trunk_rows=packed.n_trunk_rows, n_examples=shape.examples + 1,
    )
    weight = torch.cat([torch.ones(n_targets, device=device), torch.zeros(pad_targets, device=device)])
    return StaticBatch(padded, weight, torch.tensor(float(n_targets), device=device))


class StaticStep:
    """The fused engine's training step on static shapes, optionally captured as CUDA graphs.

    ``__call__(batch) -> ce_sum`` (a device scalar; 0 for a skipped NaN/inf step). ``streak`` is the
    device-side count of NaN/inf steps in a row.
    """

    def __init__(self, engine, prompt: torch.nn.Parameter, optimizer: torch.optim.Optimizer, batch_size: int,
                 capture: bool):
        self.engine, self.prompt, self.optimizer = engine, prompt, optimizer
        self.batch_size = batch_size
        self.capture = capture
        self.device = prompt.device
        self.streak = torch.zeros((), dtype=torch.int32, device=self.device)
        self.grad = torch.zeros_like(prompt)  # static gradient buffer: prompt.grad is this tensor
        self.graphs: dict[StaticShape, tuple] = {}  # shape -> (graph, static inputs, static ce_sum)
        self.pool = None
        self.failed = False

    # ------------------------------------------------------------------------------------- the step
    def _state(self) -> list[torch.Tensor]:
        state = self.optimizer.state.get(self.prompt)
        if not state:  # Adam's lazy state, created now so that the graph sees fixed tensors
            capturable = self.optimizer.defaults.get("capturable", False)
            self.optimizer.state[self.prompt] = state = {
                "step": torch.zeros((), dtype=torch.float32, device=self.device if capturable else "cpu"),
                "exp_avg": torch.zeros_like(self.prompt, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(self.prompt, memory_format=torch.preserve_format),
            }
        return [self.prompt.data, state["exp_avg"], state["exp_avg_sq"], state["step"]]

    def step(self, static: StaticBatch, ce_out: torch.Tensor) -> None:
        """Forward, backward, guarded Adam update: no host syncs (capturable)."""
        with nvtx_range("step"):
            ce_sum = self.engine.packed_loss(self.prompt, static.packed, static.target_weight)
            with nvtx_range("backward"):
                (grad,) = torch.autograd.grad(ce_sum / static.n_tokens, self.prompt)
            ok = torch.isfinite(ce_sum) & torch.isfinite(grad).all()
            with nvtx_range("update"):
                self.grad.copy_(grad)
                self.prompt.grad = self.grad
                state = self._state()
                before = [t.clone() for t in state]
                self.optimizer.step()
                for t, old in zip(state, before):  # a NaN/inf step is not applied
                    t.copy_(torch.where(ok.to(t.device), t, old))
            self.streak.copy_(torch.where(ok, torch.zeros_like(self.streak), self.streak + 1))
            ce_out.copy_(torch.where(ok, ce_sum.detach(), torch.zeros_like(ce_sum)))

    def __call__(self, batch: Sequence[Encoded]) -> torch.Tensor:
        if not self.engine._checked:  # the engine's one-time comparison with the model, never inside a graph
            self.engine.check_against_model(self.prompt, batch[0])
        packed = self.engine.pack(batch)
        encoder = self.engine.encoder
        shape = static_shape(packed, self.batch_size, encoder.prompt_start is not None, encoder.prompt_len)
        static = pad_packed(packed, shape)
        if self.capture and not self.failed:
            try:
                return self._replay(shape, static)
            except Exception as e:  # capture is an optimisation: fall back, loudly, once
                self.failed = True
                self.graphs.clear()
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                              "continuing without CUDA graphs", RuntimeWarning, stacklevel=2)
                torch.cuda.synchronize(self.device)
        ce_out = torch.zeros((), device=self.device)
        self.step(static, ce_out)
        return ce_out

    # ----------------------------------------------------------------------------------- CUDA graphs
    def _replay(self, shape: StaticShape, static: StaticBatch) -> torch.Tensor:
        entry = self.graphs.get(shape)
        if entry is None:
            entry = self._capture(shape, static)
            self.graphs[shape] = entry
        graph, inputs, ce_out = entry
        _copy_static(inputs, static)
        graph.replay()
        return ce_out.clone()

    def _capture(self, shape: StaticShape, static: StaticBatch):
        """Warm up on a side stream (the warm-up's update is undone), then capture one step."""
        self.engine.prefix_kv()  # lazily built constants must exist before capture
        inputs = _clone_static(static)
        ce_out = torch.zeros((), device=self.device)
        saved = [t.clone() for t in self._state()] + [self.streak.clone()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles Triton kernels, initialises cuBLAS workspaces
                self.step(inputs, ce_out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(inputs, ce_out)
        self._restore(saved)  # capture ran nothing, but be explicit: the replay does the real step
        return graph, inputs, ce_out

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, old in zip(self._state() + [self.streak], saved):
            t.copy_(old)


def _clone_static(static: StaticBatch) -> StaticBatch:
    from dataclasses import replace

    p = static.packed
    packed = replace(p, **{name: getattr(p, name).clone() for name in _TENSOR_FIELDS})
    return StaticBatch(packed, static.target_weight.clone(), static.n_tokens.clone())


def _copy_static(dst: StaticBatch, src: StaticBatch) -> None:
    for name in _TENSOR_FIELDS:
        getattr(dst.packed, name).copy_(getattr(src.packed, name), non_blocking=True)
    dst.target_weight.copy_(src.target_weight, non_blocking=True)
    dst.n_tokens.copy_(src.n_tokens, non_blocking=True)


_TENSOR_FIELDS = ("token_ids", "positions", "prompt_rows", "prompt_slots", "cu_seqlens", "target_rows", "target_ids")

"""What registering an op as a torch.library custom op costs per call on the CPU, at 1 thread.

The same tiny op (RoPE on (rows, heads, D) = (4, 2, 8): the math takes a few microseconds) called three
ways, forward + backward: the plain torch function, wrapped in an ``autograd.Function`` (how the kernels
were wired before), and as a ``torch.library.custom_op`` with ``register_fake`` / ``register_autograd``
(how they are wired now). Process CPU time (``time.process_time``), so a loaded machine inflates little;
median of repeats. Prints microseconds per call; nothing is recorded.

    python benchmarks/bench_registration.py
"""
from __future__ import annotations

import statistics
import time

import torch

from fastprompt.kernels.rotary import rotary_ref, rotary_tables


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_ref(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_ref(dy, cos, -sin), None, None  # the inverse rotation


@torch.library.custom_op("fastprompt_bench::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotary_ref(x, cos, sin)


@torch.library.custom_op("fastprompt_bench::rotary_bwd", mutates_args=())
def _rotary_bwd_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotary_ref(dy, cos, -sin)


_rotary_op.register_fake(lambda x, cos, sin: x.new_empty(x.shape))
_rotary_bwd_op.register_fake(lambda dy, cos, sin: dy.new_empty(dy.shape))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary_bwd_op(dy, cos, sin), None, None


_rotary_op.register_autograd(_backward, setup_context=_setup)


def per_call_us(fn, x, cos, sin, calls=2000, repeats=7) -> float:
    dy = torch.ones_like(x)
    for _ in range(200):  # warm-up
        torch.autograd.backward(fn(x, cos, sin), dy)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(calls):
            torch.autograd.backward(fn(x, cos, sin), dy)
        times.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(times)


def main():
    torch.set_num_threads(1)
    x = torch.randn(4, 2, 8, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(4), 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    for name, fn in (("plain torch", rotary_ref), ("autograd.Function", _RotaryFn.apply), ("custom_op", _rotary_op)):
        print(f"{name:>18}: {per_call_us(fn, x, cos, sin):7.1f} us per forward + backward")


if __name__ == "__main__":
    main()

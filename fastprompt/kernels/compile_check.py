"""What the launchers compile to for a GPU target, on a machine without that GPU (or any GPU).

Triton compiles for a ``GPUTarget`` without a device; only loading and launching need one. Inside
``compile_only(target)`` a stand-in driver is active: its current target is ``target``, loading a binary
returns placeholders and a launch records (kernel, grid) instead of running. The launchers themselves run
unchanged on CPU tensors (their outputs stay uninitialised), so every kernel variant compiled here is the
one a real launch of that shape and dtype would compile: the launcher's own block-size choice, its
constexprs and Triton's argument specialisation (16-divisible ints and pointers, ints equal to 1).

Then, per compiled variant: ``ptxas -v`` (the ptxas Triton itself uses) for registers and spills, the
shared memory Triton allocated, warps and stages, and how each ``tl.dot`` was lowered, read from the TTGIR:
``wgmma`` (``ttng.warp_group_dot``, Hopper tensor cores), ``mma_v2`` (Ampere-style ``mma.sync``) or
``fma`` (no tensor cores: a blocked-layout dot). Used by benchmarks/compile_report.py and the compile test.

Triton must have been imported without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` makes
interpreted functions that never compile): run this in a process of its own.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import _common

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
SM90_REGS_PER_SM = 65536
SM90_SMEM_PER_SM = 233472  # 228 KB per SM; each resident block also reserves 1 KB
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32


@dataclass
class Launch:
    """One launch the stand-in driver saw: which compiled kernel, on what grid, under which case."""

    case: str
    kernel: str
    hash: str
    grid: tuple
    seconds: float  # since the previous launch (or set_case): the compile time on a variant's first launch


@dataclass
class Variant:
    """One compiled kernel variant and what the compiler says about it."""

    kernel: str
    hash: str
    target: str
    constexprs: dict
    specialisation: list  # args Triton specialised: "name%16" (divisible by 16) or "name=1"
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    registers: int = -1
    spill_stores: int = -1  # bytes per thread
    spill_loads: int = -1
    stack: int = -1
    dots: dict = field(default_factory=dict)  # lowering -> count of tl.dot ops ("wgmma", "mma_v2", "fma")
    cases: list = field(default_factory=list)  # the report's cases that launched it
    grids: list = field(default_factory=list)
    compile_s: float = 0.0
    error: str | None = None

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM by registers, shared memory and warps (sm_90 limits; an estimate)."""
        if self.registers <= 0:
            return 0
        regs_per_warp = -(-self.registers * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = SM90_REGS_PER_SM // (regs_per_warp * self.num_warps)
        by_smem = SM90_SMEM_PER_SM // (self.shared + 1024) if self.shared else SM90_MAX_BLOCKS_PER_SM
        by_warps = SM90_MAX_WARPS_PER_SM // self.num_warps
        return max(0, min(by_regs, by_smem, by_warps, SM90_MAX_BLOCKS_PER_SM))

    @property
    def warps_per_sm(self) -> int:
        return self.blocks_per_sm * self.num_warps

    def as_dict(self) -> dict:
        out = asdict(self)
        out["blocks_per_sm"] = self.blocks_per_sm
        out["warps_per_sm"] = self.warps_per_sm
        return out


class _NoLaunch:
    """The stand-in launcher: records each launch (grid, case) instead of running it."""

    launches: list = []
    case = ""
    clock = 0.0

    def __init__(self, src, metadata):
        self.name, self.hash = metadata.name, metadata.hash

    def __call__(self, grid_x, grid_y, grid_z, *_):
        now = time.perf_counter()
        _NoLaunch.launches.append(Launch(_NoLaunch.case, self.name, self.hash, (grid_x, grid_y, grid_z),
                                         now - _NoLaunch.clock))
        _NoLaunch.clock = now


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, n_regs, n_spills, max threads per block

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": SM90_MAX_SHARED, "multiprocessor_count": 132}


class _StandInDriver:
    """An active Triton driver whose current target is ``target`` and whose launches do nothing."""

    def __init__(self, target):
        self.target = target
        self.utils = _Utils()
        self.launcher_cls = _NoLaunch
        # a device key of its own: these kernels never mix with a real device's cache
        self.device = f"compile-only:{target.backend}:{target.arch}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Launches inside compile for ``GPUTarget("cuda", arch, 32)`` and are recorded, never run.

    Yields the list of ``Launch`` records; ``set_case(name)`` labels the launches that follow."""
    if _common.interpreting():
        raise RuntimeError("compile_only needs Triton imported without TRITON_INTERPRET (run it in its own process)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    stand_in = _StandInDriver(GPUTarget("cuda", arch, 32))
    previous = driver._active
    driver.set_active(stand_in)
    _common.COMPILE_ONLY[0] = True
    _NoLaunch.launches = []
    try:
        yield _NoLaunch.launches
    finally:
        _common.COMPILE_ONLY[0] = False
        driver._active = previous


def set_case(name: str) -> None:
    _NoLaunch.case = name
    _NoLaunch.clock = time.perf_counter()


def compiled_kernels(jit_functions, arch: int = 90) -> dict:
    """{hash: CompiledKernel} of everything ``jit_functions`` compiled for the stand-in target."""
    device = f"compile-only:cuda:{arch}"
    out = {}
    for fn in jit_functions:
        if device in fn.device_caches:
            for kernel in fn.device_caches[device][0].values():
                out[kernel.hash] = kernel
    return out


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_stats(ptx: str, arch: int = 90) -> dict:
    """Registers, spill bytes and stack of the kernel in ``ptx``, from ``ptxas -v`` (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    regs = _PTXAS_REGS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-500:]}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return {"registers": int(regs.group(1)), "spill_stores": stores, "spill_loads": loads, "stack": stack}


_ALIAS = re.compile(r"^(#[\w.]+) = (#[\w.]+<.*)$", re.M)
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot)\b.*-> tensor<[^,]+, (#[\w.]+)")


def dot_lowering(ttgir: str) -> dict:
    """{"wgmma" | "mma_v2" | "fma": count} of the dots in a TTGIR module."""
    aliases = dict(_ALIAS.findall(ttgir))
    counts: dict = {}
    for op, layout in _DOT.findall(ttgir):
        enc = aliases.get(layout, layout)
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        elif "nvidia_mma" in enc:
            major = re.search(r"versionMajor = (\d+)", enc)
            kind = f"mma_v{major.group(1) if major else '?'}"
        else:
            kind = "fma"  # a dot whose result keeps a blocked layout: FMA on CUDA cores
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _specialisation(kernel) -> list:
    """Which integer args Triton specialised on: ``name%16`` (divisible by 16), ``name=1``. Pointers (torch
    allocates 16-byte aligned) and strides (multiples of 64 at GPT-2 shapes) are left out: always so."""
    src = kernel.src
    names = src.fn.arg_names
    out = []
    for path, attrs in src.attrs.items():
        name = names[path[0]]
        pointer = str(src.signature.get(name, "")).startswith("*")
        if not pointer and not name.startswith("stride") and any(a[0] == "tt.divisibility" for a in attrs):
            out.append(f"{name}%16")
    for path, value in src.constants.items():
        name = names[path[0]]
        if name not in constexpr_names(src.fn) and value == 1:
            out.append(f"{name}=1")
    return sorted(out)


def constexpr_names(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def describe(kernel, arch: int = 90, with_ptxas: bool = True) -> Variant:
    """A ``Variant`` for one compiled kernel (runs ptxas -v unless ``with_ptxas`` is False)."""
    src, md = kernel.src, kernel.metadata
    names = src.fn.arg_names
    cexpr = constexpr_names(src.fn)
    constexprs = {names[p[0]]: v for p, v in src.constants.items() if names[p[0]] in cexpr}
    v = Variant(kernel=md.name, hash=kernel.hash, target=f"sm_{arch}", constexprs=constexprs,
                specialisation=_specialisation(kernel), num_warps=md.num_warps, num_stages=md.num_stages,
                shared=md.shared, dots=dot_lowering(kernel.asm["ttgir"]))
    if with_ptxas:
        for k, val in ptxas_stats(kernel.asm["ptx"], arch).items():
            setattr(v, k, val)
    return v

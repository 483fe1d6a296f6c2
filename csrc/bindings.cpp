// Torch glue for fastprompt.kernels._C: checks, allocation, the current CUDA stream, then the raw-pointer
// launchers of layer_norm.cu. The autograd wiring is the Triton op's (kernels/layer_norm.py: add_layer_norm_cuda).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "layer_norm.h"

namespace {

fastprompt::LnDtype ln_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "fastprompt.kernels._C add_layer_norm: expected float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? fastprompt::LnDtype::kFloat32 : fastprompt::LnDtype::kBFloat16;
}

// A tensor the kernels read as `numel` contiguous elements of `like`'s dtype, on `like`'s device.
void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastprompt.kernels._C add_layer_norm: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "fastprompt.kernels._C add_layer_norm: ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastprompt.kernels._C add_layer_norm: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastprompt.kernels._C add_layer_norm: ", name, " must be contiguous");
}

void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "fastprompt.kernels._C add_layer_norm: ", name, " has shape ", t.sizes(),
              ", expected ", like.sizes());
}

void check_stats(const at::Tensor& t, int64_t rows, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fastprompt.kernels._C add_layer_norm: ", name,
              " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows,
              "fastprompt.kernels._C add_layer_norm: ", name, " must be a contiguous float32 tensor of ", rows,
              " elements (one per row)");
}

// x (..., d), residual like x or None, weight/bias (d,).
// Returns y (..., d), h (..., d) (x itself when residual is None), mean (rows,) fp32, rstd (rows,) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.is_cuda(), "fastprompt.kernels._C add_layer_norm: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1, "fastprompt.kernels._C add_layer_norm: x must have at least one dimension");
  const auto dtype = ln_dtype(x);
  check_like(x, x, "x");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(cols > 0, "fastprompt.kernels._C add_layer_norm: the normalised dimension is empty");
  const int64_t rows = x.numel() / cols;
  check_like(weight, x, "weight");
  check_like(bias, x, "bias");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols && bias.dim() == 1 && bias.size(0) == cols,
              "fastprompt.kernels._C add_layer_norm: weight and bias must have shape (", cols, ",)");
  const bool has_residual = residual.has_value();
  if (has_residual) {
    check_like(*residual, x, "residual");
    check_same_shape(*residual, x, "residual");
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_residual ? at::empty_like(x) : x;  // no residual: h is x, nothing to write
  const auto stats_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rows}, stats_options);
  at::Tensor rstd = at::empty({rows}, stats_options);

  C10_CUDA_CHECK(fastprompt::add_layer_norm_fwd(
      x.data_ptr(), has_residual ? residual->data_ptr() : nullptr, weight.data_ptr(), bias.data_ptr(),
      y.data_ptr(), has_residual ? h.data_ptr() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
      cols, static_cast<float>(eps), dtype, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, h, mean, rstd};
}

// dy, dh (or None), h: (..., d); weight (d,); mean, rstd (rows,) fp32 from the forward.
// Returns dx (..., d), which is also the gradient of the residual. No dweight/dbias: frozen.
at::Tensor add_layer_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
                              const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(h.is_cuda(), "fastprompt.kernels._C add_layer_norm: h must be a CUDA tensor");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) > 0, "fastprompt.kernels._C add_layer_norm: h must have a non-empty last dim");
  const auto dtype = ln_dtype(h);
  check_like(h, h, "h");
  const int64_t cols = h.size(-1);
  const int64_t rows = h.numel() / cols;
  check_like(dy, h, "dy");
  check_same_shape(dy, h, "dy");
  const bool has_dh = dh.has_value();
  if (has_dh) {
    check_like(*dh, h, "dh");
    check_same_shape(*dh, h, "dh");
  }
  check_like(weight, h, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols, "fastprompt.kernels._C add_layer_norm: weight must have shape (",
              cols, ",)");
  check_stats(mean, rows, h, "mean");
  check_stats(rstd, rows, h, "rstd");

  const c10::cuda::CUDAGuard device_guard(h.device());
  at::Tensor dx = at::empty_like(h);
  C10_CUDA_CHECK(fastprompt::add_layer_norm_bwd(
      dy.data_ptr(), has_dh ? dh->data_ptr() : nullptr, h.data_ptr(), weight.data_ptr(), mean.data_ptr<float>(),
      rstd.data_ptr<float>(), dx.data_ptr(), rows, cols, dtype, c10::cuda::getCurrentCUDAStream().stream()));
  return dx;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastprompt CUDA kernels: fused residual-add + LayerNorm (forward, dX-only backward)";
  m.def("add_layer_norm_fwd", &add_layer_norm_fwd, "h = x + residual; y = LayerNorm(h) * weight + bias. "
        "Returns (y, h, mean, rstd); h is x itself when residual is None.",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("add_layer_norm_bwd", &add_layer_norm_bwd, "dx = dh + LayerNorm backward of dy (no dweight/dbias). "
        "dx is also the gradient of the residual.",
        py::arg("dy"), py::arg("dh"), py::arg("h"), py::arg("weight"), py::arg("mean"), py::arg("rstd"));
}

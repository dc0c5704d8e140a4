// CUDA kernel of vaefast::reparam_sample: one thread per (point, sample, latent block of 4), the same
// per-element maths as the CPU kernel (csrc/common/reparam_math.h; built with --fmad=false).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/reparam_common.h"
#include "common/reparam_math.h"

namespace vaefast {
namespace {

template <typename scalar_t>
__global__ void reparam_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                               scalar_t* __restrict__ z, int64_t B, int64_t S, int64_t d, int64_t Q, uint64_t seed,
                               uint64_t offset, uint64_t sample_offset, const int64_t* __restrict__ ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * S * Q;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = t % Q;
    const int64_t s = (t / Q) % S;
    const int64_t b = t / (Q * S);
    float eps[4];
    const uint64_t point = offset + static_cast<uint64_t>(ids ? ids[b] : b);
    rmath::normal4(seed, point, static_cast<uint32_t>(sample_offset + s),
                   static_cast<uint32_t>(q), eps);
    const int64_t j0 = 4 * q;
    const int64_t nj = d - j0 < 4 ? d - j0 : 4;
    for (int64_t i = 0; i < nj; ++i) {
      const acc_t m = static_cast<acc_t>(mu[b * d + j0 + i]);
      const acc_t sg = reparam::sigma_of<acc_t>(static_cast<acc_t>(logvar[b * d + j0 + i]));
      z[(b * S + s) * d + j0 + i] = static_cast<scalar_t>(m + sg * static_cast<acc_t>(eps[i]));
    }
  }
}

at::Tensor reparam_sample_cuda(const at::Tensor& mu, const at::Tensor& logvar, int64_t num_samples, int64_t seed,
                               int64_t offset, int64_t sample_offset, const c10::optional<at::Tensor>& point_ids) {
  reparam::check_args(mu, logvar, num_samples, seed, offset, sample_offset);
  reparam::check_ids(mu, point_ids);
  const c10::cuda::CUDAGuard guard(mu.device());
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  const at::Tensor ids_c = point_ids.has_value() ? point_ids->contiguous() : at::Tensor();
  const int64_t* ids = ids_c.defined() ? ids_c.const_data_ptr<int64_t>() : nullptr;
  at::Tensor z = at::empty({mu.size(0), num_samples, mu.size(1)}, mu.options());
  if (z.numel() == 0) return z;
  const int64_t B = mu.size(0), d = mu.size(1), Q = (d + 3) / 4;
  const int64_t total = B * num_samples * Q;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vaefast_reparam_sample_cuda", [&] {
    reparam_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        mu_c.const_data_ptr<scalar_t>(), lv_c.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(), B,
        num_samples, d, Q, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
        static_cast<uint64_t>(sample_offset), ids);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(vaefast, CUDA, m) { m.impl("reparam_sample", &reparam_sample_cuda); }

}  // namespace vaefast

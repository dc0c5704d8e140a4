// Host-side argument checks and sigma for reparam_sample, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/reparam_math.h"

namespace vaefast {
namespace reparam {

// sigma = exp(logvar / 2) with the deterministic exp of reparam_math.h (logvar / 2 is exact).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigma_of(acc_t logvar) {
  return rmath::exp_det<acc_t>(logvar * acc_t(0.5));
}

inline void check_args(const at::Tensor& mu, const at::Tensor& logvar, int64_t num_samples, int64_t seed,
                       int64_t offset, int64_t sample_offset) {
  TORCH_CHECK(mu.dim() == 2, "reparam_sample: mu must be [B, d], got ", mu.sizes());
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "reparam_sample: logvar ", logvar.sizes(), " != mu ", mu.sizes());
  TORCH_CHECK(logvar.scalar_type() == mu.scalar_type(), "reparam_sample: logvar dtype != mu dtype");
  TORCH_CHECK(logvar.device() == mu.device(), "reparam_sample: logvar device != mu device");
  TORCH_CHECK(at::isFloatingType(mu.scalar_type()), "reparam_sample: mu must be floating point");
  TORCH_CHECK(num_samples >= 0, "reparam_sample: num_samples must be >= 0");
  TORCH_CHECK(seed >= 0 && offset >= 0 && sample_offset >= 0, "reparam_sample: seed/offset/sample_offset must be >= 0");
  TORCH_CHECK(sample_offset + num_samples <= (int64_t(1) << 32),
              "reparam_sample: sample_offset + num_samples must be <= 2^32");
  TORCH_CHECK(offset <= INT64_MAX - mu.size(0), "reparam_sample: offset + B overflows");
  TORCH_CHECK((mu.size(1) + 3) / 4 <= (int64_t(1) << 32), "reparam_sample: latent dimension too large");
}

// point_ids: int64 [B] on mu's device (the values are checked on the Python side, vaefast/ops.py).
inline void check_ids(const at::Tensor& mu, const c10::optional<at::Tensor>& point_ids) {
  if (!point_ids.has_value()) return;
  const at::Tensor& ids = *point_ids;
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == mu.size(0), "reparam_sample: point_ids must be [B], got ",
              ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "reparam_sample: point_ids must be int64");
  TORCH_CHECK(ids.device() == mu.device(), "reparam_sample: point_ids device != mu device");
}

}  // namespace reparam
}  // namespace vaefast

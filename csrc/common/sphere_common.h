// Host-side pieces of vaefast::sphere_hits shared by the CPU and CUDA launchers: argument checks and the
// radii histogram (sort radii once, binary-search each distance, cumulative sum, unpermute).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace vaefast {
namespace sphere {

inline void check_args(const at::Tensor& y, const at::Tensor& center, const at::Tensor& radii) {
  TORCH_CHECK(y.dim() == 3, "sphere_hits: y must be [B, S, D], got ", y.sizes());
  TORCH_CHECK(center.dim() == 2 && center.size(0) == y.size(0) && center.size(1) == y.size(2),
              "sphere_hits: center must be [B, D] = [", y.size(0), ", ", y.size(2), "], got ", center.sizes());
  TORCH_CHECK(radii.dim() == 1, "sphere_hits: radii must be 1-D, got ", radii.sizes());
  TORCH_CHECK(center.scalar_type() == y.scalar_type(), "sphere_hits: center dtype != y dtype");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()) && at::isFloatingType(radii.scalar_type()),
              "sphere_hits: y and radii must be floating point");
  TORCH_CHECK(center.device() == y.device() && radii.device() == y.device(),
              "sphere_hits: y, center and radii must be on one device");
}

// Distances are accumulated (and returned) in float32 for half/bfloat16/float32 and float64 for float64.
inline at::ScalarType dist_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// hits[b, k] = #{s : dist[b, s] <= radii[k]} (compared in float64; dist converts exactly).
inline at::Tensor hits_from_distances(const at::Tensor& dist, const at::Tensor& radii) {
  const int64_t B = dist.size(0), K = radii.size(0);
  if (K == 0) return at::zeros({B, 0}, dist.options().dtype(at::kLong));
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = radii.to(at::kDouble).contiguous().sort();
  // idx = first k with sorted[k] >= dist: the distance counts for every sorted radius from idx on.
  const at::Tensor idx = at::searchsorted(sorted, dist.to(at::kDouble).reshape({-1}), /*out_int32=*/false,
                                          /*right=*/false)
                             .reshape({B, dist.size(1)});  // not {B, -1}: B = 0 has no -1
  at::Tensor counts = at::zeros({B, K + 1}, dist.options().dtype(at::kLong));
  counts.scatter_add_(1, idx, at::ones_like(idx));
  const at::Tensor hits_sorted = counts.narrow(1, 0, K).cumsum(1);
  at::Tensor hits = at::empty({B, K}, hits_sorted.options());
  hits.index_copy_(1, perm, hits_sorted);  // hits[:, perm[k]] = hits_sorted[:, k]
  return hits;
}

}  // namespace sphere
}  // namespace vaefast

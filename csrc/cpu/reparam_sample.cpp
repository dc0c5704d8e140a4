// CPU kernel of vaefast::reparam_sample: z[b, s, j] = mu[b, j] + exp(logvar[b, j] / 2) * eps[b, s, j].
// eps comes from csrc/common/reparam_math.h (Philox4x32-10 + Box-Muller, bit-identical to CUDA and the
// reference).  The eps loop runs over a chunk of samples for one (point, latent block) so that gcc
// vectorises it (AVX2 clone chosen at load time where the CPU has it).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/reparam_math.h"
#include "common/reparam_common.h"

namespace vaefast {
namespace {

constexpr int64_t kChunk = 256;  // samples per eps chunk

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VAEFAST_X86_CLONES 1
#endif

// Philox words for counters (block, sample0 + i, lo, hi), i < n: the portable reference loop ...
void philox_words_scalar(uint32_t block, uint32_t sample0, int64_t n, uint32_t lo, uint32_t hi, uint32_t k0,
                         uint32_t k1, uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                         uint32_t* __restrict w3) {
  for (int64_t i = 0; i < n; ++i) {
    const philox::U4 x =
        philox::philox4x32_10(philox::U4{block, sample0 + static_cast<uint32_t>(i), lo, hi}, k0, k1);
    w0[i] = x.x0;
    w1[i] = x.x1;
    w2[i] = x.x2;
    w3[i] = x.x3;
  }
}

#ifdef VAEFAST_X86_CLONES
// ... and the same rounds on 8 counters per AVX2 register (32x32 -> 64 bit products of the even and the odd
// lanes with vpmuludq, recombined into hi/lo words); checked bit for bit against the scalar path by the tests.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_words_avx2(uint32_t block, uint32_t sample0, int64_t n, uint32_t lo,
                                                       uint32_t hi, uint32_t k0, uint32_t k1,
                                                       uint32_t* __restrict w0, uint32_t* __restrict w1,
                                                       uint32_t* __restrict w2, uint32_t* __restrict w3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i x0 = _mm256_set1_epi32(static_cast<int>(block));
    __m256i x1 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(sample0 + static_cast<uint32_t>(i))), lane);
    __m256i x2 = _mm256_set1_epi32(static_cast<int>(lo));
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(hi));
    uint32_t a = k0, b = k1;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        a += philox::kW0;
        b += philox::kW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo(x0, m0, hi0, lo0);
      mul_hi_lo(x2, m1, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(a)));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(b)));
      x3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + i), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + i), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + i), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + i), x3);
  }
  philox_words_scalar(block, sample0 + static_cast<uint32_t>(i), n - i, lo, hi, k0, k1, w0 + i, w1 + i, w2 + i,
                      w3 + i);
}

bool has_avx2() {
  static const bool value = [] {
    __builtin_cpu_init();  // safe even if called before libgcc's own initialiser
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return value;
}
#endif

// Box-Muller over the words (vectorised by gcc; AVX2 clone chosen at load time where the CPU has it).
#ifdef VAEFAST_X86_CLONES
__attribute__((target_clones("avx2", "default")))
#endif
void box_muller_words(int64_t n, const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                      const uint32_t* __restrict w2, const uint32_t* __restrict w3, float* __restrict e0,
                      float* __restrict e1, float* __restrict e2, float* __restrict e3) {
  for (int64_t i = 0; i < n; ++i) {
    rmath::box_muller(w0[i], w1[i], e0[i], e1[i]);
    rmath::box_muller(w2[i], w3[i], e2[i], e3[i]);
  }
}

// eps of latent block `block` for samples sample0 .. sample0 + n - 1 of one point (rmath::normal4 per sample).
void eps_chunk(uint64_t seed, uint64_t point, uint32_t sample0, int64_t n, uint32_t block, float* e0, float* e1,
               float* e2, float* e3) {
  uint32_t w[4][kChunk];
  const uint32_t lo = static_cast<uint32_t>(point), hi = static_cast<uint32_t>(point >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef VAEFAST_X86_CLONES
  if (has_avx2()) {
    philox_words_avx2(block, sample0, n, lo, hi, k0, k1, w[0], w[1], w[2], w[3]);
  } else {
    philox_words_scalar(block, sample0, n, lo, hi, k0, k1, w[0], w[1], w[2], w[3]);
  }
#else
  philox_words_scalar(block, sample0, n, lo, hi, k0, k1, w[0], w[1], w[2], w[3]);
#endif
  box_muller_words(n, w[0], w[1], w[2], w[3], e0, e1, e2, e3);
}

template <typename scalar_t>
void reparam_cpu_impl(const at::Tensor& mu, const at::Tensor& logvar, at::Tensor& z, int64_t S, uint64_t seed,
                      uint64_t offset, uint64_t sample_offset, const int64_t* ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = mu.size(0), d = mu.size(1);
  const int64_t Q = (d + 3) / 4;
  const scalar_t* mu_p = mu.const_data_ptr<scalar_t>();
  const scalar_t* lv_p = logvar.const_data_ptr<scalar_t>();
  scalar_t* z_p = z.mutable_data_ptr<scalar_t>();
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    float buf[4][kChunk];
    acc_t m[4], sg[4];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks;
      const int64_t s0 = (t % chunks) * kChunk;
      const int64_t n = std::min<int64_t>(kChunk, S - s0);
      const uint64_t point = offset + static_cast<uint64_t>(ids ? ids[b] : b);
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t j0 = 4 * q;
        const int64_t nj = std::min<int64_t>(4, d - j0);
        for (int64_t i = 0; i < nj; ++i) {
          m[i] = static_cast<acc_t>(mu_p[b * d + j0 + i]);
          sg[i] = reparam::sigma_of<acc_t>(static_cast<acc_t>(lv_p[b * d + j0 + i]));
        }
        eps_chunk(seed, point, static_cast<uint32_t>(sample_offset + s0), n, static_cast<uint32_t>(q), buf[0],
                  buf[1], buf[2], buf[3]);
        scalar_t* zrow = z_p + (b * S + s0) * d + j0;
        for (int64_t i = 0; i < nj; ++i) {
          const acc_t mi = m[i], si = sg[i];
          const float* e = buf[i];
          for (int64_t s = 0; s < n; ++s) zrow[s * d + i] = static_cast<scalar_t>(mi + si * static_cast<acc_t>(e[s]));
        }
      }
    }
  });
}

at::Tensor reparam_sample_cpu(const at::Tensor& mu, const at::Tensor& logvar, int64_t num_samples, int64_t seed,
                              int64_t offset, int64_t sample_offset, const c10::optional<at::Tensor>& point_ids) {
  reparam::check_args(mu, logvar, num_samples, seed, offset, sample_offset);
  reparam::check_ids(mu, point_ids);
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  const at::Tensor ids_c = point_ids.has_value() ? point_ids->contiguous() : at::Tensor();
  const int64_t* ids = ids_c.defined() ? ids_c.const_data_ptr<int64_t>() : nullptr;
  at::Tensor z = at::empty({mu.size(0), num_samples, mu.size(1)}, mu.options());
  if (z.numel() == 0) return z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vaefast_reparam_sample_cpu", [&] {
    reparam_cpu_impl<scalar_t>(mu_c, lv_c, z, num_samples, static_cast<uint64_t>(seed),
                               static_cast<uint64_t>(offset), static_cast<uint64_t>(sample_offset), ids);
  });
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(vaefast, CPU, m) { m.impl("reparam_sample", &reparam_sample_cpu); }

}  // namespace vaefast

// Row normalization kernels for XLA's CPU backend (XLA FFI).
//
// LayerNorm and RMSNorm normalize each row of x, viewed as [R, D] (every
// dimension but the last is a row; the last is the normalized features, the
// Python side flattens several trailing reduced axes into one). XLA's CPU
// backend gives every reduction its own pass over memory and forms no
// multi-output reductions, so a fused row kernel that keeps a row in cache
// between its statistics and its outputs saves passes over the activations.
// The math is that of jaxnorm/_core.py (its docstring is the reference):
//
//   hi = fl(sum(x) / D), lo = sum(x - hi) / D (the residue of the mean),
//   var = sum((x - hi)^2) / D - lo^2 (the corrected two-pass algorithm:
//   both sums are taken over the cached row, so shifted data loses no
//   precision), xhat = ((x - hi) - lo) * rstd, y = xhat * scale + bias;
//   without centring hi = lo = 0 and var = sum(x^2) / D.
//
//   backward, with g = dy * scale: S1 = sum(g), S2 = sum(g * xhat),
//   dx = rstd * (g - (S1 + xhat * S2) / D)   (no S1 without centring),
//   dscale = sum over rows of dy * xhat, dbias = sum over rows of dy.
//
// scale and bias are [P, D] with P dividing R: row r uses row r / (R / P)
// of them (P = 1 normally; jax.vmap with vmap_method="broadcast_all" stacks
// per-example copies in front, which this layout covers). dscale and dbias
// are [P, D] likewise. x and y are float32 or bfloat16; statistics,
// parameters and their gradients are float32. Sums are accumulated in 16
// float32 lanes; the dscale/dbias partial sums are per block of rows and
// added in a fixed order, so results do not depend on thread timing.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  // round to nearest even; a NaN stays a (quiet) NaN. Branch-free, so
  // that the loops storing rows vectorize.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan
                                                                : rounded);
}

// 8 float32 lanes (GCC/Clang vector extensions): explicit vectors where the
// compiler does not vectorize on its own (bfloat16 conversions, per-channel
// accumulators).
typedef float VF __attribute__((vector_size(32)));
typedef uint16_t VH __attribute__((vector_size(16)));
typedef uint32_t VU __attribute__((vector_size(32)));

inline VF LoadV(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VF LoadV(const uint16_t* p) {
  VH h;
  std::memcpy(&h, p, sizeof(h));
  VU u = __builtin_convertvector(h, VU) << 16;
  VF v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline VF Splat(float f) { return VF{f, f, f, f, f, f, f, f}; }
inline void StoreV(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
inline void StoreV(uint16_t* p, VF v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  __m128bh h = _mm256_cvtneps_pbh(reinterpret_cast<__m256>(v));
  std::memcpy(p, &h, sizeof(h));
#else
  VU u;
  std::memcpy(&u, &v, sizeof(u));
  VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even
  VU nan = (u >> 16) | 0x40u;
  VU out = (u & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
  VH h = __builtin_convertvector(out, VH);
  std::memcpy(p, &h, sizeof(h));
#endif
}

// sum over i < n of f(i), in kLanes float32 lanes then pairwise.
template <typename F>
inline float LaneSum(int64_t n, F f) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += f(i);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

// The sums over i < n of f(i) and g(i) in one sweep, as LaneSum.
template <typename F, typename G>
inline void LaneSum2(int64_t n, F f, G g, float* sf, float* sg) {
  float a[kLanes] = {0}, b[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      a[j] += f(i + j);
      b[j] += g(i + j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    a[j] += f(i);
    b[j] += g(i);
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) {
      a[j] += a[j + w];
      b[j] += b[j + w];
    }
  }
  *sf = a[0];
  *sg = b[0];
}

// Runs body(chunk) for chunk in [0, n) on the caller and the pool's
// threads. The caller waits only for chunks that were claimed; a pool task
// that starts after all chunks are claimed returns at once (its state is
// shared, so it outlives this call).
// Work below this many elements runs on the calling thread alone: waking
// pool threads costs more than it saves (a decoding step's rows).
constexpr int64_t kParallelElements = 1 << 16;

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t elements,
                 Body body) {
  if (elements < kParallelElements) {
    for (int64_t c = 0; c < n; ++c) body(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto* body_ptr = &body;
  // The body lives on this frame: a task may call it only for a chunk it
  // claimed, and this frame waits for every claimed chunk.
  auto work = [state, body_ptr, n]() {
    for (;;) {
      int64_t c = state->next.fetch_add(1);
      if (c >= n) return;
      (*body_ptr)(c);
      state->done.fetch_add(1);
    }
  };
  // the caller is one of the pool's threads' worth of work: with the
  // helpers, as many workers as the pool has threads.
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

struct Rows {
  int64_t rows, d, groups, per_group;  // R, D, P, R / P
};

template <typename Param>
ffi::Error GetRows(const ffi::AnyBuffer& x, const Param& param, Rows* out) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("x has rank 0");
  int64_t d = dims[dims.size() - 1];
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  int64_t p = 1;
  auto pd = param.dimensions();
  if (pd.size() >= 1) {
    if (pd[pd.size() - 1] != d) {
      return ffi::Error::InvalidArgument("parameter width != feature count");
    }
    for (size_t i = 0; i + 1 < pd.size(); ++i) p *= pd[i];
  }
  if (p < 1 || rows % p != 0) {
    return ffi::Error::InvalidArgument("parameter rows do not divide x rows");
  }
  *out = Rows{rows, d, p, rows / p};
  return ffi::Error::Success();
}

// Horizontal sum of a vector.
inline float HSum(VF v) {
  float out = 0.f;
  for (int e = 0; e < 8; ++e) out += v[e];
  return out;
}

template <typename T>
void RowStats(const T* x, int64_t d, bool center, float* hi, float* lo,
              float* var) {
  int64_t full = d - d % 16;  // two vectors per step, then a scalar tail
  float inv = 1.f / static_cast<float>(d);
  if (!center) {
    VF a = Splat(0.f), b = Splat(0.f);
    for (int64_t i = 0; i < full; i += 16) {
      VF u = LoadV(x + i), v = LoadV(x + i + 8);
      a += u * u;
      b += v * v;
    }
    float ss = HSum(a + b);
    for (int64_t i = full; i < d; ++i) ss += Load(x, i) * Load(x, i);
    *hi = 0.f;
    *lo = 0.f;
    *var = ss * inv;
    return;
  }
  VF a = Splat(0.f), b = Splat(0.f);
  for (int64_t i = 0; i < full; i += 16) {
    a += LoadV(x + i);
    b += LoadV(x + i + 8);
  }
  float sum = HSum(a + b);
  for (int64_t i = full; i < d; ++i) sum += Load(x, i);
  float m = sum * inv;
  VF vm = Splat(m), s1a = Splat(0.f), s1b = Splat(0.f), s2a = Splat(0.f),
     s2b = Splat(0.f);
  for (int64_t i = 0; i < full; i += 16) {
    VF u = LoadV(x + i) - vm, v = LoadV(x + i + 8) - vm;
    s1a += u;
    s1b += v;
    s2a += u * u;
    s2b += v * v;
  }
  float s1 = HSum(s1a + s1b), s2 = HSum(s2a + s2b);
  for (int64_t i = full; i < d; ++i) {
    float c = Load(x, i) - m;
    s1 += c;
    s2 += c * c;
  }
  float l = s1 * inv;
  *hi = m;
  *lo = l;
  *var = std::max(s2 * inv - l * l, 0.f);
}

// Rows per block: a fixed split (independent of the thread count) into at
// most 64 blocks per parameter group.
inline int64_t BlockRows(const Rows& r) {
  return std::max<int64_t>(1, (r.per_group + 63) / 64);
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const Rows& r, const T* x,
                   const float* scale, const float* bias, bool center,
                   float eps, T* y, float* hi, float* lo, float* var) {
  int64_t block = BlockRows(r);
  int64_t per_group_blocks = (r.per_group + block - 1) / block;
  ParallelFor(pool, r.groups * per_group_blocks, r.rows * r.d, [&](int64_t c) {
    int64_t p = c / per_group_blocks;
    int64_t start = p * r.per_group + (c % per_group_blocks) * block;
    int64_t stop = std::min(start + block, (p + 1) * r.per_group);
    const float* s = scale + p * r.d;
    const float* b = bias + p * r.d;
    for (int64_t row = start; row < stop; ++row) {
      const T* xr = x + row * r.d;
      T* yr = y + row * r.d;
      RowStats(xr, r.d, center, &hi[row], &lo[row], &var[row]);
      float rs = 1.f / std::sqrt(var[row] + eps);
      float h = hi[row], l = lo[row];
      VF vh = Splat(h), vl = Splat(l), vr = Splat(rs);
      int64_t i = 0;
      for (; i + 8 <= r.d; i += 8) {
        VF xh = ((LoadV(xr + i) - vh) - vl) * vr;
        StoreV(yr + i, xh * LoadV(s + i) + LoadV(b + i));
      }
      for (; i < r.d; ++i) {
        float xh = ((Load(xr, i) - h) - l) * rs;
        Store(yr, i, xh * s[i] + b[i]);
      }
    }
  });
}

template <typename T>
void Stats(ffi::ThreadPool& pool, const Rows& r, const T* x,
                 bool center, float* hi, float* lo, float* var) {
  int64_t block = std::max<int64_t>(1, (r.rows + 63) / 64);
  int64_t blocks = (r.rows + block - 1) / block;
  ParallelFor(pool, blocks, r.rows * r.d, [&](int64_t c) {
    int64_t stop = std::min(r.rows, (c + 1) * block);
    for (int64_t row = c * block; row < stop; ++row) {
      RowStats(x + row * r.d, r.d, center, &hi[row], &lo[row], &var[row]);
    }
  });
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const Rows& r, const T* x,
                    const float* hi, const float* lo, const float* rstd,
                    const float* scale, const T* dy, bool center, T* dx,
                    float* dscale, float* dbias) {
  int64_t block = BlockRows(r);
  int64_t per_group_blocks = (r.per_group + block - 1) / block;
  int64_t blocks = r.groups * per_group_blocks;
  // Per-block partial sums of dscale and dbias, added in block order below.
  std::vector<float> part(static_cast<size_t>(blocks) * 2 * r.d, 0.f);
  float inv = 1.f / static_cast<float>(r.d);
  ParallelFor(pool, blocks, r.rows * r.d, [&](int64_t c) {
    int64_t p = c / per_group_blocks;
    int64_t start = p * r.per_group + (c % per_group_blocks) * block;
    int64_t stop = std::min(start + block, (p + 1) * r.per_group);
    const float* s = scale + p * r.d;
    float* ps = part.data() + c * 2 * r.d;
    float* pb = ps + r.d;
    for (int64_t row = start; row < stop; ++row) {
      const T* xr = x + row * r.d;
      const T* gr = dy + row * r.d;
      T* dxr = dx + row * r.d;
      float h = hi[row], l = lo[row], rs = rstd[row];
      float s1 = 0.f, s2;
      auto gxh = [&](int64_t i) {
        return Load(gr, i) * s[i] * (((Load(xr, i) - h) - l) * rs);
      };
      if (center) {
        LaneSum2(
            r.d, gxh, [&](int64_t i) { return Load(gr, i) * s[i]; }, &s2,
            &s1);
      } else {
        s2 = LaneSum(r.d, gxh);
      }
      float k1 = s1 * inv, k2 = s2 * inv;
      VF vh = Splat(h), vl = Splat(l), vr = Splat(rs), v1 = Splat(k1),
         v2 = Splat(k2);
      int64_t i = 0;
      for (; i + 8 <= r.d; i += 8) {
        VF g = LoadV(gr + i);
        VF xh = ((LoadV(xr + i) - vh) - vl) * vr;
        StoreV(dxr + i, vr * ((g * LoadV(s + i) - v1) - xh * v2));
        StoreV(ps + i, LoadV(ps + i) + g * xh);
        StoreV(pb + i, LoadV(pb + i) + g);
      }
      for (; i < r.d; ++i) {
        float g = Load(gr, i);
        float xh = ((Load(xr, i) - h) - l) * rs;
        Store(dxr, i, rs * ((g * s[i] - k1) - xh * k2));
        ps[i] += g * xh;
        pb[i] += g;
      }
    }
  });
  for (int64_t p = 0; p < r.groups; ++p) {
    float* ds = dscale + p * r.d;
    float* db = dbias + p * r.d;
    std::fill(ds, ds + r.d, 0.f);
    std::fill(db, db + r.d, 0.f);
    for (int64_t c = p * per_group_blocks; c < (p + 1) * per_group_blocks;
         ++c) {
      const float* ps = part.data() + c * 2 * r.d;
      for (int64_t i = 0; i < r.d; ++i) {
        ds[i] += ps[i];
        db[i] += ps[r.d + i];
      }
    }
  }
}

bool IsBf16(const ffi::AnyBuffer& a) {
  return a.element_type() == ffi::DataType::BF16;
}
bool IsF32(const ffi::AnyBuffer& a) {
  return a.element_type() == ffi::DataType::F32;
}

// Calls run(T{}) with T the element type of x's data: float for float32,
// uint16_t for bfloat16 (Load and Store convert).
template <typename Run>
ffi::Error ByDtype(const ffi::AnyBuffer& x, Run run) {
  if (IsF32(x)) {
    run(float{});
  } else if (IsBf16(x)) {
    run(uint16_t{});
  } else {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <typename T>
const T* In(const ffi::AnyBuffer& a) {
  return static_cast<const T*>(a.untyped_data());
}
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& a) {
  return static_cast<T*>(a->untyped_data());
}

ffi::Error RowFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                      ffi::Result<ffi::AnyBuffer> y,
                      ffi::ResultBuffer<ffi::F32> hi,
                      ffi::ResultBuffer<ffi::F32> lo,
                      ffi::ResultBuffer<ffi::F32> var, bool center,
                      float epsilon) {
  Rows r;
  if (auto e = GetRows(x, scale, &r); e.failure()) return e;
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("y dtype != x dtype");
  }
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    Forward(pool, r, In<T>(x), scale.typed_data(), bias.typed_data(), center,
            epsilon, Out<T>(y), hi->typed_data(), lo->typed_data(),
            var->typed_data());
  });
}

ffi::Error RowStatsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                        ffi::ResultBuffer<ffi::F32> hi,
                        ffi::ResultBuffer<ffi::F32> lo,
                        ffi::ResultBuffer<ffi::F32> var, bool center) {
  Rows r;
  if (auto e = GetRows(x, x, &r); e.failure()) return e;
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    Stats(pool, r, In<T>(x), center, hi->typed_data(), lo->typed_data(),
          var->typed_data());
  });
}

ffi::Error RowBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                      ffi::Buffer<ffi::F32> hi, ffi::Buffer<ffi::F32> lo,
                      ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                      ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                      ffi::ResultBuffer<ffi::F32> dscale,
                      ffi::ResultBuffer<ffi::F32> dbias, bool center) {
  Rows r;
  if (auto e = GetRows(x, scale, &r); e.failure()) return e;
  if (x.element_type() != dy.element_type() ||
      x.element_type() != dx->element_type()) {
    return ffi::Error::InvalidArgument("x, dy and dx dtypes differ");
  }
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    Backward(pool, r, In<T>(x), hi.typed_data(), lo.typed_data(),
             rstd.typed_data(), scale.typed_data(), In<T>(dy), center,
             Out<T>(dx), dscale->typed_data(), dbias->typed_data());
  });
}

// ---------------------------------------------------------------------------
// Column kernels (BatchNorm: x viewed as [R, C], statistics per channel c
// over all R rows). Rows are split into fixed blocks of about 64 KB; each
// block's per-channel sums are taken over the cached block (two passes for
// the statistics: the block mean, then the centred sums), and the blocks are
// merged in block order in float64 (Chan et al.'s pairwise update), so the
// result is independent of thread timing and shifted data loses nothing:
//
//   col_stats:  hi = fl(mean), lo = fl(mean - hi), var = M2 / R;
//   col_sums:   sum(dy) and sum(dy * ((x - hi) - lo)), per channel.

inline int64_t ColBlockRows(int64_t c) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
}

// The per-channel sums of one block, N vectors of 8 channels at a time, so
// that the accumulators stay in registers (N = 4 for full chunks, then 1,
// then one channel at a time for the tail).

// Each block's mean is kept as the pair (mean, res): the float32 block mean
// and its residue, so the float64 merge below sees it unrounded.
template <int N, typename T>
void BlockStats(const T* x, int64_t c, int64_t j0, int64_t start,
                int64_t stop, bool center, float* mean, float* res,
                float* m2) {
  VF m[N], s1[N], s2[N];
  for (int k = 0; k < N; ++k) m[k] = s1[k] = s2[k] = Splat(0.f);
  float inv = 1.f / static_cast<float>(stop - start);
  if (center) {
    for (int64_t r = start; r < stop; ++r) {
      const T* xr = x + r * c + j0;
      for (int k = 0; k < N; ++k) m[k] += LoadV(xr + 8 * k);
    }
    for (int k = 0; k < N; ++k) m[k] *= Splat(inv);
  }
  for (int64_t r = start; r < stop; ++r) {
    const T* xr = x + r * c + j0;
    for (int k = 0; k < N; ++k) {
      VF d = LoadV(xr + 8 * k) - m[k];
      s1[k] += d;
      s2[k] += d * d;
    }
  }
  for (int k = 0; k < N; ++k) {
    if (center) {  // the corrected two-pass update
      VF l = s1[k] * Splat(inv);
      VF v = s2[k] - s1[k] * l;
      StoreV(mean + j0 + 8 * k, m[k]);
      StoreV(res + j0 + 8 * k, l);
      for (int e = 0; e < 8; ++e) v[e] = std::max(v[e], 0.f);
      StoreV(m2 + j0 + 8 * k, v);
    } else {
      StoreV(mean + j0 + 8 * k, Splat(0.f));
      StoreV(res + j0 + 8 * k, Splat(0.f));
      StoreV(m2 + j0 + 8 * k, s2[k]);
    }
  }
}

// One channel (the tail of C % 8 channels).
template <typename T>
void BlockStats1(const T* x, int64_t c, int64_t j, int64_t start,
                 int64_t stop, bool center, float* mean, float* res,
                 float* m2) {
  float m = 0.f, s1 = 0.f, s2 = 0.f;
  float inv = 1.f / static_cast<float>(stop - start);
  if (center) {
    for (int64_t r = start; r < stop; ++r) m += Load(x + r * c, j);
    m *= inv;
  }
  for (int64_t r = start; r < stop; ++r) {
    float d = Load(x + r * c, j) - m;
    s1 += d;
    s2 += d * d;
  }
  float l = center ? s1 * inv : 0.f;
  mean[j] = m;
  res[j] = l;
  m2[j] = std::max(s2 - s1 * l, 0.f);
}

template <int N, typename T>
void BlockSums(const T* x, const T* dy, int64_t c, int64_t j0,
               int64_t start, int64_t stop, const float* hi, const float* lo,
               float* sg, float* sgd) {
  VF h[N], l[N], a[N], b[N];
  for (int k = 0; k < N; ++k) {
    h[k] = LoadV(hi + j0 + 8 * k);
    l[k] = LoadV(lo + j0 + 8 * k);
    a[k] = b[k] = Splat(0.f);
  }
  for (int64_t r = start; r < stop; ++r) {
    const T* xr = x + r * c + j0;
    const T* gr = dy + r * c + j0;
    for (int k = 0; k < N; ++k) {
      VF g = LoadV(gr + 8 * k);
      a[k] += g;
      b[k] += g * ((LoadV(xr + 8 * k) - h[k]) - l[k]);
    }
  }
  for (int k = 0; k < N; ++k) {
    StoreV(sg + j0 + 8 * k, a[k]);
    StoreV(sgd + j0 + 8 * k, b[k]);
  }
}

template <typename T>
void BlockSums1(const T* x, const T* dy, int64_t c, int64_t j,
                int64_t start, int64_t stop, const float* hi,
                const float* lo, float* sg, float* sgd) {
  float a = 0.f, b = 0.f;
  for (int64_t r = start; r < stop; ++r) {
    float g = Load(dy + r * c, j);
    a += g;
    b += g * ((Load(x + r * c, j) - hi[j]) - lo[j]);
  }
  sg[j] = a;
  sgd[j] = b;
}

template <typename T>
void ColStats(ffi::ThreadPool& pool, int64_t rows, int64_t c, const T* x,
              bool center, float* hi, float* lo, float* var) {
  int64_t block = ColBlockRows(c);
  int64_t blocks = (rows + block - 1) / block;
  // per block: mean (as mean + res) and M2 of every channel
  std::vector<float> part(static_cast<size_t>(blocks) * 3 * c, 0.f);
  ParallelFor(pool, blocks, rows * c, [&](int64_t b) {
    int64_t start = b * block, stop = std::min(rows, start + block);
    float* mean = part.data() + b * 3 * c;
    float* res = mean + c;
    float* m2 = res + c;
    int64_t j0 = 0;
    for (; j0 + 32 <= c; j0 += 32) {
      BlockStats<4>(x, c, j0, start, stop, center, mean, res, m2);
    }
    for (; j0 + 8 <= c; j0 += 8) {
      BlockStats<1>(x, c, j0, start, stop, center, mean, res, m2);
    }
    for (; j0 < c; ++j0) {
      BlockStats1(x, c, j0, start, stop, center, mean, res, m2);
    }
  });
  for (int64_t j = 0; j < c; ++j) {
    double n = 0, mean = 0, m2 = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      double nb = static_cast<double>(std::min(rows, (b + 1) * block) -
                                      b * block);
      const float* pb = part.data() + b * 3 * c;
      double mb = static_cast<double>(pb[j]) + static_cast<double>(pb[c + j]);
      double m2b = pb[2 * c + j];
      double tot = n + nb, delta = mb - mean;
      mean += delta * (nb / tot);
      m2 += m2b + delta * delta * (n * nb / tot);
      n = tot;
    }
    float h = static_cast<float>(mean);
    hi[j] = h;
    lo[j] = static_cast<float>(mean - static_cast<double>(h));
    var[j] = static_cast<float>(m2 / std::max(n, 1.0));
  }
}

template <typename T>
void ColSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, const T* x,
             const T* dy, const float* hi, const float* lo, float* sg,
             float* sgd) {
  int64_t block = ColBlockRows(c);
  int64_t blocks = (rows + block - 1) / block;
  std::vector<float> part(static_cast<size_t>(blocks) * 2 * c, 0.f);
  ParallelFor(pool, blocks, rows * c, [&](int64_t b) {
    int64_t start = b * block, stop = std::min(rows, start + block);
    float* pg = part.data() + b * 2 * c;
    float* pd = pg + c;
    int64_t j0 = 0;
    for (; j0 + 32 <= c; j0 += 32) {
      BlockSums<4>(x, dy, c, j0, start, stop, hi, lo, pg, pd);
    }
    for (; j0 + 8 <= c; j0 += 8) {
      BlockSums<1>(x, dy, c, j0, start, stop, hi, lo, pg, pd);
    }
    for (; j0 < c; ++j0) {
      BlockSums1(x, dy, c, j0, start, stop, hi, lo, pg, pd);
    }
  });
  for (int64_t j = 0; j < c; ++j) {
    double a = 0, d = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      a += part[b * 2 * c + j];
      d += part[b * 2 * c + c + j];
    }
    sg[j] = static_cast<float>(a);
    sgd[j] = static_cast<float>(d);
  }
}

// x: [..., C]; outputs [C] (jax.vmap's broadcast_all stacks batches in
// front of both: each leading batch is then its own [R, C] problem).
struct Cols {
  int64_t batches, rows, c;
};

Cols GetCols(const ffi::AnyBuffer& x, int64_t out_count) {
  auto dims = x.dimensions();
  int64_t c = dims[dims.size() - 1];
  int64_t total = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) total *= dims[i];
  int64_t batches = std::max<int64_t>(out_count / std::max<int64_t>(c, 1), 1);
  return Cols{batches, total / batches, c};
}

ffi::Error ColStatsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                        ffi::ResultBuffer<ffi::F32> hi,
                        ffi::ResultBuffer<ffi::F32> lo,
                        ffi::ResultBuffer<ffi::F32> var, bool center) {
  Cols k = GetCols(x, static_cast<int64_t>(hi->element_count()));
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t b = 0; b < k.batches; ++b) {
      int64_t so = b * k.c;
      ColStats(pool, k.rows, k.c, In<T>(x) + b * k.rows * k.c, center,
               hi->typed_data() + so, lo->typed_data() + so,
               var->typed_data() + so);
    }
  });
}

ffi::Error ColSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> hi,
                       ffi::Buffer<ffi::F32> lo,
                       ffi::ResultBuffer<ffi::F32> sg,
                       ffi::ResultBuffer<ffi::F32> sgd) {
  Cols k = GetCols(x, static_cast<int64_t>(sg->element_count()));
  if (x.element_type() != dy.element_type()) {
    return ffi::Error::InvalidArgument("x and dy dtypes differ");
  }
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t b = 0; b < k.batches; ++b) {
      int64_t off = b * k.rows * k.c, so = b * k.c;
      ColSums(pool, k.rows, k.c, In<T>(x) + off, In<T>(dy) + off,
              hi.typed_data() + so, lo.typed_data() + so,
              sg->typed_data() + so, sgd->typed_data() + so);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowFwd, RowFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center")
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowStats, RowStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowBwd, RowBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColStats, ColStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColSums, ColSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Normalization kernels for XLA's CPU backend (XLA FFI).
//
// Row kernels (LayerNorm, RMSNorm) normalize each row of x viewed as [R, D]
// (every dimension but the last is a row; the Python side flattens several
// trailing reduced axes into one). Column kernels (BatchNorm) take the
// statistics of each channel of x viewed as [R, C] over all R rows. XLA's
// CPU backend gives every reduction its own pass over memory and forms no
// multi-output reductions; these kernels keep a row (a run of rows, for the
// columns) in cache between the sums that read it. The math is that of
// jaxnorm/_core.py, whose docstrings are the reference:
//
//   hi = fl(mean(x)), lo = mean(x - hi) (the residue of the mean),
//   var = mean((x - hi)^2) - lo^2 (the corrected two-pass algorithm over
//   the cached row), xhat = ((x - hi) - lo) * rstd, y = xhat * scale + bias;
//   without centring hi = lo = 0 and var = mean(x^2).
//
//   backward, with g = dy * scale: S1 = sum(g), S2 = sum(g * xhat),
//   dx = rstd * (g - (S1 + xhat * S2) / D)   (no S1 without centring),
//   dscale = sum over rows of dy * xhat, dbias = sum over rows of dy.
//
// Overflow: the statistics are float32, so a sum of squares beyond float32's
// range gives var = inf, as the XLA ops' float32 sums do (the docstring of
// jaxnorm.batch_norm_train says what follows).
//
// Exactness: every sum over a reduced axis is taken in float32 vector lanes
// over runs of at most kRun terms per lane, and each run's total joins a
// float64 sum. The error is that of a float32 sum of kRun terms, whatever
// the reduced length, and every sum is taken in a fixed order, so results
// do not depend on the thread count or timing.
//
// Row kernels: scale and bias are [P, D] with P dividing R: row r uses row
// r / (R / P) of them (P = 1 normally; jax.vmap's broadcast_all stacks
// per-example copies in front, which this layout covers); dscale and dbias
// are [P, D] likewise. x and y are float32 or bfloat16; statistics and
// gradients are float32. The forward kernels read scale and bias in their
// own dtype (float32 or bfloat16, both the same), and a parameter with no
// elements is absent (a scale of ones, a bias of zeros), so that a forward
// op needs no XLA op beside its kernel: XLA's CPU client runs a program of
// under 1000 counted flops on the caller's thread, and counts none for a
// custom call. The backward kernels take a float32 scale.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Vector width in float32 lanes: a 512-bit register where the build
// targets AVX-512, else 256 bits (two NEON registers on arm64).
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float VF __attribute__((vector_size(4 * W)));
typedef uint16_t VH __attribute__((vector_size(2 * W)));
typedef uint32_t VU __attribute__((vector_size(4 * W)));

// Terms a float32 lane accumulates before its sum joins a float64 total.
constexpr int64_t kRun = 32;

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
  // round to nearest even; a NaN stays a (quiet) NaN.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan
                                                                : rounded);
}

inline VF Splat(float f) {
  VF v = {};
  return v + f;
}
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
inline void StoreV(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
inline void StoreV(uint16_t* p, VF v) {
#if defined(__AVX512BF16__)  // implies AVX-512, so W == 16
  __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
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

typedef double VD __attribute__((vector_size(8 * W)));

// The lanes of v summed pairwise (a tree of log2(W) steps).
inline double HSum(VD v) {
  double t[W];
  for (int e = 0; e < W; ++e) t[e] = v[e];
  for (int half = W / 2; half >= 1; half /= 2) {
    for (int e = 0; e < half; ++e) t[e] += t[e + half];
  }
  return t[0];
}

// Adds to sums[k] the sums over i < n of terms(i)[k], K of them at once:
// terms(i) returns K vectors for the W elements from i (i a multiple of W,
// i + W <= n). Runs of kRun vectors per lane in float32, each run's lanes
// added to float64 lanes, whose sum joins sums[k] at the end; the caller
// adds the n % W tail. Within a run, kChains accumulators take every
// kChains-th vector (independent chains of additions, which the CPU
// overlaps), then are added pairwise.
constexpr int kChains = 4;
template <int K, typename Terms>
inline void VecSums(int64_t n, Terms terms, double* sums) {
  const int64_t full = n - n % W;
  VD total[K];
  for (int k = 0; k < K; ++k) total[k] = VD{} + 0.0;
  for (int64_t s = 0; s < full; s += kRun * W) {
    const int64_t e = std::min(full, s + kRun * W);
    VF acc[kChains][K];
    for (int c = 0; c < kChains; ++c) {
      for (int k = 0; k < K; ++k) acc[c][k] = Splat(0.f);
    }
    int64_t i = s;
    for (; i + kChains * W <= e; i += kChains * W) {
      for (int c = 0; c < kChains; ++c) {
        auto t = terms(i + c * W);
        for (int k = 0; k < K; ++k) acc[c][k] += t[k];
      }
    }
    for (int c = 0; i < e; i += W, ++c) {
      auto t = terms(i);
      for (int k = 0; k < K; ++k) acc[c][k] += t[k];
    }
    for (int k = 0; k < K; ++k) {
      total[k] += __builtin_convertvector(
          (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]), VD);
    }
  }
  for (int k = 0; k < K; ++k) sums[k] += HSum(total[k]);
}

template <int K>
struct Vecs {
  VF v[K];
  VF operator[](int k) const { return v[k]; }
};

// Writing fresh memory costs a page fault per 4 KiB page, the larger part
// of the time of writing a large output: a kernel asks the system for
// transparent huge pages on its outputs' whole 2 MiB pages (where the
// system allows them "on madvise"; a no-op elsewhere), a fault per 2 MiB.
constexpr size_t kHugePage = size_t{2} << 20;
inline void AdviseHugePages(void* p, size_t bytes) {
#if defined(MADV_HUGEPAGE)
  if (bytes < 2 * kHugePage) return;
  uintptr_t start = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) &
                    ~(uintptr_t{kHugePage} - 1);
  uintptr_t stop = (reinterpret_cast<uintptr_t>(p) + bytes) &
                   ~(uintptr_t{kHugePage} - 1);
  if (stop > start) {
    (void)madvise(reinterpret_cast<void*>(start), stop - start,
                  MADV_HUGEPAGE);
  }
#endif
}

// Runs body(chunk) for chunk in [0, n) on the caller and the pool's
// threads. The caller waits only for chunks that were claimed; a pool task
// that starts after all chunks are claimed returns at once (its state is
// shared, so it outlives this call). Work below kParallelElements runs on
// the calling thread alone: waking pool threads costs more than it saves,
// most of all inside a larger program, which XLA runs on a pool thread
// whose neighbours are busy with XLA's own split fusions. On 2 cores,
// LayerNorm(2x + 1) * 3 jitted over 8 rows of 4,096 takes 73-80 us a call
// split and 44 us not (RMSNorm 74-77 against 34 us); over 32 rows of
// 1,024, 99-110 us against 45-62 us. Called alone, a split gains at most
// 2 us below this size (8 x 4,096: 12.9-13.3 against 15.3 us), and above
// it the split wins in a program too: 16 rows of 4,096 take 54-65 us
// split and 106 us not.
constexpr int64_t kParallelElements = 1 << 16;

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t elements,
                 Body body) {
  if (elements < kParallelElements || n < 2) {
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
  // The caller works too: with the helpers, as many workers as the pool
  // has threads.
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

// ---------------------------------------------------------------------------
// Row kernels

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
  if (param.element_count() > 0) {
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

// var = m2 / n in float32, inf where the sum of squares m2 exceeds float32's
// range (see the header).
inline float Variance(double m2, double correction, double n) {
  constexpr double kMax = 3.4028234663852886e38;  // FLT_MAX
  if (m2 > kMax) return INFINITY;
  return static_cast<float>(std::max(m2 / n - correction, 0.0));
}

// (hi, lo, var) of one row: the mean, then the centred sums, each over the
// cached row (see the header).
template <typename T>
void RowStats(const T* x, int64_t d, bool center, float* hi, float* lo,
              float* var) {
  const int64_t tail = d - d % W;
  if (!center) {
    double ss = 0;
    VecSums<1>(d, [&](int64_t i) {
      VF u = LoadV(x + i);
      return Vecs<1>{{u * u}};
    }, &ss);
    for (int64_t i = tail; i < d; ++i) ss += double(Load(x, i)) * Load(x, i);
    *hi = 0.f;
    *lo = 0.f;
    *var = Variance(ss, 0.0, d);
    return;
  }
  double sum = 0;
  VecSums<1>(d, [&](int64_t i) { return Vecs<1>{{LoadV(x + i)}}; }, &sum);
  for (int64_t i = tail; i < d; ++i) sum += Load(x, i);
  const float m = static_cast<float>(sum / d);
  const VF vm = Splat(m);
  double s[2] = {0, 0};
  VecSums<2>(d, [&](int64_t i) {
    VF c = LoadV(x + i) - vm;
    return Vecs<2>{{c, c * c}};
  }, s);
  for (int64_t i = tail; i < d; ++i) {
    double c = Load(x, i) - m;
    s[0] += c;
    s[1] += c * c;
  }
  const double l = s[0] / d;
  *hi = m;
  *lo = static_cast<float>(l);
  *var = Variance(s[1], l * l, d);
}

// Rows per parallel chunk: a fixed split (independent of the thread count)
// into at most 64 chunks per parameter group, of at most kChunkRows rows
// (the backward's per-chunk dscale/dbias partials are float32 sums over a
// chunk's rows, so its length bounds their error).
constexpr int64_t kChunkRows = 64;
inline int64_t ChunkRows(const Rows& r) {
  return std::clamp<int64_t>((r.per_group + 63) / 64, 1, kChunkRows);
}

// Calls body(p, start, stop) for each chunk [start, stop) of rows, all of
// parameter group p, in parallel; the chunk index is c.
template <typename Body>
void ForRowChunks(ffi::ThreadPool& pool, const Rows& r, Body body) {
  const int64_t block = ChunkRows(r);
  const int64_t per_group = (r.per_group + block - 1) / block;
  ParallelFor(pool, r.groups * per_group, r.rows * r.d, [&](int64_t c) {
    const int64_t p = c / per_group;
    const int64_t start = p * r.per_group + (c % per_group) * block;
    body(c, p, start, std::min(start + block, (p + 1) * r.per_group));
  });
}

inline int64_t RowChunks(const Rows& r) {
  const int64_t block = ChunkRows(r);
  return r.groups * ((r.per_group + block - 1) / block);
}

// y = ((x - hi) - lo) * rstd * scale + bias for one row x of type T,
// whose statistics it computes; y of type TY.
template <typename T, typename TY, typename Vec, typename One>
void AffineRow(const T* xr, int64_t d, float h, float l, float rs, TY* yr,
               Vec vec, One one) {
  const VF vh = Splat(h), vl = Splat(l), vr = Splat(rs);
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    StoreV(yr + i, vec(((LoadV(xr + i) - vh) - vl) * vr, i));
  }
  for (; i < d; ++i) Store(yr, i, one(((Load(xr, i) - h) - l) * rs, i));
}

// y = xhat * s + b over one row; an absent s (nullptr) multiplies by
// nothing (xhat * 1 exactly), an absent b adds zero, as the arrays would.
template <typename T, typename TS, typename TY>
void NormalizeRow(const T* xr, int64_t d, const TS* s, const TS* b,
                  bool center, float eps, TY* yr, float* hi, float* lo,
                  float* var) {
  RowStats(xr, d, center, hi, lo, var);
  const float rs = 1.f / std::sqrt(*var + eps), h = *hi, l = *lo;
  const VF zero = Splat(0.f);
  if (s != nullptr && b != nullptr) {
    AffineRow(xr, d, h, l, rs, yr,
              [&](VF xh, int64_t i) { return xh * LoadV(s + i) + LoadV(b + i); },
              [&](float xh, int64_t i) { return xh * Load(s, i) + Load(b, i); });
  } else if (s != nullptr) {
    AffineRow(xr, d, h, l, rs, yr,
              [&](VF xh, int64_t i) { return xh * LoadV(s + i) + zero; },
              [&](float xh, int64_t i) { return xh * Load(s, i) + 0.f; });
  } else if (b != nullptr) {
    AffineRow(xr, d, h, l, rs, yr,
              [&](VF xh, int64_t i) { return xh + LoadV(b + i); },
              [&](float xh, int64_t i) { return xh + Load(b, i); });
  } else {
    AffineRow(xr, d, h, l, rs, yr, [&](VF xh, int64_t) { return xh + zero; },
              [&](float xh, int64_t) { return xh + 0.f; });
  }
}

// The row forward. With a residual r (type TH, else nullptr) the rows
// normalized are h = x + r, rounded to TH and written to h, then read back
// from cache: x and r are read once, h and y written once. Without y
// (nullptr) only h and the statistics are written.
template <typename TX, typename TH, typename TS>
void Forward(ffi::ThreadPool& pool, const Rows& r, const TX* x,
             const TH* res, const TS* scale, const TS* bias, bool center,
             float eps, TX* y, TH* h, float* hi, float* lo, float* var) {
  if (y != nullptr) AdviseHugePages(y, sizeof(TX) * r.rows * r.d);
  if (h != nullptr) AdviseHugePages(h, sizeof(TH) * r.rows * r.d);
  ForRowChunks(pool, r, [&](int64_t, int64_t p, int64_t start,
                            int64_t stop) {
    const TS* s = scale == nullptr ? nullptr : scale + p * r.d;
    const TS* b = bias == nullptr ? nullptr : bias + p * r.d;
    for (int64_t row = start; row < stop; ++row) {
      const int64_t o = row * r.d;
      if (res == nullptr) {
        NormalizeRow(x + o, r.d, s, b, center, eps, y + o, &hi[row],
                     &lo[row], &var[row]);
        continue;
      }
      int64_t i = 0;
      for (; i + W <= r.d; i += W) {
        StoreV(h + o + i, LoadV(x + o + i) + LoadV(res + o + i));
      }
      for (; i < r.d; ++i) Store(h + o, i, Load(x + o, i) + Load(res + o, i));
      if (y == nullptr) {
        RowStats(h + o, r.d, center, &hi[row], &lo[row], &var[row]);
      } else {
        NormalizeRow(h + o, r.d, s, b, center, eps, y + o, &hi[row],
                     &lo[row], &var[row]);
      }
    }
  });
}

template <typename T>
void Stats(ffi::ThreadPool& pool, const Rows& r, const T* x, bool center,
           float* hi, float* lo, float* var) {
  ForRowChunks(pool, r, [&](int64_t, int64_t, int64_t start, int64_t stop) {
    for (int64_t row = start; row < stop; ++row) {
      RowStats(x + row * r.d, r.d, center, &hi[row], &lo[row], &var[row]);
    }
  });
}

// The row backward over rows x (type T) with cotangent dy (type TD); with
// dh (type T, else nullptr) the cotangent of x as an output too, added to
// dx (type T): the fused add + norm's gradient of h.
template <typename T, typename TD>
void Backward(ffi::ThreadPool& pool, const Rows& r, const T* x,
              const float* hi, const float* lo, const float* rstd,
              const float* scale, const TD* dy, const T* dh, bool center,
              T* dx, float* dscale, float* dbias) {
  AdviseHugePages(dx, sizeof(T) * r.rows * r.d);
  // Per-chunk float32 partial sums of dscale and dbias, added in float64
  // in chunk order below.
  std::vector<float> part(static_cast<size_t>(RowChunks(r)) * 2 * r.d, 0.f);
  ForRowChunks(pool, r, [&](int64_t c, int64_t p, int64_t start,
                            int64_t stop) {
    const float* s = scale + p * r.d;
    float* ps = part.data() + c * 2 * r.d;
    float* pb = ps + r.d;
    for (int64_t row = start; row < stop; ++row) {
      const T* xr = x + row * r.d;
      const TD* gr = dy + row * r.d;
      const T* hr = dh == nullptr ? nullptr : dh + row * r.d;
      T* dxr = dx + row * r.d;
      const float h = hi[row], l = lo[row], rs = rstd[row];
      const VF vh = Splat(h), vl = Splat(l), vr = Splat(rs);
      double sums[2] = {0, 0};  // sum(g * s), sum(g * s * xhat)
      VecSums<2>(r.d, [&](int64_t i) {
        VF gs = LoadV(gr + i) * LoadV(s + i);
        return Vecs<2>{{gs, gs * (((LoadV(xr + i) - vh) - vl) * vr)}};
      }, sums);
      for (int64_t i = r.d - r.d % W; i < r.d; ++i) {
        double gs = double(Load(gr, i)) * s[i];
        sums[0] += gs;
        sums[1] += gs * (((Load(xr, i) - h) - l) * rs);
      }
      const float k1 = center ? static_cast<float>(sums[0] / r.d) : 0.f;
      const float k2 = static_cast<float>(sums[1] / r.d);
      const VF v1 = Splat(k1), v2 = Splat(k2);
      int64_t i = 0;
      for (; i + W <= r.d; i += W) {
        VF g = LoadV(gr + i);
        VF xh = ((LoadV(xr + i) - vh) - vl) * vr;
        VF out = vr * ((g * LoadV(s + i) - v1) - xh * v2);
        if (hr != nullptr) out += LoadV(hr + i);
        StoreV(dxr + i, out);
        StoreV(ps + i, LoadV(ps + i) + g * xh);
        StoreV(pb + i, LoadV(pb + i) + g);
      }
      for (; i < r.d; ++i) {
        float g = Load(gr, i);
        float xh = ((Load(xr, i) - h) - l) * rs;
        float out = rs * ((g * s[i] - k1) - xh * k2);
        Store(dxr, i, hr == nullptr ? out : out + Load(hr, i));
        ps[i] += g * xh;
        pb[i] += g;
      }
    }
  });
  const int64_t chunks = RowChunks(r) / r.groups;
  std::vector<double> acc(2 * r.d);
  for (int64_t p = 0; p < r.groups; ++p) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t c = p * chunks; c < (p + 1) * chunks; ++c) {
      const float* pc = part.data() + c * 2 * r.d;
      for (int64_t i = 0; i < 2 * r.d; ++i) acc[i] += pc[i];
    }
    for (int64_t i = 0; i < r.d; ++i) {
      dscale[p * r.d + i] = static_cast<float>(acc[i]);
      dbias[p * r.d + i] = static_cast<float>(acc[r.d + i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Column kernels (BatchNorm). Rows are split into fixed runs of at most
// kRun rows; each run's per-channel sums are taken in float32 over the
// cached run (two passes for the statistics: the run's mean, then the
// centred sums), and merged in float64 (Chan et al.'s pairwise update for
// the statistics), in run order within a parallel task, then in task order:
//
//   col_stats:  hi = fl(mean), lo = fl(mean - hi), var = M2 / R;
//   col_sums:   sum(dy) and sum(dy * ((x - hi) - lo)), per channel.
//
// Parallel tasks take whole runs, about kTaskElements elements each.

constexpr int64_t kTaskElements = 16384;

struct ColPlan {
  int64_t run_rows, runs, runs_per_task, tasks;
};

ColPlan PlanCols(int64_t rows, int64_t c) {
  const int64_t run_rows =
      std::clamp<int64_t>(kTaskElements / std::max<int64_t>(c, 1), 1, kRun);
  const int64_t runs = (rows + run_rows - 1) / run_rows;
  const int64_t per_task =
      std::max<int64_t>(1, kTaskElements / (run_rows * std::max<int64_t>(c, 1)));
  return ColPlan{run_rows, runs, per_task, (runs + per_task - 1) / per_task};
}

// Calls fn(N, j) for the channels of x[..., c] in groups of N vectors of W
// channels starting at j (N = 4, then 1), then N = 0 for each channel of
// the tail, one at a time: the accumulators of a group stay in registers.
template <typename Fn>
void ByChannels(int64_t c, Fn fn) {
  int64_t j = 0;
  for (; j + 4 * W <= c; j += 4 * W) fn(std::integral_constant<int, 4>{}, j);
  for (; j + W <= c; j += W) fn(std::integral_constant<int, 1>{}, j);
  for (; j < c; ++j) fn(std::integral_constant<int, 0>{}, j);
}

// Channel vectors as one lane-group: N vectors at x + j, or channel j
// alone when N = 0 (the value in lane 0).
template <int N>
struct Lanes {
  static constexpr int kCount = N == 0 ? 1 : N;
  template <typename T>
  static VF Get(const T* row, int64_t j, int k) {
    if constexpr (N == 0) {
      VF v = {};
      v[0] = Load(row, j);
      return v;
    } else {
      return LoadV(row + j + k * W);
    }
  }
  static VF GetF(const float* p, int64_t j, int k) { return Get(p, j, k); }
  static void Put(float* p, int64_t j, int k, VF v) {
    if constexpr (N == 0) {
      p[j] = v[0];
    } else {
      StoreV(p + j + k * W, v);
    }
  }
};

// One run's per-channel mean (as the float32 mean and its residue, so the
// merge sees it unrounded) and M2 for channels from j.
template <int N, typename T>
void RunStats(const T* x, int64_t c, int64_t j, int64_t start, int64_t stop,
              bool center, float* mean, float* res, float* m2) {
  using L = Lanes<N>;
  constexpr int K = L::kCount;
  VF m[K], s1[K], s2[K];
  for (int k = 0; k < K; ++k) m[k] = s1[k] = s2[k] = Splat(0.f);
  const VF inv = Splat(1.f / static_cast<float>(stop - start));
  if (center) {
    for (int64_t r = start; r < stop; ++r) {
      for (int k = 0; k < K; ++k) m[k] += L::Get(x + r * c, j, k);
    }
    for (int k = 0; k < K; ++k) m[k] *= inv;
  }
  for (int64_t r = start; r < stop; ++r) {
    for (int k = 0; k < K; ++k) {
      VF d = L::Get(x + r * c, j, k) - m[k];
      s1[k] += d;
      s2[k] += d * d;
    }
  }
  for (int k = 0; k < K; ++k) {
    VF l = center ? s1[k] * inv : Splat(0.f);
    VF v = s2[k] - s1[k] * l;  // the corrected two-pass M2
    for (int e = 0; e < W; ++e) v[e] = std::max(v[e], 0.f);
    L::Put(mean, j, k, m[k]);
    L::Put(res, j, k, l);
    L::Put(m2, j, k, v);
  }
}

template <int N, typename T>
void RunSums(const T* x, const T* dy, int64_t c, int64_t j, int64_t start,
             int64_t stop, const float* hi, const float* lo, float* sg,
             float* sgd) {
  using L = Lanes<N>;
  constexpr int K = L::kCount;
  VF h[K], l[K], a[K], b[K];
  for (int k = 0; k < K; ++k) {
    h[k] = L::GetF(hi, j, k);
    l[k] = L::GetF(lo, j, k);
    a[k] = b[k] = Splat(0.f);
  }
  for (int64_t r = start; r < stop; ++r) {
    for (int k = 0; k < K; ++k) {
      VF g = L::Get(dy + r * c, j, k);
      a[k] += g;
      b[k] += g * ((L::Get(x + r * c, j, k) - h[k]) - l[k]);
    }
  }
  for (int k = 0; k < K; ++k) {
    L::Put(sg, j, k, a[k]);
    L::Put(sgd, j, k, b[k]);
  }
}

// Calls run(t, b, start, stop) for every run b of task t of the plan, the
// tasks in parallel, each task's runs in order.
template <typename Run>
void ForRuns(ffi::ThreadPool& pool, const ColPlan& plan, int64_t rows,
             int64_t c, Run run) {
  ParallelFor(pool, plan.tasks, rows * c, [&](int64_t t) {
    const int64_t last = std::min(plan.runs, (t + 1) * plan.runs_per_task);
    for (int64_t b = t * plan.runs_per_task; b < last; ++b) {
      const int64_t start = b * plan.run_rows;
      run(t, b, start, std::min(rows, start + plan.run_rows));
    }
  });
}

// Merges the statistics of a part of nb rows (float32 mean as mean + res,
// and M2) into the float64 totals (n, mean, m2) of c channels: Chan et
// al.'s pairwise update.
inline void Merge(double nb, const float* mean, const float* res,
                  const float* m2b, int64_t c, double* n, double* tmean,
                  double* tm2) {
  const double tot = *n + nb, wb = nb / tot, wx = *n * nb / tot;
  for (int64_t j = 0; j < c; ++j) {
    const double delta = double(mean[j]) + double(res[j]) - tmean[j];
    tmean[j] += delta * wb;
    tm2[j] += double(m2b[j]) + delta * delta * wx;
  }
  *n = tot;
}

template <typename T>
void ColStats(ffi::ThreadPool& pool, int64_t rows, int64_t c, const T* x,
              bool center, float* hi, float* lo, float* var) {
  const ColPlan plan = PlanCols(rows, c);
  // Per task: its runs merged in float64 (count, then mean and M2 of every
  // channel); the tasks are merged in task order below.
  const int64_t stride = 1 + 2 * c;
  std::vector<double> part(static_cast<size_t>(plan.tasks) * stride, 0.0);
  ForRuns(pool, plan, rows, c, [&](int64_t t, int64_t, int64_t start,
                                   int64_t stop) {
    float run[3 * 4 * W];  // mean, res, M2 of up to 4 vectors of channels
    double* tp = part.data() + t * stride;
    ByChannels(c, [&](auto n, int64_t j) {
      constexpr int N = decltype(n)::value;
      constexpr int64_t width = N == 0 ? 1 : N * W;
      // (the run's statistics for channels [j, j + width), at offset 0)
      RunStats<N>(x + j, c, 0, start, stop, center, run, run + width,
                  run + 2 * width);
      double count = tp[0];
      Merge(double(stop - start), run, run + width, run + 2 * width, width,
            &count, tp + 1 + j, tp + 1 + c + j);
    });
    tp[0] += double(stop - start);
  });
  std::vector<double> mean(c, 0.0), m2(c, 0.0);
  double n = 0;
  for (int64_t t = 0; t < plan.tasks; ++t) {
    const double* tp = part.data() + t * stride;
    const double nb = tp[0], tot = n + nb, wb = nb / tot, wx = n * nb / tot;
    for (int64_t j = 0; j < c; ++j) {
      const double delta = tp[1 + j] - mean[j];
      mean[j] += delta * wb;
      m2[j] += tp[1 + c + j] + delta * delta * wx;
    }
    n = tot;
  }
  for (int64_t j = 0; j < c; ++j) {
    const float h = static_cast<float>(mean[j]);
    hi[j] = h;
    lo[j] = static_cast<float>(mean[j] - double(h));
    var[j] = Variance(m2[j], 0.0, std::max(n, 1.0));
  }
}

template <typename T>
void ColSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, const T* x,
             const T* dy, const float* hi, const float* lo, float* sg,
             float* sgd) {
  const ColPlan plan = PlanCols(rows, c);
  // Per task: its runs' float32 sums added in float64.
  std::vector<double> part(static_cast<size_t>(plan.tasks) * 2 * c, 0.0);
  ForRuns(pool, plan, rows, c, [&](int64_t t, int64_t, int64_t start,
                                   int64_t stop) {
    float run[2 * 4 * W];
    double* tp = part.data() + t * 2 * c;
    ByChannels(c, [&](auto n, int64_t j) {
      constexpr int N = decltype(n)::value;
      constexpr int64_t width = N == 0 ? 1 : N * W;
      RunSums<N>(x + j, dy + j, c, 0, start, stop, hi + j, lo + j, run,
                 run + width);
      for (int64_t k = 0; k < width; ++k) {
        tp[j + k] += run[k];
        tp[c + j + k] += run[width + k];
      }
    });
  });
  std::vector<double> acc(2 * c, 0.0);
  for (int64_t t = 0; t < plan.tasks; ++t) {
    const double* tp = part.data() + t * 2 * c;
    for (int64_t j = 0; j < 2 * c; ++j) acc[j] += tp[j];
  }
  for (int64_t j = 0; j < c; ++j) {
    sg[j] = static_cast<float>(acc[j]);
    sgd[j] = static_cast<float>(acc[c + j]);
  }
}

// y = ((x - m) - d) * k + b per channel (BatchNorm's output where a kernel
// writes it: see jaxnorm/_kernels.py), written on huge pages.
template <typename T>
void ColApply(ffi::ThreadPool& pool, int64_t rows, int64_t c, const T* x,
              const float* m, const float* d, const float* k,
              const float* b, T* y) {
  AdviseHugePages(y, sizeof(T) * rows * c);
  const int64_t block = std::max<int64_t>(1, kTaskElements / c);
  ParallelFor(pool, (rows + block - 1) / block, rows * c, [&](int64_t t) {
    const int64_t stop = std::min(rows, (t + 1) * block);
    for (int64_t r = t * block; r < stop; ++r) {
      const T* xr = x + r * c;
      T* yr = y + r * c;
      int64_t j = 0;
      for (; j + W <= c; j += W) {
        StoreV(yr + j, ((LoadV(xr + j) - LoadV(m + j)) - LoadV(d + j)) *
                               LoadV(k + j) +
                           LoadV(b + j));
      }
      for (; j < c; ++j) {
        Store(yr, j, ((Load(xr, j) - m[j]) - d[j]) * k[j] + b[j]);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// FFI handlers

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

bool Float(const ffi::AnyBuffer& a) { return IsF32(a) || IsBf16(a); }

// Calls run(A{}, B{}) with the element types of a and b, as ByDtype.
template <typename Run>
ffi::Error ByDtypes(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                    Run run) {
  if (!Float(b)) {
    return ffi::Error::InvalidArgument("arrays must be float32 or bfloat16");
  }
  return ByDtype(a, [&](auto ta) {
    (void)ByDtype(b, [&](auto tb) { run(ta, tb); });
  });
}

template <typename T>
const T* In(const ffi::AnyBuffer& a) {
  return static_cast<const T*>(a.untyped_data());
}
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& a) {
  return static_cast<T*>(a->untyped_data());
}

// The handlers' parameters, from which XLA_FFI_DEFINE_HANDLER_AUTO derives
// each binding: the thread pool (a context), the arguments and results in
// order, then the named attributes.
struct Pool : ffi::ThreadPool {
  Pool(ffi::ThreadPool pool) : ffi::ThreadPool(pool) {}  // NOLINT
};
constexpr char kCenter[] = "center";
constexpr char kEpsilon[] = "epsilon";
using Center = ffi::Attr<bool, kCenter>;
using Epsilon = ffi::Attr<float, kEpsilon>;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using AnyOut = ffi::Result<ffi::AnyBuffer>;

// A forward kernel's parameter of type TS: its data, or nullptr if absent.
template <typename TS>
const TS* Param(const ffi::AnyBuffer& p) {
  return p.element_count() > 0 ? In<TS>(p) : nullptr;
}

// The rows of x for a forward kernel, its scale and bias checked: absent,
// or [P, D] of one floating dtype (that of `*typed`, which is returned).
ffi::Error GetForward(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale,
                      const ffi::AnyBuffer& bias, Rows* r,
                      const ffi::AnyBuffer** typed) {
  *typed = scale.element_count() > 0 ? &scale : &bias;
  if (auto e = GetRows(x, **typed, r); e.failure()) return e;
  const ffi::AnyBuffer& other = *typed == &scale ? bias : scale;
  if (other.element_count() > 0 &&
      (other.element_count() != (*typed)->element_count() ||
       other.element_type() != (*typed)->element_type())) {
    return ffi::Error::InvalidArgument("scale and bias differ in shape/dtype");
  }
  return ffi::Error::Success();
}

ffi::Error RowFwdImpl(Pool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                      ffi::AnyBuffer bias, AnyOut y, F32Out hi, F32Out lo,
                      F32Out var, Center center, Epsilon epsilon) {
  Rows r;
  const ffi::AnyBuffer* typed;
  if (auto e = GetForward(x, scale, bias, &r, &typed); e.failure()) return e;
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("y dtype != x dtype");
  }
  return ByDtypes(x, *typed, [&](auto tx, auto ts) {
    using T = decltype(tx);
    using TS = decltype(ts);
    Forward<T, T, TS>(pool, r, In<T>(x), nullptr, Param<TS>(scale),
                      Param<TS>(bias), *center, *epsilon, Out<T>(y), nullptr,
                      hi->typed_data(), lo->typed_data(), var->typed_data());
  });
}

ffi::Error AddFwdImpl(Pool pool, ffi::AnyBuffer x, ffi::AnyBuffer res,
                      ffi::AnyBuffer scale, ffi::AnyBuffer bias, AnyOut y,
                      AnyOut h, F32Out hi, F32Out lo, F32Out var,
                      Center center, Epsilon epsilon) {
  Rows r;
  const ffi::AnyBuffer* typed;
  if (auto e = GetForward(x, scale, bias, &r, &typed); e.failure()) return e;
  if (x.element_type() != y->element_type() ||
      res.element_type() != h->element_type() || !Float(x) || !Float(res) ||
      !Float(*typed)) {
    return ffi::Error::InvalidArgument(
        "y must have x's dtype and h the residual's, float32 or bfloat16");
  }
  return ByDtypes(x, res, [&](auto tx, auto th) {
    using TX = decltype(tx);
    using TH = decltype(th);
    (void)ByDtype(*typed, [&](auto ts) {
      using TS = decltype(ts);
      Forward<TX, TH, TS>(pool, r, In<TX>(x), In<TH>(res), Param<TS>(scale),
                          Param<TS>(bias), *center, *epsilon, Out<TX>(y),
                          Out<TH>(h), hi->typed_data(), lo->typed_data(),
                          var->typed_data());
    });
  });
}

ffi::Error AddStatsImpl(Pool pool, ffi::AnyBuffer x, ffi::AnyBuffer res,
                        AnyOut h, F32Out hi, F32Out lo, F32Out var,
                        Center center) {
  Rows r;
  if (auto e = GetRows(x, x, &r); e.failure()) return e;
  if (res.element_type() != h->element_type() || !Float(x) || !Float(res)) {
    return ffi::Error::InvalidArgument(
        "h must have the residual's dtype, float32 or bfloat16");
  }
  return ByDtypes(x, res, [&](auto tx, auto th) {
    using TX = decltype(tx);
    using TH = decltype(th);
    Forward<TX, TH, float>(pool, r, In<TX>(x), In<TH>(res), nullptr, nullptr,
                           *center, 0.f, static_cast<TX*>(nullptr),
                           Out<TH>(h), hi->typed_data(), lo->typed_data(),
                           var->typed_data());
  });
}

ffi::Error RowStatsImpl(Pool pool, ffi::AnyBuffer x, F32Out hi, F32Out lo,
                        F32Out var, Center center) {
  Rows r;
  if (auto e = GetRows(x, x, &r); e.failure()) return e;
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    Stats(pool, r, In<T>(x), *center, hi->typed_data(), lo->typed_data(),
          var->typed_data());
  });
}

ffi::Error RowBwdImpl(Pool pool, ffi::AnyBuffer x, F32 hi, F32 lo, F32 rstd,
                      F32 scale, ffi::AnyBuffer dy, AnyOut dx, F32Out dscale,
                      F32Out dbias, Center center) {
  Rows r;
  if (auto e = GetRows(x, scale, &r); e.failure()) return e;
  if (x.element_type() != dy.element_type() ||
      x.element_type() != dx->element_type()) {
    return ffi::Error::InvalidArgument("x, dy and dx dtypes differ");
  }
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    Backward<T, T>(pool, r, In<T>(x), hi.typed_data(), lo.typed_data(),
                   rstd.typed_data(), scale.typed_data(), In<T>(dy), nullptr,
                   *center, Out<T>(dx), dscale->typed_data(),
                   dbias->typed_data());
  });
}

ffi::Error AddBwdImpl(Pool pool, ffi::AnyBuffer h, F32 hi, F32 lo, F32 rstd,
                      F32 scale, ffi::AnyBuffer dy, ffi::AnyBuffer dh,
                      AnyOut dx, F32Out dscale, F32Out dbias, Center center) {
  Rows r;
  if (auto e = GetRows(h, scale, &r); e.failure()) return e;
  if (h.element_type() != dh.element_type() ||
      h.element_type() != dx->element_type() || !Float(h) || !Float(dy)) {
    return ffi::Error::InvalidArgument(
        "dh and the gradient must have h's dtype, float32 or bfloat16");
  }
  return ByDtypes(h, dy, [&](auto th, auto td) {
    using TH = decltype(th);
    using TD = decltype(td);
    Backward<TH, TD>(pool, r, In<TH>(h), hi.typed_data(), lo.typed_data(),
                     rstd.typed_data(), scale.typed_data(), In<TD>(dy),
                     In<TH>(dh), *center, Out<TH>(dx), dscale->typed_data(),
                     dbias->typed_data());
  });
}

// x: [..., C]; outputs [..., C]: under jax.vmap (broadcast_all) batches
// stack in front of both, and each leading batch is its own [R, C] problem.
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

ffi::Error ColStatsImpl(Pool pool, ffi::AnyBuffer x, F32Out hi, F32Out lo,
                        F32Out var, Center center) {
  Cols k = GetCols(x, static_cast<int64_t>(hi->element_count()));
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t b = 0; b < k.batches; ++b) {
      int64_t so = b * k.c;
      ColStats(pool, k.rows, k.c, In<T>(x) + b * k.rows * k.c, *center,
               hi->typed_data() + so, lo->typed_data() + so,
               var->typed_data() + so);
    }
  });
}

ffi::Error ColSumsImpl(Pool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, F32 hi,
                       F32 lo, F32Out sg, F32Out sgd) {
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

ffi::Error ColApplyImpl(Pool pool, ffi::AnyBuffer x, F32 m, F32 d, F32 k, F32 b,
                        AnyOut y) {
  Cols q = GetCols(x, static_cast<int64_t>(m.element_count()));
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("x and y dtypes differ");
  }
  return ByDtype(x, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < q.batches; ++i) {
      int64_t off = i * q.rows * q.c, so = i * q.c;
      ColApply(pool, q.rows, q.c, In<T>(x) + off, m.typed_data() + so,
               d.typed_data() + so, k.typed_data() + so, b.typed_data() + so,
               Out<T>(y) + off);
    }
  });
}

}  // namespace

namespace xla::ffi {
template <>
struct CtxBinding<Pool> {
  using Ctx = ThreadPool;
};
}  // namespace xla::ffi

// The handlers, each bound by its Impl function's parameter types.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowFwd, RowFwdImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormAddFwd, AddFwdImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormAddStats, AddStatsImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormAddBwd, AddBwdImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowStats, RowStatsImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowBwd, RowBwdImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColStats, ColStatsImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColSums, ColSumsImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColApply, ColApplyImpl);

// One layer's decode attention over ssb's paged caches, fused: applies the rotary embedding to the step's queries
// and keys, writes the step's K/V into the generation cache,
// then, per (sequence, kv head), one pass of online softmax over the sequence's prompt segments and generated
// segments, read in place from the pools. Built on first use by ssb/engine/attention_kernel.py (which documents
// the layout and when it is used); the torch path in ssb/engine/cache.py computes the same thing.
//
// Why a kernel: the torch path issues a dozen small ops per cache part per layer (score matmul, casts, mask,
// softmax pieces, scatter, merge) and each makes a pass over memory; here every key and value is read once,
// scores stay in registers/L1 and the softmax is float32 throughout.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// bf16 caches on a CPU with AVX512-BF16 (built with -march=native there): scores with the bf16 dot-product
// instruction (no conversion of the keys) and values widened 16 at a time; elsewhere the portable loops below.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define SSB_AVX512_BF16 1
#endif

namespace {

constexpr int64_t LANES = 16;   // independent partial sums: lets the compiler vectorise the dot product
constexpr int64_t CHUNK = 128;  // positions scored at once (>= the longest segment; longer parts are split)
constexpr int64_t MAX_GROUP = 16;
constexpr int64_t MAX_HEAD_DIM = 256;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Reductions over LANES partial results combined as a tree: without -ffast-math the compiler may not reorder a
// plain running sum, which would leave it scalar and serial.
inline float tree_sum(float* acc) {
  for (int64_t w = LANES / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) acc[i] += acc[i + w];
  return acc[0];
}

inline float dot(const float* q, const float* k, int64_t n) {  // n: a multiple of LANES (checked)
  float acc[LANES] = {0.f};
  for (int64_t d = 0; d < n; d += LANES)
    for (int64_t i = 0; i < LANES; ++i) acc[i] += q[d + i] * k[d + i];
  return tree_sum(acc);
}

inline float max_of(const float* x, int64_t n, float start) {
  float acc[LANES];
  for (int64_t i = 0; i < LANES; ++i) acc[i] = start;
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES)
    for (int64_t i = 0; i < LANES; ++i) acc[i] = acc[i] > x[t + i] ? acc[i] : x[t + i];
  for (; t < n; ++t) acc[0] = acc[0] > x[t] ? acc[0] : x[t];
  for (int64_t w = LANES / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) acc[i] = acc[i] > acc[i + w] ? acc[i] : acc[i + w];
  return acc[0];
}

inline float sum_of(const float* x, int64_t n) {
  float acc[LANES] = {0.f};
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES)
    for (int64_t i = 0; i < LANES; ++i) acc[i] += x[t + i];
  for (; t < n; ++t) acc[0] += x[t];
  return tree_sum(acc);
}

// exp(x) for x <= 0 (scores minus their running max), relative error ~1e-7: 2^n * e^(f ln 2) with n = rint(x
// log2 e) and a degree-7 Taylor polynomial on |f ln 2| <= 0.35. Plain arithmetic, so loops over it vectorise
// (std::exp does not without -ffast-math). Below -87 it returns ~e^-87, which weighs nothing beside the max's 1.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Rotary embedding (Hugging Face's rotate-half convention) of one head, times `scale`, into float32:
// out[d] = x[d] cos[d] - x[d + half] sin[d] for d < half, x[d] cos[d] + x[d - half] sin[d] above.
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, float* out, int64_t dim, float scale) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d)
    out[d] = (to_float(x[d]) * to_float(cos[d]) - to_float(x[d + half]) * to_float(sin[d])) * scale;
  for (int64_t d = half; d < dim; ++d)
    out[d] = (to_float(x[d]) * to_float(cos[d]) + to_float(x[d - half]) * to_float(sin[d])) * scale;
}

// Running softmax state of the `group` query heads that share one kv head. D: the head dimension when known at
// compile time (the accumulators then stay in registers), 0 for any other (`dim`).
template <int64_t D>
struct OnlineSoftmax {
  int64_t group, dim;
  float q[MAX_GROUP * MAX_HEAD_DIM];    // queries, pre-scaled, float32
  float acc[MAX_GROUP * MAX_HEAD_DIM];  // sum of p * v
  float m[MAX_GROUP], l[MAX_GROUP];     // running max and sum of exp
  float s[MAX_GROUP * CHUNK];           // one chunk's scores, then probabilities
  float kf[CHUNK * MAX_HEAD_DIM];       // one chunk's keys, then values, in float32

  template <typename T>
  static constexpr bool fast_bf16() {
#ifdef SSB_AVX512_BF16
    return std::is_same_v<T, c10::BFloat16> && D > 0 && D % 32 == 0;
#else
    return false;
#endif
  }

#ifdef SSB_AVX512_BF16
  c10::BFloat16 qb[MAX_GROUP * MAX_HEAD_DIM];  // the queries rounded to bf16, for the dot-product instruction

  void round_queries() {
    for (int64_t i = 0; i < group * D; ++i) qb[i] = c10::BFloat16(q[i]);
  }

  // s[g][t] = q_g . k_t for the chunk's c keys: pairs of bf16 products summed in float32 (vdpbf16ps). Operands are
  // loaded where used: built by GCC 12 at -O3, a version keeping a key's vectors in a local __m512bh array gave
  // wrong scores, and one accumulating values into `acc` key by key did nothing (cause not established; the tests
  // and attention_kernel.self_check catch such builds).
  void scores_bf16(const c10::BFloat16* k, int64_t c) {
    for (int64_t g = 0; g < group; ++g) {
      const c10::BFloat16* qg = qb + g * D;
      for (int64_t t = 0; t < c; ++t) {
        const c10::BFloat16* kt = k + t * D;
        __m512 a = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 32)
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + i), (__m512bh)_mm512_loadu_si512(kt + i));
        s[g * CHUNK + t] = _mm512_reduce_add_ps(a);
      }
    }
  }

  // acc_g += sum_t p[g][t] v_t, accumulated in registers; a bf16 is the top half of a float32, so widening a value
  // is a shift
  void values_bf16(const c10::BFloat16* v, int64_t c) {
    constexpr int64_t W = D / 16;
    for (int64_t g = 0; g < group; ++g) {
      __m512 a[W];
      for (int64_t i = 0; i < W; ++i) a[i] = _mm512_loadu_ps(acc + g * D + 16 * i);
      for (int64_t t = 0; t < c; ++t) {
        const __m512 p = _mm512_set1_ps(s[g * CHUNK + t]);
        for (int64_t i = 0; i < W; ++i) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t * D + 16 * i));
          a[i] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), a[i]);
        }
      }
      for (int64_t i = 0; i < W; ++i) _mm512_storeu_ps(acc + g * D + 16 * i, a[i]);
    }
  }
#else
  void round_queries() {}
  template <typename T>
  void scores_bf16(const T*, int64_t) {}
  template <typename T>
  void values_bf16(const T*, int64_t) {}
#endif

  template <typename T>
  void add(const T* keys, const T* values, int64_t n) {  // keys/values: [n, dim] contiguous
    const int64_t hd = D ? D : dim;
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
      const int64_t c = std::min(CHUNK, n - lo);
      const T* k = keys + lo * hd;
      if constexpr (fast_bf16<T>()) {
        scores_bf16(k, c);
      } else {
        for (int64_t i = 0; i < c * hd; ++i) kf[i] = to_float(k[i]);
        for (int64_t g = 0; g < group; ++g)
          for (int64_t t = 0; t < c; ++t) s[g * CHUNK + t] = dot(q + g * hd, kf + t * hd, hd);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = s + g * CHUNK;
        const float mx = max_of(sg, c, m[g]);
        const float alpha = exp_nonpositive(m[g] - mx);  // m[g] = -inf at the start: alpha ~ 0 on l = acc = 0
        for (int64_t t = 0; t < c; ++t) sg[t] = exp_nonpositive(sg[t] - mx);
        l[g] = l[g] * alpha + sum_of(sg, c);
        m[g] = mx;
        float* ag = acc + g * hd;
        for (int64_t d = 0; d < hd; ++d) ag[d] *= alpha;
      }
      const T* v = values + lo * hd;
      if constexpr (fast_bf16<T>()) {
        values_bf16(v, c);
      } else {
        for (int64_t i = 0; i < c * hd; ++i) kf[i] = to_float(v[i]);
        for (int64_t g = 0; g < group; ++g) {
          const float* pg = s + g * CHUNK;
          float a[D ? D : MAX_HEAD_DIM];  // this head's accumulator, in registers when D is known
          for (int64_t d = 0; d < hd; ++d) a[d] = acc[g * hd + d];
          for (int64_t t = 0; t < c; ++t) {
            const float p = pg[t];
            const float* vt = kf + t * hd;
            for (int64_t d = 0; d < hd; ++d) a[d] += p * vt[d];
          }
          for (int64_t d = 0; d < hd; ++d) acc[g * hd + d] = a[d];
        }
      }
    }
  }
};

void check_pool(const at::Tensor& pool, const at::Tensor& q, int64_t kv_heads, int64_t dim, const char* what) {
  if (!pool.defined() || pool.numel() == 0) return;  // a segment no sequence has reached: never read
  TORCH_CHECK(pool.dim() == 5 && pool.size(2) == kv_heads && pool.size(4) == dim, what,
              " pool must be [layers, slots, kv_heads, length, head_dim]");
  TORCH_CHECK(pool.scalar_type() == q.scalar_type(), what, " pool dtype must match the queries'");
  TORCH_CHECK(pool.is_contiguous() && pool.device().is_cpu(), what, " pool must be a contiguous CPU tensor");
}

template <typename T>
T* segment_ptr(const at::Tensor& pool, int64_t layer, int64_t slot, int64_t head) {
  const int64_t slots = pool.size(1), heads = pool.size(2), length = pool.size(3), dim = pool.size(4);
  return pool.data_ptr<T>() + ((layer * slots + slot) * heads + head) * length * dim;
}

template <typename T, int64_t D>
void run(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& cos,
         const at::Tensor& sin, const std::vector<at::Tensor>& gen_k,
         const std::vector<at::Tensor>& gen_v, const at::Tensor& gen_slot, const at::Tensor& gen_len,
         const std::vector<at::Tensor>& prompt_k, const std::vector<at::Tensor>& prompt_v,
         const at::Tensor& prompt_slot, const at::Tensor& prompt_len, const at::Tensor& order, int64_t layer,
         double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = q.size(3);
  const int64_t* gslot = gen_slot.data_ptr<int64_t>();
  const int64_t* glen = gen_len.data_ptr<int64_t>();
  const int64_t* pslot = prompt_slot.data_ptr<int64_t>();
  const int64_t* plen = prompt_len.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t gsegs = gen_slot.size(1), psegs = prompt_slot.size(1);
  const int64_t glength = gen_k[0].size(3);
  const int64_t plength = psegs ? prompt_k[0].size(3) : 0;
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  // 1. this step's K (rotated) and V into the generation cache, at position gen_len - 1 of each row
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float rotated[MAX_HEAD_DIM];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t step = glen[r] - 1, j = step / glength, off = step % glength;
      const int64_t slot = gslot[r * gsegs + j];
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* kd = segment_ptr<T>(gen_k[j], layer, slot, h) + off * dim;
        T* vd = segment_ptr<T>(gen_v[j], layer, slot, h) + off * dim;
        rotate(k_new.data_ptr<T>() + (r * kv_heads + h) * dim, cp + r * dim, sp + r * dim, rotated, dim, 1.f);
        for (int64_t d = 0; d < dim; ++d) kd[d] = static_cast<T>(rotated[d]);
        std::memcpy(vd, v_new.data_ptr<T>() + (r * kv_heads + h) * dim, dim * sizeof(T));
      }
    }
  });
  // 2. attention; tasks in `order` (a prompt's samples next to each other, so its segments stay in cache)
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    auto state = std::make_unique<OnlineSoftmax<D>>();
    state->group = group;
    state->dim = dim;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = ord[task / kv_heads], h = task % kv_heads;
      const T* qr = qp + ((r * kv_heads + h) * group) * dim;
      for (int64_t g = 0; g < group; ++g)
        rotate(qr + g * dim, cp + r * dim, sp + r * dim, state->q + g * dim, dim, static_cast<float>(scale));
      for (int64_t i = 0; i < group * dim; ++i) state->acc[i] = 0.f;
      if constexpr (OnlineSoftmax<D>::template fast_bf16<T>()) state->round_queries();
      for (int64_t g = 0; g < group; ++g) state->m[g] = -INFINITY, state->l[g] = 0.f;
      for (int64_t j = 0; j * plength < plen[r]; ++j) {
        const int64_t slot = pslot[r * psegs + j];
        const int64_t n = std::min(plength, plen[r] - j * plength);
        state->add(segment_ptr<T>(prompt_k[j], layer, slot, h), segment_ptr<T>(prompt_v[j], layer, slot, h), n);
      }
      for (int64_t j = 0; j * glength < glen[r]; ++j) {
        const int64_t slot = gslot[r * gsegs + j];
        const int64_t n = std::min(glength, glen[r] - j * glength);
        state->add(segment_ptr<T>(gen_k[j], layer, slot, h), segment_ptr<T>(gen_v[j], layer, slot, h), n);
      }
      T* orow = op + ((r * kv_heads + h) * group) * dim;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d) orow[g * dim + d] = static_cast<T>(state->acc[g * dim + d] / state->l[g]);
    }
  });
}

}  // namespace

// q: [R, KV, G, hd] and k_new: [R, KV, hd] before the rotary embedding, v_new: [R, KV, hd]; cos, sin: [R, hd] (each
// row's rotary position); gen_k/gen_v: per generation segment j a pool [layers, slots_j,
// KV, length, hd] (an empty tensor where no row reaches j); gen_slot: [R, gen segments] int64, row r's slot in
// pool j (read only for the segments r reaches); gen_len: [R] int64, generated positions including this step's;
// prompt_k/prompt_v, prompt_slot [R, prompt segments], prompt_len [R]: the same for each row's prompt; order: [R]
// int64, a permutation of rows. Returns the attention output [R, KV, G, hd] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& gen_k, const std::vector<at::Tensor>& gen_v,
                            const at::Tensor& gen_slot, const at::Tensor& gen_len,
                            const std::vector<at::Tensor>& prompt_k, const std::vector<at::Tensor>& prompt_v,
                            const at::Tensor& prompt_slot, const at::Tensor& prompt_len, const at::Tensor& order,
                            int64_t layer, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.device().is_cpu(), "q must be a contiguous CPU [R, KV, G, hd]");
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(group <= MAX_GROUP && dim <= MAX_HEAD_DIM && dim % LANES == 0, "at most ", MAX_GROUP,
              " query heads per kv head, and head_dim a multiple of ", LANES, " up to ", MAX_HEAD_DIM);
  for (const auto* t : {&k_new, &v_new}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({rows, kv_heads, dim}) && t->is_contiguous(),
                "k_new/v_new must be contiguous [R, KV, hd]");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "k_new/v_new dtype must match q's");
  }
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({rows, dim}) && t->is_contiguous(), "cos/sin must be contiguous [R, hd]");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "cos/sin dtype must match q's");
  }
  for (const auto* t : {&gen_slot, &gen_len, &prompt_slot, &prompt_len, &order})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->size(0) == rows, "index tensors: int64 [R, ...]");
  TORCH_CHECK(gen_k.size() == gen_v.size() && static_cast<int64_t>(gen_k.size()) == gen_slot.size(1) && !gen_k.empty(),
              "one generation pool per segment");
  TORCH_CHECK(prompt_k.size() == prompt_v.size() && static_cast<int64_t>(prompt_k.size()) == prompt_slot.size(1),
              "one prompt pool per segment");
  for (const auto& pools : {gen_k, gen_v}) for (const auto& p : pools) check_pool(p, q, kv_heads, dim, "generation");
  for (const auto& pools : {prompt_k, prompt_v}) for (const auto& p : pools) check_pool(p, q, kv_heads, dim, "prompt");
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    if (dim == 64)
      run<scalar_t, 64>(q, k_new, v_new, cos, sin, gen_k, gen_v, gen_slot, gen_len, prompt_k, prompt_v, prompt_slot, prompt_len,
                        order, layer, scale, out);
    else if (dim == 128)
      run<scalar_t, 128>(q, k_new, v_new, cos, sin, gen_k, gen_v, gen_slot, gen_len, prompt_k, prompt_v, prompt_slot,
                         prompt_len, order, layer, scale, out);
    else
      run<scalar_t, 0>(q, k_new, v_new, cos, sin, gen_k, gen_v, gen_slot, gen_len, prompt_k, prompt_v, prompt_slot, prompt_len,
                       order, layer, scale, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention, "fused decode attention"); }

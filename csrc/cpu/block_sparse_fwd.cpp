// Block-sparse flash-attention forward on the CPU over sparse_attn's BlockLayout.
//
// One task per (batch, kv head, query tile). The G query heads of the kv head and the tile's rows
// form one matrix of R = rows * G query rows (token-major: row r * G + g is token r, head g), so
// each visited K/V block is converted to float32 once and read once for the whole group:
//   S (R x kb)  = Q (R x D) . K_block^T        register-blocked micro-kernel (vec.h)
//   online softmax per row in base 2 (q is pre-scaled by scale * log2 e), token rule on partial blocks
//   O (R x Dv) = corr * O + P (R x kb) . V_block
// in the order: the tile's full blocks (no mask), its partial blocks (the layout's token rule),
// then TopK's per-token blocks. For those, the tile's tokens are grouped by the blocks they selected
// (token_blocks.h, a counting sort), so each selected block is converted once per tile and
// multiplied with the rows of all the tokens of the tile that selected it (packed once per call
// where the tiles visit enough blocks: prepack_pairs). That is a key-block-centric pass restricted
// to one tile; the online-softmax state of a row is shared by every pass, so no partial results are
// stored. Rows that see no key output 0. Soft-capping (softcap.h) caps each score before the token rule. Scratch per thread: R x (D + Dv) for the tile's Q and O, 192 x kb scores, one K/V
// block; nothing of size Sq x Sk is allocated.
//
// Tasks are handed out dynamically (an atomic counter, heaviest causal tiles first) to the
// at::parallel_for threads. Inputs are read through their strides (no .contiguous() copy); bf16 and
// fp16 are converted to float32 block by block; accumulation is float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/target_check.h"
#include "cpu/flush_to_zero.h"
#include "cpu/huge_pages.h"
#include "cpu/layout_check.h"
#include "cpu/out_check.h"
#include "cpu/prefetch.h"
#include "cpu/softcap.h"
#include "cpu/token_blocks.h"
#include "cpu/vec.h"
#include "cpu/vec_bf16.h"
#include "cpu/gemm_amx.h"
#include "cpu/partial_rows.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// rows whose scores are computed at once: bounds the score scratch (kRowChunk x k_block) whatever
// the tile (G x q_block rows can be large with big BlockSparse blocks)
constexpr int64_t kRowChunk = 192;
// a causal diagonal block's rows on the AMX tiles go 32 at a time (a tile's rows), each group over
// the keys its last row sees rounded up to 32 (the tiles' key unit; off the tiles: kNarrowTokens,
// partial_rows.h)
constexpr int64_t kDiagRowsAmx = 32;

struct Params {
  int64_t B, Hq, Hkv, G, sq, sk, D, Dv, Dv_pad, q_block, k_block, kb_pad, M, nb, off, tile0;
  bool causal;
  int64_t window, sinks;  // window < 0: no window
  float qmul;             // scale * log2(e)
  float cap;              // softcap * log2(e) (softcap.h), 0: no soft-capping
  int64_t qst[4], kst[4], vst[4];
  int64_t ost[3];  // out's (batch, head, token) strides in elements; its feature dim is contiguous
  const int32_t *fc, *fi, *pc, *pi, *ti;
  int64_t lb, lh, wf, wp, topk;  // layout broadcast extents (1 or B / Hkv), list widths, topk
};

// Non-finite inputs (contract, "Bad input"): a score that is not finite (an infinite or NaN query
// or key, or a float32 overflow) becomes NaN before the token rule, so a -inf computed from an
// infinity is never taken for a masked pair; the row maximum propagates NaN (std::max and a
// compare-select would drop it), and a row whose sum is NaN outputs NaN (lse NaN), never 0.
inline void nonfinite_to_nan(float* s, int64_t n) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(s + i);
    vstore(s + i, v + (v - v));  // x - x is 0 for finite x, NaN for +-inf and NaN
  }
#else
  for (int64_t i = 0; i < n; ++i) s[i] += s[i] - s[i];
#endif
}

inline void scale_row(float* x, int64_t n, float mul) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  const vfloat vm = vsplat(mul);
  for (int64_t i = 0; i < n; i += kVec) vstore(x + i, vload(x + i) * vm);
#else
  for (int64_t i = 0; i < n; ++i) x[i] *= mul;
#endif
}

inline float row_max_nan(const float* x, int64_t n) {
  float m = kNegInf;
  bool nan = false;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  vfloat acc = vsplat(kNegInf);
  vint seen_nan{};
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    acc = v > acc ? v : acc;
    seen_nan |= (v != v);
  }
  m = hmax(acc), nan = vany(seen_nan);
#else
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]), nan = nan || x[i] != x[i];
#endif
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// the max of x[0, n) + (x - x): NaN if any x is not finite (the exact rule, one element at a time)
inline float max_finite_or_nan_scalar(const float* x, int64_t n) {
  float m = kNegInf;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float w = x[i] + (x[i] - x[i]);
    m = std::max(m, w), nan = nan || w != w;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// The fused form of nonfinite_to_nan + row_max_nan for a row with no padding, no token rule and
// no soft-capping (full blocks, TopK's per-token blocks): reads x once, writes nothing; the max of
// x + (x - x), i.e. NaN if any x is not finite. n a multiple of kVec. Vectorised as a max and a sum
// per vector (2 operations where the exact form takes 5): a finite sum means every x is finite;
// otherwise (a non-finite x, or finite scores whose sum overflows) the exact pass decides.
// Since a finite result means a finite row, the caller's exponentials need no NaN conversion.
inline float row_max_finite_or_nan(const float* x, int64_t n) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  vfloat acc = vsplat(kNegInf), sum{};
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    acc = vmax(acc, v);
    sum += v;
  }
  if (std::isfinite(hsum(sum))) return hmax(acc);
  vint seen_nan{};
  acc = vsplat(kNegInf);
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    const vfloat w = v + (v - v);
    acc = w > acc ? w : acc;
    seen_nan |= (w != w);
  }
  return vany(seen_nan) ? std::numeric_limits<float>::quiet_NaN() : hmax(acc);
#else
  return max_finite_or_nan_scalar(x, n);
#endif
}

#if defined(SPARSE_ATTN_BF16_DOT) && defined(__AVX512BF16__)
#define SPARSE_ATTN_FUSED_BF16_STORE 1
// exp2_sub_sum (vec.h) writing the probabilities as bf16 pairs (floats_to_bf16_pairs' rounding)
// to pw instead of back into x: one pass for what was four. n a multiple of 16. (AVX-512 BF16;
// elsewhere the plain path converts the stored floats afterwards.) 2^(mul * x - m): the AMX
// products leave the scores unscaled (mul = scale * log2 e, one FMA); mul = 1 gives x - m's bits.
//
// Short (the AMX path): 2^f on [-0.5, 0.5] by a degree-4 polynomial (a relative-error least-squares
// fit on Chebyshev nodes, max relative error 3.1e-6 over the interval, against the degree-6 one's
// ~2 ulp), two FMAs fewer per 16 probabilities. The probabilities are rounded to bf16 (2^-9) for
// P . V anyway; their float sum, the softmax's denominator, moves by at most that 3.1e-6.
inline vfloat vexp2_nonpos_short(vfloat x) {
  const __m512 c = _mm512_max_ps(_mm512_set1_ps(-150.0f), (__m512)x);  // vexp2_nonpos's clamp, NaN kept
  const __m512 n = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(c, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009600409306585789f), f, _mm512_set1_ps(0.05591697618365288f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24023719131946564f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219696998596f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return (vfloat)_mm512_scalef_ps(p, n);
}

// row_max_finite_or_nan over x[0, n) for any n (the last vector under a mask): a causal diagonal
// block's row, whose keys past n are hidden (they are -inf in x and must not turn the row NaN)
inline float prefix_max_finite_or_nan(const float* x, int64_t n) {
  __m512 acc = _mm512_set1_ps(kNegInf), sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_max_ps(acc, v), sum = _mm512_add_ps(sum, v);
  }
  if (i < n) {
    const __mmask16 k = __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    acc = _mm512_mask_max_ps(acc, k, acc, v), sum = _mm512_add_ps(sum, v);
  }
  if (std::isfinite(_mm512_reduce_add_ps(sum))) return _mm512_reduce_max_ps(acc);  // (max: any order)
  return max_finite_or_nan_scalar(x, n);
}

template <bool Short = false>
inline float exp2_sub_sum_finite_bf16(const float* x, int64_t n, float m, uint32_t* pw, float mul = 1.f) {
  vfloat acc{};
  const __m512 vm = _mm512_set1_ps(m), vmul = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    const vfloat a = (vfloat)_mm512_fmsub_ps((__m512)v, vmul, vm);
    const vfloat p = Short ? vexp2_nonpos_short(a) : vexp2_nonpos(a);
    acc += p;
    __m512 pv;
    std::memcpy(&pv, &p, sizeof(pv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw + i / 2), (__m256i)_mm512_cvtneps_pbh(pv));
  }
  return hsum(acc);  // exp2_sub_sum's reduction (a scalar loop here took ~25% of the AMX forward)
}
#endif

#ifdef SPARSE_ATTN_BF16_DOT
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif

// the bf16 products on AMX tiles (gemm_amx.h) for this call: built, granted by Linux, switched on
inline bool use_amx() {
#ifdef SPARSE_ATTN_AMX
  return amx_active();
#else
  return false;
#endif
}

// a worker thread's tiles: configured for gemm_amx on entry, released on exit (no tile state
// outlives a call)
struct TileScope {
  const bool on;
  explicit TileScope(bool on) : on(on) {
#ifdef SPARSE_ATTN_AMX
    if (on) {
      const TileConfig c = gemm_tiles();
      _tile_loadconfig(&c);
    }
#endif
  }
  ~TileScope() {
#ifdef SPARSE_ATTN_AMX
    if (on) _tile_release();
#endif
  }
};

struct Scratch {
  std::vector<float> q, o, s, kt, v, m, l, corr;
  std::vector<const float*> qp, qp2;
  std::vector<float*> sp, op, op2;
  std::vector<int32_t> rid, rid2;
  std::vector<int64_t> block_count, tokens;  // for_each_selected_block's scratch
  // bf16 dot-product path (bfloat16 inputs on AVX-512 BF16): Q rows as bf16 words (unscaled),
  // the K block pair-packed (a 32-bit transpose), the V block pair-packed (rows interleaved) and
  // the probabilities as bf16 pairs
  std::vector<uint32_t> qw, kp, vp, pw;
  std::vector<const uint32_t*> qwp, qwp2, pwp;
#ifdef SPARSE_ATTN_AMX
  GemmAmxScratch ax;  // gemm_amx's copies and read-back
#endif

  // tile_rows: the most query positions one task holds (a tile's, or fewer: a short sequence's);
  // zero-filled when made (thread_scratch keeps one per thread between calls)
  Scratch(const Params& P, bool bf16_dot, int64_t tile_rows) {
    const int64_t R = std::max<int64_t>(tile_rows, 1) * P.G, RC = std::min(R, kRowChunk);
    if (bf16_dot) {
      const int64_t Dw = (P.D + 1) / 2;
      qw.assign(R * Dw, 0u);
      kp.assign(std::max<int64_t>(Dw, 1) * P.kb_pad, 0u);
      vp.assign(P.kb_pad / 2 * P.Dv_pad, 0u);
      pw.assign(RC * P.kb_pad / 2, 0u);
      pwp.resize(RC);
      for (int64_t i = 0; i < RC; ++i) pwp[i] = pw.data() + i * P.kb_pad / 2;
      q.assign(1, 0.f);  // the float32 Q rows are not used
      kt.assign(1, 0.f);
      v.assign(1, 0.f);
    } else {
      q.assign(R * P.D, 0.f);
      kt.assign(std::max<int64_t>(P.D, 1) * P.kb_pad, 0.f);
      v.assign(P.kb_pad * P.Dv_pad, 0.f);  // padding columns stay 0
    }
    o.assign(R * P.Dv_pad, 0.f);
    s.assign(RC * P.kb_pad, 0.f);
    m.assign(R, kNegInf);
    l.assign(R, 0.f);
    corr.assign(RC, 0.f);
    qp.resize(R), qp2.resize(R), op.resize(R), op2.resize(R), rid.resize(R), rid2.resize(R);
    qwp.resize(R), qwp2.resize(R);  // attend_partial offsets them on either path
    sp.resize(RC);
    for (int64_t i = 0; i < RC; ++i) sp[i] = s.data() + i * P.kb_pad;
  }

  // every value word NaN (tests: set_scratch_poison): what a call reads before writing would show
  void poison() {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (auto* b : {&q, &o, &s, &kt, &v, &m, &l, &corr}) std::fill(b->begin(), b->end(), nan);
    for (auto* b : {&qw, &kp, &vp, &pw}) std::fill(b->begin(), b->end(), 0x7fc07fc0u);  // two bf16 NaNs
#ifdef SPARSE_ATTN_AMX
    ax.poison();
#endif
  }
};

// Poison the kept scratch of every thread with NaN before its next use (tests/test_cpu_scratch.py)
inline std::atomic<int>& scratch_poison() {
  static std::atomic<int> on{0};
  return on;
}

// The calling thread's Scratch for `P`, kept between calls while its sizes stay the same: made anew
// for every call (allocated, zero-filled), it was ~10% of a 64-token bf16 call. Reuse is safe
// because no product reads a word the call did not write first: the score columns past a block's
// keys are set to -inf after the product, the bf16 V rows past them are zero pairs written by the
// block's load, gemm_amx copies an inner tail with zero rows, and Q, O, m, l are set per task.
// Within one call the same buffers already pass from task to task; the tests poison them with NaN
// between calls (scratch_poison) and compare bits.
inline Scratch& thread_scratch(const Params& P, bool bf16_dot, int64_t tile_rows) {
  thread_local std::unique_ptr<Scratch> kept;
  thread_local std::array<int64_t, 5> key{};
  const std::array<int64_t, 5> want{bf16_dot ? 1 : 0, std::max<int64_t>(tile_rows, 1) * P.G, P.D, P.kb_pad, P.Dv_pad};
  if (!kept || key != want) kept = std::make_unique<Scratch>(P, bf16_dot, tile_rows), key = want;
  if (scratch_poison().load(std::memory_order_relaxed)) kept->poison();
  return *kept;
}

// The packed K / V blocks (load_block_bf16's or load_block_f32's layouts) of a range [bh0, bh1) of
// (batch, kv head) pairs, made once per call where the layout visits each block from several query
// tiles (run_all, prepack_pairs): packed per task and block instead, the bf16 packing took ~8% of a
// 4096-query chunk at 16K-32K keys (Hq 4, Hkv 2, D 64, 2 threads, A/B in one process: 170 vs 156
// ms with no packing at all, 88 vs 82 ms at 16K).
struct Prepacked {
  // in 2 MB pages where large (empty_huge: a fresh 64 MB buffer per call otherwise costs 16K page
  // faults); not zero-filled: pack() writes every word a product reads
  torch::Tensor store;
  uint32_t* buf = nullptr;
  int64_t bh0 = 0, bh1 = 0, kwords = 0, vwords = 0, per_pair = 0;
  void allocate(int64_t words) {
    store = empty_huge({words}, torch::TensorOptions().dtype(torch::kInt32), false);
    buf = reinterpret_cast<uint32_t*>(store.data_ptr<int32_t>());
  }
  bool covers(int64_t bh) const { return buf != nullptr && bh >= bh0 && bh < bh1; }
  uint32_t* block(int64_t bh, int64_t n) const { return buf + (bh - bh0) * per_pair + n * (kwords + vwords); }
};

template <int DT, typename OutT>
class TaskRunner {
  using In = typename Elem<DT>::T;

 public:
  // bfloat16 inputs use vdpbf16ps products (bf16 Q, K, V and probabilities, float32 sums)
  static constexpr bool kDot = DT == 1 && kHaveBf16Dot;

  // amx: the bf16 products on tiles (use_amx(); the caller's thread has them configured, TileScope)
  TaskRunner(const Params& P, const In* Q, const In* K, const In* V, OutT* O, float* L, bool amx = false)
      : P(P), Q(Q), K(K), V(V), O(O), L(L), amx_(kDot && amx) {}

  // read K / V blocks from `pre` where it holds them
  void use(const Prepacked* pre) { pre_ = pre; }

  // the words of one packed key block: K's, V's (0 where the float32 product reads V in place)
  static std::pair<int64_t, int64_t> packed_words(const Params& P) {
    if (kDot) return {(P.D + 1) / 2 * P.kb_pad, P.kb_pad / 2 * P.Dv_pad};
    const bool in_place = DT == 0 && P.vst[3] == 1 && P.Dv == P.Dv_pad;
    return {P.D * P.kb_pad, in_place ? 0 : P.kb_pad * P.Dv_pad};
  }

  // block n of (b, kv head h) packed into `pre`'s place for it (run_all), with zeros where the
  // per-task scratch holds them: the last block's K columns past its keys, V past its keys and
  // V's padding columns (Dv_pad > Dv)
  void pack(Prepacked& pre, int64_t b, int64_t h, int64_t n) {
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0);
    uint32_t* kp = pre.block(b * P.Hkv + h, n);
    uint32_t* vp = kp + pre.kwords;
    const In* kb = K + b * P.kst[0] + h * P.kst[1] + j0 * P.kst[2];
    const In* vb = V + b * P.vst[0] + h * P.vst[1] + j0 * P.vst[2];
    // K rows (words / floats per row of the packed block), V rows and their used count / width
    int64_t krows, vrows, vused, vcols;
    if constexpr (kDot) {
      load_block_bf16(kp, vp, kb, vb, nk);
      krows = (P.D + 1) / 2, vrows = P.kb_pad / 2, vused = (nk + 1) / 2, vcols = P.Dv;
    } else {
      load_block_f32(reinterpret_cast<float*>(kp), reinterpret_cast<float*>(vp), kb, vb, nk);
      krows = P.D, vrows = pre.vwords > 0 ? P.kb_pad : 0, vused = nk, vcols = P.Dv;
    }
    if (nk < P.kb_pad)  // (0.0f and 0u share their bits)
      for (int64_t w = 0; w < krows; ++w) std::fill(kp + w * P.kb_pad + nk, kp + (w + 1) * P.kb_pad, 0u);
    for (int64_t r = 0; r < vrows; ++r)
      std::fill(vp + r * P.Dv_pad + (r < vused ? vcols : 0), vp + (r + 1) * P.Dv_pad, 0u);
  }

  void run(Scratch& S, int64_t b, int64_t h, int64_t i) {
    const int64_t p_lo = std::max((P.tile0 + i) * P.q_block, P.off);
    const int64_t p_hi = std::min((P.tile0 + i + 1) * P.q_block, P.sk);
    const int64_t rows = p_hi - p_lo;
    if (rows <= 0) return;
    const int64_t t_lo = p_lo - P.off, G = P.G, R = rows * G;
    p_lo_ = p_lo;
    loaded_ = -1;
    // Q rows (token-major), pre-scaled; state reset
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g;
        const In* src = Q + b * P.qst[0] + (h * G + g) * P.qst[1] + (t_lo + r) * P.qst[2];
        if constexpr (kDot) {
#ifdef SPARSE_ATTN_BF16_DOT
          uint32_t* dst = S.qw.data() + row * ((P.D + 1) / 2);
          copy_words(dst, reinterpret_cast<const uint16_t*>(src), P.D, P.qst[3]);
          S.qwp[row] = dst;
#endif
        } else {
          load_row<DT>(S.q.data() + row * P.D, src, P.D, P.qst[3], P.qmul);
          S.qp[row] = S.q.data() + row * P.D;
        }
        S.op[row] = S.o.data() + row * P.Dv_pad;
        S.rid[row] = static_cast<int32_t>(row);
      }
    std::fill_n(S.o.begin(), R * P.Dv_pad, 0.f);
    std::fill_n(S.m.begin(), R, kNegInf);
    std::fill_n(S.l.begin(), R, 0.f);

    const int64_t lrow = ((P.lb == 1 ? 0 : b) * P.lh + (P.lh == 1 ? 0 : h)) * P.M + i;
    const int32_t* full = P.fi + lrow * P.wf;
    const int32_t* part = P.pi + lrow * P.wp;
    const int64_t nf = P.fc[lrow], np = P.pc[lrow];
    for (int64_t e = 0; e < nf; ++e) {
      prefetch_block(b, h, e + 1 < nf ? full[e + 1] : np > 0 ? part[0] : -1);
      attend(S, b, h, full[e], R, S.qp.data(), S.qwp.data(), S.op.data(), S.rid.data(), false);
    }
    for (int64_t e = 0; e < np; ++e) {
      prefetch_block(b, h, e + 1 < np ? part[e + 1] : -1);
      attend_partial(S, b, h, part[e], rows);
    }
    if (P.ti != nullptr) per_token_blocks(S, b, h, t_lo, rows);

    // out = O / l (0 where no key was visible); lse = ln 2 * (m + log2 l) in natural-log units of
    // the scaled scores (+inf where no key was visible)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g;
        const bool seen = S.l[row] > 0.f || S.l[row] != S.l[row];  // NaN: a non-finite input it sees
        const float inv = seen ? 1.f / S.l[row] : 0.f;
        const float* src = S.o.data() + row * P.Dv_pad;
        const int64_t orow = ((b * P.Hq + h * G + g) * P.sq) + t_lo + r;
        OutT* dst = O + b * P.ost[0] + (h * G + g) * P.ost[1] + (t_lo + r) * P.ost[2];
        for (int64_t t = 0; t < P.Dv; ++t) dst[t] = static_cast<OutT>(src[t] * inv);
        if (L != nullptr)
          L[orow] = seen ? kLn2 * (S.m[row] + std::log2(S.l[row])) : std::numeric_limits<float>::infinity();
      }
  }

 private:
  // A partial block of the tile's `rows` tokens, split by token (partial_rows.h): the tokens that
  // see none of it are skipped (no products for them), those that see all of it take the unmasked
  // path (one pass of the scores where keys fill the block), only the rest get the token rule. A
  // short sequence's single tile lists every block as partial: at 100 tokens (one 128-token tile
  // of 64-key blocks, causal) this computes 272 of the 400 rows x blocks it did, ~120 of them
  // masked; a narrow window's blocks are partial too (a 128-key window: every block of a tile).
  void attend_partial(Scratch& S, int64_t b, int64_t h, int64_t n, int64_t rows) {
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), G = P.G;
    partial_rows(p_lo_, rows, j0, nk, P.causal, P.window, P.sinks, [&](int64_t lo, int64_t hi, bool masked) {
      const int64_t a = lo * G;
      attend(S, b, h, n, (hi - lo) * G, S.qp.data() + a, S.qwp.data() + a, S.op.data() + a, S.rid.data() + a, masked);
    });
  }

  // TopK: the tile's tokens grouped by selected block; each block once, with all its tokens' rows.
  // Tokens that are one run of the tile's rows (every token of the tile, as on a tile whose tokens
  // select all their candidates, or a run of them) are passed where they sit: the rows stay evenly
  // spaced for the tiles' loads and nothing is gathered (bf16, A/B in one process: 2-4% of a call
  // whose tokens all select every block at 1K-4K keys; TopK(16) at 2K-4K keys within noise)
  void per_token_blocks(Scratch& S, int64_t b, int64_t h, int64_t t_lo, int64_t rows) {
    const int64_t G = P.G;
    const int32_t* sel = P.ti + ((b * P.Hkv + h) * P.sq + t_lo) * P.topk;
    for_each_selected_block(sel, rows, P.topk, S.block_count, S.tokens, [&](int64_t n, const TokenSpan& toks) {
      const int64_t r0 = *toks.begin();
      if (toks.end()[-1] - r0 + 1 == toks.size()) {  // distinct (check_token_index) and ascending: a run
        attend(S, b, h, n, toks.size() * G, S.qp.data() + r0 * G, S.qwp.data() + r0 * G, S.op.data() + r0 * G,
               S.rid.data() + r0 * G, false);
        return;
      }
      int64_t cnt = 0;
      for (const int64_t r : toks)
        for (int64_t g = 0; g < G; ++g, ++cnt) {
          const int64_t row = r * G + g;
          if constexpr (kDot) S.qwp2[cnt] = S.qwp[row];
          else S.qp2[cnt] = S.qp[row];
          S.op2[cnt] = S.op[row];
          S.rid2[cnt] = static_cast<int32_t>(row);
        }
      attend(S, b, h, n, cnt, S.qp2.data(), S.qwp2.data(), S.op2.data(), S.rid2.data(), false);
    });
  }

  // the K and V rows of block n (n < 0: none) into L2 while the current block is computed: the
  // K transpose otherwise waits on their loads (float32 4096 x 4096, Hq 4, Hkv 2, D 64: 5% of the
  // kernel's time in transpose_f32, nearly all of it on its row loads). Rows with unit element
  // stride only (a row is then D contiguous elements).
  void prefetch_block(int64_t b, int64_t h, int64_t n) const {
    if (n < 0 || n * P.k_block >= P.sk || (pre_ != nullptr && pre_->covers(b * P.Hkv + h))) return;
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0);
    if (P.kst[3] == 1) {
      const In* kb = K + b * P.kst[0] + h * P.kst[1] + j0 * P.kst[2];
      for (int64_t c = 0; c < nk; ++c) prefetch_lines(kb + c * P.kst[2], P.D * int64_t(sizeof(In)));
    }
    if (P.vst[3] == 1) {
      const In* vb = V + b * P.vst[0] + h * P.vst[1] + j0 * P.vst[2];
      for (int64_t c = 0; c < nk; ++c) prefetch_lines(vb + c * P.vst[2], P.Dv * int64_t(sizeof(In)));
    }
  }

  // K block n -> kt (D x kb_pad, transposed), V block -> v (kb x Dv_pad), float32
  void load_block(Scratch& S, int64_t b, int64_t h, int64_t n) {
    if (loaded_ == n) return;
    loaded_ = n;
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0);
    const In* kb = K + b * P.kst[0] + h * P.kst[1] + j0 * P.kst[2];
    const In* vb = V + b * P.vst[0] + h * P.vst[1] + j0 * P.vst[2];
    if constexpr (kDot) {
      const int64_t bh = b * P.Hkv + h;
      if (pre_ != nullptr && pre_->covers(bh)) {  // packed for the whole call (run_all)
        kp_ = pre_->block(bh, n), vp_ = kp_ + pre_->kwords;
        return;
      }
      load_block_bf16(S.kp.data(), S.vp.data(), kb, vb, nk);
      kp_ = S.kp.data(), vp_ = S.vp.data();
      return;
    }
    const int64_t bh = b * P.Hkv + h;
    const bool in_place = DT == 0 && P.vst[3] == 1 && P.Dv == P.Dv_pad;
    if (pre_ != nullptr && pre_->covers(bh)) {  // packed for the whole call (run_all)
      kt_ = reinterpret_cast<const float*>(pre_->block(bh, n));
      if (!in_place) vrows_ = kt_ + pre_->kwords, vld_ = P.Dv_pad;
    } else {
      load_block_f32(S.kt.data(), S.v.data(), kb, vb, nk);
      kt_ = S.kt.data();
      if (!in_place) vrows_ = S.v.data(), vld_ = P.Dv_pad;
    }
    // float32 rows that fill whole vectors: the P . V product reads the nk rows in place
    if (in_place) vrows_ = reinterpret_cast<const float*>(vb), vld_ = P.vst[2];
  }

  // float32 path: K block -> kt (D x kb_pad, transposed), V block -> v (kb x Dv_pad) unless the
  // product reads V's rows in place (float32, unit stride, Dv a whole number of vectors)
  void load_block_f32(float* kt, float* v, const In* kb, const In* vb, int64_t nk) {
    const int64_t ld = P.kb_pad, ks2 = P.kst[2], ks3 = P.kst[3];
    if (DT == 0 && ks3 == 1) {
      // float32 rows of unit stride: 16 x 16 register transposes
      transpose_f32(kt, ld, reinterpret_cast<const float*>(kb), ks2, nk, P.D);
    } else {
      // transpose in chunks of 16 keys so the reads stay in a few cache lines
      for (int64_t c0 = 0; c0 < nk; c0 += 16) {
        const int64_t c1 = std::min(nk, c0 + 16);
        for (int64_t t = 0; t < P.D; ++t) {
          float* dst = kt + t * ld;
          for (int64_t c = c0; c < c1; ++c) dst[c] = Elem<DT>::get(kb, c * ks2 + t * ks3);
        }
      }
    }
    if (!(DT == 0 && P.vst[3] == 1 && P.Dv == P.Dv_pad))
      for (int64_t c = 0; c < nk; ++c) load_row<DT>(v + c * P.Dv_pad, vb + c * P.vst[2], P.Dv, P.vst[3], 1.f);
  }

  // bf16 path: K block -> kp (word p of key c at [p][c]), V block -> vp (rows 2p, 2p + 1
  // interleaved at [p]); keys past nk are zero in vp (their probabilities are 0)
  void load_block_bf16(uint32_t* kp, uint32_t* vp, const In* kb, const In* vb, int64_t nk) {
#ifdef SPARSE_ATTN_BF16_DOT
    pack_k_pairs(kp, P.kb_pad, reinterpret_cast<const uint16_t*>(kb), P.kst[2], P.kst[3], nk, P.D);
    for (int64_t pr = 0; pr < (nk + 1) / 2; ++pr) {
      const In* r1 = 2 * pr + 1 < nk ? vb + (2 * pr + 1) * P.vst[2] : nullptr;
      interleave_bf16_rows(vp + pr * P.Dv_pad, reinterpret_cast<const uint16_t*>(vb + 2 * pr * P.vst[2]),
                           reinterpret_cast<const uint16_t*>(r1), P.Dv, P.vst[3]);
    }
#else
    (void)kp, (void)vp, (void)kb, (void)vb, (void)nk;
#endif
  }

  // online-softmax update of `cnt` rows (pointers; rid = their state rows) with key block n,
  // kRowChunk rows at a time
  void attend(Scratch& S, int64_t b, int64_t h, int64_t n, int64_t cnt, const float* const* qp,
              const uint32_t* const* qwp, float* const* op, const int32_t* rid, bool masked) {
    // a layout shared by packed sequences lists blocks past a shorter sequence's end: nothing there
    if (cnt == 0 || n * P.k_block >= P.sk) return;
    load_block(S, b, h, n);
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), kbp = P.kb_pad;
    float* const* sp = S.sp.data();
    float* corr = S.corr.data();
    // a block every row sees whole (no padding, no token rule, no soft-capping: full blocks and
    // TopK's per-token blocks): the row's softmax in two reads of its scores, the bf16
    // probabilities written directly (the general path's arithmetic, below)
    const bool plain = !masked && nk == kbp && !(P.cap > 0.f);
    // a causal diagonal block (no window, no soft-capping) whose every row sees at least its first
    // key: on the tiles, the plain rows' arithmetic over each row's visible keys, the hidden ones
    // and the columns past the block's nk keys set to -inf (their probabilities 0), where the
    // masked path below takes five passes. A short block (the sequence's last, nk < kbp) too: its
    // P . V product stops at its nk keys, so no V row past them is read (at 64 tokens, one such
    // block, the masked path took ~60% of the call)
    const bool diag = amx_ && masked && P.causal && P.window < 0 && !(P.cap > 0.f) && p_lo_ >= j0;
    // the scores' scale still to apply: 1, or scale * log2 e after the AMX products
    const float smul = amx_ ? P.qmul : 1.f;
    // a diagonal block goes kDiagRowsAmx rows at a time, each group's products and exponentials
    // over the keys its last row sees, rounded up to kDiagRowsAmx (`width`), not the whole
    // block: the keys past them are hidden from every row of the group (at 1K causal keys, 128-key
    // blocks, ~22% of the products are on the diagonal, and this skips ~3/8 of those)
    // The other products likewise on a causal block's masked rows whose first token does not see
    // the whole block (its diagonal): kNarrowTokens at a time (partial_rows.h: narrows,
    // seen_width), the rest of each row's scores hidden by the token rule below and its P . V
    // product stopped there (a first chunk of 64 float32 tokens: ~5/8 of the products)
    const bool narrow = !amx_ && masked && narrows(p_lo_ + rid[0] / P.G, j0, nk, P.causal);
    const int64_t step = diag     ? kDiagRowsAmx
                         : narrow ? std::min<int64_t>(kRowChunk, kNarrowTokens * P.G)
                                  : kRowChunk;
    for (int64_t c0 = 0; c0 < cnt; c0 += step) {
      const int64_t rows = std::min(step, cnt - c0);
      int64_t width = kbp;
      if (diag || narrow)
        width = seen_width(last_token(rid + c0, rows, P.G, p_lo_), j0, nk, kbp, diag ? kDiagRowsAmx : kNarrowTokens);
      // the keys whose probabilities the P . V product reads: past `width`, every row's are 0; the
      // columns the rows' softmax passes cover (narrow: `width`, the rest never read)
      const int64_t nkv = std::min(width, nk), wcols = narrow ? width : kbp;
#ifdef SPARSE_ATTN_AMX
      // unscaled (the tiles store them where they go); the plain path scales in its exponentials,
      // the others below
      if (kDot && amx_) gemm_amx<false>(rows, width, (P.D + 1) / 2, qwp + c0, kp_, kbp, sp, nullptr, 1.f, S.ax);
      else
#endif
#ifdef SPARSE_ATTN_BF16_DOT
      if constexpr (kDot) gemm_bf16<false>(rows, width, (P.D + 1) / 2, qwp + c0, kp_, kbp, sp, nullptr, P.qmul);
      else
#endif
        gemm_rows<false>(rows, width, P.D, qp + c0, kt_, kbp, sp, nullptr);
#ifdef SPARSE_ATTN_AMX
      if (amx_ && (plain || diag)) {
        int32_t vis[kRowChunk];  // diag: each row's visible keys (a causal row sees j <= p)
        if (diag)
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t c = std::min({width, nk, p_lo_ + rid[c0 + i] / P.G - j0 + 1});
            vis[i] = static_cast<int32_t>(c);
            std::fill(sp[i] + c, sp[i] + width, kNegInf);
          }
        plain_rows_16(S, sp, rid + c0, rows, kbp, width, smul, corr, diag ? vis : nullptr);
      } else
#endif
      for (int64_t i = 0; i < rows; ++i) {
        float* s = sp[i];
        const int64_t st = rid[c0 + i];
        float m_blk;
        if (plain) {
          m_blk = row_max_finite_or_nan(s, kbp) * smul;  // smul > 0: the scaled row's max (NaN kept)
        } else {
          if (smul != 1.f) scale_row(s, wcols, smul);
          nonfinite_to_nan(s, wcols);
          if (P.cap > 0.f) softcap_row(s, wcols, P.cap);  // before the padding and the token rule's -inf
          for (int64_t c = nk; c < wcols; ++c) s[c] = kNegInf;
          if (masked) mask_row(s, p_lo_ + st / P.G, j0, std::min(nk, wcols));
          m_blk = row_max_nan(s, wcols);
        }
        const float m_old = S.m[st];
        // NaN wins both ways: a NaN row stays NaN through every later block
        const float m_new = m_old != m_old || m_blk != m_blk ? std::numeric_limits<float>::quiet_NaN()
                                                              : std::max(m_old, m_blk);
        if (m_new == kNegInf) {  // nothing visible yet for this row (never on the plain path)
          corr[i] = 1.f;
          std::fill_n(s, wcols, 0.f);
#ifdef SPARSE_ATTN_FUSED_BF16_STORE
          if (kDot && plain) std::fill_n(S.pw.data() + i * kbp / 2, kbp / 2, 0u);
#endif
          continue;
        }
        corr[i] = exp2_scalar(m_old - m_new);  // 0 on the row's first visible block
        float sum;
#ifdef SPARSE_ATTN_FUSED_BF16_STORE
        if (kDot && plain) sum = exp2_sub_sum_finite_bf16(s, kbp, m_new, S.pw.data() + i * kbp / 2, smul);
        else
#endif
          // (plain: m_new is NaN unless every score of the row is finite, row_max_finite_or_nan)
          sum = exp2_sub_sum(s, wcols, m_new);
        S.l[st] = S.l[st] * corr[i] + sum;
        S.m[st] = m_new;
      }
#ifdef SPARSE_ATTN_BF16_DOT
      if constexpr (kDot) {
#ifdef SPARSE_ATTN_FUSED_BF16_STORE
        if (!plain && !diag)
#endif
          for (int64_t i = 0; i < rows; ++i) floats_to_bf16_pairs(S.pw.data() + i * kbp / 2, sp[i], wcols);
#ifdef SPARSE_ATTN_AMX
        if (amx_) {
          gemm_amx<true>(rows, P.Dv_pad, diag ? std::min(width, nk + 1) / 2 : (nk + 1) / 2, S.pwp.data(), vp_, P.Dv_pad, op + c0, corr,
                         1.f, S.ax);
          continue;
        }
#endif
        gemm_bf16<true>(rows, P.Dv_pad, (nkv + 1) / 2, S.pwp.data(), vp_, P.Dv_pad, op + c0, corr);
        continue;
      }
#endif
      gemm_rows<true>(rows, P.Dv_pad, nkv, sp, vrows_, vld_, op + c0, corr);
    }
  }

#ifdef SPARSE_ATTN_AMX
  // The plain path's row bookkeeping (the loop in attend) 16 rows at a time: the block maxima, then
  // the new maxima and the corrections as vectors (one exp2 for 16 rows, where the row loop's scalar
  // exp2 and its neighbours took ~12% of the AMX forward), then each row's probabilities and sum
  // (the short exponential: 2.5-3.5% less time, A/B in one process). The same rules: NaN wins, a
  // first block's correction is 2^-inf = 0.
  // vis: each row's visible keys (a causal diagonal block; the rest of the row up to `width` is
  // -inf), or nullptr for rows that see all kbp; `width` (<= kbp, a multiple of 32): the columns
  // of the scores and probabilities computed (the probability rows stay kbp / 2 words apart)
  void plain_rows_16(Scratch& S, float* const* sp, const int32_t* rid, int64_t rows, int64_t kbp, int64_t width,
                     float smul, float* corr, const int32_t* vis = nullptr) {
    alignas(64) float mo[16], mb[16], mn[16];
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      const int64_t n = std::min<int64_t>(16, rows - i0);
      for (int64_t i = 0; i < 16; ++i) {
        mo[i] = i < n ? S.m[rid[i0 + i]] : 0.f;
        // smul > 0: NaN kept
        if (i >= n) mb[i] = 0.f;
        else if (vis != nullptr) mb[i] = prefix_max_finite_or_nan(sp[i0 + i], vis[i0 + i]) * smul;
        else mb[i] = row_max_finite_or_nan(sp[i0 + i], width) * smul;
      }
      const __m512 o = _mm512_load_ps(mo), b = _mm512_load_ps(mb);
      const __m512 m = _mm512_mask_mov_ps(_mm512_max_ps(o, b), _mm512_cmp_ps_mask(o, b, _CMP_UNORD_Q),
                                          _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
      _mm512_store_ps(mn, m);
      _mm512_mask_storeu_ps(corr + i0, __mmask16((1u << n) - 1), (__m512)vexp2_nonpos((vfloat)_mm512_sub_ps(o, m)));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t st = rid[i0 + i];
        const float sum = exp2_sub_sum_finite_bf16<true>(sp[i0 + i], width, mn[i], S.pw.data() + (i0 + i) * kbp / 2, smul);
        S.l[st] = S.l[st] * corr[i0 + i] + sum;
        S.m[st] = mn[i];
      }
    }
  }
#endif

  // the token rule on keys j0 + [0, nk) for a query at position p (partial_rows.h)
  void mask_row(float* s, int64_t p, int64_t j0, int64_t nk) const {
    hide_keys(s, p, j0, nk, P.causal, P.window, P.sinks, kNegInf);
  }

  const Params& P;
  const In *Q, *K, *V;
  OutT* O;
  float* L;
  int64_t p_lo_ = 0, loaded_ = -1;
  const bool amx_;
  const Prepacked* pre_ = nullptr;  // K / V blocks packed for the call (run_all), or none
  const uint32_t *kp_ = nullptr, *vp_ = nullptr;  // the loaded block's packed K / V (bf16 path)
  const float* kt_ = nullptr;  // the loaded K block, transposed (float32 path)
  const float* vrows_ = nullptr;  // the loaded V block's rows (float32) and their stride
  int64_t vld_ = 0;
};

// Packed K / V budget of one wave of run_all (bytes; 0: every task packs its own blocks): a
// 128K-key bf16 head of D 128 packs to 64 MB, so four such kv heads at a time by default
inline std::atomic<int64_t>& prepack_bytes() {
  static std::atomic<int64_t> bytes{int64_t(256) << 20};
  return bytes;
}

// (batch, kv head) pairs run_all packs at once (`bytes` each), 0 for none: where the layout visits
// each key block from at least two query tiles on average (Dense / SlidingWindow / BlockSparse
// prefill; not a single query tile), or TopK's tiles visit at least a quarter as many blocks as
// there are, as many pairs as prepack_bytes() holds, at least one.
// TopK: a tile visits each block its tokens selected once, so at least min(topk, blocks) of them
// (the union of its tokens' selections: often many more), counted as that many. Measured (A/B in
// one process against packing per task, bf16 Hq 4 Hkv 2 D 64, TopK(16) of 64-key blocks, 2 threads,
// queries x keys): 1K x 1K 1.12x, 2K x 2K 1.14x, 4K x 4K 1.15x, 4K x 16K 1.38x, 4K x 32K 1.54x,
// 4K x 128K 1.25-1.55x, 2K x 128K 1.20-1.24x (its visits are 0.28 of the blocks), 1K x 64K 0.99x;
// 1K x 128K 0.91x (0.14: not packed).
inline int64_t prepack_pairs(const Params& P, int64_t bytes) {
  const int64_t budget = prepack_bytes().load(std::memory_order_relaxed);
  if (budget <= 0 || P.M < 2 || P.nb < 1) return 0;
  int64_t visits = 0;
  for (int64_t r = 0; r < P.lb * P.lh * P.M; ++r) visits += P.fc[r] + P.pc[r];
  if (P.ti != nullptr) {
    visits += P.lb * P.lh * P.M * std::min(P.topk, P.nb);
    if (4 * visits < P.nb * P.lb * P.lh) return 0;
  } else if (visits < 2 * P.nb * P.lb * P.lh) {
    return 0;
  }
  return std::max<int64_t>(1, budget / std::max<int64_t>(bytes, 1));
}

template <int DT, typename OutT>
void run_all(const Params& P, const void* q, const void* k, const void* v, OutT* out, float* lse) {
  using In = typename Elem<DT>::T;
  using Runner = TaskRunner<DT, OutT>;
  const In *Q = static_cast<const In*>(q), *K = static_cast<const In*>(k), *V = static_cast<const In*>(v);
  const int64_t BH = P.B * P.Hkv;
  const bool amx = Runner::kDot && use_amx();
  // (batch, kv head) pairs whose K / V are packed at once (0: packed per task and block instead);
  // the pairs are served in waves of that many, each wave's blocks packed before its tasks run
  Prepacked pre;
  std::tie(pre.kwords, pre.vwords) = Runner::packed_words(P);
  const int64_t W = prepack_pairs(P, 4 * P.nb * (pre.kwords + pre.vwords));
  if (W > 0) {
    pre.per_pair = P.nb * (pre.kwords + pre.vwords);
    pre.allocate(std::min(W, BH) * pre.per_pair);
  }
  for (int64_t bh0 = 0; bh0 < BH; bh0 += W > 0 ? W : BH) {
    const int64_t bh1 = W > 0 ? std::min(BH, bh0 + W) : BH, pairs = bh1 - bh0, total = pairs * P.M;
    if (W > 0) {
      pre.bh0 = bh0, pre.bh1 = bh1;
      at::parallel_for(0, pairs * P.nb, 1, [&](int64_t lo, int64_t hi) {
        Runner packer(P, Q, K, V, out, lse);
        for (int64_t u = lo; u < hi; ++u) {
          const int64_t bh = bh0 + u / P.nb;
          packer.pack(pre, bh / P.Hkv, bh % P.Hkv, u % P.nb);
        }
      });
    }
    std::atomic<int64_t> next{0};
    const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
    at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
      if (begin >= end) return;
      FlushToZero ftz;
      TileScope tiles(amx);
      Scratch& S = thread_scratch(P, Runner::kDot, std::min(P.q_block, P.sq));  // a task's rows: one tile, Sq
      Runner runner(P, Q, K, V, out, lse, amx);
      if (W > 0) runner.use(&pre);
      for (;;) {
        const int64_t t = next.fetch_add(1);
        if (t >= total) break;
        // heaviest first: causal tiles grow with their index
        const int64_t i = P.M - 1 - t / pairs, bh = bh0 + t % pairs;
        runner.run(S, bh / P.Hkv, bh % P.Hkv, i);
      }
    });
  }
}

// Packed varlen: `tasks` are (sequence, kv head, absolute query tile); PS[s] is sequence s's
// Params (its lengths, its layout rows) and its rows sit at the offsets `qoff` / `koff` of the packed
// q / k, v; out (Tq, Hq, Dv) is written in place from row qoff[s] (Params::ost), lse per sequence as
// an (Hq, Sq_s) block at Hq * qoff[s].
template <int DT, typename OutT>
void run_varlen(const Params& P0, const std::vector<Params>& PS, const std::vector<int64_t>& qoff,
                const std::vector<int64_t>& koff, const std::vector<std::array<int64_t, 3>>& tasks, const void* q,
                const void* k, const void* v, OutT* out, float* lse) {
  using In = typename Elem<DT>::T;
  const In *Q = static_cast<const In*>(q), *K = static_cast<const In*>(k), *V = static_cast<const In*>(v);
  const int64_t total = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  const bool amx = TaskRunner<DT, OutT>::kDot && use_amx();
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    FlushToZero ftz;
    TileScope tiles(amx);
    Scratch& S = thread_scratch(P0, TaskRunner<DT, OutT>::kDot, P0.q_block);
    for (int64_t t; (t = next.fetch_add(1)) < total;) {
      const auto& w = tasks[t];
      const Params& P = PS[w[0]];
      TaskRunner<DT, OutT> runner(P, Q + qoff[w[0]] * P.qst[2], K + koff[w[0]] * P.kst[2], V + koff[w[0]] * P.vst[2],
                                  out + P.Hq * qoff[w[0]] * P.Dv, lse + P.Hq * qoff[w[0]], amx);
      runner.run(S, 0, w[1], w[2]);
    }
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

std::tuple<torch::Tensor, torch::Tensor> block_sparse_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor full_count,
                               torch::Tensor full_index, torch::Tensor partial_count, torch::Tensor partial_index,
                               c10::optional<torch::Tensor> token_index, int64_t sq, int64_t sk, int64_t q_block,
                               int64_t k_block, bool causal, int64_t window, int64_t sink_tokens, double scale,
                               double softcap, c10::optional<torch::Tensor> out_arg, bool need_lse) {
  using namespace sparse_attn_cpu;
  // one sequence's rows token-major, (S, H, D), as a server holds them (q, k, v, out all 3-D): read
  // as (1, H, S, D) through their strides, no view made (ten ATen views cost ~5 us of a 64-token
  // call); out (Sq, Hq, Dv), lse (Hq, Sq)
  const bool rows3 = q.dim() == 3 && k.dim() == 3 && v.dim() == 3;
  TORCH_CHECK_VALUE(rows3 || (q.dim() == 4 && k.dim() == 4 && v.dim() == 4),
                    "block_sparse_fwd: q, k, v must be 4-D (B, H, S, D), or all 3-D (S, H, D) for one sequence");
  // a tensor's (B, H, S, D) sizes and strides
  struct Dims {
    std::array<int64_t, 4> n, st;
  };
  auto dims = [rows3](const torch::Tensor& t) {
    if (rows3) return Dims{{1, t.size(1), t.size(0), t.size(2)}, {0, t.stride(1), t.stride(0), t.stride(2)}};
    return Dims{{t.size(0), t.size(1), t.size(2), t.size(3)}, {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
  };
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "block_sparse_fwd: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
                   "block_sparse_fwd: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(k.scalar_type() == dt && v.scalar_type() == dt, "block_sparse_fwd: q, k, v must share one dtype");
  TORCH_CHECK_VALUE(q_block > 0 && k_block > 0, "block_sparse_fwd: q_block and k_block must be positive");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "block_sparse_fwd: softcap must be finite and >= 0 (0: off)");
  const Dims qd4 = dims(q), kd4 = dims(k), vd4 = dims(v);
  const int64_t B = qd4.n[0], Hq = qd4.n[1], D = qd4.n[3], Hkv = kd4.n[1], Dv = vd4.n[3];
  TORCH_CHECK_VALUE(kd4.n[0] == B && vd4.n[0] == B && vd4.n[1] == Hkv && kd4.n[3] == D,
                    "block_sparse_fwd: q, k, v shapes disagree");
  TORCH_CHECK_VALUE(qd4.n[2] == sq && kd4.n[2] == sk && vd4.n[2] == sk, "block_sparse_fwd: lengths disagree with sq/sk");
  TORCH_CHECK_VALUE(sq >= 0 && sk >= 0 && (!causal || sq <= sk), "block_sparse_fwd: need Sq <= Sk for a causal rule");
  // out: the caller's (B, Hq, Sq, Dv) rows (any strides but a contiguous feature dim, e.g. a view of
  // a server's (T, Hq, Dv) output buffer), or its (Sq, Hq, Dv) rows with 3-D inputs, written in
  // place; otherwise a new tensor
  torch::Tensor out;
  if (out_arg.has_value() && out_arg->defined()) {
    out = *out_arg;
    const bool shaped = rows3 ? out.dim() == 3 && out.size(0) == sq && out.size(1) == Hq && out.size(2) == Dv
                              : out.dim() == 4 && out.size(0) == B && out.size(1) == Hq && out.size(2) == sq &&
                                    out.size(3) == Dv;
    if (rows3) {
      TORCH_CHECK_VALUE(shaped, "block_sparse_fwd: out must be (Sq, Hq, Dv) = (", sq, ", ", Hq, ", ", Dv,
                        ") with 3-D q, k, v, got ", out.sizes());
    } else {
      TORCH_CHECK_VALUE(shaped, "block_sparse_fwd: out must be (B, Hq, Sq, Dv) = (", B, ", ", Hq, ", ", sq, ", ", Dv,
                        "), got ", out.sizes());
    }
    TORCH_CHECK_TYPE(out.scalar_type() == dt, "block_sparse_fwd: out must have q's dtype ", dt, ", got ",
                     out.scalar_type());
    TORCH_CHECK_VALUE(out.device().is_cpu(), "block_sparse_fwd: out must be a CPU tensor");
    TORCH_CHECK_VALUE(out.stride(out.dim() - 1) == 1 || Dv <= 1,
                      "block_sparse_fwd: out's last dim must be contiguous (stride 1), got ", out.stride(out.dim() - 1));
    // threads write rows while others read q, k, v; a stride-0 dim would have two threads write one element
    TORCH_CHECK_VALUE(!has_zero_stride(out), "block_sparse_fwd: out must not have a stride-0 dim (an expanded view), "
                      "got strides ", out.strides());
    TORCH_CHECK_VALUE(!spans_overlap(out, q) && !spans_overlap(out, k) && !spans_overlap(out, v),
                      "block_sparse_fwd: out must not share memory with q, k or v");
  } else {
    out = rows3 ? sparse_attn_cpu::empty_huge({sq, Hq, Dv}, q.options(), true)
                : sparse_attn_cpu::empty_huge({B, Hq, sq, Dv}, q.options(), true);
  }
  const Dims od4 = dims(out);
  // lse only where asked for (a serving loop's inference call drops it): (B, Hq, Sq), (Hq, Sq) for rows
  torch::Tensor lse;
  if (need_lse)
    lse = rows3 ? torch::full({Hq, sq}, std::numeric_limits<float>::infinity(), q.options().dtype(torch::kFloat32))
                : torch::full({B, Hq, sq}, std::numeric_limits<float>::infinity(), q.options().dtype(torch::kFloat32));
  if (B == 0 || Hq == 0 || sq == 0) return {out, lse};
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "block_sparse_fwd: Hq must be a multiple of Hkv");

  // query tiles at absolute positions (floor division: Sq > Sk is allowed without a causal rule)
  const int64_t off = sk - sq;
  auto floor_div = [](int64_t a, int64_t d) { return a >= 0 ? a / d : -((-a + d - 1) / d); };
  const int64_t tile0 = floor_div(off, q_block), M = (sk + q_block - 1) / q_block - tile0;
  const int64_t nb = (sk + k_block - 1) / k_block;

  auto fc = full_count.to(torch::kInt32).contiguous(), fi = full_index.to(torch::kInt32).contiguous();
  auto pc = partial_count.to(torch::kInt32).contiguous(), pi = partial_index.to(torch::kInt32).contiguous();
  for (const auto* t : {&fc, &pc}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && (t->size(1) == 1 || t->size(1) == Hkv) &&
                    t->size(2) == M,
                "block_sparse_fwd: counts must be (1 or B, 1 or Hkv, ", M, " query tiles), got ", t->sizes());
  }
  TORCH_CHECK(fi.dim() == 4 && fi.sizes().slice(0, 3) == fc.sizes() && pi.dim() == 4 &&
                  pi.sizes().slice(0, 3) == pc.sizes() && fc.sizes() == pc.sizes(),
              "block_sparse_fwd: index lists must be (counts' shape, width)");
  TORCH_CHECK(fc.device().is_cpu() && pc.device().is_cpu(), "block_sparse_fwd: layout tensors must be on the CPU");
  check_lists(fc, fi, nb, "block_sparse_fwd", "full");
  check_lists(pc, pi, nb, "block_sparse_fwd", "partial");
  torch::Tensor ti;
  if (token_index.has_value() && token_index->defined()) {
    ti = token_index->to(torch::kInt32).contiguous();
    TORCH_CHECK(ti.device().is_cpu() && ti.dim() == 4 && ti.size(0) == B && ti.size(1) == Hkv && ti.size(2) == sq,
                "block_sparse_fwd: token_index must be (B, Hkv, Sq, topk), got ", ti.sizes());
    check_token_index(ti, nb, "block_sparse_fwd");
  }

  Params P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.sk = sk, P.D = D, P.Dv = Dv;
  P.Dv_pad = round_up(std::max<int64_t>(Dv, 1), kVec);
  P.q_block = q_block, P.k_block = k_block, P.kb_pad = round_up(k_block, kVec);
  P.M = M, P.nb = nb, P.off = off, P.tile0 = tile0;
  P.causal = causal, P.window = window, P.sinks = sink_tokens;
  P.qmul = static_cast<float>(scale) * kLog2e;
  P.cap = static_cast<float>(softcap) * kLog2e;
  for (int d = 0; d < 4; ++d) P.qst[d] = qd4.st[d], P.kst[d] = kd4.st[d], P.vst[d] = vd4.st[d];
  for (int d = 0; d < 3; ++d) P.ost[d] = od4.st[d];
  P.fc = fc.data_ptr<int32_t>(), P.fi = fi.data_ptr<int32_t>(), P.pc = pc.data_ptr<int32_t>(),
  P.pi = pi.data_ptr<int32_t>();
  P.lb = fc.size(0), P.lh = fc.size(1), P.wf = fi.size(3), P.wp = pi.size(3);
  P.ti = ti.defined() && ti.size(3) > 0 ? ti.data_ptr<int32_t>() : nullptr;
  P.topk = ti.defined() ? ti.size(3) : 0;
  if (M <= 0) return {out, lse};

  const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr();
  float* ld = lse.defined() ? lse.data_ptr<float>() : nullptr;
  with_float_tag(dt, [&](auto tag) {
    constexpr int DT = decltype(tag)::value;
    run_all<DT, aten_float_t<DT>>(P, qd, kd, vd, out.data_ptr<aten_float_t<DT>>(), ld);
  });
  return {out, lse};
}

// Packed varlen forward: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), cu_seqlens_q/k int32
// (nseq + 1,) on the CPU, and ONE layout for all sequences, built for an L x L problem (L >= every
// Sk_i; its lists cut at absolute positions, batch 1 or nseq). One parallel pass over the
// (sequence, kv head, query tile) tasks of every sequence. Returns (out (Tq, Hq, Dv), lse float32
// (Hq, Tq)). Needs Sq_i <= Sk_i (a query tile at a negative position has no layout row).
std::tuple<torch::Tensor, torch::Tensor> block_sparse_fwd_varlen(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens_q, torch::Tensor cu_seqlens_k,
    torch::Tensor full_count, torch::Tensor full_index, torch::Tensor partial_count, torch::Tensor partial_index,
    int64_t L, int64_t q_block, int64_t k_block, bool causal, int64_t window, int64_t sink_tokens, double scale,
    double softcap) {
  using namespace sparse_attn_cpu;
  const char* who = "block_sparse_fwd_varlen";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, who, ": q, k, v must be 3-D (T, H, D)");
  for (const auto* t : {&q, &k, &v, &cu_seqlens_q, &cu_seqlens_k}) TORCH_CHECK(t->device().is_cpu(), who, ": CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16, who,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, who, ": q, k, v must share one dtype");
  TORCH_CHECK(q_block > 0 && k_block > 0 && L >= 0, who, ": q_block, k_block must be positive and L >= 0");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, who, ": softcap must be finite and >= 0 (0: off)");
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2), Tk = k.size(0), Hkv = k.size(1), Dv = v.size(2);
  TORCH_CHECK(v.size(0) == Tk && v.size(1) == Hkv && k.size(2) == D, who, ": q, k, v shapes disagree");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, who, ": Hq must be a multiple of Hkv");
  auto cq = cu_seqlens_q.to(torch::kInt64).contiguous(), ck = cu_seqlens_k.to(torch::kInt64).contiguous();
  TORCH_CHECK(cq.dim() == 1 && cq.sizes() == ck.sizes() && cq.numel() >= 1, who, ": cu_seqlens must be (nseq + 1,)");
  const int64_t nseq = cq.numel() - 1, M = (L + q_block - 1) / q_block, nb = (L + k_block - 1) / k_block;
  const int64_t *cqp = cq.data_ptr<int64_t>(), *ckp = ck.data_ptr<int64_t>();
  TORCH_CHECK(cqp[0] == 0 && ckp[0] == 0 && cqp[nseq] == Tq && ckp[nseq] == Tk, who,
              ": cu_seqlens must run from 0 to the packed lengths");
  auto out = torch::empty({Tq, Hq, Dv}, q.options());  // written in place: row q0 + t of sequence s, head by head
  auto lse_blk = torch::full({Hq * Tq}, std::numeric_limits<float>::infinity(), q.options().dtype(torch::kFloat32));

  auto fc = full_count.to(torch::kInt32).contiguous(), fi = full_index.to(torch::kInt32).contiguous();
  auto pc = partial_count.to(torch::kInt32).contiguous(), pi = partial_index.to(torch::kInt32).contiguous();
  TORCH_CHECK(fc.dim() == 3 && (fc.size(0) == 1 || fc.size(0) == nseq) && (fc.size(1) == 1 || fc.size(1) == Hkv) &&
                  fc.size(2) == M && fc.sizes() == pc.sizes(),
              who, ": counts must be (1 or nseq, 1 or Hkv, ", M, " query tiles), got ", fc.sizes());
  TORCH_CHECK(fi.dim() == 4 && fi.sizes().slice(0, 3) == fc.sizes() && pi.dim() == 4 &&
                  pi.sizes().slice(0, 3) == pc.sizes(), who, ": index lists must be (counts' shape, width)");
  check_lists(fc, fi, nb, who, "full");
  check_lists(pc, pi, nb, who, "partial");

  Params P0{};
  P0.B = 1, P0.Hq = Hq, P0.Hkv = Hkv, P0.G = Hq / Hkv, P0.sq = 0, P0.sk = 0, P0.D = D, P0.Dv = Dv;
  P0.Dv_pad = round_up(std::max<int64_t>(Dv, 1), kVec);
  P0.q_block = q_block, P0.k_block = k_block, P0.kb_pad = round_up(k_block, kVec);
  P0.M = M, P0.nb = nb, P0.off = 0, P0.tile0 = 0;  // tiles are absolute: the layout's rows
  P0.causal = causal, P0.window = window, P0.sinks = sink_tokens;
  P0.qmul = static_cast<float>(scale) * kLog2e;
  P0.cap = static_cast<float>(softcap) * kLog2e;
  // the packed (T, H, D) tensors read as batch-1 (1, H, T, D) views; each sequence moves the base
  P0.qst[0] = 0, P0.qst[1] = q.stride(1), P0.qst[2] = q.stride(0), P0.qst[3] = q.stride(2);
  P0.kst[0] = 0, P0.kst[1] = k.stride(1), P0.kst[2] = k.stride(0), P0.kst[3] = k.stride(2);
  P0.vst[0] = 0, P0.vst[1] = v.stride(1), P0.vst[2] = v.stride(0), P0.vst[3] = v.stride(2);
  P0.ost[0] = 0, P0.ost[1] = Dv, P0.ost[2] = Hq * Dv;
  P0.lb = 1, P0.lh = fc.size(1), P0.wf = fi.size(3), P0.wp = pi.size(3);
  P0.ti = nullptr, P0.topk = 0;

  std::vector<Params> PS(nseq, P0);
  std::vector<int64_t> qoff(nseq), koff(nseq);
  std::vector<std::array<int64_t, 3>> tasks;
  const int64_t lstride = fc.size(0) == 1 ? 0 : P0.lh * M;  // a per-sequence layout: its own rows
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t sq = cqp[s + 1] - cqp[s], sk = ckp[s + 1] - ckp[s];
    TORCH_CHECK(sq >= 0 && sk >= 0, who, ": cu_seqlens must be non-decreasing");
    TORCH_CHECK(sq <= sk, who, ": needs Sq_i <= Sk_i, got ", sq, " > ", sk, " for sequence ", s);
    TORCH_CHECK(sk <= L, who, ": sequence ", s, " has ", sk, " keys, more than the layout's L = ", L);
    Params& P = PS[s];
    P.sq = sq, P.sk = sk, P.off = sk - sq;
    P.fc = fc.data_ptr<int32_t>() + s * lstride, P.pc = pc.data_ptr<int32_t>() + s * lstride;
    P.fi = fi.data_ptr<int32_t>() + s * lstride * P0.wf, P.pi = pi.data_ptr<int32_t>() + s * lstride * P0.wp;
    qoff[s] = cqp[s], koff[s] = ckp[s];
    if (sq == 0) continue;
    for (int64_t i = (sk + q_block - 1) / q_block - 1; i >= P.off / q_block; --i)  // heaviest (causal) first
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({s, h, i});
  }
  // heaviest first over all sequences: later tiles of a causal layout visit more blocks
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& a, const auto& b) { return a[2] > b[2]; });

  if (!tasks.empty()) {
    const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr();
    with_float_tag(dt, [&](auto tag) {
      constexpr int DT = decltype(tag)::value;
      run_varlen<DT, aten_float_t<DT>>(P0, PS, qoff, koff, tasks, qd, kd, vd, out.data_ptr<aten_float_t<DT>>(),
                                       lse_blk.data_ptr<float>());
    });
  }
  // the per-sequence (Hq, Sq_s) lse blocks back to the packed layout
  auto lse = torch::empty({Hq, Tq}, q.options().dtype(torch::kFloat32));
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t q0 = cqp[s], sq = cqp[s + 1] - q0;
    if (sq == 0) continue;
    lse.narrow(1, q0, sq).copy_(lse_blk.narrow(0, Hq * q0, Hq * sq).view({Hq, sq}));
  }
  return {out, lse};
}

// block_sparse_bwd.cpp
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> block_sparse_bwd_varlen(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse, torch::Tensor dout,
    torch::Tensor cu_seqlens_q, torch::Tensor cu_seqlens_k, torch::Tensor full_count, torch::Tensor full_index,
    torch::Tensor partial_count, torch::Tensor partial_index, torch::Tensor t_full_count, torch::Tensor t_full_index,
    torch::Tensor t_partial_count, torch::Tensor t_partial_index, int64_t L, int64_t q_block, int64_t k_block,
    bool causal, int64_t window, int64_t sink_tokens, double scale, int64_t mode, double softcap);

// block_sparse_bwd.cpp
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> block_sparse_bwd(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse, torch::Tensor dout,
    torch::Tensor full_count, torch::Tensor full_index, torch::Tensor partial_count, torch::Tensor partial_index,
    torch::Tensor t_full_count, torch::Tensor t_full_index, torch::Tensor t_partial_count,
    torch::Tensor t_partial_index, c10::optional<torch::Tensor> token_index, c10::optional<torch::Tensor> block_tokens,
    c10::optional<torch::Tensor> block_token_offsets, int64_t sq, int64_t sk, int64_t q_block, int64_t k_block,
    bool causal, int64_t window, int64_t sink_tokens, double scale, int64_t mode, double softcap);

// topk_select.cpp
torch::Tensor topk_select(torch::Tensor q, torch::Tensor kbar_t, int64_t kv_heads, int64_t sk, int64_t nb,
                          int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn CPU kernels";
  m.attr("vector_width") = sparse_attn_cpu::kVec;
  m.attr("bf16_dot") = sparse_attn_cpu::kHaveBf16Dot;  // bfloat16 products with vdpbf16ps
#ifdef SPARSE_ATTN_AMX
  m.attr("amx_built") = true;  // ... and on AMX tiles in the forward (gemm_amx.h)
  m.def("set_amx", [](bool on) { sparse_attn_cpu::amx_switch().store(on ? 1 : 0); }, py::arg("on"),
        "switch the forward's AMX tiles on or off (this module, process-wide; SPARSE_ATTN_CPU_AMX=0 starts off)");
#else
  m.attr("amx_built") = false;
  m.def("set_amx", [](bool) {}, py::arg("on"), "no AMX tiles in this build: does nothing");
#endif
  m.def("prepack_bytes", [] { return sparse_attn_cpu::prepack_bytes().load(); },
        "bytes of K / V the forward packs once per call for its query tiles to share (0: each task packs its own)");
  m.def("set_prepack_bytes", [](int64_t bytes) {
          TORCH_CHECK_VALUE(bytes >= 0, "set_prepack_bytes: bytes must be >= 0, got ", bytes);
          sparse_attn_cpu::prepack_bytes().store(bytes);
        }, py::arg("bytes"), "set prepack_bytes() for the process (tests and A/B runs; the same bits either way)");
  m.def("set_scratch_poison", [](bool on) { sparse_attn_cpu::scratch_poison().store(on ? 1 : 0); }, py::arg("on"),
        "tests: fill the forward's kept per-thread scratch with NaN before each use (the same bits either way)");
  m.def("amx_enabled", &sparse_attn_cpu::use_amx,
        "whether the bfloat16 forward multiplies on AMX tiles now (built, permitted by Linux, switched on)");
  m.def("block_sparse_fwd", &block_sparse_fwd, "block-sparse flash attention forward over a BlockLayout -> (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("full_count"), py::arg("full_index"),
        py::arg("partial_count"), py::arg("partial_index"), py::arg("token_index"), py::arg("sq"), py::arg("sk"),
        py::arg("q_block"), py::arg("k_block"), py::arg("causal"), py::arg("window"), py::arg("sink_tokens"),
        py::arg("scale"), py::arg("softcap") = 0.0, py::arg("out") = py::none(), py::arg("need_lse") = true);
  m.def("block_sparse_bwd", &block_sparse_bwd,
        "block-sparse flash attention backward over a BlockLayout and its transpose -> (dq, dk, dv)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("full_count"),
        py::arg("full_index"), py::arg("partial_count"), py::arg("partial_index"), py::arg("t_full_count"),
        py::arg("t_full_index"), py::arg("t_partial_count"), py::arg("t_partial_index"), py::arg("token_index"),
        py::arg("block_tokens"), py::arg("block_token_offsets"), py::arg("sq"), py::arg("sk"), py::arg("q_block"),
        py::arg("k_block"), py::arg("causal"), py::arg("window"), py::arg("sink_tokens"), py::arg("scale"),
        py::arg("mode"), py::arg("softcap") = 0.0);
  m.def("block_sparse_fwd_varlen", &block_sparse_fwd_varlen,
        "packed varlen block-sparse forward over one shared layout -> (out (Tq, Hq, Dv), lse (Hq, Tq))", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("full_count"),
        py::arg("full_index"), py::arg("partial_count"), py::arg("partial_index"), py::arg("L"), py::arg("q_block"),
        py::arg("k_block"), py::arg("causal"), py::arg("window"), py::arg("sink_tokens"), py::arg("scale"),
        py::arg("softcap") = 0.0);
  m.def("block_sparse_bwd_varlen", &block_sparse_bwd_varlen,
        "packed varlen block-sparse backward over one shared layout and its transpose -> (dq, dk, dv) packed",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("full_count"), py::arg("full_index"),
        py::arg("partial_count"), py::arg("partial_index"), py::arg("t_full_count"), py::arg("t_full_index"),
        py::arg("t_partial_count"), py::arg("t_partial_index"), py::arg("L"), py::arg("q_block"), py::arg("k_block"),
        py::arg("causal"), py::arg("window"), py::arg("sink_tokens"), py::arg("scale"), py::arg("mode"),
        py::arg("softcap") = 0.0);
  m.def("topk_select", &topk_select,
        "TopK per-token block selection from transposed pooled keys -> int32 (B, Hkv, Sq, topk), ascending, -1 padded",
        py::arg("q"), py::arg("kbar_t"), py::arg("kv_heads"), py::arg("sk"), py::arg("nb"), py::arg("block_size"),
        py::arg("topk"), py::arg("sink_blocks"), py::arg("local_blocks"));
}

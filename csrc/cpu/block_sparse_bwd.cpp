// Block-sparse flash-attention backward on the CPU over sparse_attn's BlockLayout.
//
// Two schedules, each parallel over independent outputs, so no thread ever adds into another
// thread's rows (no atomics, deterministic):
//   two-pass: a dq pass, one task per (batch, kv head, query tile): the tile's visited blocks as
//             in the forward (full, partial, then TopK's per-token blocks grouped by block); then
//             a dk/dv pass, one task per (batch, kv head, key block): the query tiles that visit
//             the block (the transposed layout), then the tokens that selected it (TopK: a
//             per-block token list, built in PyTorch by sorting token_index; no Sq x Sk tensor).
//             7 products per (block, query chunk): S, dP, dQ and S^T, dP^T, dV, dK.
//   fused:    one task per (batch, kv head) walks its key blocks as the dk/dv pass does and also
//             adds dS . K into a float32 dq accumulator of all the task's query rows (Sq * G x
//             D_pad, the task's own: no atomics), written once at the end: 5 products.
// `mode` 0 (auto) takes the fused schedule when the (batch, kv head) tasks keep every thread busy
// (fused_pays), else the two passes; 1 forces the two passes, 2 the fused schedule (tests).
// Both recompute the probabilities from the forward's log-sum-exp:
//   P = exp2(Qs . K^T - lse2)     (Qs = q * scale * log2 e, lse2 = lse * log2 e)
//   dP = dO . V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O)
//   dQ = scale * dS . K,   dK = scale * dS^T . Q,   dV = P^T . dO
// With soft-capping (softcap.h) the scores are capped before the exp2 and dS is taken back
// through the cap: dS *= 1 - tanh^2 (the derivative of c tanh(s / c)).
// As in the forward, the G query heads of a GQA group are the rows of one matrix (token-major),
// so each K/V block is converted once for the group, and a key block's dk/dv sum over the group.
// float32 accumulation; gradients written in the inputs' dtype. Scratch per thread: a query
// tile's rows (dq pass) or kCols query columns (dk/dv pass) plus one K/V block; the fused
// schedule adds the dq accumulator (all threads together: at most one float32 copy of q).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/flush_to_zero.h"
#include "cpu/huge_pages.h"
#include "cpu/layout_check.h"
#include "cpu/softcap.h"
#include "cpu/token_blocks.h"
#include "cpu/vec.h"
#include "cpu/vec_bf16.h"
#include "cpu/partial_rows.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

constexpr float kLog2eB = 1.4426950408889634f;
constexpr float kInf = std::numeric_limits<float>::infinity();
// query rows per score chunk (dq pass) and query columns per chunk (dk/dv pass)
constexpr int64_t kRows = 192;
constexpr int64_t kCols = 256;

struct BwdParams {
  int64_t B, Hq, Hkv, G, sq, sk, D, Dv, D_pad, Dv_pad, q_block, k_block, kb_pad, M, nb, off, tile0;
  bool causal;
  int64_t window, sinks;
  float qmul, scale;
  float cap;  // softcap * log2(e), 0: no soft-capping
  int64_t qst[4], kst[4], vst[4], dost[4];
  const float *lse, *delta;  // (B, Hq, Sq) contiguous; lse in natural-log units
  // forward lists (per query tile) and their transpose (per key block)
  const int32_t *fc, *fi, *pc, *pi, *ti;
  int64_t lb, lh, wf, wp, topk;
  const int32_t *tfc, *tfi, *tpc, *tpi;
  int64_t twf, twp;
  // TopK per key block: tokens[tok_off[n] : tok_off[n + 1]] of each (b, kv head), ascending
  const int32_t *tok, *tok_off;
  int64_t tok_w;
};

// ---------------------------------------------------------------------------------- dq pass
// the gradients' element type for dtype tag DT (0 float32, 1 bfloat16, 2 float16)
template <int DT>
using OutOf = std::conditional_t<DT == 0, float, std::conditional_t<DT == 1, at::BFloat16, at::Half>>;

#ifdef SPARSE_ATTN_BF16_DOT
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif

// bf16 dot-product path (bfloat16 inputs on AVX-512 BF16; vec_bf16.h): Q and dO rows as bf16
// words, K and V blocks pair-packed for Q.K^T / dO.V^T (transposed) and dS.K (rows interleaved),
// dS as bf16 pairs; float32 sums.
struct DqDotScratch {
  std::vector<uint32_t> qw, dow, kp, vpt, kint, dsw;
  std::vector<const uint32_t*> qwp, dowp, qwp2, dowp2, dswp;
  void init(const BwdParams& P, int64_t R, int64_t RC) {
    const int64_t Dw = (P.D + 1) / 2, Dvw = (P.Dv + 1) / 2;
    qw.assign(R * Dw, 0u), dow.assign(R * Dvw, 0u);
    kp.assign(std::max<int64_t>(Dw, 1) * P.kb_pad, 0u), vpt.assign(std::max<int64_t>(Dvw, 1) * P.kb_pad, 0u);
    kint.assign(P.kb_pad / 2 * P.D_pad, 0u), dsw.assign(RC * P.kb_pad / 2, 0u);
    qwp.resize(R), dowp.resize(R), qwp2.resize(R), dowp2.resize(R), dswp.resize(RC);
    for (int64_t i = 0; i < RC; ++i) dswp[i] = dsw.data() + i * P.kb_pad / 2;
  }
};

struct DqScratch {
  std::vector<float> q, dO, dq, s, dp, kt, vt, kr, lse2, delta, ones, dcap;
  std::vector<const float *> qp, dop, qp2, dop2;
  std::vector<float *> dqp, dqp2, sp, dpp;
  std::vector<int32_t> rid, rid2;
  std::vector<int64_t> block_count, tokens;  // for_each_selected_block's scratch
  DqDotScratch w;

  DqScratch(const BwdParams& P, bool bf16_dot) {
    const int64_t R = P.q_block * P.G, RC = std::min(R, kRows);
    if (bf16_dot) w.init(P, R, RC);
    else w.qwp.resize(R), w.dowp.resize(R);  // partial_block offsets them on either path
    q.assign(R * std::max<int64_t>(P.D, 1), 0.f);
    dO.assign(R * P.Dv_pad, 0.f);
    dq.assign(R * P.D_pad, 0.f);
    s.assign(RC * P.kb_pad, 0.f);
    dp.assign(RC * P.kb_pad, 0.f);
    kt.assign(std::max<int64_t>(P.D, 1) * P.kb_pad, 0.f);
    vt.assign(std::max<int64_t>(P.Dv, 1) * P.kb_pad, 0.f);
    kr.assign(P.kb_pad * P.D_pad, 0.f);  // padding rows and columns stay 0
    lse2.assign(R, 0.f), delta.assign(R, 0.f), ones.assign(std::max(R, P.kb_pad), 1.f);
    dcap.assign(P.cap > 0.f ? P.kb_pad : 0, 0.f);
    qp.resize(R), dop.resize(R), qp2.resize(R), dop2.resize(R), dqp.resize(R), dqp2.resize(R);
    rid.resize(R), rid2.resize(R);
    sp.resize(RC), dpp.resize(RC);
    for (int64_t i = 0; i < RC; ++i) sp[i] = s.data() + i * P.kb_pad, dpp[i] = dp.data() + i * P.kb_pad;
  }
};

template <int DT>
class DqRunner {
  using In = typename Elem<DT>::T;
  using Out = OutOf<DT>;

 public:
  static constexpr bool kDot = DT == 1 && kHaveBf16Dot;

  DqRunner(const BwdParams& P, const In* Q, const In* K, const In* V, const In* dO, Out* dQ)
      : P(P), Q(Q), K(K), V(V), dO(dO), dQ(dQ) {}

  void run(DqScratch& S, int64_t b, int64_t h, int64_t i) {
    const int64_t p_lo = std::max((P.tile0 + i) * P.q_block, P.off);
    const int64_t p_hi = std::min((P.tile0 + i + 1) * P.q_block, P.sk);
    const int64_t rows = p_hi - p_lo;
    if (rows <= 0) return;
    const int64_t t_lo = p_lo - P.off, G = P.G, R = rows * G;
    p_lo_ = p_lo;
    loaded_ = -1;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g, hq = h * G + g, t = t_lo + r;
        const In* qsrc = Q + b * P.qst[0] + hq * P.qst[1] + t * P.qst[2];
        const In* dsrc = dO + b * P.dost[0] + hq * P.dost[1] + t * P.dost[2];
#ifdef SPARSE_ATTN_BF16_DOT
        if constexpr (kDot) {
          const int64_t Dw = (P.D + 1) / 2, Dvw = (P.Dv + 1) / 2;
          copy_words(S.w.qw.data() + row * Dw, reinterpret_cast<const uint16_t*>(qsrc), P.D, P.qst[3]);
          copy_words(S.w.dow.data() + row * Dvw, reinterpret_cast<const uint16_t*>(dsrc), P.Dv, P.dost[3]);
          S.w.qwp[row] = S.w.qw.data() + row * Dw;
          S.w.dowp[row] = S.w.dow.data() + row * Dvw;
        } else
#endif
        {
          load_row<DT>(S.q.data() + row * P.D, qsrc, P.D, P.qst[3], P.qmul);
          load_row<DT>(S.dO.data() + row * P.Dv_pad, dsrc, P.Dv, P.dost[3], 1.f);
        }
        const int64_t stat = (b * P.Hq + hq) * P.sq + t;
        S.lse2[row] = P.lse[stat] * kLog2eB;
        S.delta[row] = P.delta[stat];
        S.qp[row] = S.q.data() + row * P.D;
        S.dop[row] = S.dO.data() + row * P.Dv_pad;
        S.dqp[row] = S.dq.data() + row * P.D_pad;
        S.rid[row] = static_cast<int32_t>(row);
      }
    std::fill_n(S.dq.begin(), R * P.D_pad, 0.f);

    const int64_t lrow = ((P.lb == 1 ? 0 : b) * P.lh + (P.lh == 1 ? 0 : h)) * P.M + i;
    const int32_t* full = P.fi + lrow * P.wf;
    for (int64_t e = 0, n = P.fc[lrow]; e < n; ++e)
      block(S, b, h, full[e], R, S.qp.data(), S.dop.data(), S.w.qwp.data(), S.w.dowp.data(), S.dqp.data(),
            S.rid.data(), false);
    const int32_t* part = P.pi + lrow * P.wp;
    for (int64_t e = 0, n = P.pc[lrow]; e < n; ++e) partial_block(S, b, h, part[e], rows);
    if (P.ti != nullptr) per_token_blocks(S, b, h, t_lo, rows);

    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g;
        const float* src = S.dq.data() + row * P.D_pad;
        Out* dst = dQ + (((b * P.Hq + h * G + g) * P.sq) + t_lo + r) * P.D;
        for (int64_t t = 0; t < P.D; ++t) dst[t] = static_cast<Out>(src[t] * P.scale);
      }
  }

 private:
  // A partial block of the tile's `rows` tokens, split by token as the forward's attend_partial
  // does (partial_rows.h): rows that see none of it skipped, rows that see all of it unmasked. A
  // row's arithmetic does not depend on the other rows of a call: the same bits.
  void partial_block(DqScratch& S, int64_t b, int64_t h, int64_t n, int64_t rows) {
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), G = P.G;
    partial_rows(p_lo_, rows, j0, nk, P.causal, P.window, P.sinks, [&](int64_t lo, int64_t hi, bool masked) {
      const int64_t a = lo * G;
      block(S, b, h, n, (hi - lo) * G, S.qp.data() + a, S.dop.data() + a, S.w.qwp.data() + a, S.w.dowp.data() + a,
            S.dqp.data() + a, S.rid.data() + a, masked);
    });
  }

  void per_token_blocks(DqScratch& S, int64_t b, int64_t h, int64_t t_lo, int64_t rows) {
    const int64_t G = P.G;
    const int32_t* sel = P.ti + ((b * P.Hkv + h) * P.sq + t_lo) * P.topk;
    for_each_selected_block(sel, rows, P.topk, S.block_count, S.tokens, [&](int64_t n, const TokenSpan& toks) {
      int64_t cnt = 0;
      for (const int64_t r : toks)
        for (int64_t g = 0; g < G; ++g, ++cnt) {
          const int64_t row = r * G + g;
          if constexpr (kDot) S.w.qwp2[cnt] = S.w.qwp[row], S.w.dowp2[cnt] = S.w.dowp[row];
          else S.qp2[cnt] = S.qp[row], S.dop2[cnt] = S.dop[row];
          S.dqp2[cnt] = S.dqp[row];
          S.rid2[cnt] = static_cast<int32_t>(row);
        }
      block(S, b, h, n, cnt, S.qp2.data(), S.dop2.data(), S.w.qwp2.data(), S.w.dowp2.data(), S.dqp2.data(),
            S.rid2.data(), false);
    });
  }

  // K block n -> kt (D x kb_pad) and kr (kb_pad x D_pad), V block -> vt (Dv x kb_pad)
  void load_block(DqScratch& S, int64_t b, int64_t h, int64_t n) {
    if (loaded_ == n) return;
    loaded_ = n;
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), ld = P.kb_pad;
    const In* kb = K + b * P.kst[0] + h * P.kst[1] + j0 * P.kst[2];
    const In* vb = V + b * P.vst[0] + h * P.vst[1] + j0 * P.vst[2];
#ifdef SPARSE_ATTN_BF16_DOT
    if constexpr (kDot) {
      const auto* k16 = reinterpret_cast<const uint16_t*>(kb);
      pack_k_pairs(S.w.kp.data(), ld, k16, P.kst[2], P.kst[3], nk, P.D);  // Q . K^T
      pack_k_pairs(S.w.vpt.data(), ld, reinterpret_cast<const uint16_t*>(vb), P.vst[2], P.vst[3], nk, P.Dv);  // dO . V^T
      for (int64_t pr = 0; pr < (nk + 1) / 2; ++pr)  // dS . K
        interleave_bf16_rows(S.w.kint.data() + pr * P.D_pad, k16 + 2 * pr * P.kst[2],
                             2 * pr + 1 < nk ? k16 + (2 * pr + 1) * P.kst[2] : nullptr, P.D, P.kst[3]);
      return;
    }
#endif
    for (int64_t c = 0; c < nk; ++c) load_row<DT>(S.kr.data() + c * P.D_pad, kb + c * P.kst[2], P.D, P.kst[3], 1.f);
    for (int64_t c = nk; c < P.kb_pad; ++c) std::fill_n(S.kr.data() + c * P.D_pad, P.D_pad, 0.f);
    transpose_f32(S.kt.data(), ld, S.kr.data(), P.D_pad, nk, P.D);  // kr's rows past nk are 0
    for (int64_t c0 = 0; c0 < nk; c0 += 16) {
      const int64_t c1 = std::min(nk, c0 + 16);
      for (int64_t t = 0; t < P.Dv; ++t)
        for (int64_t c = c0; c < c1; ++c) S.vt[t * ld + c] = Elem<DT>::get(vb, c * P.vst[2] + t * P.vst[3]);
    }
  }

  void block(DqScratch& S, int64_t b, int64_t h, int64_t n, int64_t cnt, const float* const* qp,
             const float* const* dop, const uint32_t* const* qwp, const uint32_t* const* dowp, float* const* dqp,
             const int32_t* rid, bool masked) {
    // a layout shared by packed sequences lists blocks past a shorter sequence's end: nothing there
    if (cnt == 0 || n * P.k_block >= P.sk) return;
    load_block(S, b, h, n);
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), kbp = P.kb_pad;
    // a causal block's masked rows whose first token does not see the whole block: kNarrowTokens
    // at a time over the keys the group's last token sees (partial_rows.h), as the forward does;
    // the columns past `width` are probabilities 0 for every row of the group, so dS is 0 there
    const bool narrow = masked && narrows(p_lo_ + rid[0] / P.G, j0, nk, P.causal);
    const int64_t step = narrow ? std::min<int64_t>(kRows, kNarrowTokens * P.G) : kRows;
    for (int64_t c0 = 0; c0 < cnt; c0 += step) {
      const int64_t rows = std::min(step, cnt - c0);
      int64_t width = kbp;
      if (narrow) width = seen_width(last_token(rid + c0, rows, P.G, p_lo_), j0, nk, kbp, kNarrowTokens);
      const int64_t nkv = std::min(width, nk);  // the keys dS . K reads
#ifdef SPARSE_ATTN_BF16_DOT
      if constexpr (kDot) {
        gemm_bf16<false>(rows, width, (P.D + 1) / 2, qwp + c0, S.w.kp.data(), kbp, S.sp.data(), nullptr, P.qmul);
        gemm_bf16<false>(rows, width, (P.Dv + 1) / 2, dowp + c0, S.w.vpt.data(), kbp, S.dpp.data(), nullptr);
      } else
#endif
      {
        gemm_rows<false>(rows, width, P.D, qp + c0, S.kt.data(), kbp, S.sp.data(), nullptr);
        gemm_rows<false>(rows, width, P.Dv, dop + c0, S.vt.data(), kbp, S.dpp.data(), nullptr);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S.sp[r];
        float* dp = S.dpp[r];
        const int64_t st = rid[c0 + r];
        if (P.cap > 0.f) softcap_row_grad(s, S.dcap.data(), width, P.cap);
        for (int64_t c = nk; c < width; ++c) s[c] = kNegInf;
        if (masked) hide_keys(s, p_lo_ + st / P.G, j0, nkv, P.causal, P.window, P.sinks, kNegInf);
        exp2_sub_sum(s, width, S.lse2[st]);  // s = P
        const float dl = S.delta[st];
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) s[c] = s[c] * (dp[c] - dl);  // s = dS
        if (P.cap > 0.f) {
          const float* dc = S.dcap.data();
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) s[c] *= dc[c];
        }
      }
#ifdef SPARSE_ATTN_BF16_DOT
      if constexpr (kDot) {
        for (int64_t r = 0; r < rows; ++r) floats_to_bf16_pairs(S.w.dsw.data() + r * kbp / 2, S.sp[r], width);
        gemm_bf16<true>(rows, P.D_pad, (nkv + 1) / 2, S.w.dswp.data(), S.w.kint.data(), P.D_pad, dqp + c0,
                        S.ones.data());
        continue;
      }
#endif
      gemm_rows<true>(rows, P.D_pad, nkv, S.sp.data(), S.kr.data(), P.D_pad, dqp + c0, S.ones.data());
    }
  }

  const BwdParams& P;
  const In *Q, *K, *V, *dO;
  Out* dQ;
  int64_t p_lo_ = 0, loaded_ = -1;
};

// -------------------------------------------------------------------------------- dk/dv pass
// bf16 dot-product path of the dk/dv pass: the key block's K and V rows as bf16 words (the
// A operands of K.Q^T and V.dO^T), the chunk's Q and dO rows copied (bf16, even width) then
// pair-packed transposed (qT, doT) and with pairs of columns interleaved (qi, doi) for
// dS^T.Q and P^T.dO; P^T and dS^T as bf16 pairs.
struct DkvDotScratch {
  std::vector<uint32_t> kw, vw, qrow, drow, qT, doT, qi, doi, pw, dsw, kint, dsq;
  std::vector<const uint32_t*> kwp, vwp, pwp, dswp, dsqp;
  void init(const BwdParams& P, bool fused) {
    const int64_t Dw = (P.D + 1) / 2, Dvw = (P.Dv + 1) / 2, kbp = P.kb_pad;
    kw.assign(kbp * Dw, 0u), vw.assign(kbp * Dvw, 0u);
    qrow.assign(kCols * Dw, 0u), drow.assign(kCols * Dvw, 0u);
    qT.assign(std::max<int64_t>(Dw, 1) * kCols, 0u), doT.assign(std::max<int64_t>(Dvw, 1) * kCols, 0u);
    qi.assign(kCols / 2 * P.D_pad, 0u), doi.assign(kCols / 2 * P.Dv_pad, 0u);
    pw.assign(kbp * kCols / 2, 0u), dsw.assign(kbp * kCols / 2, 0u);
    kwp.resize(kbp), vwp.resize(kbp), pwp.resize(kbp), dswp.resize(kbp);
    for (int64_t r = 0; r < kbp; ++r) {
      kwp[r] = kw.data() + r * Dw, vwp[r] = vw.data() + r * Dvw;
      pwp[r] = pw.data() + r * kCols / 2, dswp[r] = dsw.data() + r * kCols / 2;
    }
    if (!fused) return;
    // dQ += dS . K: K rows interleaved in pairs (padding words stay 0), dS rows as bf16 pairs
    kint.assign(kbp / 2 * P.D_pad, 0u), dsq.assign(kCols * kbp / 2, 0u), dsqp.resize(kCols);
    for (int64_t c = 0; c < kCols; ++c) dsqp[c] = dsq.data() + c * kbp / 2;
  }
};

struct DkvScratch {
  std::vector<float> qt, dot, qr, dor, st, dpt, kr, vr, dk, dv, lse2, delta, ones, dcap;
  std::vector<const float *> krp, vrp;
  std::vector<float *> stp, dptp, dkp, dvp;
  std::vector<int64_t> cols;  // (token, head) of each column, as t * G + g
  // fused schedule only: dS rows (kCols x kb_pad), the task's dq accumulator (Sq * G x D_pad,
  // row t * G + g) and the chunk's rows of it
  std::vector<float> ds, dq;
  std::vector<const float*> dsp;
  std::vector<float*> dqp;
  DkvDotScratch w;
  DkvScratch(const BwdParams& P, bool bf16_dot, bool fused) {
    if (bf16_dot) w.init(P, fused);
    const int64_t D1 = std::max<int64_t>(P.D, 1), Dv1 = std::max<int64_t>(P.Dv, 1), kbp = P.kb_pad;
    qt.assign(D1 * kCols, 0.f), dot.assign(Dv1 * kCols, 0.f);
    qr.assign(kCols * P.D_pad, 0.f), dor.assign(kCols * P.Dv_pad, 0.f);
    st.assign(kbp * kCols, 0.f), dpt.assign(kbp * kCols, 0.f);
    kr.assign(kbp * P.D_pad, 0.f), vr.assign(kbp * Dv1, 0.f);  // kr: D_pad wide (B of dS . K), padding 0
    dk.assign(kbp * P.D_pad, 0.f), dv.assign(kbp * P.Dv_pad, 0.f);
    dcap.assign(P.cap > 0.f ? kCols : 0, 0.f);
    lse2.assign(kCols, kInf), delta.assign(kCols, 0.f), ones.assign(std::max(kbp, kCols), 1.f);
    krp.resize(kbp), vrp.resize(kbp), stp.resize(kbp), dptp.resize(kbp), dkp.resize(kbp), dvp.resize(kbp);
    for (int64_t r = 0; r < kbp; ++r) {
      krp[r] = kr.data() + r * P.D_pad, vrp[r] = vr.data() + r * Dv1;
      stp[r] = st.data() + r * kCols, dptp[r] = dpt.data() + r * kCols;
      dkp[r] = dk.data() + r * P.D_pad, dvp[r] = dv.data() + r * P.Dv_pad;
    }
    cols.reserve(kCols);
    if (!fused) return;
    ds.assign(kCols * kbp, 0.f), dq.assign(P.sq * P.G * P.D_pad, 0.f);
    dsp.resize(kCols), dqp.resize(kCols);
    for (int64_t c = 0; c < kCols; ++c) dsp[c] = ds.data() + c * kbp;
  }
};

template <int DT>
class DkvRunner {
  using In = typename Elem<DT>::T;
  using Out = OutOf<DT>;

 public:
  static constexpr bool kDot = DT == 1 && kHaveBf16Dot;

  DkvRunner(const BwdParams& P, const In* Q, const In* K, const In* V, const In* dO, Out* dK, Out* dV)
      : P(P), Q(Q), K(K), V(V), dO(dO), dK(dK), dV(dV) {}

  void run(DkvScratch& S, int64_t b, int64_t h, int64_t n) {
    const int64_t j0 = n * P.k_block, nk = std::min(P.k_block, P.sk - j0), G = P.G;
    if (nk <= 0) return;
    b_ = b, h_ = h, j0_ = j0, nk_ = nk;
    const In* kb = K + b * P.kst[0] + h * P.kst[1] + j0 * P.kst[2];
    const In* vb = V + b * P.vst[0] + h * P.vst[1] + j0 * P.vst[2];
    for (int64_t c = 0; c < nk; ++c) {
#ifdef SPARSE_ATTN_BF16_DOT
      if constexpr (kDot) {
        copy_words(S.w.kw.data() + c * ((P.D + 1) / 2), reinterpret_cast<const uint16_t*>(kb + c * P.kst[2]), P.D,
                   P.kst[3]);
        copy_words(S.w.vw.data() + c * ((P.Dv + 1) / 2), reinterpret_cast<const uint16_t*>(vb + c * P.vst[2]), P.Dv,
                   P.vst[3]);
        if (dq_ != nullptr && c % 2 == 0) {  // fused: K rows c, c + 1 interleaved for dS . K
          const auto* k16 = reinterpret_cast<const uint16_t*>(kb);
          interleave_bf16_rows(S.w.kint.data() + c / 2 * P.D_pad, k16 + c * P.kst[2],
                               c + 1 < nk ? k16 + (c + 1) * P.kst[2] : nullptr, P.D, P.kst[3]);
        }
        continue;
      }
#endif
      load_row<DT>(S.kr.data() + c * P.D_pad, kb + c * P.kst[2], P.D, P.kst[3], 1.f);
      load_row<DT>(S.vr.data() + c * std::max<int64_t>(P.Dv, 1), vb + c * P.vst[2], P.Dv, P.vst[3], 1.f);
    }
    std::fill(S.dk.begin(), S.dk.end(), 0.f);
    std::fill(S.dv.begin(), S.dv.end(), 0.f);

    // the query tiles that visit this block: all G heads of each of their tokens, kCols at a time
    const int64_t lrow = ((P.lb == 1 ? 0 : b) * P.lh + (P.lh == 1 ? 0 : h)) * P.nb + n;
    for (int pass = 0; pass < 2; ++pass) {
      const bool masked = pass == 1;
      const int32_t* idx = masked ? P.tpi + lrow * P.twp : P.tfi + lrow * P.twf;
      const int64_t cnt = masked ? P.tpc[lrow] : P.tfc[lrow];
      for (int64_t e = 0; e < cnt; ++e) {
        const int64_t i = idx[e];
        const int64_t p_lo = std::max((P.tile0 + i) * P.q_block, P.off);
        const int64_t p_hi = std::min((P.tile0 + i + 1) * P.q_block, P.sk);
        // a partial tile's leading and trailing tokens that see none of the block (partial_rows.h:
        // before it, past the window) are skipped: their terms were zeros. The chunks keep their
        // place, each starting from an even column of its own (the bf16 products pair columns).
        int64_t first = 0, last = p_hi - p_lo;
        if (masked) seeing_rows(p_lo, p_hi - p_lo, j0, nk, P.causal, P.window, P.sinks, first, last);
        const int64_t c0 = (p_lo - P.off) * G, cv = c0 + first * G, c1 = c0 + last * G;
        for (int64_t c = c0; c < c1; c += kCols) {
          const int64_t lo = cv > c ? c + ((cv - c) & ~int64_t(1)) : c, hi = std::min(c1, c + kCols);
          if (lo >= hi) continue;
          S.cols.clear();
          for (int64_t x = lo; x < hi; ++x) S.cols.push_back(x);
          columns(S, masked);
        }
      }
    }
    // TopK: the tokens that selected this block
    if (P.tok != nullptr) {
      const int32_t* off = P.tok_off + (b * P.Hkv + h) * (P.nb + 1);
      const int32_t* tok = P.tok + (b * P.Hkv + h) * P.tok_w;
      S.cols.clear();
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        for (int64_t g = 0; g < G; ++g) S.cols.push_back(int64_t(tok[e]) * G + g);
        if (int64_t(S.cols.size()) + G > kCols) columns(S, false), S.cols.clear();
      }
      if (!S.cols.empty()) columns(S, false);
    }

    // dK from the pre-scaled Q (float32 path): * scale, not * scale * log2 e; the bf16 path's Q is unscaled
    const float kmul = kDot ? P.scale : P.scale / P.qmul;
    for (int64_t c = 0; c < nk; ++c) {
      Out* dk = dK + ((b * P.Hkv + h) * P.sk + j0 + c) * P.D;
      Out* dv = dV + ((b * P.Hkv + h) * P.sk + j0 + c) * P.Dv;
      const float* sk = S.dk.data() + c * P.D_pad;
      const float* sv = S.dv.data() + c * P.Dv_pad;
      for (int64_t t = 0; t < P.D; ++t) dk[t] = static_cast<Out>(sk[t] * kmul);
      for (int64_t t = 0; t < P.Dv; ++t) dv[t] = static_cast<Out>(sv[t]);
    }
  }

  // Fused schedule: every key block of (b, kv head h) as run() does, plus dQ of all the task's
  // query rows, accumulated in S.dq (dS . K, K unscaled) and written once, times scale.
  void run_fused(DkvScratch& S, int64_t b, int64_t h, Out* dQ) {
    const int64_t G = P.G, R = P.sq * G;
    std::fill_n(S.dq.begin(), R * P.D_pad, 0.f);
    dq_ = S.dq.data();
    for (int64_t n = 0; n < P.nb; ++n) run(S, b, h, n);
    dq_ = nullptr;
    for (int64_t g = 0; g < G; ++g) {
      Out* dst = dQ + (b * P.Hq + h * G + g) * P.sq * P.D;
      for (int64_t t = 0; t < P.sq; ++t, dst += P.D) {
        const float* src = S.dq.data() + (t * G + g) * P.D_pad;
        for (int64_t x = 0; x < P.D; ++x) dst[x] = static_cast<Out>(src[x] * P.scale);
      }
    }
  }

 private:
  // fused schedule: dQ[columns] += dS . K for the chunk, dS^T (S.dpt, keys x Cp) transposed into
  // rows first; on the bf16 dot-product path, bf16 pairs of dS rows times the interleaved K pairs.
  void add_dq(DkvScratch& S, int64_t C, int64_t Cp) {
    const int64_t nk = nk_, kbp = P.kb_pad;
    transpose_f32(S.ds.data(), kbp, S.dpt.data(), kCols, nk, Cp);  // ds[c][0:nk]
    for (int64_t c = 0; c < C; ++c) S.dqp[c] = dq_ + S.cols[c] * P.D_pad;
#ifdef SPARSE_ATTN_BF16_DOT
    if constexpr (kDot) {
      for (int64_t c = 0; c < C; ++c) {
        float* row = S.ds.data() + c * kbp;
        std::fill(row + nk, row + kbp, 0.f);  // an odd nk's last pair: (dS, 0), never stale
        floats_to_bf16_pairs(S.w.dsq.data() + c * kbp / 2, row, kbp);
      }
      gemm_bf16<true>(C, P.D_pad, (nk + 1) / 2, S.w.dsqp.data(), S.w.kint.data(), P.D_pad, S.dqp.data(),
                      S.ones.data());
      return;
    }
#endif
    gemm_rows<true>(C, P.D_pad, nk, S.dsp.data(), S.kr.data(), P.D_pad, S.dqp.data(), S.ones.data());
  }

  // the probabilities and dS of the chunk's columns: st = P^T, dpt = dS^T (rows: keys)
  void softmax_grad(DkvScratch& S, int64_t C, int64_t Cp, bool masked) {
    for (int64_t r = 0; r < nk_; ++r) {
      float* s = S.stp[r];
      float* dp = S.dptp[r];
      if (P.cap > 0.f) softcap_row_grad(s, S.dcap.data(), Cp, P.cap);
      // a masked chunk's columns are consecutive (run(): S.cols[c] = S.cols[0] + c)
      if (masked) hide_queries(s, S.cols[0], C, P.G, P.off, j0_ + r, P.causal, P.window, P.sinks, kNegInf);
      exp2_sub_cols(s, S.lse2.data(), Cp);  // s = P^T
      const float* dl = S.delta.data();
#pragma omp simd
      for (int64_t c = 0; c < Cp; ++c) dp[c] = s[c] * (dp[c] - dl[c]);  // dp = dS^T
      if (P.cap > 0.f) {
        const float* dc = S.dcap.data();
#pragma omp simd
        for (int64_t c = 0; c < Cp; ++c) dp[c] *= dc[c];
      }
    }
  }

  // the chunk's statistics (lse in base 2, delta) per column; padding columns get P = 0
  void column_stats(DkvScratch& S, int64_t C, int64_t Cp) {
    for (int64_t c = 0; c < Cp; ++c) {
      if (c >= C) {
        S.lse2[c] = kInf, S.delta[c] = 0.f;
        continue;
      }
      const int64_t t = S.cols[c] / P.G, hq = h_ * P.G + S.cols[c] % P.G;
      const int64_t stat = (b_ * P.Hq + hq) * P.sq + t;
      S.lse2[c] = P.lse[stat] * kLog2eB;
      S.delta[c] = P.delta[stat];
    }
  }

#ifdef SPARSE_ATTN_BF16_DOT
  // columns() on the bf16 dot-product path
  void columns_bf16(DkvScratch& S, bool masked) {
    auto& W = S.w;
    const int64_t C = S.cols.size(), Cp = round_up(C, kVec), G = P.G, nk = nk_;
    const int64_t Dw = (P.D + 1) / 2, Dvw = (P.Dv + 1) / 2;
    for (int64_t c = 0; c < Cp; ++c) {  // the columns' Q and dO rows, bf16 words (padding: zeros)
      uint32_t* qr = W.qrow.data() + c * Dw;
      uint32_t* dr = W.drow.data() + c * Dvw;
      if (c >= C) {
        std::fill_n(qr, Dw, 0u), std::fill_n(dr, Dvw, 0u);
        continue;
      }
      const int64_t t = S.cols[c] / G, hq = h_ * G + S.cols[c] % G;
      copy_words(qr, reinterpret_cast<const uint16_t*>(Q + b_ * P.qst[0] + hq * P.qst[1] + t * P.qst[2]), P.D,
                 P.qst[3]);
      copy_words(dr, reinterpret_cast<const uint16_t*>(dO + b_ * P.dost[0] + hq * P.dost[1] + t * P.dost[2]), P.Dv,
                 P.dost[3]);
    }
    column_stats(S, C, Cp);
    const auto* q16 = reinterpret_cast<const uint16_t*>(W.qrow.data());
    const auto* d16 = reinterpret_cast<const uint16_t*>(W.drow.data());
    pack_k_pairs(W.qT.data(), kCols, q16, 2 * Dw, 1, Cp, 2 * Dw);
    pack_k_pairs(W.doT.data(), kCols, d16, 2 * Dvw, 1, Cp, 2 * Dvw);
    gemm_bf16<false>(nk, Cp, Dw, W.kwp.data(), W.qT.data(), kCols, S.stp.data(), nullptr, P.qmul);  // S^T
    gemm_bf16<false>(nk, Cp, Dvw, W.vwp.data(), W.doT.data(), kCols, S.dptp.data(), nullptr);      // dP^T
    softmax_grad(S, C, Cp, masked);
    for (int64_t r = 0; r < nk; ++r) {
      floats_to_bf16_pairs(W.pw.data() + r * kCols / 2, S.stp[r], Cp);
      floats_to_bf16_pairs(W.dsw.data() + r * kCols / 2, S.dptp[r], Cp);
    }
    for (int64_t pr = 0; pr < Cp / 2; ++pr) {  // pairs of columns interleaved, for the products over columns
      interleave_bf16_rows(W.doi.data() + pr * P.Dv_pad, d16 + 2 * pr * 2 * Dvw, d16 + (2 * pr + 1) * 2 * Dvw, P.Dv);
      interleave_bf16_rows(W.qi.data() + pr * P.D_pad, q16 + 2 * pr * 2 * Dw, q16 + (2 * pr + 1) * 2 * Dw, P.D);
    }
    gemm_bf16<true>(nk, P.Dv_pad, Cp / 2, W.pwp.data(), W.doi.data(), P.Dv_pad, S.dvp.data(), S.ones.data());
    gemm_bf16<true>(nk, P.D_pad, Cp / 2, W.dswp.data(), W.qi.data(), P.D_pad, S.dkp.data(), S.ones.data());
    if (dq_ != nullptr) add_dq(S, C, Cp);
  }
#endif

  // one chunk of query columns S.cols (x = t * G + g: token t, head h * G + g)
  void columns(DkvScratch& S, bool masked) {
#ifdef SPARSE_ATTN_BF16_DOT
    if constexpr (kDot) {
      columns_bf16(S, masked);
      return;
    }
#endif
    const int64_t C = S.cols.size(), Cp = round_up(C, kVec), G = P.G, D = P.D, Dv = P.Dv;
    const int64_t b = b_, h = h_;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t t = S.cols[c] / G, hq = h * G + S.cols[c] % G;
      float* qr = S.qr.data() + c * P.D_pad;
      float* dr = S.dor.data() + c * P.Dv_pad;
      load_row<DT>(qr, Q + b * P.qst[0] + hq * P.qst[1] + t * P.qst[2], D, P.qst[3], P.qmul);
      load_row<DT>(dr, dO + b * P.dost[0] + hq * P.dost[1] + t * P.dost[2], Dv, P.dost[3], 1.f);
      for (int64_t x = D; x < P.D_pad; ++x) qr[x] = 0.f;
      for (int64_t x = Dv; x < P.Dv_pad; ++x) dr[x] = 0.f;
    }
    for (int64_t c = C; c < Cp; ++c) {  // padding columns: zero inputs
      std::fill_n(S.qr.data() + c * P.D_pad, P.D_pad, 0.f);
      std::fill_n(S.dor.data() + c * P.Dv_pad, P.Dv_pad, 0.f);
    }
    column_stats(S, C, Cp);
    // Q^T and dO^T from the rows (zero-padded to D_pad / Dv_pad columns and Cp rows)
    transpose_f32(S.qt.data(), kCols, S.qr.data(), P.D_pad, Cp, D);
    transpose_f32(S.dot.data(), kCols, S.dor.data(), P.Dv_pad, Cp, Dv);
    const int64_t nk = nk_;
    gemm_rows<false>(nk, Cp, D, S.krp.data(), S.qt.data(), kCols, S.stp.data(), nullptr);   // S^T
    gemm_rows<false>(nk, Cp, Dv, S.vrp.data(), S.dot.data(), kCols, S.dptp.data(), nullptr);  // dP^T
    softmax_grad(S, C, Cp, masked);
    gemm_rows<true>(nk, P.Dv_pad, C, S.stp.data(), S.dor.data(), P.Dv_pad, S.dvp.data(), S.ones.data());
    gemm_rows<true>(nk, P.D_pad, C, S.dptp.data(), S.qr.data(), P.D_pad, S.dkp.data(), S.ones.data());
    if (dq_ != nullptr) add_dq(S, C, Cp);  // fused schedule
  }

  const BwdParams& P;
  const In *Q, *K, *V, *dO;
  Out *dK, *dV;
  int64_t b_ = 0, h_ = 0, j0_ = 0, nk_ = 0;
  float* dq_ = nullptr;  // the fused schedule's dq accumulator while run_fused runs
};

// `total` tasks over min(threads, total) threads, taken in order from a shared counter (dynamic
// scheduling: tasks differ in cost); each thread builds its scratch and runner once with make()
// and runs task t with run(that, t)
template <typename Make, typename Run>
void dynamic_tasks(int64_t total, Make&& make, Run&& run) {
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    FlushToZero ftz;
    auto w = make();
    for (int64_t t; (t = next.fetch_add(1)) < total;) run(w, t);
  });
}

// The fused schedule has one task per (batch, kv head): worth it where those tasks keep every
// thread busy (at least one each, and the last round at least 80% full), else the two passes'
// finer tasks balance better.
bool fused_pays(int64_t tasks, int64_t nthreads) {
  if (tasks < nthreads) return false;
  const int64_t rounds = (tasks + nthreads - 1) / nthreads;
  return tasks >= 0.8 * double(rounds * nthreads);
}

template <int DT>
void run_bwd(const BwdParams& P, const void* q, const void* k, const void* v, const void* dout, void* dq, void* dk,
             void* dv, int64_t mode) {
  using In = typename Elem<DT>::T;
  using Out = OutOf<DT>;
  const In *Q = static_cast<const In*>(q), *K = static_cast<const In*>(k), *V = static_cast<const In*>(v),
           *dO = static_cast<const In*>(dout);
  const int64_t BH = P.B * P.Hkv;
  const bool fused = mode == 2 || (mode == 0 && fused_pays(BH, at::get_num_threads()));
  auto dkv_runner = [&](bool with_dq) {
    return std::make_pair(DkvScratch(P, DkvRunner<DT>::kDot, with_dq),
                          DkvRunner<DT>(P, Q, K, V, dO, static_cast<Out*>(dk), static_cast<Out*>(dv)));
  };
  if (fused) {  // one task per (batch, kv head): dk, dv and dq
    dynamic_tasks(BH, [&] { return dkv_runner(true); }, [&](auto& w, int64_t t) {
      w.second.run_fused(w.first, t / P.Hkv, t % P.Hkv, static_cast<Out*>(dq));
    });
    return;
  }
  // dq: heaviest (late, causal) tiles first
  dynamic_tasks(
      BH * P.M,
      [&] { return std::make_pair(DqScratch(P, DqRunner<DT>::kDot), DqRunner<DT>(P, Q, K, V, dO, static_cast<Out*>(dq))); },
      [&](auto& w, int64_t t) {
        const int64_t i = P.M - 1 - t / BH, bh = t % BH;
        w.second.run(w.first, bh / P.Hkv, bh % P.Hkv, i);
      });
  // dk, dv: heaviest (early, causal) key blocks first
  dynamic_tasks(BH * P.nb, [&] { return dkv_runner(false); }, [&](auto& w, int64_t t) {
    const int64_t n = t / BH, bh = t % BH;
    w.second.run(w.first, bh / P.Hkv, bh % P.Hkv, n);
  });
}

torch::Tensor as_lists(const torch::Tensor& x) { return x.to(torch::kInt32).contiguous(); }

// Packed varlen: PS[s] is sequence s's BwdParams (its lengths, layout rows, lse / delta blocks);
// its rows sit at qoff[s] / koff[s] of the packed q, dO / k, v; dq, dk, dv are written as per-sequence
// (H, S_s, *) blocks at H * offset. Tasks over all sequences at once: fused (sequence, kv head), or
// the two passes' (sequence, kv head, query tile) and (sequence, kv head, key block).
template <int DT>
void run_bwd_varlen(const BwdParams& P0, const std::vector<BwdParams>& PS, const std::vector<int64_t>& qoff,
                    const std::vector<int64_t>& koff, const void* q, const void* k, const void* v, const void* dout,
                    void* dq, void* dk, void* dv, int64_t mode) {
  using In = typename Elem<DT>::T;
  using Out = OutOf<DT>;
  const In *Q = static_cast<const In*>(q), *K = static_cast<const In*>(k), *V = static_cast<const In*>(v),
           *dO = static_cast<const In*>(dout);
  Out *dQ = static_cast<Out*>(dq), *dK = static_cast<Out*>(dk), *dV = static_cast<Out*>(dv);
  const int64_t nseq = static_cast<int64_t>(PS.size()), Hkv = P0.Hkv;
  auto dkv = [&](int64_t s) {
    const BwdParams& P = PS[s];
    return DkvRunner<DT>(P, Q + qoff[s] * P.qst[2], K + koff[s] * P.kst[2], V + koff[s] * P.vst[2],
                         dO + qoff[s] * P.dost[2], dK + P.Hkv * koff[s] * P.D, dV + P.Hkv * koff[s] * P.Dv);
  };
  std::vector<std::array<int64_t, 3>> tasks;
  const bool fused = mode == 2 || (mode == 0 && fused_pays(nseq * Hkv, at::get_num_threads()));
  if (fused) {  // one task per (sequence, kv head): dk, dv and dq; longest sequences first
    for (int64_t s = 0; s < nseq; ++s)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({s, h, 0});
    std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& a, const auto& b) { return PS[a[0]].sk > PS[b[0]].sk; });
    dynamic_tasks(static_cast<int64_t>(tasks.size()), [&] { return DkvScratch(P0, DkvRunner<DT>::kDot, true); },
                  [&](auto& S, int64_t t) {
                    const int64_t s = tasks[t][0];
                    dkv(s).run_fused(S, 0, tasks[t][1], dQ + PS[s].Hq * qoff[s] * PS[s].D);
                  });
    return;
  }
  for (int64_t s = 0; s < nseq; ++s) {
    const BwdParams& P = PS[s];
    if (P.sq == 0) continue;
    for (int64_t i = (P.sk + P.q_block - 1) / P.q_block - 1; i >= P.off / P.q_block; --i)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({s, h, i});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& a, const auto& b) { return a[2] > b[2]; });
  dynamic_tasks(static_cast<int64_t>(tasks.size()), [&] { return DqScratch(P0, DqRunner<DT>::kDot); },
                [&](auto& S, int64_t t) {
                  const auto& w = tasks[t];
                  const BwdParams& P = PS[w[0]];
                  DqRunner<DT> r(P, Q + qoff[w[0]] * P.qst[2], K + koff[w[0]] * P.kst[2], V + koff[w[0]] * P.vst[2],
                                 dO + qoff[w[0]] * P.dost[2], dQ + P.Hq * qoff[w[0]] * P.D);
                  r.run(S, 0, w[1], w[2]);
                });
  tasks.clear();
  for (int64_t s = 0; s < nseq; ++s)  // every key block: one with no query still writes its zeros
    for (int64_t n = 0; n < (PS[s].sk + P0.k_block - 1) / P0.k_block; ++n)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({s, h, n});
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& a, const auto& b) { return a[2] < b[2]; });
  dynamic_tasks(static_cast<int64_t>(tasks.size()), [&] { return DkvScratch(P0, DkvRunner<DT>::kDot, false); },
                [&](auto& S, int64_t t) { dkv(tasks[t][0]).run(S, 0, tasks[t][1], tasks[t][2]); });
}

}  // namespace
}  // namespace sparse_attn_cpu

// Packed varlen backward (see block_sparse_fwd_varlen): out, dout (Tq, Hq, Dv), lse float32 (Hq, Tq);
// the forward's shared layout and its transpose. Returns packed (dq, dk, dv).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> block_sparse_bwd_varlen(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse, torch::Tensor dout,
    torch::Tensor cu_seqlens_q, torch::Tensor cu_seqlens_k, torch::Tensor full_count, torch::Tensor full_index,
    torch::Tensor partial_count, torch::Tensor partial_index, torch::Tensor t_full_count, torch::Tensor t_full_index,
    torch::Tensor t_partial_count, torch::Tensor t_partial_index, int64_t L, int64_t q_block, int64_t k_block,
    bool causal, int64_t window, int64_t sink_tokens, double scale, int64_t mode, double softcap) {
  using namespace sparse_attn_cpu;
  const char* who = "block_sparse_bwd_varlen";
  TORCH_CHECK(mode >= 0 && mode <= 2, who, ": mode must be 0 (auto), 1 (two-pass) or 2 (fused), got ", mode);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3 && dout.dim() == 3, who,
              ": q, k, v, out, dout must be 3-D (T, H, D)");
  for (const auto* t : {&q, &k, &v, &out, &lse, &dout, &cu_seqlens_q, &cu_seqlens_k})
    TORCH_CHECK(t->device().is_cpu(), who, ": CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16, who,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && dout.scalar_type() == dt && out.scalar_type() == dt,
              who, ": q, k, v, out, dout must share one dtype");
  TORCH_CHECK(q_block > 0 && k_block > 0 && L >= 0, who, ": q_block, k_block must be positive and L >= 0");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, who, ": softcap must be finite and >= 0 (0: off)");
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2), Tk = k.size(0), Hkv = k.size(1), Dv = v.size(2);
  TORCH_CHECK(v.size(0) == Tk && v.size(1) == Hkv && k.size(2) == D, who, ": q, k, v shapes disagree");
  TORCH_CHECK(out.sizes() == torch::IntArrayRef({Tq, Hq, Dv}) && dout.sizes() == out.sizes(), who,
              ": out and dout must be (Tq, Hq, Dv)");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.sizes() == torch::IntArrayRef({Hq, Tq}), who,
              ": lse must be float32 (Hq, Tq)");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, who, ": Hq must be a multiple of Hkv");
  auto cq = cu_seqlens_q.to(torch::kInt64).contiguous(), ck = cu_seqlens_k.to(torch::kInt64).contiguous();
  TORCH_CHECK(cq.dim() == 1 && cq.sizes() == ck.sizes() && cq.numel() >= 1, who, ": cu_seqlens must be (nseq + 1,)");
  const int64_t nseq = cq.numel() - 1, M = (L + q_block - 1) / q_block, nb = (L + k_block - 1) / k_block;
  const int64_t *cqp = cq.data_ptr<int64_t>(), *ckp = ck.data_ptr<int64_t>();
  TORCH_CHECK(cqp[0] == 0 && ckp[0] == 0 && cqp[nseq] == Tq && ckp[nseq] == Tk, who,
              ": cu_seqlens must run from 0 to the packed lengths");

  auto fc = as_lists(full_count), fi = as_lists(full_index), pc = as_lists(partial_count),
       pi = as_lists(partial_index);
  auto tfc = as_lists(t_full_count), tfi = as_lists(t_full_index), tpc = as_lists(t_partial_count),
       tpi = as_lists(t_partial_index);
  TORCH_CHECK(fc.dim() == 3 && (fc.size(0) == 1 || fc.size(0) == nseq) && (fc.size(1) == 1 || fc.size(1) == Hkv) &&
                  fc.size(2) == M && fc.sizes() == pc.sizes(),
              who, ": counts must be (1 or nseq, 1 or Hkv, ", M, " query tiles), got ", fc.sizes());
  TORCH_CHECK(fi.dim() == 4 && fi.sizes().slice(0, 3) == fc.sizes() && pi.dim() == 4 &&
                  pi.sizes().slice(0, 3) == pc.sizes(), who, ": index lists must be (counts' shape, width)");
  for (const auto* t : {&tfc, &tpc})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == fc.size(0) && t->size(1) == fc.size(1) && t->size(2) == nb, who,
                ": transposed counts must be (", fc.size(0), ", ", fc.size(1), ", ", nb, " key blocks), got ", t->sizes());
  TORCH_CHECK(tfi.dim() == 4 && tfi.sizes().slice(0, 3) == tfc.sizes() && tpi.dim() == 4 &&
                  tpi.sizes().slice(0, 3) == tpc.sizes(), who, ": transposed index lists must be (counts' shape, width)");
  check_lists(fc, fi, nb, who, "full");
  check_lists(pc, pi, nb, who, "partial");
  check_lists(tfc, tfi, M, who, "t_full");
  check_lists(tpc, tpi, M, who, "t_partial");

  // per-sequence (Hq, Sq_s) blocks of lse and delta = rowsum(dO * O), float32
  auto delta_p = (dout.to(torch::kFloat32) * out.to(torch::kFloat32)).sum(-1);  // (Tq, Hq)
  auto lse_blk = torch::empty({Hq * Tq}, lse.options()), delta_blk = torch::empty({Hq * Tq}, lse.options());
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t q0 = cqp[s], sq = cqp[s + 1] - q0;
    if (sq <= 0) continue;
    lse_blk.narrow(0, Hq * q0, Hq * sq).view({Hq, sq}).copy_(lse.narrow(1, q0, sq));
    delta_blk.narrow(0, Hq * q0, Hq * sq).view({Hq, sq}).copy_(delta_p.narrow(0, q0, sq).t());
  }

  BwdParams P0{};
  P0.B = 1, P0.Hq = Hq, P0.Hkv = Hkv, P0.G = Hq / Hkv, P0.sq = 0, P0.sk = 0, P0.D = D, P0.Dv = Dv;
  P0.D_pad = round_up(std::max<int64_t>(D, 1), kVec), P0.Dv_pad = round_up(std::max<int64_t>(Dv, 1), kVec);
  P0.q_block = q_block, P0.k_block = k_block, P0.kb_pad = round_up(k_block, kVec);
  P0.M = M, P0.nb = nb, P0.off = 0, P0.tile0 = 0;  // tiles are absolute: the layout's rows
  P0.causal = causal, P0.window = window, P0.sinks = sink_tokens;
  P0.scale = static_cast<float>(scale);
  P0.qmul = static_cast<float>(scale) * kLog2eB;
  P0.cap = static_cast<float>(softcap) * kLog2eB;
  for (auto [dst, t] : {std::make_pair(P0.qst, &q), std::make_pair(P0.kst, &k), std::make_pair(P0.vst, &v),
                        std::make_pair(P0.dost, &dout)})
    dst[0] = 0, dst[1] = t->stride(1), dst[2] = t->stride(0), dst[3] = t->stride(2);
  P0.lb = 1, P0.lh = fc.size(1), P0.wf = fi.size(3), P0.wp = pi.size(3), P0.twf = tfi.size(3), P0.twp = tpi.size(3);
  P0.ti = nullptr, P0.topk = 0, P0.tok = nullptr, P0.tok_off = nullptr, P0.tok_w = 0;

  std::vector<BwdParams> PS(nseq, P0);
  std::vector<int64_t> qoff(nseq), koff(nseq);
  const int64_t per = fc.size(0) == 1 ? 0 : 1;  // a per-sequence layout: its own rows
  int64_t max_sq = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t sq = cqp[s + 1] - cqp[s], sk = ckp[s + 1] - ckp[s];
    TORCH_CHECK(sq >= 0 && sk >= 0, who, ": cu_seqlens must be non-decreasing");
    TORCH_CHECK(sq <= sk, who, ": needs Sq_i <= Sk_i, got ", sq, " > ", sk, " for sequence ", s);
    TORCH_CHECK(sk <= L, who, ": sequence ", s, " has ", sk, " keys, more than the layout's L = ", L);
    BwdParams& P = PS[s];
    P.sq = sq, P.sk = sk, P.off = sk - sq;
    const int64_t r = s * per * P0.lh;  // first (sequence, head) row of this sequence's lists
    P.fc = fc.data_ptr<int32_t>() + r * M, P.pc = pc.data_ptr<int32_t>() + r * M;
    P.fi = fi.data_ptr<int32_t>() + r * M * P0.wf, P.pi = pi.data_ptr<int32_t>() + r * M * P0.wp;
    P.tfc = tfc.data_ptr<int32_t>() + r * nb, P.tpc = tpc.data_ptr<int32_t>() + r * nb;
    P.tfi = tfi.data_ptr<int32_t>() + r * nb * P0.twf, P.tpi = tpi.data_ptr<int32_t>() + r * nb * P0.twp;
    P.lse = lse_blk.data_ptr<float>() + Hq * cqp[s], P.delta = delta_blk.data_ptr<float>() + Hq * cqp[s];
    qoff[s] = cqp[s], koff[s] = ckp[s];
    max_sq = std::max(max_sq, sq);
  }
  P0.sq = max_sq;  // sizes the fused schedule's per-thread dq accumulator

  auto dq_blk = torch::zeros({Hq * Tq * D}, q.options());
  auto dk_blk = torch::zeros({Hkv * Tk * D}, k.options()), dv_blk = torch::zeros({Hkv * Tk * Dv}, v.options());
  if (nseq > 0 && Tq > 0 && Tk > 0) {
    const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr(), *dod = dout.data_ptr();
    with_float_tag(dt, [&](auto tag) {
      run_bwd_varlen<decltype(tag)::value>(P0, PS, qoff, koff, qd, kd, vd, dod, dq_blk.data_ptr(), dk_blk.data_ptr(),
                                           dv_blk.data_ptr(), mode);
    });
  }
  auto dq = torch::empty({Tq, Hq, D}, q.options());
  auto dk = torch::empty({Tk, Hkv, D}, k.options()), dv = torch::empty({Tk, Hkv, Dv}, v.options());
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t q0 = cqp[s], sq = cqp[s + 1] - q0, k0 = ckp[s], sk = ckp[s + 1] - k0;
    if (sq > 0) dq.narrow(0, q0, sq).copy_(dq_blk.narrow(0, Hq * q0 * D, Hq * sq * D).view({Hq, sq, D}).transpose(0, 1));
    if (sk > 0) {
      dk.narrow(0, k0, sk).copy_(dk_blk.narrow(0, Hkv * k0 * D, Hkv * sk * D).view({Hkv, sk, D}).transpose(0, 1));
      dv.narrow(0, k0, sk).copy_(dv_blk.narrow(0, Hkv * k0 * Dv, Hkv * sk * Dv).view({Hkv, sk, Dv}).transpose(0, 1));
    }
  }
  return {dq, dk, dv};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> block_sparse_bwd(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse, torch::Tensor dout,
    torch::Tensor full_count, torch::Tensor full_index, torch::Tensor partial_count, torch::Tensor partial_index,
    torch::Tensor t_full_count, torch::Tensor t_full_index, torch::Tensor t_partial_count,
    torch::Tensor t_partial_index, c10::optional<torch::Tensor> token_index, c10::optional<torch::Tensor> block_tokens,
    c10::optional<torch::Tensor> block_token_offsets, int64_t sq, int64_t sk, int64_t q_block, int64_t k_block,
    bool causal, int64_t window, int64_t sink_tokens, double scale, int64_t mode, double softcap) {
  using namespace sparse_attn_cpu;
  const char* who = "block_sparse_bwd";
  TORCH_CHECK(mode >= 0 && mode <= 2, who, ": mode must be 0 (auto), 1 (two-pass) or 2 (fused), got ", mode);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && out.dim() == 4 && dout.dim() == 4,
              who, ": q, k, v, out, dout must be 4-D (B, H, S, D)");
  for (const auto* t : {&q, &k, &v, &out, &lse, &dout})
    TORCH_CHECK(t->device().is_cpu(), who, ": CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16, who,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && dout.scalar_type() == dt && out.scalar_type() == dt,
              who, ": q, k, v, out, dout must share one dtype");
  TORCH_CHECK(q_block > 0 && k_block > 0, who, ": q_block and k_block must be positive");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, who, ": softcap must be finite and >= 0 (0: off)");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(3) == D, who, ": q, k, v shapes disagree");
  TORCH_CHECK(q.size(2) == sq && k.size(2) == sk && v.size(2) == sk, who, ": lengths disagree with sq/sk");
  TORCH_CHECK(out.sizes() == torch::IntArrayRef({B, Hq, sq, Dv}) && dout.sizes() == out.sizes(), who,
              ": out and dout must be (B, Hq, Sq, Dv)");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.sizes() == torch::IntArrayRef({B, Hq, sq}), who,
              ": lse must be float32 (B, Hq, Sq)");
  TORCH_CHECK(sq >= 0 && sk >= 0 && (!causal || sq <= sk), who, ": need Sq <= Sk for a causal rule");
  auto dq = empty_huge(q.sizes(), q.options(), true);
  auto dk = empty_huge(k.sizes(), k.options(), true);
  auto dv = empty_huge(v.sizes(), v.options(), true);
  if (B == 0 || Hq == 0 || sq == 0 || sk == 0) return {dq, dk, dv};
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, who, ": Hq must be a multiple of Hkv");

  const int64_t off = sk - sq;
  auto floor_div = [](int64_t a, int64_t d) { return a >= 0 ? a / d : -((-a + d - 1) / d); };
  const int64_t tile0 = floor_div(off, q_block), M = (sk + q_block - 1) / q_block - tile0;
  const int64_t nb = (sk + k_block - 1) / k_block;
  if (M <= 0) return {dq, dk, dv};

  auto fc = as_lists(full_count), fi = as_lists(full_index), pc = as_lists(partial_count),
       pi = as_lists(partial_index);
  auto tfc = as_lists(t_full_count), tfi = as_lists(t_full_index), tpc = as_lists(t_partial_count),
       tpi = as_lists(t_partial_index);
  for (const auto* t : {&fc, &pc}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && (t->size(1) == 1 || t->size(1) == Hkv) &&
                    t->size(2) == M,
                who, ": counts must be (1 or B, 1 or Hkv, ", M, " query tiles), got ", t->sizes());
  }
  TORCH_CHECK(fi.dim() == 4 && fi.sizes().slice(0, 3) == fc.sizes() && pi.dim() == 4 &&
                  pi.sizes().slice(0, 3) == pc.sizes() && fc.sizes() == pc.sizes(),
              who, ": index lists must be (counts' shape, width)");
  for (const auto* t : {&tfc, &tpc}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == fc.size(0) && t->size(1) == fc.size(1) && t->size(2) == nb, who,
                ": transposed counts must be (", fc.size(0), ", ", fc.size(1), ", ", nb, " key blocks), got ",
                t->sizes());
  }
  TORCH_CHECK(tfi.dim() == 4 && tfi.sizes().slice(0, 3) == tfc.sizes() && tpi.dim() == 4 &&
                  tpi.sizes().slice(0, 3) == tpc.sizes(),
              who, ": transposed index lists must be (counts' shape, width)");
  check_lists(fc, fi, nb, who, "full");
  check_lists(pc, pi, nb, who, "partial");
  check_lists(tfc, tfi, M, who, "t_full");
  check_lists(tpc, tpi, M, who, "t_partial");

  torch::Tensor ti, tok, tok_off;
  if (token_index.has_value() && token_index->defined() && token_index->size(-1) > 0) {
    ti = as_lists(*token_index);
    TORCH_CHECK(ti.dim() == 4 && ti.size(0) == B && ti.size(1) == Hkv && ti.size(2) == sq, who,
                ": token_index must be (B, Hkv, Sq, topk), got ", ti.sizes());
    check_token_index(ti, nb, who);
    TORCH_CHECK(Hq / Hkv <= kCols, who, ": TopK backward supports at most ", kCols, " query heads per kv head");
    TORCH_CHECK(block_tokens.has_value() && block_token_offsets.has_value(), who,
                ": token_index needs block_tokens and block_token_offsets");
    tok = as_lists(*block_tokens), tok_off = as_lists(*block_token_offsets);
    TORCH_CHECK(tok.dim() == 3 && tok.size(0) == B && tok.size(1) == Hkv, who,
                ": block_tokens must be (B, Hkv, width), got ", tok.sizes());
    TORCH_CHECK(tok_off.dim() == 3 && tok_off.size(0) == B && tok_off.size(1) == Hkv && tok_off.size(2) == nb + 1,
                who, ": block_token_offsets must be (B, Hkv, ", nb + 1, "), got ", tok_off.sizes());
    const int32_t* o = tok_off.data_ptr<int32_t>();
    const int32_t* x = tok.data_ptr<int32_t>();
    const int64_t w = tok.size(2);
    for (int64_t r = 0; r < B * Hkv; ++r) {
      TORCH_CHECK(o[r * (nb + 1)] >= 0, who, ": block_token_offsets must start at >= 0");
      for (int64_t n = 0; n < nb; ++n)
        TORCH_CHECK(o[r * (nb + 1) + n] <= o[r * (nb + 1) + n + 1] && o[r * (nb + 1) + n + 1] <= w, who,
                    ": block_token_offsets must be non-decreasing in [0, ", w, "]");
      for (int64_t e = o[r * (nb + 1)]; e < o[r * (nb + 1) + nb]; ++e)
        TORCH_CHECK(x[r * w + e] >= 0 && x[r * w + e] < sq, who, ": block_tokens must be tokens in [0, ", sq, ")");
    }
  }

  // delta = rowsum(dO * O) and the forward's lse, float32 (B, Hq, Sq)
  auto delta = (dout.to(torch::kFloat32) * out.to(torch::kFloat32)).sum(-1).contiguous();
  auto lsec = lse.contiguous();

  BwdParams P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.sk = sk, P.D = D, P.Dv = Dv;
  P.D_pad = round_up(std::max<int64_t>(D, 1), kVec), P.Dv_pad = round_up(std::max<int64_t>(Dv, 1), kVec);
  P.q_block = q_block, P.k_block = k_block, P.kb_pad = round_up(k_block, kVec);
  P.M = M, P.nb = nb, P.off = off, P.tile0 = tile0;
  P.causal = causal, P.window = window, P.sinks = sink_tokens;
  P.scale = static_cast<float>(scale);
  P.qmul = static_cast<float>(scale) * kLog2eB;
  P.cap = static_cast<float>(softcap) * kLog2eB;
  for (int d = 0; d < 4; ++d)
    P.qst[d] = q.stride(d), P.kst[d] = k.stride(d), P.vst[d] = v.stride(d), P.dost[d] = dout.stride(d);
  P.lse = lsec.data_ptr<float>(), P.delta = delta.data_ptr<float>();
  P.fc = fc.data_ptr<int32_t>(), P.fi = fi.data_ptr<int32_t>(), P.pc = pc.data_ptr<int32_t>(),
  P.pi = pi.data_ptr<int32_t>();
  P.lb = fc.size(0), P.lh = fc.size(1), P.wf = fi.size(3), P.wp = pi.size(3);
  P.tfc = tfc.data_ptr<int32_t>(), P.tfi = tfi.data_ptr<int32_t>(), P.tpc = tpc.data_ptr<int32_t>(),
  P.tpi = tpi.data_ptr<int32_t>();
  P.twf = tfi.size(3), P.twp = tpi.size(3);
  P.ti = ti.defined() ? ti.data_ptr<int32_t>() : nullptr;
  P.topk = ti.defined() ? ti.size(3) : 0;
  P.tok = tok.defined() ? tok.data_ptr<int32_t>() : nullptr;
  P.tok_off = tok_off.defined() ? tok_off.data_ptr<int32_t>() : nullptr;
  P.tok_w = tok.defined() ? tok.size(2) : 0;

  const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr(), *dod = dout.data_ptr();
  with_float_tag(dt, [&](auto tag) {
    run_bwd<decltype(tag)::value>(P, qd, kd, vd, dod, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), mode);
  });
  return {dq, dk, dv};
}

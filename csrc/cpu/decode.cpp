// Split-KV ("flash-decoding") attention forward on the CPU for a few query rows (Sq <= 16).
//
// Decode is memory-bound: the whole cost is reading the visited K/V once. So:
// * per (batch, kv head) the visited keys are cut into segments of <= 128 keys (256 for the
//   float32 products with q held in registers: segment_keys) (the union
//   over the Sq rows; each segment carries a bit mask of the rows that visit it), and the list is
//   split across threads (on the direct bf16 / int8 / fp8 paths over a strided tensor, and over a
//   paged cache where the stream prefetch is on, consecutive segments are then read as runs of up
//   to kRunKeys keys, kPagedRunKeys over pages, with the same arithmetic); every split computes a
//   partial (out, max, sum) for ALL the rows it serves (the G query heads of the group x the Sq
//   tokens), so each K/V byte is read once, then the splits are merged by log-sum-exp;
// * K/V are read in their dtype (bf16 / fp16 / fp32) and converted in registers, 8 floats at a
//   time; float32 accumulation;
// * scores: q . k as dot products vectorised over the head dim, for a tile of rows x keys at once
//   (register-blocked), reduced with a horizontal-add tree (AVX) or lane sums (portable);
//   softmax in base 2 (q pre-scaled by scale * log2 e), online across segments;
// * out += p . V: accumulators of 16 output columns x the tile's rows stay in registers while the
//   segment's keys stream by;
// * bfloat16 on AVX-512 BF16: vdpbf16ps products (P rounded to bf16, float32 sums), about 3x
//   fewer instructions per key than the float32 dot products, which left one core at ~5 GB/s.
//   Head dims 32/64/128/256 multiply straight from the K/V rows (decode_bf16.h: no packing; one
//   core computes ~24 GB/s of K/V from cache, 1.5x the packed path); other head dims pack each
//   segment's K (16 x 16 word transposes) and V (pair interleave) for vec_bf16.h's micro-kernel,
//   with K/V prefetched two segments ahead.
// Which keys a row visits: the token rule (causal, window, sinks) and a block filter: none
// (Dense, SlidingWindow), a BlockSparse layout (read in place, broadcast batch / heads allowed) or
// TopK (forced sink / local blocks + the per-token selection `token_index`). Rows that see no key
// output 0 with lse = +inf; rows that meet a NaN or an infinity output NaN (decode_softmax.h).
// Nothing of size Sq x Sk is allocated; scratch is O(rows x (D + 64)).
//
// The files (docs/kernel_guide.md, "The decode kernel's files"):
//   decode_plan.h     the problem (Params), segments, runs, splits: integer work
//   decode_rows.h     where key j's K/V rows are: a strided tensor or a paged cache's pages
//   decode_f32.h      float32 products on vec.h's 8-float vectors (v8)
//   decode_kcols.h    q . K^T over float32 pages that keep K as columns (the vLLM plugin's)
//   decode_direct.h   what the direct products share: rows per pass, head dims, the paced prefetch
//   decode_bf16.h     bfloat16 products straight from the rows (AVX-512 BF16)
//   decode_int8.h     int8 codes x int16 q / P with integer dot products (AVX-512 VNNI)
//   decode_fp8.h      fp8 codes turned into bf16 words for decode_bf16.h's products (AVX-512 BF16)
//   decode_softmax.h  the online softmax, the split merge, the non-finite rule
//   quant_rows.h, decode_quant.h  int8 / fp8 codes read as floats, their row scales applied
//                     to the scores (K) and the probabilities (V): a quantized cache
//   decode.cpp        this file: one split's loop over its segments, the threads
//   decode_binding.cpp  the Python binding (one DecodeArgs struct), its checks, pool_keys
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/decode_amx.h"   // SPARSE_ATTN_AMX: the same bfloat16 products on AMX tiles
#include "cpu/decode_bf16.h"  // SPARSE_ATTN_BF16_DOT: bfloat16 products with vdpbf16ps, from the rows
#include "cpu/decode_f32.h"
#include "cpu/reuse_clock.h"
#include "cpu/stream_ahead.h"  // a contiguous run's rows asked for ahead of the products
#include "cpu/decode_fp8.h"   // SPARSE_ATTN_FP8_DOT: fp8 codes as bf16 words, the bf16 products
#include "cpu/decode_int8.h"  // SPARSE_ATTN_INT8_DOT: int8 codes x int16 q / P with vpdpwssd
#include "cpu/decode_kcols.h"  // q . K^T over a paged float32 cache keeping K as columns
#include "cpu/decode_plan.h"
#include "cpu/flush_to_zero.h"
#include "cpu/decode_quant.h"
#include "cpu/decode_rows.h"
#include "cpu/decode_softmax.h"
#include "cpu/quant_rows.h"
#include "cpu/vec_bf16.h"     // ... and packed

namespace sparse_attn_decode {
namespace {

using sparse_attn_cpu::round_up;
#ifdef SPARSE_ATTN_BF16_DOT
using sparse_attn_cpu::copy_words;
using sparse_attn_cpu::direct_head_dim;
using sparse_attn_cpu::floats_to_bf16_pairs;
using sparse_attn_cpu::gemm_bf16;
using sparse_attn_cpu::interleave_bf16_rows;
using sparse_attn_cpu::kDirectRows;
using sparse_attn_cpu::kPvAccVectors;
using sparse_attn_cpu::kPvCols;
using sparse_attn_cpu::pack_k_pairs_rows;
using sparse_attn_cpu::Pacer;
using sparse_attn_cpu::pacer_calls;
using sparse_attn_cpu::pv_direct;
using sparse_attn_cpu::pv_one_pass_dim;
using sparse_attn_cpu::pv_rows_per_pass;
using sparse_attn_cpu::qk_direct;
using sparse_attn_cpu::with_chunks;
using sparse_attn_cpu::with_direct_rows;
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif
#ifdef SPARSE_ATTN_FP8_DOT
constexpr bool kHaveFp8Dot = true;
#else
constexpr bool kHaveFp8Dot = false;
#endif
#ifdef SPARSE_ATTN_INT8_DOT
constexpr bool kHaveInt8Dot = true;
#else
constexpr bool kHaveInt8Dot = false;
#endif

constexpr int64_t kPrefetchAhead = 2;  // the packed bf16 path's software prefetch, in segments

// how the direct products of a segment ask for rows ahead of use (Split::segment's argument):
// none; the next segment's rows at the products' pace (Pacer: a paged cache's 128-key segments
// where the stream is off, or a run that does not continue this one); the run's own rows a few KB
// ahead (Streamer: a contiguous run, or a paged run through its padded row table)
enum class Fetch { none, pace, stream };

#ifdef SPARSE_ATTN_AMX
// Tiles pay for R >= 4 query rows per (batch, kv head) only: with one or two rows the scores' C
// tile is 1-2 columns wide and P . V wastes most of the unit, while vdpbf16ps's loop is as short.
// Measured (2-core Sapphire Rapids VM, 2 threads, bf16 paged cache, 64-key pages, tiles / vectors
// time, cache warm in L3 | read from DRAM): R 1 (Hq 8 Hkv 8 D 128, 16K keys) 1.24 | 1.04;
// R 2 (Hq 4 Hkv 2 D 64, 32K) 1.08 | 1.06, at 8K 0.92 | 1.03; R 4 (Hq 32 Hkv 8 D 128) 0.94 | 0.95;
// R 4 (Hq 8 Hkv 2 D 64) 0.87 | 1.00; R 8 (Hq 16 Hkv 2 D 128) 0.56 | 0.69 (docs/kernel_guide.md 8a).
constexpr int64_t kAmxMinRows = 4;
std::atomic<int64_t>& amx_min_rows_ref() {
  static std::atomic<int64_t> rows{kAmxMinRows};
  return rows;
}
bool amx_rows(int64_t R) {
  return R >= amx_min_rows_ref().load(std::memory_order_relaxed) && sparse_attn_cpu::amx_active();
}
#endif

// bf16 dot-product path (bfloat16 on AVX-512 BF16): q rows as bf16 words (unscaled), the segment's
// K pair-packed (transposed) and V pair-packed (rows interleaved), P as bf16 pairs, and the output
// accumulators with rows padded to a multiple of 16 columns (ob); products by vec_bf16.h's
// micro-kernel, the softmax as on the float32 path.
struct DotScratch {
  int64_t Dw = 0, Dvp = 0;
  bool direct = false;  // decode_bf16.h's products (no packing): D and Dv in {32, 64, 128, 256}
  bool amx = false;     // ... on AMX tiles (decode_amx.h), where built, permitted and switched on
#ifdef SPARSE_ATTN_AMX
  sparse_attn_cpu::AmxScratch x;
#endif
  std::vector<uint16_t> zero;
  std::vector<uint32_t> qw, kp, vp, pw;
  std::vector<float> ob;
  std::vector<const uint32_t*> qwp, pwp;
  std::vector<float*> obp;
  static bool direct_path(const Params& P) {
#ifdef SPARSE_ATTN_BF16_DOT
    return direct_head_dim(P.D) && direct_head_dim(P.Dv);
#else
    return false;
#endif
  }
  // `run`: keys per segment at most (the stride of the P rows)
  void init(const Params& P, int64_t run) {
    Dw = (P.D + 1) / 2, Dvp = (P.Dv + 15) / 16 * 16;
    direct = direct_path(P);
#ifdef SPARSE_ATTN_AMX
    amx = direct && amx_rows(P.R);
#endif
    zero.assign(Dvp, 0);
    qw.assign(P.R * Dw, 0u);
    if (!direct) kp.assign(std::max<int64_t>(Dw, 1) * kSeg, 0u), vp.assign(kSeg / 2 * Dvp, 0u);  // packed path only
    pw.assign(P.R * run / 2, 0u), ob.assign(P.R * Dvp, 0.f);
    qwp.resize(P.R), pwp.resize(P.R), obp.resize(P.R);
    for (int64_t i = 0; i < P.R; ++i) pwp[i] = pw.data() + i * run / 2;
  }
};

// int8 products (decode_int8.h): q rows as int16 codes with a multiplier per row, the segment's
// probabilities as int16 pairs with a multiplier per row
struct Int8Scratch {
  bool on = false;  // D and Dv in {32, 64, 128, 256}
  std::vector<int16_t> q, p;
  std::vector<float> qmul, rq, rp;  // qmul per row id; rq / rp per row of a segment
  std::vector<const int16_t*> qp;
  std::vector<const uint32_t*> pp;
  static bool direct_path(const Params& P) {
    return sparse_attn_cpu::direct_head_dim(P.D) && sparse_attn_cpu::direct_head_dim(P.Dv);
  }
  // `run`: keys per segment or run at most (the stride of the P rows)
  void init(const Params& P, int64_t run) {
    on = direct_path(P);
    if (!on) return;
    q.assign(P.R * P.D, 0), p.assign(P.R * run, 0);
    qmul.assign(P.R, 0.f), rq.assign(P.R, 0.f), rp.assign(P.R * (run / 16 + 1), 0.f);  // segments >= 16 keys
    qp.resize(P.R), pp.resize(P.R);
    for (int64_t i = 0; i < P.R; ++i) pp[i] = reinterpret_cast<const uint32_t*>(p.data() + i * run);
  }
};

struct Scratch {
  std::vector<float> q, o, s, m, l, corr;
  std::vector<float> ks, vs;  // a quantized cache: the segment's K / V row scales (decode_quant.h)
  Int8Scratch i8;
  std::vector<const float*> qp;
  std::vector<float*> sp, op;
  std::vector<int32_t> rid;
  DotScratch w;
  // keys per segment at most: P.seg, or long_run_keys on the direct paths over a strided tensor
  // (and a paged cache with the stream on), where runs of consecutive segments are read as one
  // (Split::run, Split::paged_runs)
  int64_t run;
  std::vector<Seg> runs;  // a split's segments merged into runs (run > P.seg)
  std::vector<int64_t> run_first, pair_end;  // runs[e]'s first segment; per sub-segment, its end key pair
  // paged_runs: a paged cache read as runs too (the stream on, K and V sharing pages: Split::paged_runs)
  Scratch(const Params& P, bool bf16_dot, bool int8_dot, bool paged_runs) : run(P.seg) {
    const bool direct = (bf16_dot && DotScratch::direct_path(P)) || (int8_dot && Int8Scratch::direct_path(P));
    if (direct && (!P.table || paged_runs))  // a paged run's row tables want shorter runs (kPagedRunKeys)
      run = P.table ? std::min(long_run_keys(P.R), kPagedRunKeys) : long_run_keys(P.R);
    if (bf16_dot) w.init(P, run);
    if (int8_dot) i8.init(P, run);
    q.assign(P.R * P.Dpad, 0.f);
    o.assign(P.R * std::max<int64_t>(P.Dv, 1), 0.f);
    s.assign(P.R * run, 0.f);
    m.assign(P.R, kNegInf);
    l.assign(P.R, 0.f);
    corr.assign(P.R, 1.f);
    if (P.ksc) ks.assign(run + 16, 1.f), vs.assign(run + 16, 1.f);
    qp.resize(P.R), sp.resize(P.R), op.resize(P.R), rid.resize(P.R);
  }
};

// whether q's dtype QT and K/V's DT (as Split's) run the float32 products: not the bf16 dot
// products, not a quantized cache's codes (Split::kFloatProducts, segment_keys)
constexpr bool float_products(int qt, int dt) {
  return !(qt == 1 && dt == 1 && kHaveBf16Dot) && dt != sparse_attn_cpu::kInt8 && dt != sparse_attn_cpu::kFp8;
}

// QT: q's element tag; DT: K/V's (QT, or sparse_attn_cpu::kInt8 / kFp8 codes of a quantized cache)
template <int QT, int DT>
class Split {
  using In = typename Elem<DT>::T;
  using QIn = typename Elem<QT>::T;

 public:
  static constexpr bool kDot = QT == 1 && DT == 1 && kHaveBf16Dot;
  static constexpr bool kQuant = DT == sparse_attn_cpu::kInt8 || DT == sparse_attn_cpu::kFp8;
  // int8 codes with bf16 / fp16 queries: integer products where D and Dv allow (Int8Scratch::on)
  static constexpr bool kInt8Dot = DT == sparse_attn_cpu::kInt8 && (QT == 1 || QT == 2) && kHaveInt8Dot;
  // fp8 codes with bf16 queries: the bf16 products on codes turned into bf16 words (decode_fp8.h),
  // where D and Dv allow (DotScratch::direct)
  static constexpr bool kFp8Dot = DT == sparse_attn_cpu::kFp8 && QT == 1 && kHaveFp8Dot;
  // the bf16 products' scratch (q as bf16 words, P as bf16 pairs) is needed
  static constexpr bool kBf16Words = kDot || kFp8Dot;

  // the float32 products (K/V in float32 / float16, or bfloat16 without vdpbf16ps)
  static constexpr bool kFloatProducts = float_products(QT, DT);
  static_assert(kFloatProducts == (!kDot && !kQuant));

  // pf: whether the products prefetch rows ahead of use (the reuse clock's verdict: reuse_clock.h);
  // stream: stream_ahead_bytes() as the call read it (stream_ahead.h)
  Split(const Params& P, const QIn* Q, const In* K, const In* V, bool pf, int64_t stream)
      : P(P), Q(Q), K(K), V(V), pf_(pf), stream_(stream) {}

  // rows r = t * G + g (token-major); writes the split's unnormalised out (R x Dv), max, sum
  void run(Scratch& S, int64_t b, int64_t h, const Seg* segs, int64_t nseg, float* po, float* pm, float* pl) {
    const int64_t G = P.G;
    uint32_t need = 0;
    for (int64_t e = 0; e < nseg; ++e) need |= segs[e].rows;
    for (int64_t t = 0; t < P.sq; ++t) {
      if (!(need >> t & 1u)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = t * G + g;
        const QIn* src = Q + b * P.qst[0] + (h * G + g) * P.qst[1] + t * P.qst[2];
#ifdef SPARSE_ATTN_BF16_DOT
        if (kDot || (kFp8Dot && S.w.direct)) {
          copy_words(S.w.qw.data() + row * S.w.Dw, reinterpret_cast<const uint16_t*>(src), P.D, P.qst[3]);
          continue;
        }
#endif
        float* dst = S.q.data() + row * P.Dpad;
        if (kInt8Dot && S.i8.on) {  // int16 codes; the row's multiplier carries scale * log2 e
          for (int64_t d = 0; d < P.D; ++d) dst[d] = Elem<QT>::get(src, d * P.qst[3]);
          S.i8.qmul[row] = sparse_attn_cpu::quantize_q16(dst, P.D, S.i8.q.data() + row * P.D) * P.qmul;
          continue;
        }
        for (int64_t d = 0; d < P.D; ++d) dst[d] = Elem<QT>::get(src, d * P.qst[3]) * P.qmul;
      }
    }
    std::fill(S.o.begin(), S.o.end(), 0.f);
    if constexpr (kDot) std::fill(S.w.ob.begin(), S.w.ob.end(), 0.f);
    std::fill(S.m.begin(), S.m.end(), kNegInf);
    std::fill(S.l.begin(), S.l.end(), 0.f);
    const int64_t skb = P.len(b);
    if (!P.table) {
      const In* kb = K + b * P.kst[0] + h * P.kst[1];
      const In* vb = V + b * P.vst[0] + h * P.vst[1];
      if (S.run > P.seg) {  // direct bf16 / int8 paths: runs of consecutive segments (kRunKeys)
        merge_runs(segs, nseg, S.run, S.runs, S.run_first);
        const int64_t nrun = static_cast<int64_t>(S.runs.size());
        for (int64_t e = 0; e < nrun; ++e) {
          const Seg& cur = S.runs[e];
          const Seg* nx = e + 1 < nrun ? &S.runs[e + 1] : nullptr;
          const Seg* subs = segs + S.run_first[e];
          const int64_t nsub = S.run_first[e + 1] - S.run_first[e];
          // the next run is prefetched (its first kSeg keys) only where it does not continue this
          // one: a continuation the hardware prefetchers fetch by themselves
          const int64_t ahead = nx && nx->j0 != cur.j0 + cur.nk ? std::min<int64_t>(nx->nk, kSeg) : 0;
          const StridedRows<In> ck{kb + cur.j0 * P.kst[2], P.kst[2]}, cv{vb + cur.j0 * P.vst[2], P.vst[2]};
          const StridedRows<In> nk{kb + (nx ? nx->j0 : 0) * P.kst[2], P.kst[2]};
          const StridedRows<In> nv{vb + (nx ? nx->j0 : 0) * P.vst[2], P.vst[2]};
          if constexpr (kQuant) load_scales(P, cur, b, h, S.ks.data(), S.vs.data());
          if (ahead > 0 && pf_) {
            segment(S, cur, ck, cv, skb, nk, nv, ahead, subs, nsub);
          } else if (pf_ && stream_ > 0) {
            segment<StridedRows<In>, Fetch::stream>(S, cur, ck, cv, skb, nk, nv, 0, subs, nsub);
          } else {
            segment<StridedRows<In>, Fetch::none>(S, cur, ck, cv, skb, nk, nv, 0, subs, nsub);
          }
        }
        copy_out(S, po, pm, pl);
        return;
      }
      for (int64_t e = 0; e < nseg; ++e) {
        if (kDot && !S.w.direct && pf_) {  // K and V kPrefetchAhead segments ahead, every line: the bf16
          // products consume a segment faster than the hardware prefetchers fetch 16 rows at once
          for (int64_t f = (e == 0 ? 1 : kPrefetchAhead); f <= kPrefetchAhead && e + f < nseg; ++f) {
            prefetch_rows<In, 1>(StridedRows<In>{kb + segs[e + f].j0 * P.kst[2], P.kst[2]}, segs[e + f].nk, P.D);
            prefetch_rows<In, 1>(StridedRows<In>{vb + segs[e + f].j0 * P.vst[2], P.vst[2]}, segs[e + f].nk, P.Dv);
          }
        }
        const Seg* nx = e + 1 < nseg ? &segs[e + 1] : nullptr;
        if constexpr (kQuant) load_scales(P, segs[e], b, h, S.ks.data(), S.vs.data());
        segment(S, segs[e], StridedRows<In>{kb + segs[e].j0 * P.kst[2], P.kst[2]},
                StridedRows<In>{vb + segs[e].j0 * P.vst[2], P.vst[2]}, skb,
                StridedRows<In>{kb + (nx ? nx->j0 : 0) * P.kst[2], P.kst[2]},
                StridedRows<In>{vb + (nx ? nx->j0 : 0) * P.vst[2], P.vst[2]}, nx ? nx->nk : 0);
      }
      copy_out(S, po, pm, pl);
      return;
    }
    if (S.run > P.seg) {  // the direct products, the stream on, K and V sharing pages (Scratch::run)
      paged_runs(S, b, h, segs, nseg, skb);
      copy_out(S, po, pm, pl);
      return;
    }
    if (nseg > 0) locate_rows(P, K, V, segs[0], b, h, kr_[0], vr_[0]);
    for (int64_t e = 0; e < nseg; ++e) {
      if (e + 1 < nseg) locate_rows(P, K, V, segs[e + 1], b, h, kr_[(e + 1) & 1], vr_[(e + 1) & 1]);
      if (e + 2 < nseg && pf_) touch_pages(P, K, V, segs[e + 2], b, h);  // pages two segments ahead
      if constexpr (kQuant) load_scales(P, segs[e], b, h, S.ks.data(), S.vs.data());
      if (pf_) {
        segment(S, segs[e], TableRows<In>{kr_[e & 1]}, TableRows<In>{vr_[e & 1]}, skb, TableRows<In>{kr_[(e + 1) & 1]},
                TableRows<In>{vr_[(e + 1) & 1]}, e + 1 < nseg ? segs[e + 1].nk : 0);
      } else {
        segment<TableRows<In>, Fetch::none>(S, segs[e], TableRows<In>{kr_[e & 1]}, TableRows<In>{vr_[e & 1]}, skb,
                                      TableRows<In>{kr_[(e + 1) & 1]}, TableRows<In>{vr_[(e + 1) & 1]}, 0);
      }
    }
    copy_out(S, po, pm, pl);
  }

 private:
  void copy_out(const Scratch& S, float* po, float* pm, float* pl) const {
    if constexpr (kDot) {
      for (int64_t r = 0; r < P.R; ++r) std::copy_n(S.w.ob.data() + r * S.w.Dvp, P.Dv, po + r * P.Dv);
    } else {
      std::copy(S.o.begin(), S.o.begin() + P.R * P.Dv, po);
    }
    std::copy(S.m.begin(), S.m.end(), pm);
    std::copy(S.l.begin(), S.l.end(), pl);
  }

  // A paged cache whose pages hold a head's K and V rows together (kv_share_pages: vLLM's layout),
  // with the stream on, is read as a contiguous one is: runs of consecutive segments (merge_runs),
  // q . K^T over a run, then P . V over it, the stream ahead (when prefetching at all: pf_). Each
  // run's K / V row addresses go into one table (locate_rows, across its pages), followed by the
  // next run's first rows (or the last row again after the last run), `pad` of them: the Streamer
  // asks for rows up to the run's keys rounded up to 16 plus its distance + 1, so it reads only the
  // table and walks on across page and run ends alike. Against 128-key segments with the pacer
  // (Sapphire Rapids VM, Dense, 128K keys, Hq 32, Hkv 8, D 128, bf16 on tiles, pages in random
  // order; `python bench/cpu_decode_ab.py --vllm-pages --kinds bf16`): 2 threads 29.6 -> 26.8 ms
  // (64-token pages), 28.9 -> 25.9 (128-token); 1 thread 1.03x (docs/kernel_guide.md 8a). K and V
  // in two pools measured 0.90-0.98x as runs (0.97-1.03x as 512-key runs), so they keep the
  // segments. Runs here are at most kPagedRunKeys (512) keys: 2048-key runs measured 5-8% slower
  // (decode_plan.h). The arithmetic is the segments' (bit-identical), as on a contiguous cache.
  void paged_runs(Scratch& S, int64_t b, int64_t h, const Seg* segs, int64_t nseg, int64_t skb) {
    merge_runs(segs, nseg, S.run, S.runs, S.run_first);
    const int64_t nrun = static_cast<int64_t>(S.runs.size());
    const int64_t pad = sparse_attn_cpu::stream_rows(stream_, std::min(P.D, P.Dv) * int64_t(sizeof(In))) + 16;
    krun_.resize(S.run + pad), vrun_.resize(S.run + pad);
    for (int64_t e = 0; e < nrun; ++e) {
      const Seg& cur = S.runs[e];
      locate_rows(P, K, V, cur, b, h, krun_.data(), vrun_.data());
      int64_t n = cur.nk;
      if (e + 1 < nrun) {
        Seg nx = S.runs[e + 1];
        nx.nk = static_cast<decltype(nx.nk)>(std::min<int64_t>(nx.nk, pad));
        locate_rows(P, K, V, nx, b, h, krun_.data() + n, vrun_.data() + n);
        n += nx.nk;
      }
      for (; n < cur.nk + pad; ++n) krun_[n] = krun_[cur.nk - 1], vrun_[n] = vrun_[cur.nk - 1];
      const Seg* subs = segs + S.run_first[e];
      const int64_t nsub = S.run_first[e + 1] - S.run_first[e];
      if constexpr (kQuant) load_scales(P, cur, b, h, S.ks.data(), S.vs.data());
      const TableRows<In> kr{krun_.data()}, vr{vrun_.data()};
      if (pf_) {
        segment<TableRows<In>, Fetch::stream>(S, cur, kr, vr, skb, kr, vr, 0, subs, nsub);
      } else {
        segment<TableRows<In>, Fetch::none>(S, cur, kr, vr, skb, kr, vr, 0, subs, nsub);
      }
    }
  }

  // the products' hook, called as they read keys j, j + 1: the pacer's step (Fetch::pace), the
  // stream's rows ahead in a segment's first pass over them (`lead`: Fetch::stream), nothing
  template <Fetch F, typename Rows>
  static auto hook(sparse_attn_cpu::Pacer<Rows>& pace, const sparse_attn_cpu::Streamer<Rows>& ahead, bool lead) {
    return [&pace, &ahead, lead]([[maybe_unused]] int64_t j) __attribute__((always_inline)) {
      if constexpr (F == Fetch::pace) pace.step();
      if constexpr (F == Fetch::stream) {
        if (lead) ahead(j);
      }
    };
  }

  // one segment's keys: kr / vr its K / V rows; nkr / nvr the next segment's (next_nk of them),
  // which the direct bf16 path prefetches into L2 while it works
  // F (Fetch): Fetch::pace prefetches the next segment (nkr, nvr: next_nk rows) at the products'
  // pace; Fetch::stream (strided rows, or a paged run's padded row table; next_nk 0) this run's rows
  // ahead of the products;
  // Fetch::none (next_nk must be 0): no prefetch hook at all in the products' loops (a call
  // there, even one that does nothing, makes the compiler spill the accumulators around it)
  // `subs` (nsub > 0): sg is a run of these consecutive segments, each but the last a multiple of
  // 16 keys; the softmax and the P . V rescaling run per sub-segment, so the result is bit-identical
  // to processing them one by one (only the memory access pattern changes)
  template <typename Rows, Fetch F = Fetch::pace>
  void segment(Scratch& S, const Seg& sg, Rows kr, Rows vr, int64_t skb, Rows nkr, Rows nvr, int64_t next_nk,
               const Seg* subs = nullptr, int64_t nsub = 0) {
    const int64_t G = P.G, nk = sg.nk, j0 = sg.j0;
    if (nsub == 0) subs = &sg, nsub = 1;
    if (kDot && P.table && !S.w.direct && pf_) prefetch_rows<In>(vr, nk, P.Dv);  // the V rows are read after the scores: ask for them now
    int64_t cnt = 0;
    for (int64_t t = 0; t < P.sq; ++t) {
      if (!(sg.rows >> t & 1u)) continue;
      for (int64_t g = 0; g < G; ++g, ++cnt) {
        const int64_t row = t * G + g;
        S.qp[cnt] = S.q.data() + row * P.Dpad;
        S.op[cnt] = S.o.data() + row * P.Dv;
        S.sp[cnt] = S.s.data() + cnt * S.run;
        S.rid[cnt] = static_cast<int32_t>(row);
        if constexpr (kBf16Words) {
          S.w.qwp[cnt] = S.w.qw.data() + row * S.w.Dw;
          S.w.obp[cnt] = S.w.ob.data() + row * S.w.Dvp;
        }
        if constexpr (kInt8Dot) {
          S.i8.qp[cnt] = S.i8.q.data() + row * P.D;
          S.i8.rq[cnt] = S.i8.qmul[row];
        }
      }
    }
    if constexpr (kInt8Dot) {
      if (S.i8.on) return segment_codes<Rows, F>(S, sg, kr, vr, skb, nkr, nvr, next_nk, cnt, subs, nsub);
    }
    if constexpr (kFp8Dot) {
      if (S.w.direct) return segment_codes<Rows, F>(S, sg, kr, vr, skb, nkr, nvr, next_nk, cnt, subs, nsub);
    }
#ifdef SPARSE_ATTN_AMX
    if constexpr (kDot) {
      if (S.w.amx) return segment_amx<Rows, F>(S, sg, kr, vr, skb, nkr, nvr, next_nk, cnt, subs, nsub);
    }
#endif
#ifdef SPARSE_ATTN_BF16_DOT
    // direct path: q . K^T in passes of kDirectRows rows, P . V in passes of `rows` rows x `cols`
    // columns; every key pair of every pass steps the pacer, which prefetches the next segment
    // (P . V over up to kDirectRows rows and all Dv 128 / 256 columns in one pass, where `rows` rows
    // per pass would read every V row twice: decode_bf16.h pv_direct_blocked)
    const int64_t cols = std::min<int64_t>(P.Dv, kPvCols), rows = pv_rows_per_pass(cols);
#ifdef SPARSE_ATTN_PV_DIRECT_BLOCKED
    const bool blocked = kDot && S.w.direct && pv_one_pass_dim(P.Dv) && cnt > rows;
#else
    const bool blocked = false;  // Arm: the passes of decode_bf16_neon.h
#endif
    Pacer<Rows> pace{nkr, nvr, next_nk, P.D * int64_t(sizeof(In)), P.Dv * int64_t(sizeof(In)),
                     pacer_calls(nk, cnt, P.Dv, blocked)};
    const sparse_attn_cpu::Streamer<Rows> kahead{kr, P.D * int64_t(sizeof(In)), stream_},
        vahead{vr, P.Dv * int64_t(sizeof(In)), stream_};
    if constexpr (kDot) {  // scores: q . K^T over the segment's keys, scaled by scale * log2 e
      if (S.w.direct) {
        for (int64_t r = 0; r < cnt; r += kDirectRows)
          with_direct_rows(std::min<int64_t>(kDirectRows, cnt - r), [&](auto rg) {
            with_chunks(P.D, [&](auto dc) {
              qk_direct<decltype(rg)::value, decltype(dc)::value>(
                  nk, S.w.qwp.data() + r, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(kr[j]); },
                  S.sp.data() + r, P.qmul, hook<F>(pace, kahead, r == 0));
            });
          });
      } else {
      pack_k_pairs_rows(S.w.kp.data(), kSeg, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(kr[j]); }, 1,
                        nk, P.D);
      gemm_bf16<false>(cnt, round_up(nk, 16), S.w.Dw, S.w.qwp.data(), S.w.kp.data(), kSeg, S.sp.data(), nullptr,
                       P.qmul);
      }
    } else
#endif
    {
      // float32 products: while the first row group's scores run, the segment's V rows (read by
      // P . V right after) are asked for into L2, a row per key, so the requests go out at the
      // pace of the products (one burst of the whole segment's V at the start was mostly dropped:
      // ~12% of the segment's time sat on those prefetches); the next segment's K rows likewise
      // during P . V (below), so both passes keep memory busy. Asking for both in q . K^T left
      // P . V with nothing in flight: 1.03-1.20x slower at 128K keys (float32, Hq 4 Hkv 2 D 64)
      const int64_t vb = P.Dv * int64_t(sizeof(In));
      auto ahead = [&](int64_t j, int n) __attribute__((always_inline)) {
        for (int i = 0; i < n; ++i) sparse_attn_cpu::prefetch_lines<2>(vr[j + i], vb);
      };
      auto none = [](int64_t, int) {};
      // few rows of a small head: q held in registers over the segment (decode_f32.h), when every
      // row group fits (G = 1-2 rows per kv head at D 32-64 with Sq = 1)
      const bool held = !P.kcol && qk_held(cnt, P.D);
      if (P.kcol) {  // K as columns (decode_kcols.h); float32 only (decode_binding.cpp)
        if constexpr (DT == 0 && std::is_same_v<Rows, TableRows<In>>) {
          const int64_t ps = P.page_size, off = nk > 0 ? col_row(K, kr[0], P.D * P.kcol) : 0;
          for (int64_t r = 0; r < cnt; r += kRT) {
            auto group = [&](auto&& hook) {  // rows [r, r + kRT) with the hook (V rows ahead, or none)
              switch (std::min<int64_t>(kRT, cnt - r)) {
                case 4: qk_cols<4>(nk, P.D, P.kcol, ps, off, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
                case 3: qk_cols<3>(nk, P.D, P.kcol, ps, off, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
                case 2: qk_cols<2>(nk, P.D, P.kcol, ps, off, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
                default: qk_cols<1>(nk, P.D, P.kcol, ps, off, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
              }
            };
            r == 0 && pf_ ? group(ahead) : group(none);
          }
        }
      } else if (held) {
        with_held(cnt, P.D, [&](auto rt, auto nq) {
          constexpr int RT = decltype(rt)::value, NQ = decltype(nq)::value;
          pf_ ? qk_rows_held<DT, RT, NQ>(nk, S.qp.data(), kr, S.sp.data(), ahead)
              : qk_rows_held<DT, RT, NQ>(nk, S.qp.data(), kr, S.sp.data(), none);
        });
      }
      for (int64_t r = 0; r < cnt && !held && !P.kcol; r += kRT) {
        auto group = [&](auto&& hook) {  // rows [r, r + kRT) with the hook (V rows ahead, or none)
          switch (std::min<int64_t>(kRT, cnt - r)) {
            case 4: qk_rows<DT, 4>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
            case 3: qk_rows<DT, 3>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
            case 2: qk_rows<DT, 2>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
            default: qk_rows<DT, 1>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r, hook); break;
          }
        };
        r == 0 && pf_ ? group(ahead) : group(none);
      }
    }
    if constexpr (kQuant) scale_rows(S.sp.data(), cnt, nk, S.ks.data());  // q . k = s_k (q . code)
    // token rule, online softmax (base 2), per sub-segment (decode_softmax.h); corr[u * cnt + i]:
    // sub-segment u's rescaling of row i's accumulators
    if (static_cast<int64_t>(S.corr.size()) < nsub * cnt) S.corr.resize(nsub * cnt);
    float* const corr = S.corr.data();
    online_softmax(P, skb, j0, nk, subs, nsub, cnt, S.rid.data(), S.sp.data(), S.m.data(), S.l.data(), corr);
#ifdef SPARSE_ATTN_BF16_DOT
    if constexpr (kDot) {  // out = corr * out + P . V, P rounded to bf16 pairs
      const int64_t np = (nk + 1) / 2;
      S.pair_end.resize(nsub);
      for (int64_t u = 0; u < nsub; ++u) S.pair_end[u] = (subs[u].j0 - j0 + subs[u].nk + 1) / 2;
      for (int64_t i = 0; i < cnt; ++i) floats_to_bf16_pairs(S.w.pw.data() + i * S.run / 2, S.sp[i], round_up(nk, 16));
#ifdef SPARSE_ATTN_PV_DIRECT_BLOCKED
      if (blocked) {
        auto vwords = [&](int64_t j) { return reinterpret_cast<const uint16_t*>(vr[j]); };
        for (int64_t r = 0; r < cnt; r += kDirectRows)
          with_direct_rows(std::min<int64_t>(kDirectRows, cnt - r), [&](auto rg) {
            with_chunks(P.Dv, [&](auto nc) {
              constexpr int RG = std::remove_reference_t<decltype(rg)>::value, NC = decltype(nc)::value;
              if constexpr (NC % 2 == 0)
                sparse_attn_cpu::pv_direct_blocked<RG, NC, 2>(
                    nk, S.w.pwp.data() + r, vwords, S.w.zero.data(), S.w.obp.data() + r, corr + r,
                    hook<F>(pace, vahead, r == 0), nsub, S.pair_end.data(), cnt, sparse_attn_cpu::Bf16Words{});
            });
          });
        return;
      }
#endif
      if (S.w.direct) {  // passes of up to kPvCols columns: whole V rows for Dv <= 128 (decode_bf16.h)
        for (int64_t r = 0; r < cnt; r += rows)
          for (int64_t d0 = 0; d0 < P.Dv; d0 += cols)
            with_direct_rows(std::min<int64_t>(rows, cnt - r), [&](auto rg) {
              with_chunks(cols, [&](auto nc) {
                constexpr int RG = std::remove_reference_t<decltype(rg)>::value, NC = decltype(nc)::value;
                if constexpr (RG * NC <= kPvAccVectors / 2)  // pv_rows_per_pass never asks for more
                  pv_direct<RG, NC>(
                      nk, S.w.pwp.data() + r, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(vr[j]); },
                      S.w.zero.data(), d0, S.w.obp.data() + r, corr + r, hook<F>(pace, vahead, r == 0 && d0 == 0),
                      nsub, S.pair_end.data(), cnt);
              });
            });
        return;
      }
      for (int64_t pr = 0; pr < np; ++pr)
        interleave_bf16_rows(S.w.vp.data() + pr * S.w.Dvp, reinterpret_cast<const uint16_t*>(vr[2 * pr]),
                             2 * pr + 1 < nk ? reinterpret_cast<const uint16_t*>(vr[2 * pr + 1]) : nullptr, P.Dv);
      gemm_bf16<true>(cnt, S.w.Dvp, np, S.w.pwp.data(), S.w.vp.data(), S.w.Dvp, S.w.obp.data(), S.corr.data());
      return;
    }
#endif
    if constexpr (kQuant) scale_rows(S.sp.data(), cnt, nk, S.vs.data());  // p v = (p s_v) code
    // the next segment's K rows into L2 during the first row group's P . V, a row per key
    const int64_t kbytes = P.D * int64_t(sizeof(In));
    auto knext = [&](int64_t j) __attribute__((always_inline)) {
      if (j < next_nk) sparse_attn_cpu::prefetch_lines<2>(nkr[j], kbytes);
    };
    // K as columns: key j's share of its block (decode_kcols.h col_share)
    const int64_t blk = P.D * P.kcol, share = P.kcol ? blk / std::max<int64_t>(1, P.page_size) * int64_t(sizeof(In)) : 0;
    auto kcnext = [&](int64_t j) __attribute__((always_inline)) {
      if constexpr (DT == 0) {
        if (j < next_nk)
          sparse_attn_cpu::prefetch_lines<2>(col_share(reinterpret_cast<const float*>(K),
                                                       reinterpret_cast<const float*>(nkr[j]), blk, P.page_size),
                                             share);
      }
    };
    auto knone = [](int64_t) {};
    for (int64_t r = 0; r < cnt; r += kRT) {
      const float* const* p = const_cast<const float* const*>(S.sp.data() + r);
      auto group = [&](auto&& hook) {  // rows [r, r + kRT) with the hook (the next K rows, or none)
        switch (std::min<int64_t>(kRT, cnt - r)) {
          case 4: pv_rows<DT, 4>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r, hook); break;
          case 3: pv_rows<DT, 3>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r, hook); break;
          case 2: pv_rows<DT, 2>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r, hook); break;
          default: pv_rows<DT, 1>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r, hook); break;
        }
      };
      if (r == 0 && pf_) {
        P.kcol ? group(kcnext) : group(knext);
      } else {
        group(knone);
      }
    }
  }

#ifdef SPARSE_ATTN_AMX
  // segment() on AMX tiles (decode_amx.h), rows already listed (cnt): q . K^T in passes of <= 16
  // rows, the softmax per sub-segment, P spread to the pair halves, P . V per sub-segment and pass.
  // The next segment goes to L2 at the products' pace (Pacer), or a run's rows ahead (Streamer).
  template <typename Rows, Fetch F>
  void segment_amx(Scratch& S, const Seg& sg, Rows kr, Rows vr, int64_t skb, Rows nkr, Rows nvr, int64_t next_nk,
                   int64_t cnt, const Seg* subs, int64_t nsub) {
    using namespace sparse_attn_cpu;
    const int64_t nk = sg.nk, j0 = sg.j0, passes = (cnt + 15) / 16, nk16 = round_up(nk, 16);
    Pacer<Rows> pace{nkr, nvr, next_nk, P.D * int64_t(sizeof(In)), P.Dv * int64_t(sizeof(In)), passes * nk16 / 2};
    const Streamer<Rows> kahead{kr, P.D * int64_t(sizeof(In)), stream_};
    auto words = [](Rows r) { return [r](int64_t j) { return reinterpret_cast<const uint16_t*>(r[j]); }; };
    AmxScratch& X = S.w.x;
    uint16_t* rc = X.rc.get(16 * std::max(P.D, P.Dv));
    float* cb = X.cb.get(16 * 64);
    uint32_t* qb = X.qb.get(16 * ((P.D + 31) / 32) * 16);
    for (int64_t r = 0; r < cnt; r += 16) {
      const int R = static_cast<int>(std::min<int64_t>(16, cnt - r));
      const TileConfig c = qk_tiles(R);
      _tile_loadconfig(&c);
      q_tiles(qb, S.w.qwp.data() + r, R, static_cast<int>(P.D / 32));
      with_chunks(P.D, [&](auto dc) {
        qk_amx<decltype(dc)::value>(nk, R, qb, words(kr), S.sp.data() + r, P.qmul, rc, cb, hook<F>(pace, kahead, r == 0),
                                    passes == 1);
      });
    }
    if (static_cast<int64_t>(S.corr.size()) < nsub * cnt) S.corr.resize(nsub * cnt);
    online_softmax(P, skb, j0, nk, subs, nsub, cnt, S.rid.data(), S.sp.data(), S.m.data(), S.l.data(), S.corr.data());
    uint32_t* pe = X.pe.get(cnt * nk16);
    uint32_t* po = X.po.get(cnt * nk16);
    for (int64_t u = 0; u < nsub; ++u) {  // zero past each sub-segment's end to its 16-key group's
      const int64_t a = subs[u].j0 - j0, n = subs[u].nk;
      for (int64_t i = 0; i < cnt; ++i) spread_p(pe + i * nk16 + a, po + i * nk16 + a, S.sp[i] + a, n);
    }
    for (int64_t r = 0; r < cnt; r += 16) {
      const int R = static_cast<int>(std::min<int64_t>(16, cnt - r));
      const TileConfig c = pv_tiles(R);
      _tile_loadconfig(&c);
      for (int64_t u = 0; u < nsub; ++u) {
        const int64_t a = subs[u].j0 - j0;  // a multiple of 16
        const Streamer<Rows> vahead{vr + a, P.Dv * int64_t(sizeof(In)), stream_};
        pv_amx(subs[u].nk, R, P.Dv, pe + r * nk16 + a, po + r * nk16 + a, nk16 * 4, words(vr + a), rc,
               S.w.obp.data() + r, S.corr.data() + u * cnt + r, cb,
               hook<F == Fetch::stream ? F : Fetch::none>(pace, vahead, r == 0),  // the pacer steps in q . K^T
               passes == 1);
      }
    }
    _tile_release();
  }
#endif

  // segment() for a quantized cache's codes multiplied straight from the rows, rows already listed
  // (cnt): int8 with integer products (decode_int8.h: q and P as int16), fp8 with the bf16 products
  // on codes turned into bf16 words (decode_fp8.h: q as bf16 words, P as bf16 pairs). Scores, the K
  // scales, the softmax (per sub-segment of a run), P times the V scales, P . V; the next segment's
  // K and V go to L2 at the products' pace (Pacer).
  template <typename Rows, Fetch F>
  void segment_codes(Scratch& S, const Seg& sg, Rows kr, Rows vr, int64_t skb, Rows nkr, Rows nvr, int64_t next_nk,
                     int64_t cnt, const Seg* subs, int64_t nsub) {
#if defined(SPARSE_ATTN_INT8_DOT) || defined(SPARSE_ATTN_FP8_DOT)
    using namespace sparse_attn_cpu;
    static_assert(kSeg <= 256, "int8 P . V sums are exact in int32 for sub-segments of at most 256 keys");
    const int64_t nk = sg.nk;
    const int64_t cols = std::min<int64_t>(P.Dv, kPvCols), rows = pv_rows_per_pass(cols);
    // P . V over up to kDirectRows rows and all columns in one pass over the keys where passes of
    // `rows` rows would read every V row twice (int8: decode_int8.h pv_int8_blocked; fp8:
    // decode_bf16.h pv_direct_blocked)
    const bool blocked = ((kInt8Dot && pv_int8_blocks(P.Dv)) || (kFp8Dot && pv_one_pass_dim(P.Dv))) && cnt > rows;
    Pacer<Rows> pace{nkr, nvr, next_nk, P.D, P.Dv, pacer_calls(nk, cnt, P.Dv, blocked)};
    const Streamer<Rows> kahead{kr, P.D, stream_}, vahead{vr, P.Dv, stream_};  // one byte per code
#ifdef SPARSE_ATTN_FP8_DOT
    const Fp8Words words;
    auto codes = [](Rows r) { return [r](int64_t j) { return reinterpret_cast<const uint8_t*>(r[j]); }; };
#endif
    for (int64_t r = 0; r < cnt; r += kDirectRows)
      with_direct_rows(std::min<int64_t>(kDirectRows, cnt - r), [&](auto rg) {
        with_chunks(P.D, [&](auto dc) {
          constexpr int RG = std::remove_reference_t<decltype(rg)>::value, DC = decltype(dc)::value;
#ifdef SPARSE_ATTN_INT8_DOT
          if constexpr (kInt8Dot)
            qk_int8<RG, DC>(nk, S.i8.qp.data() + r, kr, S.sp.data() + r, S.i8.rq.data() + r, S.ks.data(),
                            hook<F>(pace, kahead, r == 0));
#endif
#ifdef SPARSE_ATTN_FP8_DOT
          if constexpr (kFp8Dot)
            qk_direct<RG, DC>(nk, S.w.qwp.data() + r, codes(kr), S.sp.data() + r, P.qmul, hook<F>(pace, kahead, r == 0),
                              words);
#endif
        });
      });
    if constexpr (!kInt8Dot) scale_rows(S.sp.data(), cnt, nk, S.ks.data());  // q . k = s_k (q . code); int8: in qk_int8
    if (static_cast<int64_t>(S.corr.size()) < nsub * cnt) S.corr.resize(nsub * cnt);
    online_softmax(P, skb, sg.j0, nk, subs, nsub, cnt, S.rid.data(), S.sp.data(), S.m.data(), S.l.data(),
                   S.corr.data());
    // p v = (p s_v) code: P times the V scales, per row and sub-segment (sub-segments but the last are
    // multiples of 16 keys, so key pairs do not straddle them): int8 as int16 (u's multiplier at
    // rp[u * cnt + i]), fp8 rounded to bf16 pairs
    S.pair_end.resize(nsub);
    for (int64_t u = 0; u < nsub; ++u) {
      const int64_t a = subs[u].j0 - sg.j0, n = subs[u].nk;
      S.pair_end[u] = (a + n + 1) / 2;
#ifdef SPARSE_ATTN_INT8_DOT
      if constexpr (kInt8Dot)
        for (int64_t i = 0; i < cnt; ++i)
          S.i8.rp[u * cnt + i] = quantize_p16(S.sp[i] + a, S.vs.data() + a, n, S.i8.p.data() + i * S.run + a);
#endif
    }
#ifdef SPARSE_ATTN_FP8_DOT
    if constexpr (kFp8Dot) {
      scale_rows(S.sp.data(), cnt, nk, S.vs.data());
      for (int64_t i = 0; i < cnt; ++i) floats_to_bf16_pairs(S.w.pw.data() + i * S.run / 2, S.sp[i], round_up(nk, 16));
    }
#endif
    if (blocked) {
      for (int64_t r = 0; r < cnt; r += kDirectRows)
        with_direct_rows(std::min<int64_t>(kDirectRows, cnt - r), [&](auto rg) {
          with_chunks(P.Dv, [&](auto nc) {
            constexpr int RG = std::remove_reference_t<decltype(rg)>::value, NC = decltype(nc)::value;
            if constexpr (NC % 2 == 0) {  // Dv 128 / 256 (`blocked`): 64 columns at a time
#ifdef SPARSE_ATTN_INT8_PV_BLOCKED
              if constexpr (kInt8Dot)
                pv_int8_blocked<RG, NC, 2>(nk, S.i8.pp.data() + r, vr, S.op.data() + r, S.corr.data() + r,
                                           S.i8.rp.data() + r, hook<F>(pace, vahead, r == 0), nsub, S.pair_end.data(),
                                           cnt);
#endif
#ifdef SPARSE_ATTN_FP8_DOT
              if constexpr (kFp8Dot)
                pv_direct_blocked<RG, NC, 2>(nk, S.w.pwp.data() + r, codes(vr),
                                             reinterpret_cast<const uint8_t*>(S.w.zero.data()), S.op.data() + r,
                                             S.corr.data() + r, hook<F>(pace, vahead, r == 0), nsub, S.pair_end.data(),
                                             cnt, words);
#endif
            }
          });
        });
      return;
    }
    for (int64_t r = 0; r < cnt; r += rows)
      for (int64_t d0 = 0; d0 < P.Dv; d0 += cols)
        with_direct_rows(std::min<int64_t>(rows, cnt - r), [&](auto rg) {
          with_chunks(cols, [&](auto nc) {
            constexpr int RG = std::remove_reference_t<decltype(rg)>::value, NC = decltype(nc)::value;
            if constexpr (RG * NC <= kPvAccVectors / 2) {  // pv_rows_per_pass never asks for more
#ifdef SPARSE_ATTN_INT8_DOT
              if constexpr (kInt8Dot)
                pv_int8<RG, NC>(nk, S.i8.pp.data() + r, vr, d0, S.op.data() + r, S.corr.data() + r,
                                S.i8.rp.data() + r, hook<F>(pace, vahead, r == 0 && d0 == 0), nsub, S.pair_end.data(),
                                cnt);
#endif
#ifdef SPARSE_ATTN_FP8_DOT
              if constexpr (kFp8Dot)  // an odd nk's missing key reads Dv zero codes
                pv_direct<RG, NC>(nk, S.w.pwp.data() + r, codes(vr), reinterpret_cast<const uint8_t*>(S.w.zero.data()),
                                  d0, S.op.data() + r, S.corr.data() + r, hook<F>(pace, vahead, r == 0 && d0 == 0), nsub,
                                  S.pair_end.data(), cnt, words);
#endif
            }
          });
        });
#else
    (void)S, (void)sg, (void)kr, (void)vr, (void)skb, (void)nkr, (void)nvr, (void)next_nk, (void)cnt, (void)subs,
        (void)nsub;
#endif
  }

  const Params& P;
  const QIn* Q;
  const In *K, *V;
  const bool pf_;
  const int64_t stream_;  // bytes the stream runs ahead (stream_ahead.h; 0: off), read once per call
  std::vector<const In*> krun_, vrun_;  // paged runs: K / V row addresses of a run and `pad` more
  const In* kr_[2][kSegMax];  // paged: K / V row addresses of the current and the next segment
  const In* vr_[2][kSegMax];
};

template <int QT, int DT, typename OutT>
void run_all(const Params& P, const void* q, const void* k, const void* v, OutT* out, float* lse) {
  using In = typename Elem<DT>::T;
  using QIn = typename Elem<QT>::T;
  const int64_t BH = P.B * P.Hkv, R = P.R, Dv = P.Dv;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());

  // 1. the visited segments of every (batch, kv head): O(Sq x blocks) integer work each, done
  // here when small (a parallel region costs a barrier, and on a busy machine a barrier can cost
  // a scheduler time slice)
  std::vector<std::vector<Seg>> segs(BH);
  const int64_t nb = (P.sk + P.unit - 1) / P.unit;
  auto build = [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> mask;
    for (int64_t bh = lo; bh < hi; ++bh) build_segments(P, bh / P.Hkv, bh % P.Hkv, mask, segs[bh]);
  };
  if (BH * (nb + 1) * P.sq <= (int64_t(1) << 20)) {
    build(0, BH);
  } else {
    at::parallel_for(0, BH, 1, build);
  }

  // whether the products prefetch rows ahead of use: not where this cache was read so recently
  // that its rows are probably still cached (reuse_clock.h). Every call is a read on the clock,
  // whatever its mode (`DecodeArgs.prefetch` overrides the answer only); quantized caches count
  // on it but always prefetch in auto mode (their products were not measured faster without)
  bool pf = P.prefetch == 1;
  const int64_t stream = sparse_attn_cpu::stream_ahead_bytes().load(std::memory_order_relaxed);
  const bool paged_runs = stream > 0 && kv_share_pages(P, static_cast<const In*>(k), static_cast<const In*>(v));
  {
    int64_t keys = 0;
    for (const auto& sv : segs)
      for (const Seg& sg : sv) keys += sg.nk;
    const uint64_t bytes = uint64_t(keys) * uint64_t(P.D + P.Dv) * sizeof(In);
    // bf16 / fp16 rows read fast enough that a TLB miss per 4 KB shows: past ~8 MB (2048 pages of
    // 4 KB: a second-level TLB's reach) their pages need the prefetches' walks even when cached
    const uint64_t budget = Split<QT, DT>::kFloatProducts ? uint64_t(llc_bytes()) / 2
                                                          : std::min<uint64_t>(uint64_t(llc_bytes()) / 2, 8u << 20);
    const bool warm = reuse_clock().warm(k, bytes, budget) && !Split<QT, DT>::kQuant;
    if (P.prefetch < 0) pf = !warm;
  }

  // 2. splits: ~4 units of work per thread over all (batch, kv head) (decode_plan.h)
  const SplitPlan plan(segs, nthreads, P.seg);
  const int64_t units = plan.units;
  const std::vector<int64_t>& first = plan.first;
  const std::vector<int64_t>& nsplit = plan.nsplit;
  std::vector<float> po(units * R * Dv), pm(units * R), pl(units * R);
  // splits still running per (batch, kv head): the thread that finishes the last one merges
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[BH]);
  for (int64_t bh = 0; bh < BH; ++bh) left[bh].store(nsplit[bh]);

  // 3. one parallel region: splits handed out dynamically, merged by log-sum-exp when complete
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    sparse_attn_cpu::FlushToZero ftz;
    Scratch S(P, Split<QT, DT>::kBf16Words, Split<QT, DT>::kInt8Dot, paged_runs);
    std::vector<float> acc, w;
    Split<QT, DT> split(P, static_cast<const QIn*>(q), static_cast<const In*>(k), static_cast<const In*>(v), pf,
                        stream);
    for (;;) {
      const int64_t u = next.fetch_add(1);
      if (u >= units) break;
      const int64_t bh = plan.head_of(u), ns = nsplit[bh], b = bh / P.Hkv, h = bh % P.Hkv;
      int64_t s0, s1;
      plan.range(u, bh, static_cast<int64_t>(segs[bh].size()), s0, s1);
      split.run(S, b, h, segs[bh].data() + s0, s1 - s0, po.data() + u * R * Dv, pm.data() + u * R,
                pl.data() + u * R);
      if (left[bh].fetch_sub(1, std::memory_order_acq_rel) == 1)
        merge<OutT>(P, b, h, ns, po.data() + first[bh] * R * Dv, pm.data() + first[bh] * R, pl.data() + first[bh] * R,
                    out, lse, acc, w);
    }
  };
  const int64_t workers = std::min(nthreads, units);
  if (workers <= 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, workers, 1, work);
  }
  reuse_clock().done(k);
}

}  // namespace

namespace {
// q's dtype QT (out in it), K/V's: the same, or int8 / fp8 codes
template <int QT, typename OutT>
void run_kv(const Params& P, int kv_dtype, const void* q, const void* k, const void* v, void* out, float* lse) {
  using sparse_attn_cpu::kFp8;
  using sparse_attn_cpu::kInt8;
  if (kv_dtype == kInt8) {
    run_all<QT, kInt8, OutT>(P, q, k, v, static_cast<OutT*>(out), lse);
  } else if (kv_dtype == kFp8) {
    run_all<QT, kFp8, OutT>(P, q, k, v, static_cast<OutT*>(out), lse);
  } else {
    run_all<QT, QT, OutT>(P, q, k, v, static_cast<OutT*>(out), lse);
  }
}
}  // namespace

void run_decode(const Params& P, int dtype, int kv_dtype, const void* q, const void* k, const void* v, void* out,
                float* lse) {
  if (dtype == 0) {
    run_kv<0, float>(P, kv_dtype, q, k, v, out, lse);
  } else if (dtype == 1) {
    run_kv<1, c10::BFloat16>(P, kv_dtype, q, k, v, out, lse);
  } else {
    run_kv<2, c10::Half>(P, kv_dtype, q, k, v, out, lse);
  }
}

int64_t segment_keys(int dtype, int kv_dtype, int64_t R, int64_t D) {
  return float_products(dtype, kv_dtype) && qk_held(R, D) ? kLongSeg : kSeg;
}

// the same rules as Split's dispatch (kInt8Dot / kFp8Dot with Int8Scratch::on / DotScratch::direct,
// kDot with DotScratch::direct / amx, qk_held on the float32 products), in words
std::string decode_products(int dtype, int kv_dtype, int64_t R, int64_t D, int64_t Dv) {
  const bool direct = sparse_attn_cpu::direct_head_dim(D) && sparse_attn_cpu::direct_head_dim(Dv);
  if (kv_dtype == sparse_attn_cpu::kInt8)
    return kHaveInt8Dot && (dtype == 1 || dtype == 2) && direct ? "int8 codes x int16 q / P, integer dot products"
                                                                  : "int8 codes as floats, float32 products";
  if (kv_dtype == sparse_attn_cpu::kFp8)
    return kHaveFp8Dot && dtype == 1 && direct ? "fp8 codes as bf16 words, bfloat16 dot products"
                                               : "fp8 codes as floats, float32 products";
  if (!float_products(dtype, kv_dtype)) {
    if (!direct) return "bfloat16 dot products on packed K/V (head dims other than 32 / 64 / 128 / 256)";
#ifdef SPARSE_ATTN_AMX
    if (amx_rows(R))
      return "bfloat16 products on AMX tiles (csrc/cpu/decode_amx.h; SPARSE_ATTN_CPU_AMX=0 turns them off)";
    if (sparse_attn_cpu::amx_active())
      return "bfloat16 dot products from the rows (AMX tiles from " + std::to_string(amx_min_rows()) +
             " query rows per kv head; this call has " + std::to_string(R) + ")";
    return "bfloat16 dot products from the rows (AMX tiles switched off or refused)";
#else
    return "bfloat16 dot products from the rows";
#endif
  }
  return qk_held(R, D) ? "float32 products, q held in registers" : "float32 products";
}

bool bf16_dot_enabled() { return kHaveBf16Dot; }
#ifdef SPARSE_ATTN_AMX
bool amx_built() { return true; }
bool amx_enabled() { return sparse_attn_cpu::amx_active(); }
void set_amx(bool on) { sparse_attn_cpu::amx_switch().store(on ? 1 : 0); }
int64_t amx_min_rows() { return amx_min_rows_ref().load(); }
void set_amx_min_rows(int64_t rows) { amx_min_rows_ref().store(rows); }
#else
bool amx_built() { return false; }
bool amx_enabled() { return false; }
void set_amx(bool) {}
int64_t amx_min_rows() { return 0; }
void set_amx_min_rows(int64_t) {}
#endif
bool int8_dot_enabled() { return kHaveInt8Dot; }
bool fp8_dot_enabled() { return kHaveFp8Dot; }

}  // namespace sparse_attn_decode

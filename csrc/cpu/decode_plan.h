// The CPU decode kernel's problem and its plan: which keys each query row visits, cut into
// segments, grouped into runs, and dealt out to threads as splits. Integer work only; the
// arithmetic is in decode.cpp and the headers it includes.
//
// * Params: the problem as the binding (decode_binding.cpp) fills it: shapes, strides, the token
//   rule (causal, window, sinks), the block filter (none, a BlockSparse layout, a TopK selection),
//   per-sequence lengths and a paged cache's page table.
// * Segments: per (batch, kv head), the union over the Sq rows of their visited keys, cut into
//   pieces of at most P.seg keys that never cross a filter block; each carries a bit mask of the
//   rows that visit it. Segments are cut by position, never by page, so a paged cache reads the
//   same segments as a contiguous one (and gets the same bits).
// * Runs: consecutive segments (next keys, same rows) read as one (the direct bf16 path over a
//   strided tensor): q . K^T and P . V over up to kRunKeys keys, the softmax still per segment.
// * Splits: each (batch, kv head)'s segment list cut into a few splits, handed to threads; the
//   splits' partial results are merged by log-sum-exp (decode_softmax.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace sparse_attn_decode {

// keys per segment (scores scratch: rows x Params::seg). 128 rather than 64: the per-segment work
// (row setup, softmax bookkeeping, the products' prologues) took ~12% less of the bf16 direct
// path's compute from cache (one Zen 4 core, Hkv=8, D=128, G=4)
constexpr int64_t kSeg = 128;
// ... and kLongSeg for the float32 products with q held in registers (decode_f32.h's qk_held: one
// or two rows per kv head of a small head, the tiny-model shape), whose keys cost so little each
// that the per-segment work and the switches between the K and the V pages showed: 256-key
// segments took 3-7% less (paged, one Zen 4 core, cache warm in L3: segment_keys in decode.cpp).
// A shape's segment length never depends on the cache's kind or state: paged and contiguous
// caches, warm and cold, keep the same bits.
constexpr int64_t kLongSeg = 256;
constexpr int64_t kSegMax = kLongSeg;  // the segment scratch's capacity
// On the direct bf16 path over a strided tensor, consecutive segments (next keys, same rows) are
// read as one run of up to long_run_keys <= kRunKeys keys: q . K^T over the run, then P . V over
// it, while the softmax and the accumulators' rescaling still go segment by segment, so the
// result is bit-identical to the segments one by one (and to a paged cache, which keeps 128-key
// segments and the paced prefetch where the stream below is off: on the Zen 4, with 2048-key runs
// it measured 0.79-0.97x under every prefetch scheme tried, as a run and its prefetched successor
// overflow L2; re-measured once the pacer's prefetches were really compiled in (prefetch.h), runs
// of 256-1024 keys 0.89-0.95x). On the Zen 4 a
// run's continuation is left to the hardware: its prefetchers follow a long run of demand misses, while one
// core's software prefetches top out near 15 GB/s (probably its L1 miss buffers), where the
// hardware prefetchers reach ~29. Measured in docs/kernel_guide.md section 8 ("Long runs"):
// 2048-key runs 1.10-1.13x the paced 128-key segments when the memory runs fast, 1.01-1.04x slow.
// That was the Zen 4. On a Sapphire Rapids VM the hardware prefetchers fall behind from DRAM, and a
// run's own rows asked for a few KB ahead (stream_ahead.h, on by default on Intel CPUs) made dense
// decode at 128K keys 1.2-1.45x faster; with the stream on, a paged cache is read as runs too
// (decode.cpp's Split::paged_runs: 1.06-1.14x the paced segments there).
constexpr int64_t kRunKeys = 2048;
// A paged cache's runs (Split::paged_runs) are shorter: their K and V row tables (two pointers per
// key) come on top of the run's scores and P spreads, ~130 KB at 2048 keys for 4 query rows, three
// times L1 (probably the cause: a contiguous run, without tables, measured alike at every length). Measured on the Sapphire Rapids VM (vLLM's page layout, 128K keys, bf16
// on tiles, 2 threads, each call after emptying the 480 MiB L3, one process): runs of 2048 / 1024 /
// 768 / 512 / 384 / 256 keys 25.0-25.7 / 23.7-24.3 / 24.0 / 23.8-23.9 / 24.1 / 24.9 ms over
// 64-token pages, 24.5 / 23.7 / 23.6 ms over 128-token pages (contiguous, no tables: 21.7-22.0 ms
// at 512-2048 alike; an int8 contiguous cache 14.0-14.1 ms alike).
constexpr int64_t kPagedRunKeys = 512;
constexpr int64_t kRunScratchFloats = 16384;  // rows x run keys of scores at most (64 KB)
constexpr int64_t kMinSplitKeys = 512;  // a split reads at least ~512 keys: the merge stays negligible
constexpr int64_t kMaxSplits = 256;  // per (batch, kv head)

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------- problem
struct Params {
  int64_t B, Hq, Hkv, G, sq, sk, D, Dv, Dpad, R;  // R = G x sq rows per (batch, kv head)
  int64_t qst[4], kst[3], vst[3];
  bool causal;
  int64_t window, sinks;  // window < 0: none
  float qmul;             // scale * log2(e)
  float cap;              // softcap * log2(e) (softcap.h), 0: no soft-capping
  int mode;               // 0: no block filter, 1: BlockSparse layout, 2: TopK
  int64_t seg;            // keys per segment at most: kSeg or kLongSeg (segment_keys)
  int64_t unit;           // block size of the filter (mode 0: seg)
  const bool* lay;
  int64_t lst[4], lb, lh;
  const int32_t* ti;
  int64_t topk, sink_blocks, local_blocks;
  // per-sequence lengths (nullptr: every sequence holds sk keys) and the page table (nullptr:
  // K/V are (B, Hkv, sk, D); else pages (P, Hkv, page_size, D) and key j of sequence b lives at
  // page table[b * tst0 + (j / page_size) * tst1], row j % page_size)
  const int32_t* lens;
  const int32_t* table;
  int64_t tst0, tst1, page_size;
  // 0: K rows (unit stride along D); else a paged float32 cache whose (page, kv head) blocks keep K
  // as columns, element d of a key `kcol` floats after element d - 1 (decode_kcols.h)
  int64_t kcol;
  // a quantized cache (k, v hold int8 / fp8 codes): the float32 row scales, laid out as the rows
  // without the head dim (sst: strides of dims 0 and 1; unit stride along the keys); else nullptr
  const float* ksc;
  const float* vsc;
  int64_t sst[2];
  // the float32 products' prefetches (reuse_clock.h): -1 as the reuse clock says, 0 never, 1 always
  int prefetch;

  int64_t len(int64_t b) const { return lens ? lens[b] : sk; }
};

// The kernel (decode.cpp): out (B, Hq, Sq, Dv) in q's dtype `dtype` (0 float32, 1 bfloat16,
// 2 float16; both 16-bit types as raw bits), lse float32 (B, Hq, Sq); K/V in `kv_dtype`: the same
// as q's, or 3 int8 / 4 fp8 e4m3 codes with P.ksc / P.vsc (quant_rows.h, decode_quant.h)
void run_decode(const Params& P, int dtype, int kv_dtype, const void* q, const void* k, const void* v, void* out,
                float* lse);
// whether this build multiplies bfloat16 with vdpbf16ps (AVX-512 BF16)
// keys per segment for q's dtype and K/V's (as run_decode's), R rows per kv head of head dim D:
// kLongSeg where the float32 products hold q in registers, else kSeg
int64_t segment_keys(int dtype, int kv_dtype, int64_t R, int64_t D);
// which products run_decode multiplies with for these dtypes, R rows per kv head, head dims D / Dv
// (words for explain(); the same rules as the dispatch)
std::string decode_products(int dtype, int kv_dtype, int64_t R, int64_t D, int64_t Dv);
bool bf16_dot_enabled();
bool amx_built();         // decode_amx.h's tiles built in (AMX-TILE, AMX-BF16, Linux)
bool amx_enabled();       // ... and in use now: built, permitted by the kernel, not switched off
void set_amx(bool on);    // the run-time switch (SPARSE_ATTN_CPU_AMX=0 starts it off)
int64_t amx_min_rows();   // query rows per (batch, kv head) from which decode uses the tiles
void set_amx_min_rows(int64_t rows);  // (tests: 1 runs every shape on tiles)
bool int8_dot_enabled();  // decode_int8.h's integer products built in
bool fp8_dot_enabled();   // decode_fp8.h's path built in

// keys [lo, hi) and the sinks [0, s) visible to token row t by the token rule
struct RowRange {
  int64_t lo, hi, s;
};

inline RowRange row_range(const Params& P, int64_t skb, int64_t t) {
  const int64_t p = skb - P.sq + t;
  RowRange r;
  r.hi = P.causal ? std::min(p + 1, skb) : skb;
  r.hi = std::max<int64_t>(r.hi, 0);
  r.lo = P.window >= 0 ? std::max<int64_t>(0, p - P.window + 1) : 0;
  r.lo = std::min(r.lo, r.hi);
  r.s = P.window >= 0 ? std::min(P.sinks, r.lo) : 0;  // sinks below the window only
  return r;
}

// ------------------------------------------------------------------------------------ segments
struct Seg {
  int64_t j0;
  int32_t nk;
  uint32_t rows;  // bit t: token row t visits the segment
};

// the visited segments of (b, h), ascending; `mask` is scratch
inline void build_segments(const Params& P, int64_t b, int64_t h, std::vector<uint32_t>& mask, std::vector<Seg>& out) {
  out.clear();
  const int64_t skb = P.len(b), U = P.unit, nb = (skb + U - 1) / U;
  mask.assign(nb, 0u);
  for (int64_t t = 0; t < P.sq; ++t) {
    const RowRange r = row_range(P, skb, t);
    const uint32_t bit = 1u << t;
    auto mark_range = [&](int64_t a, int64_t z, auto&& ok) {  // blocks meeting keys [a, z)
      if (a >= z) return;
      for (int64_t n = a / U; n <= (z - 1) / U; ++n)
        if (ok(n)) mask[n] |= bit;
    };
    const int64_t p = skb - P.sq + t;
    if (P.mode == 0) {
      auto all = [](int64_t) { return true; };
      mark_range(r.lo, r.hi, all);
      mark_range(0, r.s, all);
    } else if (P.mode == 1) {
      if (p < 0) continue;
      const bool* row = P.lay + (P.lb == 1 ? 0 : b) * P.lst[0] + (P.lh == 1 ? 0 : h) * P.lst[1] + (p / U) * P.lst[2];
      auto in_layout = [&](int64_t n) { return row[n * P.lst[3]]; };
      mark_range(r.lo, r.hi, in_layout);
      mark_range(0, r.s, in_layout);
    } else {
      if (p < 0) continue;
      const int64_t pb = p / U;
      auto in_range = [&](int64_t n) {  // the block holds a key the token rule shows
        const int64_t a = n * U, z = std::min(skb, a + U);
        return (a < r.hi && z > r.lo) || a < r.s;
      };
      for (int64_t n = 0; n < std::min(P.sink_blocks, nb); ++n)
        if (n <= pb && in_range(n)) mask[n] |= bit;
      for (int64_t n = std::max<int64_t>(0, pb - P.local_blocks + 1); n <= std::min(pb, nb - 1); ++n)
        if (in_range(n)) mask[n] |= bit;
      const int32_t* sel = P.ti + ((b * P.Hkv + h) * P.sq + t) * P.topk;
      for (int64_t e = 0; e < P.topk; ++e) {
        const int64_t n = sel[e];
        if (n >= 0 && n < nb && n <= pb && in_range(n)) mask[n] |= bit;
      }
    }
  }
  // keys some row may see by the token rule: the sinks [0, s) and the windows' union [lo, hi)
  // (consecutive rows' windows overlap). Blocks are clipped to them, so no key that no row sees
  // is ever read: a released page (its table entry points at the trash page, which holds the
  // padding rows of ragged appends, any bits) never enters a sum, not even with weight 0.
  int64_t lo = skb, hi = 0, s = 0;
  for (int64_t t = 0; t < P.sq; ++t) {
    const RowRange r = row_range(P, skb, t);
    if (r.lo < r.hi) lo = std::min(lo, r.lo), hi = std::max(hi, r.hi);
    s = std::max(s, r.s);
  }
  int64_t iv[2][2] = {{0, s}, {lo, hi}};
  int niv = 0;
  if (s > 0 && lo <= s) {
    iv[0][1] = std::max(s, hi), niv = 1;
  } else if (s > 0) {
    niv = 2;
  } else {
    iv[0][0] = lo, iv[0][1] = hi, niv = 1;
  }
  for (int64_t n = 0; n < nb; ++n) {
    if (!mask[n]) continue;
    for (int i = 0; i < niv; ++i) {
      const int64_t a = std::max(n * U, iv[i][0]), z = std::min({skb, (n + 1) * U, iv[i][1]});
      for (int64_t j = a; j < z; j += P.seg)
        out.push_back(Seg{j, static_cast<int32_t>(std::min(P.seg, z - j)), mask[n]});
    }
  }
}

// ---------------------------------------------------------------------------------------- runs
// keys of a strided run processed as one segment for `rows` query rows: a power of two in
// [kSeg, kRunKeys] whose rows x keys of scores fit kRunScratchFloats
inline int64_t long_run_keys(int64_t rows) {
  int64_t n = kSeg;
  while (n * 2 <= kRunKeys && rows * n * 2 <= kRunScratchFloats) n *= 2;
  return n;
}

// segs[0, nseg) as runs: a run grows by the next segment while it continues it (next keys, same
// rows), fits max_keys keys, and ends on a multiple of 16 keys so far (its segments then keep
// their own key pairs and 16-key score groups: the arithmetic of separate segments). first[e] is
// runs[e]'s first segment; first has one more entry, nseg.
inline void merge_runs(const Seg* segs, int64_t nseg, int64_t max_keys, std::vector<Seg>& runs,
                       std::vector<int64_t>& first) {
  runs.clear(), first.clear();
  for (int64_t e = 0; e < nseg;) {
    Seg r = segs[e];
    first.push_back(e);
    for (++e; e < nseg && r.nk % 16 == 0 && segs[e].j0 == r.j0 + r.nk && segs[e].rows == r.rows &&
              r.nk + segs[e].nk <= max_keys;
         ++e)
      r.nk += segs[e].nk;
    runs.push_back(r);
  }
  first.push_back(nseg);
}

// -------------------------------------------------------------------------------------- splits
// ~4 units of work per thread over all (batch, kv head), each of at least kMinSplitKeys keys
// (min_segs segments of `seg` keys);
// unit u is split u - first[bh] of (batch, kv head) bh, which has nsplit[bh] of them
struct SplitPlan {
  std::vector<int64_t> first, nsplit;
  int64_t units = 0;

  SplitPlan(const std::vector<std::vector<Seg>>& segs, int64_t nthreads, int64_t seg) {
    const int64_t min_segs = std::max<int64_t>(1, kMinSplitKeys / seg);
    const int64_t BH = static_cast<int64_t>(segs.size());
    int64_t total = 0;
    for (const auto& s : segs) total += static_cast<int64_t>(s.size());
    const int64_t per_split = std::max<int64_t>(min_segs, (total + 4 * nthreads - 1) / (4 * nthreads));
    first.assign(BH + 1, 0), nsplit.assign(BH, 1);
    for (int64_t bh = 0; bh < BH; ++bh) {
      const int64_t n = static_cast<int64_t>(segs[bh].size());
      nsplit[bh] = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, (n + per_split - 1) / per_split));
      first[bh + 1] = first[bh] + nsplit[bh];
    }
    units = first[BH];
  }
  // the (batch, kv head) of unit u
  int64_t head_of(int64_t u) const { return std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1; }
  // unit u's segments [s0, s1) of its (batch, kv head)'s n segments
  void range(int64_t u, int64_t bh, int64_t n, int64_t& s0, int64_t& s1) const {
    const int64_t i = u - first[bh], ns = nsplit[bh];
    s0 = n * i / ns, s1 = n * (i + 1) / ns;
  }
};

}  // namespace sparse_attn_decode

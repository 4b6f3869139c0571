// TopK block selection on the CPU (the contract's TopK rule), for prefill and decode rows alike.
//
// Per query token t at position p = Sk - Sq + t, shared by the G query heads of a kv head:
//   score[n] = qbar_t . kbar[n]            qbar_t = mean of the group's q rows, kbar = block means
//   candidates: sink_blocks <= n <= p / bs - local_blocks (the forced blocks are not candidates)
//   selected:   the `topk` highest-scoring candidates (all of them if fewer), ascending, -1 padded.
// One task per (batch, kv head, chunk of kRows tokens): the chunk's qbar (kRows x D, float32) times
// the transposed pooled keys (D x nb_pad, float32, prepared by the caller) over the columns the
// chunk's last token can see, with vec.h's micro-kernel; then per row the top-k: on AVX-512, rows of
// up to kShortRow candidates by a bitwise search of the k-th largest score (top_w_short: no
// branches on the data, no sort); longer rows (and other ISAs) by a running top-k whose current
// minimum rejects most candidates 16 (or 8) at a time. Memory per thread: kRows x nb_pad
// scores; nothing of size Sq x nblocks or Sq x Sk. Ties keep the lower block index.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace sparse_attn_cpu {
namespace {

constexpr int64_t kRows = 64;

struct SelectParams {
  int64_t B, Hq, Hkv, G, sq, sk, D, nb, nb_pad, bs, topk, sinks, locals;
  int64_t qst[4];
  const float* kbt;  // (B, Hkv, D, nb_pad)
  int32_t* out;      // (B, Hkv, Sq, topk)
};

#if defined(__AVX512F__)
// rows of at most this many candidates take top_w_short. Measured against the running top-w alone
// (topk_select, bf16, Hq 4, Hkv 2, D 64, TopK(16) of 64-key blocks, 2 threads, one process,
// alternating, 2026-12-06): 4K x 4K keys 1.94x, 4K x 32K 1.57x (rows up to 511 candidates), 512 x 8K
// 2.3x, 2K x 2K 1.15x; with whole 2047-candidate rows taken this way (1K x 128K) 0.78x, so longer
// rows keep the running top-w.
constexpr int64_t kShortRow = 512;

// order-preserving unsigned keys of 16 scores: key(a) < key(b) exactly when a < b (-0 counts as +0,
// as the float compares of the running top-w count it; NaN never gets here: run_task made it +inf)
inline __m512i order_key(__m512 x) {
  const __m512i b = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN));
  return _mm512_xor_si512(b, flip);
}

// the `w` best of a short row s[lo..hi] (w < n = hi - lo + 1 <= kShortRow) -> idx, ascending; the
// same picks as the running top-w below (score descending, then the lower block). The w-th largest
// key T is built bit by bit (32 steps of n / 16 compares, no data-dependent branch); the picks are
// the keys above T and the first ties at T, written in block order by a compress-store (no sort).
// The running top-w spent ~1500 cycles a row here: each entry a mispredicted branch and a new
// minimum, then a sort.
inline void top_w_short(const float* s, int64_t lo, int64_t hi, int64_t w, int32_t* idx) {
  const int64_t n = hi - lo + 1, nv = (n + 15) / 16;
  __m512i key[kShortRow / 16];
  __mmask16 valid[kShortRow / 16];
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t left = n - 16 * j;
    valid[j] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    key[j] = order_key(_mm512_maskz_loadu_ps(valid[j], s + lo + 16 * j));
  }
  uint32_t t = 0;  // the largest value with at least w keys >= it: the w-th largest key
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t c = t | (1u << bit);
    const __m512i vc = _mm512_set1_epi32(static_cast<int>(c));
    int64_t cnt = 0;
    for (int64_t j = 0; j < nv; ++j) cnt += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(valid[j], key[j], vc));
    t = cnt >= w ? c : t;
  }
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  int64_t ties = w;  // how many keys equal to T are picked (the lowest blocks first)
  for (int64_t j = 0; j < nv; ++j) ties -= __builtin_popcount(_mm512_mask_cmpgt_epu32_mask(valid[j], key[j], vt));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t* o = idx;
  for (int64_t j = 0; j < nv; ++j) {
    uint32_t pick = _mm512_mask_cmpgt_epu32_mask(valid[j], key[j], vt);
    for (uint32_t eq = _mm512_mask_cmpeq_epu32_mask(valid[j], key[j], vt); eq != 0 && ties > 0; eq &= eq - 1, --ties)
      pick |= eq & (0u - eq);
    _mm512_mask_compressstoreu_epi32(o, static_cast<__mmask16>(pick),
                                     _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(lo + 16 * j))));
    o += __builtin_popcount(pick);
  }
}
#endif

// the `w` best of s[lo..hi] (w < hi - lo + 1) -> idx, ascending. A running top-w: a candidate
// enters only if it beats the current minimum (about w ln(n / w) entries on random scores), so
// most of the row is rejected a vector at a time.
inline void top_w(const float* s, int64_t lo, int64_t hi, int64_t w, float* val, int32_t* idx) {
#if defined(__AVX512F__)
  if (hi - lo + 1 <= kShortRow) return top_w_short(s, lo, hi, w, idx);
#endif
  for (int64_t e = 0; e < w; ++e) val[e] = s[lo + e], idx[e] = static_cast<int32_t>(lo + e);
  auto argmin_scalar = [&]() {
    int64_t a = 0;
    for (int64_t e = 1; e < w; ++e)
      if (val[e] < val[a] || (val[e] == val[a] && idx[e] > idx[a])) a = e;  // evict the later block on ties
    return a;
  };
#if defined(__AVX512F__)
  // w <= 16 (the common topk): the minimum of one vector; val has 16 slots, unused ones +inf
  const __mmask16 live = w >= 16 ? __mmask16(0xffff) : __mmask16((1u << w) - 1);
  auto argmin = [&]() -> int64_t {
    if (w > 16) return argmin_scalar();
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(std::numeric_limits<float>::infinity()), live, val);
    const float mn = _mm512_reduce_min_ps(v);
    const uint32_t eq = _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(mn), _CMP_EQ_OQ);
    if (eq != 0 && (eq & (eq - 1)) == 0) return __builtin_ctz(eq);
    return argmin_scalar();  // ties (or NaN)
  };
#else
  auto argmin = argmin_scalar;
#endif
  int64_t amin = argmin();
  float vmin = val[amin];
  auto offer = [&](int64_t n) {
    if (s[n] > vmin) {
      val[amin] = s[n], idx[amin] = static_cast<int32_t>(n);
      amin = argmin(), vmin = val[amin];
    }
  };
  int64_t n = lo + w;
#if defined(__AVX512F__)
  for (; n + 16 <= hi + 1; n += 16) {
    uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + n), _mm512_set1_ps(vmin), _CMP_GT_OQ);
    while (m != 0) {  // lanes above the minimum when the vector was read; offer re-checks each
      offer(n + __builtin_ctz(m));
      m &= m - 1;
    }
  }
#elif defined(__AVX__)
  for (; n + 8 <= hi + 1; n += 8) {
    uint32_t m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + n), _mm256_set1_ps(vmin), _CMP_GT_OQ));
    while (m != 0) {
      offer(n + __builtin_ctz(m));
      m &= m - 1;
    }
  }
#endif
  for (; n <= hi; ++n) offer(n);
  std::sort(idx, idx + w);
}

// last candidate block of the token at position `pos` (floor division: a negative position, a
// cache row before its sequence's first key, has none)
inline int64_t last_candidate(const SelectParams& P, int64_t nb, int64_t pos) {
  return pos < 0 ? -1 : std::min(nb - 1, pos / P.bs - P.locals);
}

// rows [t0, t0 + kRows) of (b, h): kbt the (D, nb_pad) transposed pooled keys, sk / nb the keys and
// blocks the rows end-align to (P.sk / P.nb for prefill, a cache sequence's own length for decode)
template <int DT>
void run_task(const SelectParams& P, const typename Elem<DT>::T* Q, int64_t b, int64_t h, int64_t t0,
              const float* kbt, int64_t nb_pad, int64_t sk, int64_t nb, std::vector<float>& qbar,
              std::vector<float>& s, std::vector<float>& val, std::vector<int32_t>& idx) {
  const int64_t t1 = std::min(P.sq, t0 + kRows), rows = t1 - t0, off = sk - P.sq;
  int32_t* out = P.out + ((b * P.Hkv + h) * P.sq + t0) * P.topk;
  std::fill_n(out, rows * P.topk, -1);
  // candidate columns of the chunk's last token: [sinks, hi_max]
  const int64_t hi_max = last_candidate(P, nb, off + t1 - 1);
  if (hi_max < P.sinks || P.topk == 0) return;
  const int64_t ncols = round_up(hi_max + 1, kVec);
  // qbar rows: the mean of the group's heads
  const float inv_g = 1.f / static_cast<float>(P.G);
  std::vector<const float*> ap(rows);
  std::vector<float*> cp(rows);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = qbar.data() + r * P.D;
    std::fill_n(dst, P.D, 0.f);
    for (int64_t g = 0; g < P.G; ++g) {
      const auto* src = Q + b * P.qst[0] + (h * P.G + g) * P.qst[1] + (t0 + r) * P.qst[2];
      for (int64_t d = 0; d < P.D; ++d) dst[d] += Elem<DT>::get(src, d * P.qst[3]);
    }
    for (int64_t d = 0; d < P.D; ++d) dst[d] *= inv_g;
    ap[r] = dst;
    cp[r] = s.data() + r * nb_pad;
  }
  gemm_rows<false>(rows, ncols, P.D, ap.data(), kbt, nb_pad, cp.data(), nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t hi = last_candidate(P, nb, off + t0 + r);
    const int64_t cnt = hi - P.sinks + 1;
    if (cnt <= 0) continue;
    int32_t* o = out + r * P.topk;
    if (cnt <= P.topk) {
      for (int64_t e = 0; e < cnt; ++e) o[e] = static_cast<int32_t>(P.sinks + e);
    } else {
      // a NaN score (a NaN query or key) ranks first, as torch.topk ranks it: the row then sees the
      // NaN and comes out NaN (contract, "Bad input"), instead of dropping it silently
      for (int64_t c = P.sinks; c <= hi; ++c)
        if (cp[r][c] != cp[r][c]) cp[r][c] = std::numeric_limits<float>::infinity();
      top_w(cp[r], P.sinks, hi, P.topk, val.data(), o);
    }
  }
}

// run_task for q's dtype (float32, bfloat16 or float16)
inline void run_task_any(at::ScalarType dt, const SelectParams& P, const void* Q, int64_t b, int64_t h, int64_t t0,
                         const float* kbt, int64_t nb_pad, int64_t sk, int64_t nb, std::vector<float>& qbar,
                         std::vector<float>& s, std::vector<float>& val, std::vector<int32_t>& idx) {
  with_float_tag(dt, [&](auto tag) {
    constexpr int DT = decltype(tag)::value;
    run_task<DT>(P, static_cast<const typename Elem<DT>::T*>(Q), b, h, t0, kbt, nb_pad, sk, nb, qbar, s, val, idx);
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

torch::Tensor topk_select(torch::Tensor q, torch::Tensor kbar_t, int64_t kv_heads, int64_t sk, int64_t nb,
                          int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks) {
  using namespace sparse_attn_cpu;
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "topk_select: q must be a 4-D CPU tensor (B, Hq, Sq, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "topk_select: q must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = q.size(0), Hq = q.size(1), sq = q.size(2), D = q.size(3);
  TORCH_CHECK(kv_heads > 0 && Hq % kv_heads == 0, "topk_select: Hq must be a multiple of kv_heads");
  TORCH_CHECK(block_size > 0 && topk >= 0 && sink_blocks >= 0 && local_blocks >= 0 && sq <= sk,
              "topk_select: bad TopK parameters or Sq > Sk");
  TORCH_CHECK(kbar_t.scalar_type() == torch::kFloat32 && kbar_t.is_contiguous() && kbar_t.dim() == 4 &&
                  kbar_t.size(0) == B && kbar_t.size(1) == kv_heads && kbar_t.size(2) == D &&
                  kbar_t.size(3) >= nb && kbar_t.size(3) % kVec == 0,
              "topk_select: kbar_t must be contiguous float32 (B, Hkv, D, nb padded to a multiple of ", kVec,
              "), got ", kbar_t.sizes());
  auto out = torch::full({B, kv_heads, sq, topk}, -1, q.options().dtype(torch::kInt32));
  if (B == 0 || sq == 0 || topk == 0) return out;
  SelectParams P{};
  P.B = B, P.Hq = Hq, P.Hkv = kv_heads, P.G = Hq / kv_heads, P.sq = sq, P.sk = sk, P.D = D, P.nb = nb;
  P.nb_pad = kbar_t.size(3), P.bs = block_size, P.topk = topk, P.sinks = sink_blocks, P.locals = local_blocks;
  for (int d = 0; d < 4; ++d) P.qst[d] = q.stride(d);
  P.kbt = kbar_t.data_ptr<float>();
  P.out = out.data_ptr<int32_t>();
  const int64_t chunks = (sq + kRows - 1) / kRows, total = B * kv_heads * chunks;
  const void* qd = q.data_ptr();
  // tasks handed out dynamically, latest chunks (the most candidate columns) first
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    std::vector<float> qbar(kRows * std::max<int64_t>(D, 1)), s(kRows * P.nb_pad), val(std::max<int64_t>(topk, 1));
    std::vector<int32_t> idx(std::max<int64_t>(topk, 1));
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= total) break;
      const int64_t t = (chunks - 1 - i / (B * kv_heads)) + (i % (B * kv_heads)) * chunks;
      const int64_t c = t % chunks, bh = t / chunks, b = bh / kv_heads, h = bh % kv_heads;
      run_task_any(dt, P, qd, b, h, c * kRows, P.kbt + (b * P.Hkv + h) * P.D * P.nb_pad, P.nb_pad, P.sk, P.nb, qbar,
                   s, val, idx);
    }
  });
  return out;
}

// TopK's selection over a KV cache (decode: each sequence's rows end-aligned to its own length),
// from the running block sums the cache keeps, read where they lie: float32 (B, Hkv, >= nb + 1, D)
// (block n of sequence b at sums[b, :, n]), or, with `page_table` (int32 (B, W)), float32
// (pages, Hkv, D) with one sum per page (a block is a page: vLLM's pages, integrations/vllm), block
// n of sequence b at sums[page_table[b, n]]. A block's mean is its sum over its keys present (the
// division PyTorch's KVView.pooled_keys does), transposed per (sequence, kv head) into a scratch
// (D, nb_pad) and scored as prefill's selection scores pooled keys. O(blocks) per step: K is not
// read and the sums are not gathered. Same result as layout.topk_selection.topk_index_over_cache.
torch::Tensor topk_select_sums(torch::Tensor q, torch::Tensor sums, std::vector<int64_t> lengths, int64_t block_size,
                               int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                               c10::optional<torch::Tensor> page_table) {
  using namespace sparse_attn_cpu;
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "topk_select_sums: q must be a 4-D CPU tensor (B, Hq, Sq, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "topk_select_sums: q must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = q.size(0), Hq = q.size(1), sq = q.size(2), D = q.size(3);
  const bool paged = page_table.has_value();
  int64_t capacity = 0;  // blocks a sequence can hold
  if (paged) {
    const auto& t = *page_table;
    TORCH_CHECK(sums.scalar_type() == torch::kFloat32 && sums.dim() == 3 && sums.size(2) == D && sums.stride(2) == 1,
                "topk_select_sums: page sums must be float32 (pages, Hkv, D) with unit stride on D, got ",
                sums.sizes());
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.dim() == 2 && t.size(0) == B && t.device().is_cpu() &&
                    (t.size(1) <= 1 || t.stride(1) == 1),
                "topk_select_sums: page_table must be int32 (B, W) on the CPU with unit stride on W, got ",
                t.sizes());
    capacity = t.size(1);
  } else {
    TORCH_CHECK(sums.scalar_type() == torch::kFloat32 && sums.dim() == 4 && sums.size(0) == B &&
                    sums.size(3) == D && sums.stride(3) == 1,
                "topk_select_sums: sums must be float32 (B, Hkv, blocks, D) with unit stride on D, got ",
                sums.sizes());
    capacity = sums.size(2);
  }
  const int64_t Hkv = sums.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "topk_select_sums: Hq must be a multiple of the sums' kv heads");
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B, "topk_select_sums: one length per sequence");
  TORCH_CHECK(block_size > 0 && topk >= 0 && sink_blocks >= 0 && local_blocks >= 0, "topk_select_sums: bad TopK");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lengths[b] >= 0 && (lengths[b] + block_size - 1) / block_size <= capacity,
                "topk_select_sums: length ", lengths[b], " needs more blocks than the ",
                paged ? "page table" : "sums", " hold");
  const int32_t* table = nullptr;
  int64_t tst0 = 0;
  if (paged) {  // every page a selection may read exists (an id out of range would read past the sums)
    table = page_table->data_ptr<int32_t>();
    tst0 = page_table->stride(0);
    const int64_t pages = sums.size(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0, nb = (lengths[b] + block_size - 1) / block_size; n < nb; ++n)
        TORCH_CHECK(table[b * tst0 + n] >= 0 && table[b * tst0 + n] < pages, "topk_select_sums: page_table[", b,
                    ", ", n, "] = ", table[b * tst0 + n], " is not a page of the sums (", pages, " pages)");
  }
  auto out = torch::full({B, Hkv, sq, topk}, -1, q.options().dtype(torch::kInt32));
  if (B == 0 || sq == 0 || topk == 0) return out;
  SelectParams P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.D = D, P.bs = block_size, P.topk = topk;
  P.sinks = sink_blocks, P.locals = local_blocks;
  for (int d = 0; d < 4; ++d) P.qst[d] = q.stride(d);
  P.out = out.data_ptr<int32_t>();
  const float* S = sums.data_ptr<float>();
  // where block n of (b, h) lies: a page's row, or the sequence's own block slot
  const int64_t sst0 = sums.stride(0), sst1 = sums.stride(1), sst2 = paged ? 0 : sums.stride(2);
  auto block_sum = [&](int64_t b, int64_t h, int64_t n) -> const float* {
    if (paged) return S + static_cast<int64_t>(table[b * tst0 + n]) * sst0 + h * sst1;
    return S + b * sst0 + h * sst1 + n * sst2;
  };
  const int64_t chunks = (sq + kRows - 1) / kRows, total = B * Hkv * chunks;
  const void* qd = q.data_ptr();
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    std::vector<float> qbar(kRows * std::max<int64_t>(D, 1)), s, val(std::max<int64_t>(topk, 1)), kbt;
    std::vector<int32_t> idx(std::max<int64_t>(topk, 1));
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= total) break;
      const int64_t c = i % chunks, bh = i / chunks, b = bh / Hkv, h = bh % Hkv;
      const int64_t sk = lengths[b], nb = (sk + block_size - 1) / block_size;
      const int64_t last = std::min(sq, (c + 1) * kRows) - 1;  // the chunk's last row sees the most blocks
      const int64_t hi_max = last_candidate(P, nb, sk - sq + last);
      const int64_t nb_pad = round_up(std::max<int64_t>(hi_max + 1, 1), kVec);
      kbt.assign(D * nb_pad, 0.f);
      // the transpose 16 blocks at a time, so each d writes one 64-byte line (a block at a time wrote
      // D lines per block, and the stores to a 2-column-stride buffer beyond L1 were 90% of the call)
      for (int64_t n0 = 0; n0 <= hi_max; n0 += 16) {  // complete blocks (candidates lie below the row's own)
        const int64_t m = std::min<int64_t>(16, hi_max + 1 - n0);
        const float* src[16];
        float cnt[16];
        for (int64_t j = 0; j < m; ++j) {
          const int64_t n = n0 + j;
          src[j] = block_sum(b, h, n);
          cnt[j] = static_cast<float>(std::max<int64_t>(1, std::min(block_size, sk - n * block_size)));
        }
        for (int64_t d = 0; d < D; ++d) {
          float* dst = kbt.data() + d * nb_pad + n0;
          for (int64_t j = 0; j < m; ++j) dst[j] = src[j][d] / cnt[j];
        }
      }
      s.resize(kRows * nb_pad);
      run_task_any(dt, P, qd, b, h, c * kRows, kbt.data(), nb_pad, sk, nb, qbar, s, val, idx);
    }
  });
  return out;
}

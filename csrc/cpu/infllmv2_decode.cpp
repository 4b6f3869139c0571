// InfLLMv2 block selection for a few query rows over a KV cache's window sums (the contract's
// "InfLLMv2 semantics", steps 3-5; sparse_attn/cache/compressed.py keeps the sums).
//
// The cache keeps, per sequence and kv head, the running sum of the keys of every window, row-major
// float32 `(B, Hkv, slots, D)` (window j starts at j * stride): the fine windows (kernel_size /
// kernel_stride) and, for normalizer "coarse", the coarse ones (4x both). They are read where they
// are: per (batch, kv head), a chunk of kChunk windows at a time is transposed into a D x kChunk
// scratch (L1-sized) and multiplied with all the group's rows at once (G heads x Sq tokens, vec.h's
// float32 micro-kernel; q pre-multiplied by scale * log2(e) / size, so the window sum stands for
// the mean and every exp is an exp2). Two passes over the windows:
//   1. the normaliser: per row, a running base-2 log-sum-exp over its visible coarse windows
//      ("coarse") or fine ones ("exact");
//   2. the fine scores: S[t][j] += 2^(F[g, t][j] - LSE[g, t]) on the visible fine windows of token t.
// Then per token: the max-pool onto blocks, the candidates and the running top-w
// (infllmv2_rows.h: the prefill selection's code). Each sequence's rows are end-aligned to its own
// length (token t at position lengths[b] - Sq + t). Same result as the PyTorch path
// (layout/infllmv2_selection.token_index_from_compressed) up to the float32 rounding of the scores.
// Scratch per thread: the rows' q (2 x G Sq x D), one transposed chunk, G Sq x kChunk scores and the
// group sums Sq x windows; nothing of size Sq x Sk.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/infllmv2_rows.h"
#include "cpu/target_check.h"
#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

using infllmv2::visible;

constexpr int64_t kChunk = 64;  // windows per transposed chunk: D x 64 floats (32 KB at D = 128)

struct SumParams {
  int64_t B, Hkv, G, sq, D, nb;
  infllmv2::Rule rule;
  float qmul1, qmul2;  // scale * log2(e) / kernel_size, / (4 * kernel_size)
  int64_t qst[4];
  const float* fine;    // (B, Hkv, slots1, D), strides fst; paged: (pages, slots, Hkv, D), see table
  const float* coarse;  // the same for the coarse windows (strides cst), or null
  int64_t slots1, slots2, fst[3], cst[3];  // fst / cst: strides of (sequence or page, kv head, window slot)
  const int64_t* lengths;
  int32_t* out;  // (B, Hkv, Sq, topk)
  // paged sums (null: per sequence): window j of sequence b lies in the page holding its last row
  // e = j * stride + size - 1, page table[b, e / page_size], at slot (e % page_size) / stride
  const int32_t* table;
  int64_t tst0, tst1, page_size;
};

struct SumScratch {
  std::vector<float> q1, q2, kt, stage, f, s, score, m, l;
  std::vector<int32_t> ids;
  std::vector<uint8_t> flag;  // per row: 1 a NaN was seen, 2 a +inf
  std::vector<const float*> a1, a2, rows;  // rows: the sums rows of one chunk of windows
  std::vector<float*> fp;
};

// The sums rows of windows [j0, j0 + nw) (of `size` keys at `stride`) of sequence b, kv head h,
// into rows[0, nw): per sequence, st[2] apart; paged, walked along the windows' last rows, one
// division per page crossed (not per window)
inline void window_rows(const SumParams& P, const float* base, const int64_t* st, int64_t b, int64_t h, int64_t j0,
                        int64_t nw, int64_t size, int64_t stride, const float** rows) {
  if (!P.table) {
    const float* r = base + b * st[0] + h * st[1] + j0 * st[2];
    for (int64_t i = 0; i < nw; ++i) rows[i] = r + i * st[2];
    return;
  }
  const int64_t ps = P.page_size;
  const int32_t* trow = P.table + b * P.tst0;
  int64_t e = j0 * stride + size - 1, pg = e / ps, off = e - pg * ps, slot = off / stride;
  const float* page = base + trow[pg * P.tst1] * st[0] + h * st[1];
  for (int64_t i = 0; i < nw; ++i) {
    rows[i] = page + slot * st[2];
    off += stride, ++slot;
    if (off >= ps && i + 1 < nw) {  // the next window ends in a later page
      pg += off / ps, off %= ps, slot = off / stride;
      page = base + trow[pg * P.tst1] * st[0] + h * st[1];
    }
  }
}

// kt (D x kChunk) = the rows of windows [j0, j0 + nw) transposed; the fast 16 x 16 path only where it
// reads inside the tensor (whole groups of 16 windows, D a multiple of 16). Rows `ld` apart (sums per
// sequence) are transposed where they lie; paged rows (ld = 0) are first copied to `stage`
// (16 x D), as consecutive windows may lie in different pages.
inline void transpose_chunk(float* kt, float* stage, const float* const* rows, int64_t ld, int64_t j0, int64_t nw,
                            int64_t slots, int64_t D) {
  int64_t c = 0;
  if (D % 16 == 0)
    for (; c + 16 <= nw && j0 + c + 16 <= slots; c += 16) {
      if (ld) {
        transpose_f32(kt + c, kChunk, rows[c], ld, 16, D);
        continue;
      }
      for (int64_t i = 0; i < 16; ++i) std::memcpy(stage + i * D, rows[c + i], D * sizeof(float));
      transpose_f32(kt + c, kChunk, stage, D, 16, D);
    }
  for (; c < nw; ++c) {
    const float* src = rows[c];
    for (int64_t d = 0; d < D; ++d) kt[d * kChunk + c] = src[d];
  }
}

template <int DT>
void run_sums_task(const SumParams& P, const typename Elem<DT>::T* Q, int64_t b, int64_t h, SumScratch& S) {
  const infllmv2::Rule& R = P.rule;
  const int64_t G = P.G, sq = P.sq, D = P.D, rows = G * sq, len = P.lengths[b];
  int32_t* out = P.out + (b * P.Hkv + h) * sq * R.topk;
  std::fill_n(out, sq * R.topk, -1);
  const int64_t last = len - 1;  // the last row has the most kernels and candidates
  if (last < 0 || last / R.bs - R.window < R.forced_init) return;
  const int64_t n1 = visible(last, R.ks, R.st, P.slots1);
  const int64_t n2 = R.coarse ? visible(last, 4 * R.ks, 4 * R.st, P.slots2) : 0;
  const int64_t n1c = round_up(std::max<int64_t>(n1, 1), kVec);
  // the group's rows, head-major (row g * Sq + t), scaled for the fine and the coarse sums
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < sq; ++t) {
      const int64_t r = g * sq + t;
      const auto* src = Q + b * P.qst[0] + (h * G + g) * P.qst[1] + t * P.qst[2];
      load_row<DT>(S.q1.data() + r * D, src, D, P.qst[3], P.qmul1);
      if (R.coarse) load_row<DT>(S.q2.data() + r * D, src, D, P.qst[3], P.qmul2);
    }
  auto pos = [&](int64_t r) { return len - sq + r % sq; };
  // F (rows x kChunk) = a . sums[j0, j0 + nw)^T, the fine or the coarse windows
  const int64_t fld = P.table ? 0 : P.fst[2], cld = P.table ? 0 : P.cst[2];
  auto scores = [&](bool use_coarse, const float* const* a, int64_t j0, int64_t nw) {
    const float** rp = S.rows.data();
    if (use_coarse)
      window_rows(P, P.coarse, P.cst, b, h, j0, nw, 4 * R.ks, 4 * R.st, rp);
    else
      window_rows(P, P.fine, P.fst, b, h, j0, nw, R.ks, R.st, rp);
    transpose_chunk(S.kt.data(), S.stage.data(), rp, use_coarse ? cld : fld, j0, nw,
                    use_coarse ? P.slots2 : P.slots1, D);
    gemm_rows<false>(rows, round_up(nw, kVec), D, a, S.kt.data(), kChunk, S.fp.data(), nullptr);
  };

  // 1. the normaliser of every row: running log-sum-exp (base 2) over its visible windows
  std::fill_n(S.m.begin(), rows, kNegInf);
  std::fill_n(S.l.begin(), rows, 0.f);
  std::fill_n(S.flag.begin(), rows, uint8_t(0));
  const bool coarse = R.coarse;
  const int64_t nsize = coarse ? 4 * R.ks : R.ks, nstride = coarse ? 4 * R.st : R.st, nn = coarse ? n2 : n1;
  for (int64_t j0 = 0; j0 < nn; j0 += kChunk) {
    const int64_t nw = std::min(kChunk, nn - j0);
    scores(coarse, coarse ? S.a2.data() : S.a1.data(), j0, nw);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = std::min(nw, visible(pos(r), nsize, nstride, nn) - j0);
      if (v <= 0) continue;
      const float* x = S.fp[r];
      float cm = kNegInf;
      for (int64_t j = 0; j < v; ++j) {
        if (x[j] != x[j]) S.flag[r] |= 1;
        else if (x[j] == std::numeric_limits<float>::infinity()) S.flag[r] |= 2;
        else cm = std::max(cm, x[j]);
      }
      if (S.flag[r] || cm == kNegInf) continue;  // the result is decided, or nothing to add
      const float mn = std::max(S.m[r], cm);
      float add = 0.f;
      for (int64_t j = 0; j < v; ++j) add += exp2_scalar(x[j] - mn);  // -inf scores add 0
      S.l[r] = S.l[r] * exp2_scalar(S.m[r] - mn) + add;
      S.m[r] = mn;
    }
  }
  // lse per row: NaN if a visible score is NaN, +inf if one is +inf (then 2^(F - lse) is ~0, or
  // NaN for F = +inf, as the prefill selection); a head that sees no normalising window (or only
  // -inf scores) adds nothing (0 scores, as the PyTorch path)
  std::vector<float>& lse = S.m;
  for (int64_t r = 0; r < rows; ++r) {
    if (S.flag[r] & 1) lse[r] = std::numeric_limits<float>::quiet_NaN();
    else if (S.flag[r] & 2) lse[r] = std::numeric_limits<float>::infinity();
    else if (S.l[r] > 0.f) lse[r] = S.m[r] + std::log2(S.l[r]);
    else lse[r] = kNegInf;  // adds nothing
  }

  // 2. the group sums of the fine scores, per token
  std::fill_n(S.s.begin(), sq * n1c, 0.f);
  for (int64_t j0 = 0; j0 < n1; j0 += kChunk) {
    const int64_t nw = std::min(kChunk, n1 - j0);
    scores(false, S.a1.data(), j0, nw);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = std::min(nw, visible(pos(r), R.ks, R.st, n1) - j0);
      if (v <= 0 || lse[r] == kNegInf) continue;
      infllmv2::add_exp2(S.s.data() + (r % sq) * n1c + j0, S.fp[r], v, lse[r]);
    }
  }
  for (int64_t t = 0; t < sq; ++t) {
    const int64_t p = len - sq + t;
    if (p < 0) continue;  // a row before the sequence's start sees nothing
    infllmv2::pick_row(R, p, P.nb, S.s.data() + t * n1c, visible(p, R.ks, R.st, n1), S.score.data(), S.ids.data(),
                       out + t * R.topk);
  }
}

// windows of `size` keys at `stride` complete in the first n keys
inline int64_t windows(int64_t n, int64_t size, int64_t stride) { return n >= size ? (n - size) / stride + 1 : 0; }

// The checks and the Params both entry points share; the sums' own checks are theirs.
SumParams common_params(const char* who, const torch::Tensor& q, int64_t Hkv, const std::vector<int64_t>& lengths,
                        int64_t kernel_size, int64_t kernel_stride, int64_t block_size, int64_t topk,
                        int64_t forced_init, int64_t window_blocks, bool variant41, bool use_coarse, int64_t* max_len) {
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), who, ": q must be a 4-D CPU tensor (B, Hq, Sq, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16, who,
              ": q must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = q.size(0), Hq = q.size(1), sq = q.size(2), D = q.size(3);
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B, who, ": lengths must have one entry per sequence");
  TORCH_CHECK(kernel_size > 0 && kernel_stride > 0 && block_size > 0 && block_size % kernel_stride == 0 &&
                  topk >= 0 && forced_init >= 0 && window_blocks >= 1,
              who, ": bad InfLLMv2 parameters");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, who, ": q's heads (", Hq, ") must be a multiple of the sums' kv heads (",
              Hkv, ")");
  *max_len = 0;
  for (const int64_t n : lengths) {
    TORCH_CHECK(n >= 0, who, ": lengths must be >= 0");
    *max_len = std::max(*max_len, n);
  }
  SumParams P{};
  P.B = B, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.D = D, P.nb = (*max_len + block_size - 1) / block_size;
  P.rule = infllmv2::Rule{kernel_size, kernel_stride, block_size, block_size / kernel_stride, topk, forced_init,
                          window_blocks, variant41, use_coarse};
  const double qmul = std::pow(static_cast<double>(D), -0.5) * infllmv2::kLog2e;  // the contract's scale
  P.qmul1 = static_cast<float>(qmul / kernel_size), P.qmul2 = static_cast<float>(qmul / (4.0 * kernel_size));
  for (int d = 0; d < 4; ++d) P.qst[d] = q.stride(d);
  P.lengths = lengths.data();
  return P;
}

// every (sequence, kv head) a task, all threads
void run_select(SumParams& P, const torch::Tensor& q, const std::vector<int64_t>& lengths, torch::Tensor& out) {
  const auto dt = q.scalar_type();
  const bool use_coarse = P.rule.coarse;
  const int64_t D = P.D, sq = P.sq;
  P.out = out.data_ptr<int32_t>();
  int64_t n1max = 0;
  for (const int64_t n : lengths) n1max = std::max(n1max, windows(n, P.rule.ks, P.rule.st));
  const int64_t total = P.B * P.Hkv, rows = P.G * sq, n1c = round_up(std::max<int64_t>(n1max, 1), kVec);
  const void* qd = q.data_ptr();
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    SumScratch S;
    S.q1.assign(rows * D, 0.f), S.q2.assign(use_coarse ? rows * D : 0, 0.f);
    S.kt.assign(D * kChunk, 0.f), S.f.assign(rows * kChunk, 0.f), S.s.assign(sq * n1c, 0.f);
    S.stage.assign(P.table ? 16 * D : 0, 0.f), S.rows.resize(kChunk);
    S.score.assign(std::max<int64_t>(P.nb, 1), 0.f), S.ids.assign(std::max<int64_t>(P.nb, 1), 0);
    S.m.assign(rows, 0.f), S.l.assign(rows, 0.f), S.flag.assign(rows, 0);
    S.a1.resize(rows), S.a2.resize(rows), S.fp.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      S.a1[r] = S.q1.data() + r * D;
      S.a2[r] = use_coarse ? S.q2.data() + r * D : S.a1[r];
      S.fp[r] = S.f.data() + r * kChunk;
    }
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      const int64_t b = i / P.Hkv, h = i % P.Hkv;
      with_float_tag(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        run_sums_task<DT>(P, static_cast<const typename Elem<DT>::T*>(qd), b, h, S);
      });
    }
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

torch::Tensor infllmv2_select_sums(torch::Tensor q, torch::Tensor fine, torch::Tensor coarse,
                                   std::vector<int64_t> lengths, int64_t kernel_size, int64_t kernel_stride,
                                   int64_t block_size, int64_t topk, int64_t forced_init, int64_t window_blocks,
                                   bool variant41, bool use_coarse) {
  using namespace sparse_attn_cpu;
  const char* who = "infllmv2_select_sums";
  TORCH_CHECK(fine.dim() == 4, who, ": fine must be window sums (B, Hkv, windows, D), got ", fine.sizes());
  int64_t max_len = 0;
  SumParams P = common_params(who, q, fine.size(1), lengths, kernel_size, kernel_stride, block_size, topk,
                              forced_init, window_blocks, variant41, use_coarse, &max_len);
  const int64_t B = P.B, D = P.D, Hkv = P.Hkv;
  auto check_sums = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.dim() == 4 && t.size(0) == B &&
                    t.size(1) == Hkv && t.size(3) == D && (D <= 1 || t.stride(3) == 1),
                who, ": ", name, " must be float32 CPU window sums (B, Hkv, windows, D) with unit stride along D, got ",
                t.sizes(), " ", t.scalar_type());
  };
  check_sums(fine, "fine");
  if (use_coarse) check_sums(coarse, "coarse");
  // every window a row can see must be kept
  TORCH_CHECK(windows(max_len, kernel_size, kernel_stride) <= fine.size(2), who, ": fine sums hold ", fine.size(2),
              " windows, fewer than the ", max_len, " keys need");
  if (use_coarse)
    TORCH_CHECK(windows(max_len, 4 * kernel_size, 4 * kernel_stride) <= coarse.size(2), who, ": coarse sums hold ",
                coarse.size(2), " windows, fewer than the ", max_len, " keys need");
  auto out = torch::full({B, Hkv, P.sq, topk}, -1, q.options().dtype(torch::kInt32));
  if (B == 0 || P.sq == 0 || topk == 0 || D == 0) return out;
  P.fine = fine.data_ptr<float>(), P.slots1 = fine.size(2);
  for (int d = 0; d < 3; ++d) P.fst[d] = fine.stride(d);
  if (use_coarse) {
    P.coarse = coarse.data_ptr<float>(), P.slots2 = coarse.size(2);
    for (int d = 0; d < 3; ++d) P.cst[d] = coarse.stride(d);
  }
  run_select(P, q, lengths, out);
  return out;
}

// The same over window sums kept per page (sparse_attn/integrations/vllm/pages.py): `fine` float32
// (pages, slots, Hkv, D) holds window j (kernel_size keys from j * kernel_stride) of sequence b in
// the page of its last row e = j * kernel_stride + kernel_size - 1, page_table[b, e / page_size], at
// slot (e % page_size) / kernel_stride; `coarse` likewise for 4x both. Read through the table in
// place: no per-sequence copy of the sums.
torch::Tensor infllmv2_select_pages(torch::Tensor q, torch::Tensor fine, torch::Tensor coarse, torch::Tensor page_table,
                                    int64_t page_size, std::vector<int64_t> lengths, int64_t kernel_size,
                                    int64_t kernel_stride, int64_t block_size, int64_t topk, int64_t forced_init,
                                    int64_t window_blocks, bool variant41, bool use_coarse) {
  using namespace sparse_attn_cpu;
  const char* who = "infllmv2_select_pages";
  TORCH_CHECK(fine.dim() == 4, who, ": fine must be per-page window sums (pages, slots, Hkv, D), got ",
              fine.sizes());
  int64_t max_len = 0;
  SumParams P = common_params(who, q, fine.size(2), lengths, kernel_size, kernel_stride, block_size, topk,
                              forced_init, window_blocks, variant41, use_coarse, &max_len);
  const int64_t B = P.B, D = P.D, Hkv = P.Hkv, pages = fine.size(0);
  TORCH_CHECK(page_size > 0, who, ": page_size must be positive, got ", page_size);
  auto check_sums = [&](const torch::Tensor& t, int64_t stride, const char* name) {
    const int64_t slots = (page_size + stride - 1) / stride;
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.dim() == 4 && t.size(0) == pages &&
                    t.size(1) >= slots && t.size(2) == Hkv && t.size(3) == D && (D <= 1 || t.stride(3) == 1),
                who, ": ", name, " must be float32 CPU per-page window sums (pages=", pages, ", >= ", slots,
                ", Hkv, D) with unit stride along D, got ", t.sizes(), " ", t.scalar_type());
  };
  check_sums(fine, kernel_stride, "fine");
  if (use_coarse) check_sums(coarse, 4 * kernel_stride, "coarse");
  TORCH_CHECK(page_table.scalar_type() == torch::kInt32 && page_table.device().is_cpu() && page_table.dim() == 2 &&
                  page_table.size(0) == B,
              who, ": page_table must be a CPU int32 (B=", B, ", W) tensor, got ", page_table.sizes());
  const int32_t* table = page_table.data_ptr<int32_t>();
  const int64_t t0 = page_table.stride(0), t1 = page_table.stride(1);
  for (int64_t b = 0; b < B; ++b) {  // every page a complete window can end in must be in the pool
    const int64_t used = (lengths[b] + page_size - 1) / page_size;
    TORCH_CHECK(used <= page_table.size(1), who, ": lengths[", b, "] = ", lengths[b], " needs ", used,
                " pages, the page_table has ", page_table.size(1));
    for (int64_t s = 0; s < used; ++s)
      TORCH_CHECK(table[b * t0 + s * t1] >= 0 && table[b * t0 + s * t1] < pages, who, ": page_table[", b, ", ", s,
                  "] = ", table[b * t0 + s * t1], " is outside the pool [0, ", pages, ")");
  }
  auto out = torch::full({B, Hkv, P.sq, topk}, -1, q.options().dtype(torch::kInt32));
  if (B == 0 || P.sq == 0 || topk == 0 || D == 0) return out;
  P.table = table, P.tst0 = t0, P.tst1 = t1, P.page_size = page_size;
  // every complete window is reachable: no cap beyond the lengths
  P.fine = fine.data_ptr<float>(), P.slots1 = windows(max_len, kernel_size, kernel_stride);
  P.fst[0] = fine.stride(0), P.fst[1] = fine.stride(2), P.fst[2] = fine.stride(1);
  if (use_coarse) {
    P.coarse = coarse.data_ptr<float>(), P.slots2 = windows(max_len, 4 * kernel_size, 4 * kernel_stride);
    P.cst[0] = coarse.stride(0), P.cst[1] = coarse.stride(2), P.cst[2] = coarse.stride(1);
  }
  run_select(P, q, lengths, out);
  return out;
}

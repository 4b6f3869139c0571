// The Python binding of the CPU decode kernel (decode.cpp) and of TopK's key pooling.
//
// decode_fwd takes ONE argument, a DecodeArgs: the tensors and the pattern's numbers by name
// (sparse_attn/backends/cpu/decode.py fills it in one place). This file checks them (a clear
// error naming the field, never a crash in the kernel), turns them into the kernel's Params
// (decode_plan.h) and allocates the outputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/decode_plan.h"
#include "cpu/dtype_tag.h"
#include "cpu/out_check.h"
#include "cpu/quant_rows.h"
#include "cpu/stream_ahead.h"
#include "cpu/target_check.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {
namespace {

namespace v8 = sparse_attn_cpu::v8;

// What decode_fwd computes, by name:
// * q (B, Hq, Sq, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): one dtype (float32, bfloat16 or
//   float16), the head dims contiguous; Sq <= 16.
// * the token rule: causal, window (< 0: none) and sinks (the first keys, always visible with a
//   window); scale multiplies q . k; softcap > 0 caps the scores: softcap * tanh(s / softcap)
//   (0: off).
// * a block filter of `block` keys per block, at most one: `layout` (BlockSparse: bool (1 or B,
//   1 or Hkv, >= nb, >= nb), indexed by absolute positions) or `token_index` (TopK: int32
//   (B, Hkv, Sq, topk), ascending, -1 padded, plus sink_blocks / local_blocks forced blocks).
// * a cache: `lengths` (int32 (B,)): sequence b holds lengths[b] keys and its query rows are
//   end-aligned to it (absent: every sequence holds S keys); `page_table` (int32 (B, W), needs
//   lengths): k, v are pages (P, Hkv, page_size, D|Dv) and key j of sequence b is row
//   j % page_size of page page_table[b, j / page_size].
// * a quantized cache: k, v hold int8 or float8_e4m3fn codes (q stays float32 / bf16 / fp16) and
//   `k_scale`, `v_scale` (float32 (pages or B, Hkv, rows), unit stride along the rows) their row
//   scales: key j's row is k_scale[.., j] * k[.., j, :] (sparse_attn/cache/quant.py).
// * where the result goes, optional: `out` (B, Hq, Sq, Dv) in q's dtype, contiguous, not
//   overlapping q; absent, decode_fwd allocates it (a serving loop hands its own output rows).
//   A q of shape (B, Hq, D) is one row per sequence (Sq = 1), and `out` may then be (B, Hq, Dv);
//   the results returned are 4-D views.
struct DecodeArgs {
  torch::Tensor q, k, v;
  bool causal = true;
  int64_t window = -1, sinks = 0;
  double scale = std::nan("");
  double softcap = 0.0;
  int64_t block = 0;
  c10::optional<torch::Tensor> layout, token_index;
  int64_t sink_blocks = 0, local_blocks = 1;
  c10::optional<torch::Tensor> lengths, page_table;
  int64_t page_size = 0;
  c10::optional<torch::Tensor> k_scale, v_scale;
  c10::optional<torch::Tensor> out;
  // the float32 products' prefetches of rows ahead of use: -1 when the K/V were probably not read
  // recently (csrc/cpu/reuse_clock.h), 0 never, 1 always; the same bits either way
  int64_t prefetch = -1;
  // the longest sequence `lengths` may hold (-1: no bound): a TopK / InfLLMv2 runs as a Dense rule
  // only while it sees every causal key (sparse_attn/backends/cpu/decode.py PreparedDecode)
  int64_t max_length = -1;
};

std::string describe(const DecodeArgs& a) {
  auto shape = [](const c10::optional<torch::Tensor>& t) {
    std::ostringstream s;
    if (t.has_value() && t->defined()) s << t->sizes(); else s << "None";
    return s.str();
  };
  std::ostringstream s;
  s << "DecodeArgs(q=" << shape(a.q) << ", k=" << shape(a.k) << ", v=" << shape(a.v) << ", causal=" << a.causal
    << ", window=" << a.window << ", sinks=" << a.sinks << ", scale=" << a.scale << ", softcap=" << a.softcap << ", block=" << a.block
    << ", layout=" << shape(a.layout) << ", token_index=" << shape(a.token_index) << ", sink_blocks=" << a.sink_blocks
    << ", local_blocks=" << a.local_blocks << ", lengths=" << shape(a.lengths) << ", page_table=" << shape(a.page_table)
    << ", page_size=" << a.page_size << ", k_scale=" << shape(a.k_scale) << ", v_scale=" << shape(a.v_scale) << ", out=" << shape(a.out)
    << ", prefetch=" << a.prefetch << ", max_length=" << a.max_length << ")";
  return s.str();
}

// -> (out (B, Hq, Sq, Dv) in q's dtype, lse float32 (B, Hq, Sq); with_lse false: lse undefined and
// not computed). A serving loop's step (decode_step) comes here every layer and token with the
// code cold (its caches hold the model's weights by then): for it this path makes no ATen call
// when the tensors are as it hands them (3-D rows read through their own sizes and strides, int32
// lengths used as they are, no lse), only checks.
static std::tuple<torch::Tensor, torch::Tensor> decode_impl(const DecodeArgs& a, bool with_lse) {
  TORCH_CHECK(a.q.defined() && a.k.defined() && a.v.defined(), "decode_fwd: DecodeArgs needs q, k and v");
  TORCH_CHECK(std::isfinite(a.scale), "decode_fwd: scale must be a finite number, got ", a.scale);
  TORCH_CHECK(std::isfinite(a.softcap) && a.softcap >= 0, "decode_fwd: softcap must be finite and >= 0 (0: off), got ",
              a.softcap);
  // one query row per sequence may come as (B, Hq, D) (out then (B, Hq, Dv)): a serving loop's
  // token rows as they lie, no view made per step in Python
  const bool rows3 = a.q.dim() == 3;
  const torch::Tensor& q = a.q;
  const torch::Tensor &k = a.k, &v = a.v;
  // q as (B, Hq, Sq, D): a (B, Hq, D) tensor's rows are Sq = 1 (its stride there is never used)
  int64_t qs[4], qt[4];
  if (rows3) {
    qs[0] = q.size(0), qs[1] = q.size(1), qs[2] = 1, qs[3] = q.size(2);
    qt[0] = q.stride(0), qt[1] = q.stride(1), qt[2] = q.size(2) * q.stride(2), qt[3] = q.stride(2);
  } else if (q.dim() == 4) {
    for (int d = 0; d < 4; ++d) qs[d] = q.size(d), qt[d] = q.stride(d);
  }
  const bool causal = a.causal;
  const int64_t window = a.window, sinks = a.sinks, block = a.block, page_size = a.page_size;
  const double scale = a.scale;
  TORCH_CHECK((q.dim() == 4 || rows3) && k.dim() == 4 && v.dim() == 4, "decode_fwd: q, k, v must be 4-D (B, H, S, D) (q may be (B, Hq, D): one row)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_fwd: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "decode_fwd: dtype must be float32, bfloat16 or float16, got ", dt);
  const bool quant = a.k_scale.has_value() && a.k_scale->defined();
  TORCH_CHECK(quant == (a.v_scale.has_value() && a.v_scale->defined()), "decode_fwd: set both k_scale and v_scale, or neither");
  const auto kdt = k.scalar_type();
  int kv_tag = sparse_attn_cpu::float_tag(dt);
  if (quant) {
    TORCH_CHECK((kdt == torch::kInt8 || kdt == torch::kFloat8_e4m3fn) && v.scalar_type() == kdt,
                "decode_fwd: with scales, k and v must both be int8 or both float8_e4m3fn, got ", kdt, " and ",
                v.scalar_type());
    kv_tag = kdt == torch::kInt8 ? sparse_attn_cpu::kInt8 : sparse_attn_cpu::kFp8;
  } else {
    TORCH_CHECK(kdt == dt && v.scalar_type() == dt, "decode_fwd: q, k, v must share one dtype");
  }
  const bool paged = a.page_table.has_value() && a.page_table->defined();
  const bool ragged = a.lengths.has_value() && a.lengths->defined();
  TORCH_CHECK(!paged || ragged, "decode_fwd: a page_table needs lengths");
  const int64_t B = qs[0], Hq = qs[1], sq = qs[2], D = qs[3];
  const int64_t Hkv = k.size(1), rows = k.size(2), Dv = v.size(3);
  TORCH_CHECK((paged || k.size(0) == B) && v.size(0) == k.size(0) && v.size(1) == Hkv && v.size(2) == rows &&
                  k.size(3) == D,
              "decode_fwd: q, k, v shapes disagree");
  TORCH_CHECK(sq <= 16, "decode_fwd: at most 16 query rows, got ", sq);
  const bool has_layout = a.layout.has_value() && a.layout->defined();
  const bool has_index = a.token_index.has_value() && a.token_index->defined();
  TORCH_CHECK(!(has_layout && has_index), "decode_fwd: set one block filter, layout or token_index, not both");
  const int mode = has_layout ? 1 : has_index ? 2 : 0;
  TORCH_CHECK(mode == 0 || block > 0, "decode_fwd: block must be positive with a ", has_layout ? "layout" : "token_index",
              ", got ", block);
  torch::Tensor lens, table;
  int64_t sk = rows;  // the longest sequence
  if (ragged) {
    const torch::Tensor& given = *a.lengths;
    lens = given.scalar_type() == torch::kInt32 && given.is_contiguous() ? given : given.to(torch::kInt32).contiguous();
    TORCH_CHECK(lens.device().is_cpu() && lens.dim() == 1 && lens.size(0) == B,
                "decode_fwd: lengths must be a CPU int32 (B=", B, ",) tensor, got ", lens.sizes());
    int64_t cap = rows;
    if (paged) {
      table = *a.page_table;
      TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.device().is_cpu() && table.dim() == 2 &&
                      table.size(0) == B,
                  "decode_fwd: page_table must be a CPU int32 (B=", B, ", W) tensor, got ", table.sizes());
      TORCH_CHECK(page_size > 0 && rows == page_size, "decode_fwd: k, v pages must hold page_size=", page_size,
                  " rows, got ", rows);
      cap = table.size(1) * page_size;
    }
    const int32_t* L = lens.data_ptr<int32_t>();
    sk = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(L[b] >= 0 && L[b] <= cap, "decode_fwd: lengths[", b, "] = ", L[b], " is outside [0, ", cap, "]");
      TORCH_CHECK(!causal || L[b] >= sq, "decode_fwd: a causal rule needs Sq <= lengths[", b, "] = ", L[b]);
      TORCH_CHECK_VALUE(a.max_length < 0 || L[b] <= a.max_length, "decode_fwd: lengths[", b, "] = ", L[b],
                        " is beyond max_length = ", a.max_length, " (the rule given holds only that far)");
      sk = std::max<int64_t>(sk, L[b]);
      if (paged) {  // every page a visited key can live on must be in the pool
        const int32_t* row = table.data_ptr<int32_t>() + b * table.stride(0);
        for (int64_t s = 0; s < (L[b] + page_size - 1) / page_size; ++s) {
          const int32_t pg = row[s * table.stride(1)];
          TORCH_CHECK(pg >= 0 && pg < k.size(0), "decode_fwd: page_table[", b, ", ", s, "] = ", pg,
                      " is outside the pool [0, ", k.size(0), ")");
        }
      }
    }
  } else {
    TORCH_CHECK(!causal || sq <= sk, "decode_fwd: a causal rule needs Sq <= Sk");
    TORCH_CHECK_VALUE(a.max_length < 0 || sk <= a.max_length, "decode_fwd: Sk = ", sk, " is beyond max_length = ",
                      a.max_length, " (the rule given holds only that far)");
  }
  // the caller's result tensor (checked: the kernel writes it as contiguous rows), else a new one
  torch::Tensor out;
  if (a.out.has_value() && a.out->defined()) {
    out = *a.out;
    const bool shape_ok = rows3 && out.dim() == 3 ? out.sizes() == torch::IntArrayRef({B, Hq, Dv})
                                                  : out.sizes() == torch::IntArrayRef({B, Hq, sq, Dv});
    TORCH_CHECK(out.scalar_type() == dt && out.device().is_cpu() && shape_ok && out.is_contiguous(),
                "decode_fwd: out must be a contiguous CPU ", dt, " (", B, ", ", Hq, ", ", sq, ", ", Dv, ") tensor, got ",
                out.scalar_type(), " ", out.sizes());
    // q's rows are read while other heads' results are written: they must not share memory
    TORCH_CHECK(!sparse_attn_cpu::spans_overlap(out, q), "decode_fwd: out must not overlap q");
  } else {
    out = torch::empty({B, Hq, sq, Dv}, q.options());
  }
  torch::Tensor lse;
  if (with_lse) lse = torch::empty({B, Hq, sq}, q.options().dtype(torch::kFloat32));
  if (B == 0 || Hq == 0 || sq == 0) return {out, lse};
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_fwd: Hq must be a multiple of Hkv");
  // K as columns (decode_kcols.h): a paged float32 cache whose (page, kv head) blocks are D rows of
  // kcol >= page_size floats, the blocks whole (kst0, kst1 multiples of D x kcol)
  const bool kcols = paged && rows > 0 && D > 1 && k.stride(3) != 1 && k.stride(2) == 1;
  if (kcols) {
    const int64_t blk = D * k.stride(3);
    TORCH_CHECK_VALUE(dt == torch::kFloat32 && !quant && k.stride(3) >= page_size && k.stride(0) % blk == 0 &&
                          k.stride(1) % blk == 0,
                      "decode_fwd: k as columns (stride 1 along the rows) needs a paged float32 cache whose "
                      "(page, kv head) blocks are D rows of at least page_size floats, got dtype ",
                      kdt, " and strides ", k.strides());
  } else if (rows > 0 && D > 0) {
    TORCH_CHECK(k.stride(3) == 1, "decode_fwd: k must be contiguous in its last dim (or, paged float32, in its rows)");
  }
  if (rows > 0 && Dv > 0) TORCH_CHECK(v.stride(3) == 1, "decode_fwd: v must be contiguous in its last dim");

  Params P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.sk = sk, P.D = D, P.Dv = Dv;
  P.Dpad = std::max<int64_t>(8, (D + 7) / 8 * 8), P.R = sq * P.G;
  for (int d = 0; d < 4; ++d) P.qst[d] = qt[d];
  for (int d = 0; d < 3; ++d) P.kst[d] = k.stride(d), P.vst[d] = v.stride(d);
  P.causal = causal, P.window = window, P.sinks = std::max<int64_t>(0, sinks);
  P.qmul = static_cast<float>(scale) * kLog2e;
  P.cap = static_cast<float>(a.softcap) * kLog2e;
  const int dtag = sparse_attn_cpu::float_tag(dt);
  P.seg = segment_keys(dtag, kv_tag, P.R, D);
  P.mode = mode, P.unit = mode == 0 ? P.seg : block;
  P.lens = ragged ? lens.data_ptr<int32_t>() : nullptr;
  P.table = paged ? table.data_ptr<int32_t>() : nullptr;
  P.tst0 = paged ? table.stride(0) : 0, P.tst1 = paged ? table.stride(1) : 0;
  P.page_size = paged ? page_size : 0;
  P.kcol = kcols ? k.stride(3) : 0;
  P.ksc = P.vsc = nullptr;
  TORCH_CHECK_VALUE(a.prefetch >= -1 && a.prefetch <= 1, "decode_fwd: prefetch must be -1 (auto), 0 or 1, got ",
                    a.prefetch);
  P.prefetch = static_cast<int>(a.prefetch);
  if (quant) {
    const torch::Tensor &ks = *a.k_scale, &vs = *a.v_scale;
    for (const torch::Tensor* t : {&ks, &vs})
      TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->dim() == 3 &&
                      t->size(0) == k.size(0) && t->size(1) == Hkv && t->size(2) == rows &&
                      (rows <= 1 || t->stride(2) == 1),
                  "decode_fwd: k_scale / v_scale must be float32 (", k.size(0), ", ", Hkv, ", ", rows,
                  ") with unit stride along the rows, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(ks.stride(0) == vs.stride(0) && ks.stride(1) == vs.stride(1),
                "decode_fwd: k_scale and v_scale must share their strides");
    P.ksc = ks.data_ptr<float>(), P.vsc = vs.data_ptr<float>();
    P.sst[0] = ks.stride(0), P.sst[1] = ks.stride(1);
  }
  torch::Tensor lay, ti;
  const int64_t nb = (sk + P.unit - 1) / P.unit;
  if (mode == 1) {
    lay = *a.layout;
    TORCH_CHECK(lay.scalar_type() == torch::kBool && lay.device().is_cpu() && lay.dim() == 4 &&
                    (lay.size(0) == 1 || lay.size(0) == B) && (lay.size(1) == 1 || lay.size(1) == Hkv) &&
                    lay.size(2) >= nb && lay.size(3) >= nb,
                "decode_fwd: layout must be bool (1 or B, 1 or Hkv, >= ", nb, ", >= ", nb, "), got ", lay.sizes());
    P.lay = lay.data_ptr<bool>();
    for (int d = 0; d < 4; ++d) P.lst[d] = lay.stride(d);
    P.lb = lay.size(0), P.lh = lay.size(1);
  } else if (mode == 2) {
    ti = a.token_index->to(torch::kInt32).contiguous();
    TORCH_CHECK(ti.device().is_cpu() && ti.dim() == 4 && ti.size(0) == B && ti.size(1) == Hkv && ti.size(2) == sq,
                "decode_fwd: token_index must be (B, Hkv, Sq, topk), got ", ti.sizes());
    P.ti = ti.data_ptr<int32_t>(), P.topk = ti.size(3);
    P.sink_blocks = std::max<int64_t>(0, a.sink_blocks), P.local_blocks = std::max<int64_t>(1, a.local_blocks);
  }

  const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr();
  run_decode(P, dtag, kv_tag, qd, kd, vd, out.data_ptr(), with_lse ? lse.data_ptr<float>() : nullptr);
  return {out, lse};
}

std::tuple<torch::Tensor, torch::Tensor> decode_fwd(const DecodeArgs& a) { return decode_impl(a, true); }

// A serving loop's step (sparse_attn/backends/cpu/decode.py PreparedDecode): decode_fwd with the
// step's four tensors passed as arguments instead of set on `a` one attribute at a time, the
// result written into `out` and nothing returned: ~1.5 us less per call from Python than four
// attribute assignments, decode_fwd(a) and a returned (out, lse) pair. Checked as decode_fwd.
void decode_step(const DecodeArgs& a, const torch::Tensor& q, const torch::Tensor& lengths,
                 const torch::Tensor& page_table, const torch::Tensor& out) {
  DecodeArgs s = a;
  s.q = q, s.lengths = lengths, s.page_table = page_table, s.out = out;
  decode_impl(s, false);
}

// TopK's pooled keys: mean of each block of `block` keys (the last may be partial), float32
// (B, Hkv, ceil(Sk / block), D). K is read once in its dtype (converted in registers), float32
// sums; parallel over (batch, kv head, block). At decode this is the selection's whole cost.
torch::Tensor pool_keys(torch::Tensor k, int64_t block) {
  TORCH_CHECK(k.dim() == 4 && k.device().is_cpu(), "pool_keys: k must be a 4-D CPU tensor");
  TORCH_CHECK(block > 0, "pool_keys: block must be positive");
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "pool_keys: dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = k.size(0), H = k.size(1), sk = k.size(2), D = k.size(3), nb = (sk + block - 1) / block;
  auto out = torch::empty({B, H, nb, D}, k.options().dtype(torch::kFloat32));
  if (out.numel() == 0) return out;
  if (D > 1 && k.stride(3) != 1) k = k.contiguous();
  const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
  float* o = out.data_ptr<float>();
  auto run = [&](auto tag) {
    constexpr int DT = decltype(tag)::value;
    using In = typename sparse_attn_cpu::Elem<DT>::T;
    const In* K = static_cast<const In*>(k.data_ptr());
    const int64_t grain = std::max<int64_t>(1, 4096 / block);  // ~4K keys per task
    at::parallel_for(0, B * H * nb, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(std::max<int64_t>(D, 8));
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i % nb, bh = i / nb, j0 = n * block, j1 = std::min(sk, j0 + block);
        const In* base = K + (bh / H) * s0 + (bh % H) * s1;
        std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t D8 = D / 8 * 8;
        for (int64_t j = j0; j < j1; ++j) {
          const In* row = base + j * s2;
          for (int64_t c = 0; c < D8; c += 8) v8::store(acc.data() + c, v8::load(acc.data() + c) + v8::convert<DT>(row + c));
          for (int64_t c = D8; c < D; ++c) acc[c] += sparse_attn_cpu::Elem<DT>::get(row, c);
        }
        const float cnt = static_cast<float>(j1 - j0);
        float* dst = o + i * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = acc[c] / cnt;
      }
    });
  };
  sparse_attn_cpu::with_float_tag(dt, run);
  return out;
}

// A quantized cache's append: x (..., D) float32 / bfloat16 / float16 on the CPU -> (codes (..., D)
// int8, or float8_e4m3fn with fp8, scales float32 (...)): each row in one pass (quant_rows.h),
// parallel over rows. The contract's definition; sparse_attn/cache/quant.py holds it in PyTorch.
std::tuple<torch::Tensor, torch::Tensor> quantize_rows(torch::Tensor x, bool fp8) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "quantize_rows: x must be a CPU tensor with a last (row) dim");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "quantize_rows: dtype must be float32, bfloat16 or float16, got ", dt);
  x = x.contiguous();
  const int64_t D = x.size(-1), n = D ? x.numel() / D : 0;
  auto codes = torch::empty(x.sizes(), x.options().dtype(fp8 ? torch::kFloat8_e4m3fn : torch::kInt8));
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  auto scales = torch::empty(sizes, x.options().dtype(torch::kFloat32));
  if (n == 0) return {codes, scales.fill_(1.f)};
  float* s = scales.data_ptr<float>();
  auto* c = static_cast<uint8_t*>(codes.data_ptr());
  auto run = [&](auto tag) {
    constexpr int DT = decltype(tag)::value;
    using In = typename sparse_attn_cpu::Elem<DT>::T;
    const In* src = static_cast<const In*>(x.data_ptr());
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<float> tmp(D);
      for (int64_t r = lo; r < hi; ++r)
        s[r] = sparse_attn_cpu::quantize_row<DT>(src + r * D, D, fp8, c + r * D, tmp.data());
    });
  };
  sparse_attn_cpu::with_float_tag(dt, run);
  return {codes, scales};
}

}  // namespace
}  // namespace sparse_attn_decode

// csrc/cpu/page_write.cpp: a serving loop's new key / value rows into their page slots
namespace sparse_attn_decode {
void write_page_rows(const torch::Tensor& k_pages, const torch::Tensor& v_pages, const torch::Tensor& key,
                     const torch::Tensor& value, const torch::Tensor& slots, const c10::optional<torch::Tensor>& sums);
}  // namespace sparse_attn_decode

// csrc/cpu/topk_select.cpp: TopK's selection over a cache's block sums (per sequence, or per page
// through a page table)
torch::Tensor topk_select_sums(torch::Tensor q, torch::Tensor sums, std::vector<int64_t> lengths, int64_t block_size,
                               int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                               c10::optional<torch::Tensor> page_table);

namespace {
// a dtype's name as run_decode's tag (q: float32 / bfloat16 / float16; K/V also int8 / fp8_e4m3)
int dtype_tag(const char* fn, const std::string& n, bool kv) {
  if (n == "float32") return 0;
  if (n == "bfloat16") return 1;
  if (n == "float16") return 2;
  if (kv && n == "int8") return sparse_attn_cpu::kInt8;
  if (kv && n == "fp8_e4m3") return sparse_attn_cpu::kFp8;
  TORCH_CHECK_VALUE(false, fn, ": ", kv ? "kv_dtype" : "dtype", " must be float32, bfloat16, float16",
                    kv ? ", int8 or fp8_e4m3" : "", ", got ", n);
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  using namespace sparse_attn_decode;
  m.doc() = "sparse_attn CPU split-KV decode kernel";
  m.attr("bf16_dot") = bf16_dot_enabled();  // bfloat16 products with vdpbf16ps
  m.attr("amx_built") = amx_built();         // ... and on AMX tiles (decode_amx.h)
  m.def("amx_enabled", &amx_enabled, "whether bf16 decode runs on AMX tiles now (built, permitted, switched on)");
  m.def("set_amx", &set_amx, py::arg("on"),
        "switch the AMX tiles on or off for bf16 decode (process-wide; SPARSE_ATTN_CPU_AMX=0 starts off)");
  m.def("amx_min_rows", &amx_min_rows,
        "query rows per (batch, kv head) from which bf16 decode uses the tiles (fewer: vdpbf16ps; 0 without AMX)");
  m.def("set_amx_min_rows", [](int64_t rows) {
          TORCH_CHECK_VALUE(rows >= 1, "set_amx_min_rows: rows must be >= 1, got ", rows);
          set_amx_min_rows(rows);
        }, py::arg("rows"), "set amx_min_rows() for the process (tests: 1 runs every shape on tiles)");
  m.def("stream_ahead", [] { return sparse_attn_cpu::stream_ahead_bytes().load(); },
        "bytes of a contiguous run's K / V rows asked for ahead of the products (0: off; stream_ahead.h)");
  m.def("set_stream_ahead", [](int64_t bytes) {
          TORCH_CHECK_VALUE(bytes >= 0, "set_stream_ahead: bytes must be >= 0, got ", bytes);
          sparse_attn_cpu::stream_ahead_bytes().store(bytes);
        }, py::arg("bytes"),
        "set stream_ahead() for the process (SPARSE_ATTN_CPU_STREAM_AHEAD=<bytes> sets it at start)");
  m.attr("int8_dot") = int8_dot_enabled();  // int8 codes x int16 q / P with vpdpwssd (decode_int8.h)
  m.attr("fp8_dot") = fp8_dot_enabled();  // fp8 codes as bf16 words, the bf16 products (decode_fp8.h)
  py::class_<DecodeArgs>(m, "DecodeArgs", "decode_fwd's arguments, by name (see csrc/cpu/decode_binding.cpp)")
      .def(py::init<>())
      .def_readwrite("q", &DecodeArgs::q)
      .def_readwrite("k", &DecodeArgs::k)
      .def_readwrite("v", &DecodeArgs::v)
      .def_readwrite("causal", &DecodeArgs::causal)
      .def_readwrite("window", &DecodeArgs::window)
      .def_readwrite("sinks", &DecodeArgs::sinks)
      .def_readwrite("scale", &DecodeArgs::scale)
      .def_readwrite("softcap", &DecodeArgs::softcap)
      .def_readwrite("block", &DecodeArgs::block)
      .def_readwrite("layout", &DecodeArgs::layout)
      .def_readwrite("token_index", &DecodeArgs::token_index)
      .def_readwrite("sink_blocks", &DecodeArgs::sink_blocks)
      .def_readwrite("local_blocks", &DecodeArgs::local_blocks)
      .def_readwrite("lengths", &DecodeArgs::lengths)
      .def_readwrite("page_table", &DecodeArgs::page_table)
      .def_readwrite("page_size", &DecodeArgs::page_size)
      .def_readwrite("k_scale", &DecodeArgs::k_scale)
      .def_readwrite("v_scale", &DecodeArgs::v_scale)
      .def_readwrite("out", &DecodeArgs::out)
      .def_readwrite("prefetch", &DecodeArgs::prefetch)
      .def_readwrite("max_length", &DecodeArgs::max_length)
      .def("__repr__", &describe);
  m.def("decode_fwd", &decode_fwd, "split-KV attention forward for Sq <= 16 query rows -> (out, lse)", py::arg("args"));
  m.def("decode_step", &decode_step,
        "decode_fwd(args) with q, lengths, page_table and out given here, writing out in place (returns None)",
        py::arg("args"), py::arg("q"), py::arg("lengths"), py::arg("page_table"), py::arg("out"));
  m.def("pool_keys", &pool_keys, "mean key of each block, float32 (B, H, ceil(Sk / block), D)", py::arg("k"),
        py::arg("block"));
  m.def("write_page_rows", &write_page_rows,
        "key (T, Hkv, D) / value rows into k_pages / v_pages (P, Hkv, page_size, D) at slots (>= T,) "
        "(page * page_size + row; negative: skipped), keeping float32 page sums (P, Hkv, D) when given",
        py::arg("k_pages"), py::arg("v_pages"), py::arg("key"), py::arg("value"), py::arg("slots"),
        py::arg("sums") = py::none());
  m.def("topk_select_sums", &topk_select_sums,
        "TopK's selection over a cache: int32 (B, Hkv, Sq, topk) from float32 block sums (B, Hkv, blocks, D), "
        "or per-page sums (pages, Hkv, D) read through page_table (B, W), rows end-aligned to each "
        "sequence's length", py::arg("q"), py::arg("sums"), py::arg("lengths"), py::arg("block_size"),
        py::arg("topk"), py::arg("sink_blocks"), py::arg("local_blocks"), py::arg("page_table") = py::none());
  m.def(
      "segment_keys",
      [](const std::string& dtype, const std::string& kv_dtype, int64_t rows, int64_t head_dim) {
        TORCH_CHECK_VALUE(rows > 0 && head_dim > 0, "segment_keys: rows and head_dim must be positive");
        return segment_keys(dtype_tag("segment_keys", dtype, false), dtype_tag("segment_keys", kv_dtype, true), rows,
                            head_dim);
      },
      "keys per segment the kernel cuts for q's dtype, K/V's, rows per kv head (G x Sq) and the head dim",
      py::arg("dtype"), py::arg("kv_dtype"), py::arg("rows"), py::arg("head_dim"));
  m.def(
      "products",
      [](const std::string& dtype, const std::string& kv_dtype, int64_t rows, int64_t head_dim, int64_t v_head_dim) {
        TORCH_CHECK_VALUE(rows > 0 && head_dim > 0 && v_head_dim > 0, "products: rows and head dims must be positive");
        return decode_products(dtype_tag("products", dtype, false), dtype_tag("products", kv_dtype, true), rows,
                               head_dim, v_head_dim);
      },
      "which products the kernel multiplies with for q's dtype, K/V's, rows per kv head and the head dims (words)",
      py::arg("dtype"), py::arg("kv_dtype"), py::arg("rows"), py::arg("head_dim"), py::arg("v_head_dim"));
  m.def("quantize_rows", &quantize_rows, "rows -> (int8 or fp8 codes, float32 scale per row)", py::arg("x"),
        py::arg("fp8"));
}

// The decode kernel over a quantized cache (int8 / fp8 codes, one float32 scale per row: the
// element types are in quant_rows.h). A key's dequantized row is s_k[j] * code_j, so
//   q . k_j = s_k[j] * (q . code_j)       (the scores: the products read codes, then one multiply)
//   sum_j p_j v_j = sum_j (p_j s_v[j]) code_j   (P . V: the probabilities carry the V scales)
// with the softmax's max and sum taken before the V scales are applied. This file finds a
// segment's scales (beside the pages, laid out as they are) and applies them; decode.cpp calls it
// around the unchanged float32 products of decode_f32.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/decode_plan.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {

namespace v8 = sparse_attn_cpu::v8;

// ks[j], vs[j] = the K / V scales of key sg.j0 + j of sequence b, kv head h, j < sg.nk; entries up
// to the next multiple of 8 are 1 (the vector loops below read them)
inline void load_scales(const Params& P, const Seg& sg, int64_t b, int64_t h, float* ks, float* vs) {
  const int64_t nk = sg.nk, j0 = sg.j0;
  if (!P.table) {  // (B, Hkv, S): the segment's scales are consecutive
    const float* k = P.ksc + b * P.sst[0] + h * P.sst[1] + j0;
    const float* v = P.vsc + b * P.sst[0] + h * P.sst[1] + j0;
    std::copy_n(k, nk, ks), std::copy_n(v, nk, vs);
  } else {  // (pages, Hkv, page_size) through the page table, as the rows
    const int64_t ps = P.page_size;
    const int32_t* row = P.table + b * P.tst0;
    for (int64_t j = 0; j < nk;) {
      const int64_t a = j0 + j, off = a % ps, n = std::min(nk - j, ps - off);
      const int64_t base = row[(a / ps) * P.tst1] * P.sst[0] + h * P.sst[1] + off;
      std::copy_n(P.ksc + base, n, ks + j), std::copy_n(P.vsc + base, n, vs + j);
      j += n;
    }
  }
  const int64_t nk8 = (nk + 7) / 8 * 8;
  std::fill(ks + nk, ks + nk8, 1.f), std::fill(vs + nk, vs + nk8, 1.f);
}

// s[i][0 : nk) *= sc[0 : nk), i < cnt (rows padded to a multiple of 8 keys)
inline void scale_rows(float* const* s, int64_t cnt, int64_t nk, const float* sc) {
  const int64_t nk8 = (nk + 7) / 8 * 8;
  for (int64_t i = 0; i < cnt; ++i)
    for (int64_t j = 0; j < nk8; j += 8) v8::store(s[i] + j, v8::load(s[i] + j) * v8::load(sc + j));
}

}  // namespace sparse_attn_decode

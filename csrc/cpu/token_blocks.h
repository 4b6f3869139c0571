// TopK's per-token blocks of one query tile, grouped by block (forward and dq pass of the CPU
// kernels): every selected block is then converted once for all the tile's tokens that chose it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparse_attn_cpu {

// sel: the tile's first token's row of token_index (rows of `topk` entries, -1 = none).
// Calls f(n, token_rows) for each selected block n, ascending; token_rows are the tile-relative
// tokens that selected it, ascending. `pairs` and `tokens` are the caller's scratch.
template <typename F>
inline void for_each_selected_block(const int32_t* sel, int64_t rows, int64_t topk, std::vector<int64_t>& pairs,
                                    std::vector<int64_t>& tokens, F&& f) {
  pairs.clear();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < topk; ++e)
      if (sel[r * topk + e] >= 0) pairs.push_back((int64_t(sel[r * topk + e]) << 32) | r);
  std::sort(pairs.begin(), pairs.end());
  for (size_t a = 0; a < pairs.size();) {
    const int64_t n = pairs[a] >> 32;
    tokens.clear();
    for (; a < pairs.size() && (pairs[a] >> 32) == n; ++a) tokens.push_back(pairs[a] & 0xffffffff);
    f(n, tokens);
  }
}

}  // namespace sparse_attn_cpu

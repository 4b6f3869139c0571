// TopK's per-token blocks of one query tile, grouped by block (forward and dq pass of the CPU
// kernels): every selected block is then converted once for all the tile's tokens that chose it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparse_attn_cpu {

// the tile-relative tokens that selected one block, ascending
struct TokenSpan {
  const int64_t *first, *last;
  const int64_t* begin() const { return first; }
  const int64_t* end() const { return last; }
  int64_t size() const { return last - first; }
};

// sel: the tile's first token's row of token_index (rows of `topk` entries, -1 = none).
// Calls f(n, tokens) for each selected block n, ascending; tokens (a TokenSpan) are the
// tile-relative tokens that selected it, ascending. A counting sort by block id: two passes over
// the selections and one over the blocks up to the largest selected. `count` and `tokens` are the
// caller's scratch.
template <typename F>
inline void for_each_selected_block(const int32_t* sel, int64_t rows, int64_t topk, std::vector<int64_t>& count,
                                    std::vector<int64_t>& tokens, F&& f) {
  int64_t top = -1, pairs = 0;
  for (int64_t e = 0; e < rows * topk; ++e) top = std::max<int64_t>(top, sel[e]), pairs += sel[e] >= 0;
  if (top < 0) return;
  count.assign(top + 2, 0);  // count[n + 1]: the tokens of block n; then, summed, where block n starts
  for (int64_t e = 0; e < rows * topk; ++e)
    if (sel[e] >= 0) ++count[sel[e] + 1];
  for (int64_t n = 0; n <= top; ++n) count[n + 1] += count[n];
  tokens.resize(pairs);
  for (int64_t r = 0; r < rows; ++r)  // rows ascending: each block's tokens ascending
    for (int64_t e = 0; e < topk; ++e)
      if (sel[r * topk + e] >= 0) tokens[count[sel[r * topk + e]]++] = r;
  // count[n] is now where block n ends (and block n + 1 starts)
  for (int64_t n = 0, start = 0; n <= top; start = count[n++])
    if (count[n] > start) f(n, TokenSpan{tokens.data() + start, tokens.data() + count[n]});
}

}  // namespace sparse_attn_cpu

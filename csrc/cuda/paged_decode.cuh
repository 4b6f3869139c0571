// Split-KV (flash-decoding) attention over a paged KV cache, for decode and short query blocks.
//
// Pure CUDA (no torch headers) so that CI can compile it with nvcc for sm_80 and sm_90 on a
// machine without a GPU or a CUDA build of torch. The torch binding is paged_decode_binding.cpp.
//
// Addressing: key (page, kv head h, offset o, d) lives at
//   k + page * k_page_stride + h * k_head_stride + o * k_tok_stride + d
// and token j of sequence b is at page page_table[b][j / page_size], offset j % page_size.
// A contiguous (B, Hkv, Sk, D) cache is the special case page_size = Sk, page_table[b] = {b},
// k_page_stride = Hkv * Sk * D.
//
// Work split: grid (splits, B * Hkv, row groups). One CTA reads its share of the visited key
// blocks of one (sequence, kv head) ONCE for up to ROWS query rows (the G query heads of the GQA
// group times the Sq rows), four warps taking keys in turn; each warp keeps an online softmax
// per row; the warps merge in shared memory and the CTA writes a partial (out, lse) per split.
// A second kernel merges the splits by log-sum-exp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sparse_attn_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// K/V storage: the queries' dtype, or a quantized cache's int8 / fp8 e4m3fn codes with one float32
// scale per row (sparse_attn/cache/quant.py): row values are code * scale
enum class KvQuant : int { kNone = 0, kInt8 = 1, kFp8E4M3 = 2 };

struct PagedDecodeParams {
  const void* q;  // (B, Hq, Sq, D), contiguous
  const void* k;
  const void* v;
  int64_t k_page_stride, k_head_stride, k_tok_stride;
  int64_t v_page_stride, v_head_stride, v_tok_stride;
  // quantized K/V (kv_quant != kNone): row scales (pages, Hkv, page_size) float32, laid out as the
  // rows without the head dim (unit stride along the tokens), the same strides for K and V
  int kv_quant;
  const float* k_scale;
  const float* v_scale;
  int64_t scale_page_stride, scale_head_stride;
  const int32_t* page_table;  // (B, table_width)
  const int32_t* lengths;     // (B,) tokens held by each sequence; query row t sits at lengths[b] - Sq + t
  // visited key blocks of key_block tokens per (b, kv head): ascending, -1 padded; block_count
  // == nullptr means every block below the sequence's length
  const int32_t* block_count;  // (B, Hkv)
  const int32_t* block_index;  // (B, Hkv, max_blocks)
  // optional per-row membership (TopK with Sq > 1): (B, Hkv, Sq, row_mask_blocks) uint8
  const uint8_t* row_block_mask;
  int row_mask_blocks;
  int batch, q_heads, kv_heads, sq, head_dim, v_head_dim;
  int page_size, table_width, key_block, max_blocks;
  int causal;   // 1: key j visible only if j <= query position
  int window;   // > 0: also p - j < window or j < sinks
  int sinks;
  float scale;
  float softcap;  // > 0: scores become softcap * tanh(s / softcap) before the token rule; 0: off
  int num_splits;
  float* part_out;  // (B, Hq, Sq, num_splits, Dv) normalised partial outputs
  float* part_lse;  // (B, Hq, Sq, num_splits), -inf for a split that saw nothing
  void* out;        // (B, Hq, Sq, Dv), dtype of q
  float* lse;       // (B, Hq, Sq), +inf for a row that saw no key
};

// Returns cudaSuccess or the launch error. `dtype` is the dtype of q and out (and of k, v unless
// p.kv_quant says they hold codes).
cudaError_t launch_paged_decode(const PagedDecodeParams& p, DType dtype, cudaStream_t stream);

// Query rows one CTA serves at most (G * Sq rows are split into groups of this many).
constexpr int kRowsPerCta = 8;
// Largest head dim served (D and Dv).
constexpr int kMaxHeadDim = 256;

}  // namespace sparse_attn_cuda

// Split-KV paged decode: kernels and launcher (see paged_decode.cuh for the data layout).
#include "paged_decode.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

namespace sparse_attn_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kNegInf = -INFINITY;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// a quantized cache's codes (the scales are applied by the caller): int8 as an integer, fp8 e4m3fn
// from its bits (exponent rebiased 7 -> 127; subnormals m * 2^-9 exactly, no float32 denormal made)
struct Int8Code {
  int8_t x;
};
struct Fp8Code {
  uint8_t x;
};
template <>
__device__ __forceinline__ float to_f32<Int8Code>(Int8Code c) { return static_cast<float>(c.x); }
template <>
__device__ __forceinline__ float to_f32<Fp8Code>(Fp8Code c) {
  const unsigned w = c.x;
  const float mag = (w & 0x78u) ? __uint_as_float(((w & 0x7fu) << 20) + (120u << 23)) : static_cast<float>(w & 7u) * 0.001953125f;
  return (w & 0x80u) ? -mag : mag;
}
template <typename KV>
struct IsCode {
  static constexpr bool value = false;
};
template <>
struct IsCode<Int8Code> {
  static constexpr bool value = true;
};
template <>
struct IsCode<Fp8Code> {
  static constexpr bool value = true;
};

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One CTA: split `blockIdx.x` of the visited key blocks of (sequence, kv head) `blockIdx.y`, for
// query rows [blockIdx.z * R, +R) of the group (row r -> head g = r / Sq, token t = r % Sq).
// NC: 32-element chunks along D and Dv held per lane (D, Dv <= 32 * NC). KV: the K/V element
// (T, or a quantized cache's Int8Code / Fp8Code: each row dequantized in registers as it is loaded).
//
// Occupancy (CTAs per SM) the launch bounds ask for, per NC, read from `ptxas -v` / the cubin by
// `python -m bench.gpu_static` (docs/perf/2026-12-02-gpu-static.md): uncapped, NC=2 used 153-160
// registers (3 CTAs / SM), NC=4 184-197 (2), NC=8 251-255 (2). Capped at 4 CTAs NC=2 takes 96-111
// registers with no spill (4 CTAs: 16 warps / SM); NC=4 fits 3 CTAs on sm_90 (153 registers, no
// spill) but spills 56 bytes on sm_80 at that cap, so sm_80 keeps 2; NC=8 (D 129..256) cannot go
// below 2 CTAs (sm_90 spills 24 bytes even uncapped).
template <int NC>
struct MinCtasPerSm {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static constexpr int value = NC <= 2 ? 4 : NC <= 4 ? 3 : 1;
#else
  static constexpr int value = NC <= 2 ? 4 : 1;
#endif
};

template <typename T, typename KV, int NC>
__global__ void __launch_bounds__(kThreads, MinCtasPerSm<NC>::value) split_kernel(const PagedDecodeParams p) {
  constexpr int R = kRowsPerCta;
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.kv_heads;
  const int hkv = blockIdx.y % p.kv_heads;
  const int group = p.q_heads / p.kv_heads;
  const int row0 = blockIdx.z * R;
  const int nrows = min(R, group * p.sq - row0);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int len = p.lengths[b];

  const T* qptr = static_cast<const T*>(p.q);
  const KV* kptr = static_cast<const KV*>(p.k);
  const KV* vptr = static_cast<const KV*>(p.v);

  float q[R][NC];
  int qpos[R];
  int qtok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool valid = r < nrows;
    const int row = row0 + r;
    const int g = valid ? row / p.sq : 0;
    const int t = valid ? row % p.sq : 0;
    const int64_t base = ((static_cast<int64_t>(b) * p.q_heads + hkv * group + g) * p.sq + t) * p.head_dim;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = lane + 32 * c;
      q[r][c] = (valid && d < p.head_dim) ? to_f32<T>(qptr[base + d]) * p.scale : 0.f;
    }
    qpos[r] = valid ? len - p.sq + t : -1;
    qtok[r] = t;
  }

  const int bh = b * p.kv_heads + hkv;
  const int nblocks = p.block_count ? p.block_count[bh] : (len + p.key_block - 1) / p.key_block;
  const int per = (nblocks + p.num_splits - 1) / p.num_splits;
  const int blo = split * per;
  const int bhi = min(nblocks, blo + per);

  float m[R], l[R], acc[R][NC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = 0.f;
  }

  for (int bi = blo; bi < bhi; ++bi) {
    const int blk = p.block_count ? p.block_index[static_cast<int64_t>(bh) * p.max_blocks + bi] : bi;
    if (blk < 0) continue;
    const int j0 = blk * p.key_block;
    const int j1 = min(j0 + p.key_block, len);
    for (int j = j0 + warp; j < j1; j += kWarps) {
      const int64_t page = p.page_table[static_cast<int64_t>(b) * p.table_width + j / p.page_size];
      const int off = j % p.page_size;
      const KV* kr = kptr + page * p.k_page_stride + hkv * p.k_head_stride + off * p.k_tok_stride;
      const int64_t srow = page * p.scale_page_stride + hkv * p.scale_head_stride + off;
      const float ks = IsCode<KV>::value ? p.k_scale[srow] : 1.f;
      float kv[NC];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int d = lane + 32 * c;
        kv[c] = d < p.head_dim ? to_f32<KV>(kr[d]) * ks : 0.f;  // the dequantized row
      }
      float s[R];
      bool vis[R];
      bool any = false;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) dot += q[r][c] * kv[c];
        s[r] = warp_sum(dot);  // every lane holds the row's score: the branches below are uniform
        if (p.softcap > 0.f) s[r] = p.softcap * tanhf(s[r] / p.softcap);
        bool ok = qpos[r] >= 0;
        if (p.causal) ok = ok && j <= qpos[r];
        if (p.window > 0) ok = ok && (qpos[r] - j < p.window || j < p.sinks);
        if (p.row_block_mask != nullptr && ok) {
          const int64_t mi = (static_cast<int64_t>(bh) * p.sq + qtok[r]) * p.row_mask_blocks + blk;
          ok = p.row_block_mask[mi] != 0;
        }
        vis[r] = ok;
        any = any || ok;
      }
      if (!any) continue;
      const KV* vr = vptr + page * p.v_page_stride + hkv * p.v_head_stride + off * p.v_tok_stride;
      const float vs = IsCode<KV>::value ? p.v_scale[srow] : 1.f;
      float vv[NC];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int d = lane + 32 * c;
        vv[c] = d < p.v_head_dim ? to_f32<KV>(vr[d]) * vs : 0.f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (!vis[r]) continue;
        const float m_new = fmaxf(m[r], s[r]);
        const float alpha = __expf(m[r] - m_new);  // exp(-inf) = 0 on the first visible key
        const float pe = __expf(s[r] - m_new);
        l[r] = l[r] * alpha + pe;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[r][c] = acc[r][c] * alpha + pe * vv[c];
        m[r] = m_new;
      }
    }
  }

  // merge the warps
  __shared__ float sm_m[kWarps][R];
  __shared__ float sm_l[kWarps][R];
  __shared__ float sm_acc[kWarps][R][32 * NC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == 0) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) sm_acc[warp][r][lane + 32 * c] = acc[r][c];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * p.v_head_dim; idx += kThreads) {
    const int r = idx / p.v_head_dim;
    const int d = idx % p.v_head_dim;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][r]);
    float lsum = 0.f, a = 0.f;
    if (mx != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float e = __expf(sm_m[w][r] - mx);
        lsum += sm_l[w][r] * e;
        a += sm_acc[w][r][d] * e;
      }
    }
    const int row = row0 + r;
    const int g = row / p.sq;
    const int t = row % p.sq;
    const int64_t prow = (static_cast<int64_t>(b) * p.q_heads + hkv * group + g) * p.sq + t;
    const int64_t slot = prow * p.num_splits + split;
    p.part_out[slot * p.v_head_dim + d] = lsum > 0.f ? a / lsum : 0.f;
    if (d == 0) p.part_lse[slot] = lsum > 0.f ? mx + logf(lsum) : kNegInf;
  }
}

// One CTA per query row: merge the splits' partial outputs by log-sum-exp.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(const PagedDecodeParams p) {
  const int64_t row = blockIdx.x;
  const float* lse = p.part_lse + row * p.num_splits;
  float mx = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse[s]);
  float wsum = 0.f;
  if (mx != kNegInf)
    for (int s = 0; s < p.num_splits; ++s) wsum += __expf(lse[s] - mx);
  T* out = static_cast<T*>(p.out) + row * p.v_head_dim;
  for (int d = threadIdx.x; d < p.v_head_dim; d += kThreads) {
    float a = 0.f;
    if (wsum > 0.f)
      for (int s = 0; s < p.num_splits; ++s)
        a += __expf(lse[s] - mx) * p.part_out[(row * p.num_splits + s) * p.v_head_dim + d];
    out[d] = from_f32<T>(wsum > 0.f ? a / wsum : 0.f);
  }
  if (threadIdx.x == 0) p.lse[row] = wsum > 0.f ? mx + logf(wsum) : INFINITY;
}

template <typename T, typename KV, int NC>
cudaError_t launch_typed(const PagedDecodeParams& p, cudaStream_t stream) {
  const int group = p.q_heads / p.kv_heads;
  const dim3 grid(p.num_splits, p.batch * p.kv_heads, (group * p.sq + kRowsPerCta - 1) / kRowsPerCta);
  split_kernel<T, KV, NC><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  merge_kernel<T><<<p.batch * p.q_heads * p.sq, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename KV>
cudaError_t launch_dims(const PagedDecodeParams& p, cudaStream_t stream) {
  const int d = p.head_dim > p.v_head_dim ? p.head_dim : p.v_head_dim;
  if (d <= 64) return launch_typed<T, KV, 2>(p, stream);
  if (d <= 128) return launch_typed<T, KV, 4>(p, stream);
  if (d <= 256) return launch_typed<T, KV, 8>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_kv(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (static_cast<KvQuant>(p.kv_quant)) {
    case KvQuant::kNone: return launch_dims<T, T>(p, stream);
    case KvQuant::kInt8: return launch_dims<T, Int8Code>(p, stream);
    case KvQuant::kFp8E4M3: return launch_dims<T, Fp8Code>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_paged_decode(const PagedDecodeParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0 || p.sq == 0) return cudaSuccess;
  if (p.num_splits < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_kv<float>(p, stream);
    case DType::kFloat16: return launch_kv<__half>(p, stream);
    case DType::kBFloat16: return launch_kv<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparse_attn_cuda

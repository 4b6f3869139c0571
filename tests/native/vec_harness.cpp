// Torch-free check of the CPU kernels' vector layer (csrc/cpu/vec.h, vec_bf16.h, decode_bf16.h,
// decode_int8.h)
// against plain scalar loops, for whatever instruction set it is compiled for: x86 (AVX2, AVX-512,
// AVX-512 BF16) natively, aarch64 (NEON, BF16) under qemu-user. It builds in seconds with no
// torch, so CI runs it for every ISA level (tests/test_vec_harness.py natively, .ci/arm under
// emulation). Prints the ISA it was built for, then "N passed, M failed"; exits 1 on a failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/decode_bf16.h"
#include "cpu/decode_int8.h"
#include "cpu/target_check.h"
#include "cpu/vec.h"
#include "cpu/vec_bf16.h"

using namespace sparse_attn_cpu;

namespace {

int passed = 0, failed = 0;
std::mt19937 rng(1234);

float uniform() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

void check(bool ok, const char* what, double err = 0.0) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s (error %.3g)\n", what, err);
  }
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

uint16_t to_bf16(float x) {  // round to nearest even
  uint32_t w = float_to_bits(x);
  w += 0x7fffu + ((w >> 16) & 1u);
  return uint16_t(w >> 16);
}
float from_bf16(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

void test_gemm_f32() {
  for (int rows : {1, 5, 6, 7, 13})
    for (int n : {kVec, 2 * kVec, kNR, kNR + kVec, 3 * kNR})
      for (int acc = 0; acc < 2; ++acc) {
        const int K = 37;
        std::vector<float> a(rows * K), b(K * n), c(rows * n), scale(rows);
        for (auto& x : a) x = uniform();
        for (auto& x : b) x = uniform();
        for (auto& x : c) x = uniform();
        for (auto& x : scale) x = uniform();
        std::vector<double> want(rows * n);
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < n; ++j) {
            double s = acc ? double(scale[r]) * c[r * n + j] : 0.0;
            for (int k = 0; k < K; ++k) s += double(a[r * K + k]) * b[k * n + j];
            want[r * n + j] = s;
          }
        std::vector<const float*> ap(rows);
        std::vector<float*> cp(rows);
        for (int r = 0; r < rows; ++r) ap[r] = &a[r * K], cp[r] = &c[r * n];
        if (acc) gemm_rows<true>(rows, n, K, ap.data(), b.data(), n, cp.data(), scale.data());
        else gemm_rows<false>(rows, n, K, ap.data(), b.data(), n, cp.data(), nullptr);
        const double e = rel_err(c, want);
        check(e < 1e-5, "gemm_rows (float32 micro-kernel)", e);
      }
}

void test_softmax_pieces() {
  const int n = 4 * kVec;
  std::vector<float> x(n), y(n);
  for (auto& v : x) v = 20.f * uniform() - 30.f;
  for (auto& v : y) v = 5.f * uniform();
  const float m = row_max(x.data(), n);
  float want_m = -INFINITY;
  for (float v : x) want_m = std::max(want_m, v);
  check(m == want_m, "row_max");
  std::vector<float> z = x;
  const float s = exp2_sub_sum(z.data(), n, m);
  double ws = 0, worst = 0;
  for (int i = 0; i < n; ++i) {
    const double w = std::exp2(double(x[i]) - m);
    ws += w;
    worst = std::max(worst, std::fabs(z[i] - w) / std::max(w, 1e-30));
  }
  check(worst < 2e-6 && std::fabs(s - ws) / ws < 1e-5, "exp2_sub_sum", worst);
  z = x;
  exp2_sub_cols(z.data(), y.data(), n);
  worst = 0;
  for (int i = 0; i < n; ++i) {
    const double w = std::exp2(double(x[i]) - y[i]);
    worst = std::max(worst, std::fabs(z[i] - w) / std::max(w, 1e-30));
  }
  check(worst < 2e-6, "exp2_sub_cols", worst);
}

void test_transpose_and_rows() {
  const int rows = 19, cols = 21, lds = 32, ldd = 32;
  std::vector<float> src(32 * lds), dst(32 * ldd, 0.f);
  for (auto& v : src) v = uniform();
  transpose_f32(dst.data(), ldd, src.data(), lds, rows, cols);
  bool ok = true;
  for (int c = 0; c < rows; ++c)
    for (int x = 0; x < cols; ++x) ok &= dst[x * ldd + c] == src[c * lds + x];
  check(ok, "transpose_f32");
  std::vector<uint16_t> h(40);
  for (auto& v : h) v = to_bf16(uniform());
  std::vector<float> out(20);
  load_row<1>(out.data(), h.data(), 20, 2, 0.5f);
  ok = true;
  for (int i = 0; i < 20; ++i) ok &= out[i] == from_bf16(h[2 * i]) * 0.5f;
  check(ok, "load_row<bfloat16>");
}

#ifdef SPARSE_ATTN_BF16_DOT
void test_bf16_products() {
  for (int D : {32, 64, 80, 128, 33})
    for (int nk : {1, 7, 16, 29}) {
      // the kernels' leading dimensions are multiples of kVec (16 with AVX-512, 4 on Arm), not of 16
      const int rows = 7, ld = int(round_up(nk, kVec)), Dw = (D + 1) / 2;
      std::vector<uint16_t> q(rows * 2 * Dw, 0), k(nk * D);
      for (int r = 0; r < rows; ++r)
        for (int d = 0; d < D; ++d) q[r * 2 * Dw + d] = to_bf16(uniform());
      for (auto& v : k) v = to_bf16(uniform());
      constexpr uint32_t kGuard = 0x7fc0dead;  // words past the packed block must stay untouched
      std::vector<uint32_t> kp(Dw * ld + 64, kGuard);
      pack_k_pairs(kp.data(), ld, k.data(), D, 1, nk, D);
      bool guard_ok = true;
      for (int i = Dw * ld; i < Dw * ld + 64; ++i) guard_ok &= kp[i] == kGuard;
      check(guard_ok, "pack_k_pairs stays inside its ld x ceil(D/2) words");
      std::vector<float> s(rows * ld + 64, -7.f);
      std::vector<const uint32_t*> qp(rows);
      std::vector<float*> sp(rows);
      for (int r = 0; r < rows; ++r)
        qp[r] = reinterpret_cast<const uint32_t*>(&q[r * 2 * Dw]), sp[r] = &s[r * ld];
      gemm_bf16<false>(rows, ld, Dw, qp.data(), kp.data(), ld, sp.data(), nullptr, 0.25f);
      std::vector<float> got;
      std::vector<double> want;
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < ld; ++j) {
          double w = 0;
          if (j < nk)
            for (int d = 0; d < D; ++d) w += double(from_bf16(q[r * 2 * Dw + d])) * from_bf16(k[j * D + d]);
          want.push_back(0.25 * w);
          got.push_back(s[r * ld + j]);
        }
      const double e = rel_err(got, want);
      check(e < 1e-5, "pack_k_pairs + gemm_bf16 (S = Q . K^T)", e);
      bool tail_ok = true;
      for (int i = rows * ld; i < rows * ld + 64; ++i) tail_ok &= s[i] == -7.f;
      check(tail_ok, "gemm_bf16 writes only its N columns");
    }
  const int nf = 3 * kVec;  // a multiple of the vector width, not of 16 on Arm
  std::vector<float> f(nf);
  for (auto& v : f) v = uniform() * 100.f;
  std::vector<uint32_t> w(nf / 2 + 8, 0x7fc0dead);
  floats_to_bf16_pairs(w.data(), f.data(), nf);
  bool ok = true;
  for (int i = 0; i < nf; ++i) ok &= uint16_t(w[i / 2] >> (16 * (i % 2))) == to_bf16(f[i]);
  for (int i = nf / 2; i < nf / 2 + 8; ++i) ok &= w[i] == 0x7fc0dead;
  check(ok, "floats_to_bf16_pairs (round to nearest even)");
  std::vector<uint16_t> r0(45), r1(45);
  for (auto& v : r0) v = to_bf16(uniform());
  for (auto& v : r1) v = to_bf16(uniform());
  std::vector<uint32_t> il(45);
  interleave_bf16_rows(il.data(), r0.data(), r1.data(), 45);
  ok = true;
  for (int i = 0; i < 45; ++i) ok &= il[i] == (uint32_t(r0[i]) | uint32_t(r1[i]) << 16);
  interleave_bf16_rows(il.data(), r0.data(), nullptr, 45);
  for (int i = 0; i < 45; ++i) ok &= il[i] == uint32_t(r0[i]);
  check(ok, "interleave_bf16_rows");
}

template <int RG, int DC>
void test_direct_once(int nk) {
  constexpr int D = 32 * DC;
  const int ld = int(round_up(nk, 16));
  std::vector<uint16_t> q(RG * D), k(nk * D), v(nk * D), zero(D, 0);
  for (auto& x : q) x = to_bf16(uniform());
  for (auto& x : k) x = to_bf16(uniform());
  for (auto& x : v) x = to_bf16(uniform());
  std::vector<float> s(RG * ld);
  const uint32_t* qp[RG];
  float* sp[RG];
  for (int r = 0; r < RG; ++r) qp[r] = reinterpret_cast<const uint32_t*>(&q[r * D]), sp[r] = &s[r * ld];
  int calls = 0;
  bool in_order = true;  // the hook is told each key pair's first key, in order
  auto hook = [&](int64_t j) { in_order &= j == 2 * calls, ++calls; };
  qk_direct<RG, DC>(nk, qp, [&](int64_t j) { return &k[j * D]; }, sp, 0.5f, hook);
  std::vector<float> got;
  std::vector<double> want;
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < ld; ++j) {
      const int jr = std::min(j, nk - 1);
      double w = 0;
      for (int d = 0; d < D; ++d) w += double(from_bf16(q[r * D + d])) * from_bf16(k[jr * D + d]);
      want.push_back(0.5 * w);
      got.push_back(s[r * ld + j]);
    }
  double e = rel_err(got, want);
  check(e < 1e-5 && calls == ld / 2 && in_order, "qk_direct", e);
  // P . V in two sub-segments with a rescale between them
  const int np = (nk + 1) / 2;
  std::vector<uint16_t> p(RG * 2 * np, 0);
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < nk; ++j) p[r * 2 * np + j] = to_bf16(std::fabs(uniform()));
  std::vector<float> o(RG * D), corr(2 * RG);
  for (auto& x : o) x = uniform();
  for (auto& x : corr) x = std::fabs(uniform());
  const int64_t pair_end[1] = {np / 2};
  std::vector<double> wo(RG * D);
  for (int r = 0; r < RG; ++r)
    for (int d = 0; d < D; ++d) {
      double acc = double(o[r * D + d]) * corr[r];
      for (int j = 0; j < nk; ++j) {
        if (j == 2 * pair_end[0]) acc *= corr[RG + r];
        acc += double(from_bf16(p[r * 2 * np + j])) * from_bf16(v[j * D + d]);
      }
      wo[r * D + d] = acc;
    }
  const uint32_t* pp[RG];
  float* op[RG];
  for (int r = 0; r < RG; ++r) pp[r] = reinterpret_cast<const uint32_t*>(&p[r * 2 * np]), op[r] = &o[r * D];
  calls = 0;
  pv_direct<RG, DC>(nk, pp, [&](int64_t j) { return &v[j * D]; }, zero.data(), 0, op, corr.data(), hook, 2,
                    pair_end, RG);
  e = rel_err(o, wo);
  check(e < 1e-5 && calls == np && in_order, "pv_direct (two sub-segments)", e);
}

void test_direct() {
  for (int nk : {1, 5, 16, 33}) {
    test_direct_once<1, 1>(nk);
    test_direct_once<4, 1>(nk);
    test_direct_once<2, 2>(nk);
    test_direct_once<3, 4>(nk);
    test_direct_once<4, 8>(nk);
  }
}
#endif

#ifdef SPARSE_ATTN_INT8_DOT
// decode_int8.h's integer products (vpdpwssd / Arm sdot + smlal): the int32 sums are exact, so the
// results must be the integer products times the multipliers up to float32 rounding; q at the int16
// extremes (the Arm split into two int8 halves), codes at +-127, two P . V sub-segments
struct Int8Rows {  // the kernels' row access (decode_rows.h's StridedRows)
  const int8_t* base;
  int64_t stride;
  const int8_t* operator[](int64_t j) const { return base + j * stride; }
};

template <int RG, int DC>
void test_int8_once(int nk) {
  constexpr int D = 32 * DC;
  const int ld = int(round_up(nk, 16));
  auto code = [] { return int8_t(std::uniform_int_distribution<int>(-127, 127)(rng)); };
  std::vector<int16_t> q(RG * D);
  std::vector<int8_t> k(nk * D), v(nk * D);
  for (int i = 0; i < RG * D; ++i)
    q[i] = int16_t(i % 7 == 0 ? 32767 : i % 7 == 1 ? -32767 : std::uniform_int_distribution<int>(-32767, 32767)(rng));
  for (int i = 0; i < nk * D; ++i) k[i] = i % 5 == 0 ? int8_t(127) : i % 5 == 1 ? int8_t(-127) : code();
  for (auto& x : v) x = code();
  std::vector<float> s(RG * ld), mul(RG);
  const int16_t* qp[RG];
  float* sp[RG];
  for (int r = 0; r < RG; ++r) qp[r] = &q[r * D], sp[r] = &s[r * ld], mul[r] = 1e-6f * float(r + 1);
  std::vector<float> ks(ld);  // the keys' scales, applied as the scores are stored
  for (auto& x : ks) x = 1.f + 0.5f * uniform();
  int calls = 0;
  bool in_order = true;  // the hook is told each key pair's first key, in order
  auto hook = [&](int64_t j) { in_order &= j == 2 * calls, ++calls; };
  qk_int8<RG, DC>(nk, qp, Int8Rows{k.data(), D}, sp, mul.data(), ks.data(), hook);
  std::vector<float> got;
  std::vector<double> want;
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < nk; ++j) {  // keys past nk: finite scores the caller masks
      int64_t w = 0;
      for (int d = 0; d < D; ++d) w += int64_t(q[r * D + d]) * k[j * D + d];
      want.push_back(double(mul[r]) * double(ks[j]) * double(w));
      got.push_back(s[r * ld + j]);
    }
  double e = rel_err(got, want);
  check(e < 1e-6 && calls == ld / 2 && in_order, "qk_int8", e);
  // P as int16 pairs (an odd nk's pad word 0), two sub-segments with their own corr and mul
  const int np = (nk + 1) / 2;
  std::vector<int16_t> p(RG * 2 * np, 0);
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < nk; ++j) p[r * 2 * np + j] = int16_t(j % 3 == 0 ? 32767 : std::uniform_int_distribution<int>(0, 32767)(rng));
  std::vector<float> o(RG * D), corr(2 * RG), pm(2 * RG);
  for (auto& x : o) x = uniform();
  for (auto& x : corr) x = std::fabs(uniform());
  for (auto& x : pm) x = 1e-7f * (1.f + std::fabs(uniform()));
  const int64_t pair_end[1] = {np / 2};
  std::vector<double> wo(RG * D);
  for (int r = 0; r < RG; ++r)
    for (int d = 0; d < D; ++d) {
      double acc = o[r * D + d];
      for (int u = 0; u < 2; ++u) {  // sub-segment u: keys [lo, hi), o = corr o + mul sum
        const int lo = u == 0 ? 0 : int(2 * pair_end[0]), hi = u == 0 ? int(2 * pair_end[0]) : nk;
        int64_t sum = 0;
        for (int j = lo; j < hi; ++j) sum += int64_t(p[r * 2 * np + j]) * v[j * D + d];
        acc = acc * corr[u * RG + r] + double(pm[u * RG + r]) * double(sum);
      }
      wo[r * D + d] = acc;
    }
  const uint32_t* pp[RG];
  float* op[RG];
  for (int r = 0; r < RG; ++r) pp[r] = reinterpret_cast<const uint32_t*>(&p[r * 2 * np]), op[r] = &o[r * D];
  calls = 0;
  pv_int8<RG, DC>(nk, pp, Int8Rows{v.data(), D}, 0, op, corr.data(), pm.data(), hook, 2, pair_end, RG);
  e = rel_err(o, wo);
  check(e < 1e-6 && calls == np && in_order, "pv_int8 (two sub-segments)", e);
  // quantize_p16 == quantize_p16_scalar but for the fused rounding (codes within 1)
  std::vector<float> pf(nk), sv(nk);
  for (int j = 0; j < nk; ++j) pf[j] = std::fabs(uniform()), sv[j] = 0.01f * (1.f + std::fabs(uniform()));
  std::vector<int16_t> c1(nk + 1, -1), c2(nk + 1, -1);
  const float s1 = quantize_p16(pf.data(), sv.data(), nk, c1.data());
  const float s2 = quantize_p16_scalar(pf.data(), sv.data(), nk, c2.data());
  bool ok = s1 == s2 && (nk % 2 == 0 || c1[nk] == 0);
  for (int j = 0; j < nk; ++j) ok &= std::abs(c1[j] - c2[j]) <= 1 && c1[j] >= 0;
  pf[nk / 2] = std::numeric_limits<float>::infinity();
  ok &= std::isnan(quantize_p16(pf.data(), sv.data(), nk, c1.data()));
  check(ok, "quantize_p16");
}

void test_int8() {
  for (int nk : {1, 5, 16, 33, 70}) {
    test_int8_once<1, 1>(nk);
    test_int8_once<4, 1>(nk);
    test_int8_once<2, 2>(nk);
    test_int8_once<3, 4>(nk);
    test_int8_once<4, 8>(nk);
  }
}
#endif

}  // namespace

int main() {
#if defined(__aarch64__)
  const char* isa = "aarch64 NEON";
#elif defined(__AVX512F__)
  const char* isa = "x86-64 AVX-512";
#elif defined(__AVX2__)
  const char* isa = "x86-64 AVX2";
#else
  const char* isa = "generic";
#endif
#ifdef SPARSE_ATTN_BF16_DOT
  const char* bf16 = "bf16 dot products";
#else
  const char* bf16 = "no bf16 dot products";
#endif
#ifdef SPARSE_ATTN_INT8_DOT
  const char* int8 = "int8 dot products";
#else
  const char* int8 = "no int8 dot products";
#endif
  std::printf("vector layer: %s, %d floats per vector, %s, %s\n", isa, kVec, bf16, int8);
  // the extensions' import-time check: a build for features this CPU lacks must be refused
  const std::string missing = missing_target_features();
  if (!missing.empty()) {
    std::printf("refused: %s\n", missing.c_str());
    return 2;
  }
  test_gemm_f32();
  test_softmax_pieces();
  test_transpose_and_rows();
#ifdef SPARSE_ATTN_BF16_DOT
  test_bf16_products();
  test_direct();
#endif
#ifdef SPARSE_ATTN_INT8_DOT
  test_int8();
#endif
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

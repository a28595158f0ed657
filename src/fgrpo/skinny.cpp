// y = x W^T + b for a few rows of x (fgrpo.skinny): each weight row is read from memory once, by AVX2 FMA.
// Weight rows are split between torch's threads in blocks of BLOCK; each block stays in cache while every
// group of up to 4 rows of x multiplies it, so W crosses the memory bus once whatever the row count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t BLOCK = 8;  // weight rows per task: 8 x 1536 floats (48 KiB) fit in L2

// y[r * ldy] = x[r] . w + b for the R rows of x (row stride ldx), w one weight row of length n.
template <int R>
inline void dot_rows(const float* x, int64_t ldx, const float* w, float b, float* y, int64_t ldy, int64_t n) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
    for (int r = 0; r < R; ++r) {  // two accumulators per row: two FMA chains in flight
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + i + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float v = _mm_cvtss_f32(h);
    for (int64_t j = i; j < n; ++j) v += w[j] * x[r * ldx + j];
    y[r * ldy] = v + b;
  }
}

}  // namespace

torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "skinny_linear: float32 only");
  TORCH_CHECK(weight.is_contiguous() && x.size(-1) == weight.size(1), "skinny_linear: weight [out, in], contiguous");
  const auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t rows = x2.size(0), n = weight.size(1), out = weight.size(0);
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + BLOCK - 1) / BLOCK, 1, [&](int64_t first, int64_t last) {
    for (int64_t o = first * BLOCK; o < std::min(out, last * BLOCK); o += BLOCK) {
      const int64_t end = std::min(out, o + BLOCK);
      for (int64_t r = 0; r < rows; r += 4) {
        const float* xr = xp + r * n;
        for (int64_t k = o; k < end; ++k) {
          const float b = bp ? bp[k] : 0.f;
          float* yr = yp + r * out + k;
          switch (std::min<int64_t>(4, rows - r)) {
            case 1: dot_rows<1>(xr, n, wp + k * n, b, yr, out, n); break;
            case 2: dot_rows<2>(xr, n, wp + k * n, b, yr, out, n); break;
            case 3: dot_rows<3>(xr, n, wp + k * n, b, yr, out, n); break;
            default: dot_rows<4>(xr, n, wp + k * n, b, yr, out, n);
          }
        }
      }
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  return y.view(sizes);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("skinny_linear", &skinny_linear, "y = x W^T + b, few rows"); }

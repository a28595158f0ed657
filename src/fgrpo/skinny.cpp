// y = x W^T + b for a few rows of x (fgrpo.skinny): each weight row is read from memory once, by AVX2 FMA.
// Weight rows are split between torch's threads in blocks of BLOCK; each block stays in cache while every
// group of up to 4 rows of x multiplies it, so W crosses the memory bus once whatever the row count.
// A Python module with one function over raw pointers (fgrpo/skinny.py passes the tensors' addresses): it
// includes no torch header, so it compiles in about 2 s; the Python around the call (SkinnyLinear.forward:
// pointers, the output tensor) costs a few microseconds more than torch's extension did in C++.
// The threads are OpenMP's, the runtime torch itself runs on.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

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

// y[rows, out] = x[rows, n] W[out, n]^T (+ b[out] unless b is null), all contiguous float32.
static void skinny_linear(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t n,
                          int64_t out, int threads) {
  const int64_t blocks = (out + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t first = block * BLOCK, end = std::min(out, first + BLOCK);
    for (int64_t r = 0; r < rows; r += 4) {
      const float* xr = x + r * n;
      for (int64_t k = first; k < end; ++k) {
        const float bk = b ? b[k] : 0.f;
        float* yr = y + r * out + k;
        switch (std::min<int64_t>(4, rows - r)) {
          case 1: dot_rows<1>(xr, n, w + k * n, bk, yr, out, n); break;
          case 2: dot_rows<2>(xr, n, w + k * n, bk, yr, out, n); break;
          case 3: dot_rows<3>(xr, n, w + k * n, bk, yr, out, n); break;
          default: dot_rows<4>(xr, n, w + k * n, bk, yr, out, n);
        }
      }
    }
  }
}

// skinny_linear(x, w, b, y, rows, n, out, threads): addresses (b = 0: no bias) and sizes, all integers.
static PyObject* py_skinny_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "skinny_linear(x, w, b, y, rows, n, out, threads) takes 8 integers");
    return nullptr;
  }
  long long v[8];
  for (int i = 0; i < 8; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  skinny_linear(reinterpret_cast<const float*>(v[0]), reinterpret_cast<const float*>(v[1]),
                reinterpret_cast<const float*>(v[2]), reinterpret_cast<float*>(v[3]), v[4], v[5], v[6],
                static_cast<int>(v[7]));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"skinny_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_skinny_linear)),
     METH_FASTCALL, "y = x W^T + b for a few rows of x (addresses and sizes)"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fgrpo_skinny", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_fgrpo_skinny(void) { return PyModule_Create(&module); }

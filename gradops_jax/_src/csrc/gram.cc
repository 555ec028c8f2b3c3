// The Gram pass as an XLA FFI handler for the CPU (see gradops_jax/_src/kernels.py).
//
// Gram. K[i][j] = sum_k x[i][k] * x[j][k], accumulated in double. The product
// of two float32 numbers is exact in double, so for float32 input the only
// rounding is that of the double sums. A chunk walks through blocks of
// columns and forms each block's Gram
// matrix tile by tile. An N x N tile of task pairs keeps its accumulators in
// vector registers (sized for AVX-512's 32), so each loaded vector serves N
// products: N = T for T <= 4, else 3 or 4, whichever pads T to fewer rows
// (padded rows are zeros). The diagonal tiles read the input and convert it
// to double in registers, forming only their upper triangle. With two groups
// of N rows (T <= 8), the second group's pass also forms the products across
// the groups, converting both as it reads them. With more groups, the
// diagonal tiles also store the converted rows into a small buffer that
// stays in the level-1 cache, from which the off-diagonal tiles read. Each
// chunk has its own partial matrix; they are added up in chunk order, so
// the result does not depend on the number of threads or on timing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "chunk_runner.h"
#include "xla/ffi/api/ffi.h"

namespace {

using gradops_jax::RunChunks;
namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Largest tile of task pairs: kMaxTile^2 vector accumulators stay in registers
// with AVX-512 (32 vector registers). With 16 (AVX2), GCC spills some, yet
// smaller tiles that fit measured slower still.
constexpr int kMaxTile = 4;

typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

inline Vec Load(const double* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(double* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// kLanes values of the input, as doubles.
inline Vec LoadAsDouble(const double* p) { return Load(p); }

inline Vec LoadAsDouble(const float* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));  // one instruction
#else
  typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
  Floats v;
  std::memcpy(&v, p, sizeof(Floats));
  return __builtin_convertvector(v, Vec);
#endif
}

// acc + a * b, in one fused multiply-add where the CPU has one. The library
// is compiled with -ffp-contract=off, so that the combine rounds exactly as
// its literal sum; the Gram pass asks for the fused form here (for float32
// input the products are exact, so fusing only saves an instruction).
inline Vec MulAdd(Vec acc, Vec a, Vec b) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                               reinterpret_cast<__m512d>(acc)));
#elif defined(__FMA__)
  return reinterpret_cast<Vec>(_mm256_fmadd_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b),
                                               reinterpret_cast<__m256d>(acc)));
#else
  return acc + a * b;
#endif
}

inline double Sum(Vec v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Adds the diagonal N x N tile of the Gram matrix of the first `width`
// columns (a multiple of kLanes) of the N rows `rows` to `lanes` (entry
// (i, j) at lanes[i * padded_tasks + j], upper triangle), which holds each
// entry's kLanes partial sums. Converts the rows to double as it reads them;
// if kStore, also stores them (`stride` doubles apart) into `converted`.
//
// The tile functions are not inlined: inlined into the block loop, GCC keeps
// the accumulators in memory.
template <int N, bool kStore, typename In>
__attribute__((noinline)) void AddDiagonalTile(const In* const* rows, int64_t width,
                                               double* converted, int64_t stride,
                                               int64_t padded_tasks, Vec* lanes) {
  const In* row[N];  // a local copy, which the stores to `converted` cannot alias
  for (int t = 0; t < N; ++t) row[t] = rows[t];
  Vec acc[N][N] = {};
  for (int64_t k = 0; k < width; k += kLanes) {
    Vec v[N];
    for (int t = 0; t < N; ++t) v[t] = LoadAsDouble(row[t] + k);
    if (kStore)
      for (int t = 0; t < N; ++t) Store(converted + t * stride + k, v[t]);
    for (int i = 0; i < N; ++i)
      for (int j = i; j < N; ++j) acc[i][j] = MulAdd(acc[i][j], v[i], v[j]);
  }
  for (int i = 0; i < N; ++i)
    for (int j = i; j < N; ++j) lanes[i * padded_tasks + j] += acc[i][j];
}

// Adds the N x N tile of products of rows a[0..N) and b[0..N) (converted
// rows, `stride` doubles apart) over the first `width` columns to `lanes`
// (entry (i, j) at lanes[i * padded_tasks + j]).
template <int N>
__attribute__((noinline)) void AddTile(const double* a, const double* b, int64_t stride,
                                       int64_t width, int64_t padded_tasks, Vec* lanes) {
  Vec acc[N][N] = {};
  for (int64_t k = 0; k < width; k += kLanes) {
    Vec va[N], vb[N];
    for (int t = 0; t < N; ++t) {
      va[t] = Load(a + t * stride + k);
      vb[t] = Load(b + t * stride + k);
    }
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j) acc[i][j] = MulAdd(acc[i][j], va[i], vb[j]);
  }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) lanes[i * padded_tasks + j] += acc[i][j];
}

// For two groups of N rows, a and b: adds the products of a with b and the
// diagonal tile of b (upper triangle) over the first `width` columns to
// `lanes` (entry (i, j) of the Gram matrix of [a; b] at
// lanes[i * padded_tasks + j]). Converts both groups as it reads them, so it
// needs no buffer; the N x N products with b and b's triangle use
// N^2 + N(N+1)/2 + N + 1 vector registers (31 for N = 4).
template <int N, typename In>
__attribute__((noinline)) void AddSecondGroup(const In* const* rows, int64_t width,
                                              int64_t padded_tasks, Vec* lanes) {
  const In* a[N];
  const In* b[N];
  for (int t = 0; t < N; ++t) {
    a[t] = rows[t];
    b[t] = rows[N + t];
  }
  Vec cross[N][N] = {};
  Vec diagonal[N][N] = {};
  for (int64_t k = 0; k < width; k += kLanes) {
    Vec vb[N];
    for (int t = 0; t < N; ++t) vb[t] = LoadAsDouble(b[t] + k);
    for (int i = 0; i < N; ++i)
      for (int j = i; j < N; ++j) diagonal[i][j] = MulAdd(diagonal[i][j], vb[i], vb[j]);
    for (int i = 0; i < N; ++i) {
      const Vec va = LoadAsDouble(a[i] + k);
      for (int j = 0; j < N; ++j) cross[i][j] = MulAdd(cross[i][j], va, vb[j]);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      lanes[i * padded_tasks + N + j] += cross[i][j];
      if (j >= i) lanes[(N + i) * padded_tasks + N + j] += diagonal[i][j];
    }
}

// Adds the Gram matrix of `width` columns of `rows` (padded_tasks row
// pointers; width a multiple of kLanes) to `lanes`, in N x N tiles. With
// more than two groups of rows, the diagonal tiles store the converted rows
// into `converted` (padded_tasks rows, `stride` doubles apart) for the
// off-diagonal tiles.
template <int N, typename In>
void AddBlock(const In* const* rows, int64_t width, int64_t padded_tasks, double* converted,
              int64_t stride, Vec* lanes) {
  if (padded_tasks == N) {  // one tile: nothing to store
    AddDiagonalTile<N, false>(rows, width, converted, stride, padded_tasks, lanes);
    return;
  }
  if (padded_tasks == 2 * N) {  // two groups: no buffer either
    AddDiagonalTile<N, false>(rows, width, converted, stride, padded_tasks, lanes);
    AddSecondGroup<N>(rows, width, padded_tasks, lanes);
    return;
  }
  for (int64_t i0 = 0; i0 < padded_tasks; i0 += N)
    AddDiagonalTile<N, true>(rows + i0, width, converted + i0 * stride, stride, padded_tasks,
                             lanes + i0 * padded_tasks + i0);
  for (int64_t i0 = 0; i0 < padded_tasks; i0 += N)
    for (int64_t j0 = i0 + N; j0 < padded_tasks; j0 += N)
      AddTile<N>(converted + i0 * stride, converted + j0 * stride, stride, width, padded_tasks,
                 lanes + i0 * padded_tasks + j0);
}

// Writes the Gram matrix of columns [begin, end) of x (T rows of length
// `length`) into `gram` (padded_tasks x padded_tasks, upper triangle), block
// by block of `block` columns (padded_tasks is a multiple of N; rows past T
// are zeros). Each entry keeps kLanes partial sums over the whole range,
// summed once at the end.
template <int N, typename In>
void PartialGram(const In* x, int64_t tasks, int64_t length, int64_t begin, int64_t end,
                 int64_t padded_tasks, int64_t block, double* gram) {
  // Converted rows, aligned to the vector size; only AddBlock's general case
  // (more than two groups of rows) stores any.
  std::vector<Vec> converted(padded_tasks > 2 * N ? padded_tasks * block / kLanes : 0);
  std::vector<Vec> lanes(padded_tasks * padded_tasks, Vec{});
  const std::vector<In> zeros(block, In{0});
  std::vector<In> tail(padded_tasks * kLanes, In{0});  // last columns, padded with zeros
  std::vector<const In*> rows(padded_tasks), tail_rows(padded_tasks);
  for (int64_t t = 0; t < padded_tasks; ++t) tail_rows[t] = tail.data() + t * kLanes;
  double* const converted_rows = reinterpret_cast<double*>(converted.data());
  for (int64_t start = begin; start < end; start += block) {
    const int64_t count = std::min(block, end - start);
    const int64_t whole = count / kLanes * kLanes;
    for (int64_t t = 0; t < padded_tasks; ++t)
      rows[t] = t < tasks ? x + t * length + start : zeros.data();
    AddBlock<N>(rows.data(), whole, padded_tasks, converted_rows, block, lanes.data());
    if (whole < count) {
      for (int64_t t = 0; t < tasks; ++t)
        std::copy(rows[t] + whole, rows[t] + count, tail.data() + t * kLanes);
      AddBlock<N>(tail_rows.data(), kLanes, padded_tasks, converted_rows, block, lanes.data());
    }
  }
  for (int64_t entry = 0; entry < padded_tasks * padded_tasks; ++entry) gram[entry] = Sum(lanes[entry]);
}

// Columns of the input per chunk of work, in elements of T x D. The chunks,
// and so the order of the sums, depend only on the shape of the input.
constexpr int64_t kElementsPerChunk = int64_t{1} << 18;
constexpr int64_t kMaxGramChunks = 64;

template <typename In>
void Gram(const In* x, int64_t tasks, int64_t length, ffi::ThreadPool& pool, double* out) {
  // T <= 4: one tile of exactly T rows. Else tiles of 3 or 4 rows, whichever
  // pads T to fewer rows (each padded row costs products of zeros).
  const auto padded = [tasks](int64_t tile) { return (tasks + tile - 1) / tile * tile; };
  const int64_t tile = tasks <= kMaxTile ? std::max<int64_t>(tasks, 1) : padded(3) < padded(4) ? 3 : 4;
  const int64_t padded_tasks = padded(tile);
  // Up to T = 16, one block of converted rows fits in 16 KiB (a third of a
  // level-1 data cache). Past that, each block also pays a read-modify-write
  // of T^2 vectors of partial sums and the set-up of T^2 / N^2 tiles, which
  // blocks of at least 8 T columns amortise; the rows then stay in the
  // level-2 cache (at most 512 KiB), which the tiles' loads keep up with.
  const int64_t block = std::max<int64_t>(
      kLanes * 8, std::min<int64_t>(std::max<int64_t>(2048 / padded_tasks, 8 * padded_tasks) / kLanes * kLanes, 1024));
  const int64_t num_blocks = (length + block - 1) / block;
  const int64_t wanted = std::min(kMaxGramChunks, tasks * length / kElementsPerChunk);
  const int64_t num_chunks = std::max<int64_t>(1, std::min(wanted, num_blocks));
  const int64_t columns_per_chunk = (num_blocks + num_chunks - 1) / num_chunks * block;
  const int64_t size = padded_tasks * padded_tasks;
  std::vector<double> partial(num_chunks * size, 0.0);  // one matrix per chunk

  RunChunks(pool, num_chunks, [&](int64_t chunk) {
    const int64_t begin = std::min(length, chunk * columns_per_chunk);
    const int64_t end = std::min(length, begin + columns_per_chunk);
    double* gram = partial.data() + chunk * size;
    switch (tile) {
      case 1: PartialGram<1>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
      case 2: PartialGram<2>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
      case 3: PartialGram<3>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
      default: PartialGram<4>(x, tasks, length, begin, end, padded_tasks, block, gram);
    }
  });

  // Only tiles on and above the diagonal were formed; the matrix is symmetric.
  for (int64_t i = 0; i < tasks; ++i)
    for (int64_t j = i; j < tasks; ++j) {
      double s = 0.0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) s += partial[chunk * size + i * padded_tasks + j];
      out[i * tasks + j] = s;
      out[j * tasks + i] = s;
    }
}

template <ffi::DataType In>
ffi::Error GramImpl(ffi::ThreadPool pool, ffi::Buffer<In> x, ffi::ResultBuffer<ffi::F64> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("gram_kernel: expected a (T, D) array");
  Gram(x.typed_data(), dims[0], dims[1], pool, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GramF32, GramImpl<ffi::F32>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F64>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GramF64, GramImpl<ffi::F64>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());

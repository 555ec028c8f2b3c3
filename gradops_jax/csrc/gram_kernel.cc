// Gram matrix of the rows of a (T, D) float32 or float64 array, in float64,
// as an XLA FFI handler for the CPU (see gradops_jax/cpu_gram.py).
//
// K[i][j] = sum_k x[i][k] * x[j][k], accumulated in double. The product of
// two float32 numbers is exact in double, so for float32 input the only
// rounding is that of the double sums.
//
// The columns are cut into chunks that depend only on (T, D); the calling
// thread and helpers on XLA's intra-op thread pool take chunks until none is
// left. A chunk converts cache-sized blocks of all T rows to double (rows
// padded with zeros to a multiple of the tile, columns to a multiple of the
// vector width), then forms each block's Gram matrix tile by tile: an N x N
// tile of task pairs (N = T for T <= 4, else 4) keeps its accumulators in
// vector registers, so each loaded vector serves N products, and a diagonal
// tile forms only its upper triangle. Each chunk has its own partial matrix;
// they are added up in chunk order, so the result does not depend on the
// number of threads or on timing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Largest tile of task pairs: kMaxTile^2 vector accumulators stay in registers.
constexpr int kMaxTile = 4;

typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

inline Vec Load(const double* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline double Sum(Vec v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Adds the N x N tile (i0.., j0..) of the Gram matrix of the first `width`
// columns of `rows` (rows `stride` doubles apart; width a multiple of kLanes)
// to `lanes`, which holds each entry's kLanes partial sums. A diagonal tile
// (i0 == j0) forms only its upper triangle.
template <int N, bool kDiagonal>
inline void AddTile(const double* rows, int64_t stride, int64_t width, int64_t i0,
                    int64_t j0, int64_t padded_tasks, Vec* lanes) {
  Vec acc[N][N] = {};
  for (int64_t k = 0; k < width; k += kLanes) {
    Vec va[N], vb[N];
    for (int t = 0; t < N; ++t) {
      va[t] = Load(rows + (i0 + t) * stride + k);
      vb[t] = kDiagonal ? va[t] : Load(rows + (j0 + t) * stride + k);
    }
    for (int i = 0; i < N; ++i)
      for (int j = kDiagonal ? i : 0; j < N; ++j) acc[i][j] += va[i] * vb[j];
  }
  for (int i = 0; i < N; ++i)
    for (int j = kDiagonal ? i : 0; j < N; ++j)
      lanes[(i0 + i) * padded_tasks + j0 + j] += acc[i][j];
}

// Writes the Gram matrix of columns [begin, end) of x (T rows of length
// `length`) into `gram` (padded_tasks x padded_tasks, upper triangle), in
// N x N tiles (padded_tasks is a multiple of N). Each entry keeps kLanes
// partial sums over the whole range, summed once at the end.
template <int N, typename In>
void PartialGram(const In* x, int64_t tasks, int64_t length, int64_t begin,
                 int64_t end, int64_t padded_tasks, int64_t block, double* gram) {
  std::vector<double> rows(padded_tasks * block, 0.0);
  std::vector<Vec> lanes(padded_tasks * padded_tasks, Vec{});
  for (int64_t start = begin; start < end; start += block) {
    const int64_t count = std::min(block, end - start);
    const int64_t width = (count + kLanes - 1) / kLanes * kLanes;
    for (int64_t t = 0; t < tasks; ++t) {
      const In* source = x + t * length + start;
      double* target = rows.data() + t * block;
      for (int64_t k = 0; k < count; ++k) target[k] = static_cast<double>(source[k]);
      for (int64_t k = count; k < width; ++k) target[k] = 0.0;
    }
    for (int64_t i0 = 0; i0 < padded_tasks; i0 += N) {
      AddTile<N, true>(rows.data(), block, width, i0, i0, padded_tasks, lanes.data());
      for (int64_t j0 = i0 + N; j0 < padded_tasks; j0 += N)
        AddTile<N, false>(rows.data(), block, width, i0, j0, padded_tasks, lanes.data());
    }
  }
  for (int64_t entry = 0; entry < padded_tasks * padded_tasks; ++entry) gram[entry] = Sum(lanes[entry]);
}

// Columns of the input per chunk of work, in elements of T x D. The chunks,
// and so the order of the sums, depend only on the shape of the input.
constexpr int64_t kElementsPerChunk = int64_t{1} << 18;
constexpr int64_t kMaxChunks = 64;

// The work of one call, shared by the calling thread and the tasks it
// schedules on XLA's thread pool, which may start after the call has ended.
template <typename In>
struct GramWork {
  const In* x;
  int64_t tasks, length, tile, padded_tasks, block, num_chunks, columns_per_chunk;
  std::vector<double> partial;  // num_chunks x padded_tasks^2
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  // Runs chunks until none is left; returns after its last chunk.
  void Run() {
    for (int64_t chunk; (chunk = next.fetch_add(1)) < num_chunks;) {
      const int64_t begin = std::min(length, chunk * columns_per_chunk);
      const int64_t end = std::min(length, begin + columns_per_chunk);
      double* gram = partial.data() + chunk * padded_tasks * padded_tasks;
      switch (tile) {  // T <= 4: one tile of exactly T rows; else tiles of 4
        case 1: PartialGram<1>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
        case 2: PartialGram<2>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
        case 3: PartialGram<3>(x, tasks, length, begin, end, padded_tasks, block, gram); break;
        default: PartialGram<kMaxTile>(x, tasks, length, begin, end, padded_tasks, block, gram);
      }
      if (done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

template <typename In>
void Gram(const In* x, int64_t tasks, int64_t length, ffi::ThreadPool& pool, double* out) {
  auto work = std::make_shared<GramWork<In>>();
  work->x = x;
  work->tasks = tasks;
  work->length = length;
  work->tile = std::min<int64_t>(std::max<int64_t>(tasks, 1), kMaxTile);
  work->padded_tasks = (tasks + work->tile - 1) / work->tile * work->tile;
  // Rows of one block fit in 32 KiB (a level-1 data cache).
  int64_t block = 4096 / work->padded_tasks / kLanes * kLanes;
  work->block = std::max<int64_t>(kLanes * 8, std::min<int64_t>(block, 1024));
  const int64_t num_blocks = (length + work->block - 1) / work->block;
  const int64_t wanted = std::min(kMaxChunks, tasks * length / kElementsPerChunk);
  work->num_chunks = std::max<int64_t>(1, std::min(wanted, num_blocks));
  work->columns_per_chunk = (num_blocks + work->num_chunks - 1) / work->num_chunks * work->block;
  const int64_t size = work->padded_tasks * work->padded_tasks;
  work->partial.assign(work->num_chunks * size, 0.0);

  // Helpers from the pool take chunks too; the caller works until none is
  // left, then waits only for chunks that helpers have started.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mutex);
    work->finished.wait(lock, [&] { return work->done.load() == work->num_chunks; });
  }

  // Only tiles on and above the diagonal were formed; the matrix is symmetric.
  for (int64_t i = 0; i < tasks; ++i)
    for (int64_t j = i; j < tasks; ++j) {
      double s = 0.0;
      for (int64_t chunk = 0; chunk < work->num_chunks; ++chunk)
        s += work->partial[chunk * size + i * work->padded_tasks + j];
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

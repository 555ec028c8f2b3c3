// The combine pass as an XLA FFI handler for the CPU (see gradops_jax/_src/kernels.py).
//
// Combine. out[k] = sum_t (x[t][k] * a[t]) * b[t], in the input's dtype,
// task after task, rounded as written (built with -ffp-contract=off): the sum
// that gradops_jax.combine's XLA loop writes.
// Before writing, it asks the kernel to back the output with transparent
// huge pages (madvise): a fresh output of tens of megabytes is otherwise
// faulted in page by page, 4 KiB at a time, which can cost as much as
// reading the input.

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>

#include "chunk_runner.h"
#include "xla/ffi/api/ffi.h"

namespace {

using gradops_jax::RunChunks;
namespace ffi = xla::ffi;

// Size of a transparent huge page (x86-64, and arm64 with 4 KiB pages).
constexpr uintptr_t kHugePage = uintptr_t{1} << 21;

// Asks for transparent huge pages for the whole huge pages inside
// [data, data + bytes). Only a hint: the kernel ignores it where THP is off.
void AdviseHugePages(void* data, int64_t bytes) {
#if defined(MADV_HUGEPAGE)
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Columns per chunk of the combine, and per block inside a chunk: a block of
// the output (4 or 8 KiB) stays in the level-1 cache while the tasks are
// added to it, up to kCombineGroup tasks per pass over the block.
constexpr int64_t kCombineColumnsPerChunk = int64_t{1} << 16;
constexpr int64_t kCombineBlock = 1024;
constexpr int kCombineGroup = 4;

// Adds the terms (rows[t][k] * a[t]) * b[t] of N tasks to out[k] for k in
// [start, stop), one task after the other; kFirst: out starts at the first term.
template <int N, bool kFirst, typename T>
void AddTasks(const T* const* rows, const T* a, const T* b, int64_t start, int64_t stop,
              T* __restrict__ out) {
  const T* row[N];
  T at[N], bt[N];
  for (int t = 0; t < N; ++t) {
    row[t] = rows[t];
    at[t] = a[t];
    bt[t] = b[t];
  }
  for (int64_t k = start; k < stop; ++k) {
    T total = kFirst ? (row[0][k] * at[0]) * bt[0] : out[k] + (row[0][k] * at[0]) * bt[0];
    for (int t = 1; t < N; ++t) total = total + (row[t][k] * at[t]) * bt[t];
    out[k] = total;
  }
}

template <bool kFirst, typename T>
void AddGroup(int count, const T* const* rows, const T* a, const T* b, int64_t start, int64_t stop,
              T* out) {
  switch (count) {
    case 1: AddTasks<1, kFirst>(rows, a, b, start, stop, out); break;
    case 2: AddTasks<2, kFirst>(rows, a, b, start, stop, out); break;
    case 3: AddTasks<3, kFirst>(rows, a, b, start, stop, out); break;
    default: AddTasks<kCombineGroup, kFirst>(rows, a, b, start, stop, out);
  }
}

// out[k] = sum_t (x[t][k] * a[t]) * b[t] for k in [begin, end), task after task.
template <typename T>
void PartialCombine(const T* x, const T* a, const T* b, int64_t tasks, int64_t length,
                    int64_t begin, int64_t end, T* out) {
  std::vector<const T*> rows(tasks);
  for (int64_t t = 0; t < tasks; ++t) rows[t] = x + t * length;
  for (int64_t start = begin; start < end; start += kCombineBlock) {
    const int64_t stop = std::min(end, start + kCombineBlock);
    for (int64_t t0 = 0; t0 < tasks; t0 += kCombineGroup) {
      const int count = static_cast<int>(std::min<int64_t>(kCombineGroup, tasks - t0));
      if (t0 == 0)
        AddGroup<true>(count, rows.data(), a, b, start, stop, out);
      else
        AddGroup<false>(count, rows.data() + t0, a + t0, b + t0, start, stop, out);
    }
  }
}

template <typename T>
void Combine(const T* x, const T* a, const T* b, int64_t tasks, int64_t length,
             ffi::ThreadPool& pool, T* out) {
  AdviseHugePages(out, length * static_cast<int64_t>(sizeof(T)));
  const int64_t num_chunks = (length + kCombineColumnsPerChunk - 1) / kCombineColumnsPerChunk;
  RunChunks(pool, num_chunks, [&](int64_t chunk) {
    const int64_t begin = chunk * kCombineColumnsPerChunk;
    PartialCombine(x, a, b, tasks, length, begin, std::min(length, begin + kCombineColumnsPerChunk), out);
  });
}

template <ffi::DataType In>
ffi::Error CombineImpl(ffi::ThreadPool pool, ffi::Buffer<In> x, ffi::Buffer<In> a, ffi::Buffer<In> b,
                       ffi::ResultBuffer<In> out) {
  const auto dims = x.dimensions();
  const auto count = [](size_t n) { return static_cast<int64_t>(n); };
  if (dims.size() != 2 || count(a.element_count()) != dims[0] || count(b.element_count()) != dims[0] ||
      count(out->element_count()) != dims[1])
    return ffi::Error::InvalidArgument("combine_kernel: expected (T, D), (T,), (T,) -> (D,)");
  if (dims[0] > 0)
    Combine(x.typed_data(), a.typed_data(), b.typed_data(), dims[0], dims[1], pool, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#define COMBINE_BINDING(T) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<T>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(CombineF32, CombineImpl<ffi::F32>, COMBINE_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CombineF64, CombineImpl<ffi::F64>, COMBINE_BINDING(ffi::F64));

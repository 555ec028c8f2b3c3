// The chunk runner shared by the kernels: the columns of a (T, D) input are
// cut into chunks that depend only on (T, D); the calling thread and helpers
// on XLA's intra-op thread pool take chunks until none is left.
#ifndef GRADOPS_JAX_CHUNK_RUNNER_H_
#define GRADOPS_JAX_CHUNK_RUNNER_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace gradops_jax {

namespace ffi = xla::ffi;

// The chunks of one call, shared by the calling thread and the tasks it
// schedules on XLA's thread pool, which may start after the call has ended
// (they then find no chunk left and never call `body`).
struct Chunks {
  std::function<void(int64_t)> body;
  int64_t count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  // Runs chunks until none is left; returns after its last chunk.
  void Run() {
    for (int64_t chunk; (chunk = next.fetch_add(1)) < count;) {
      body(chunk);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// Calls body(chunk) for every chunk in [0, count), on the calling thread and
// on helpers from the pool, and returns when all calls have returned. The
// caller works until no chunk is left, then waits only for chunks that
// helpers have started.
inline void RunChunks(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  auto chunks = std::make_shared<Chunks>();
  chunks->body = std::move(body);
  chunks->count = count;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  std::unique_lock<std::mutex> lock(chunks->mutex);
  chunks->finished.wait(lock, [&] { return chunks->done.load() == count; });
}

}  // namespace gradops_jax

#endif  // GRADOPS_JAX_CHUNK_RUNNER_H_

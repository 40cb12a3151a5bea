// A small work-sharing pool for the packed matmul kernels (torch-free, Linux/x86).
//
// Why not at::parallel_for (OpenMP): an OpenMP region ends at a barrier, so the calling thread waits for every
// team member to have been scheduled.  On a machine whose cores are busy with other processes, a worker that
// is not running costs a whole scheduler time slice (we measured 8-16 ms per region on a loaded 2-vCPU box,
// for kernels that take 10-50 us).  Here a call is split into chunks that the calling thread and the workers
// claim from one atomic counter; the caller works through the chunks itself and then waits only for chunks a
// worker has actually started.  A worker that shows up late finds nothing left to do, so the worst case is
// the single-thread time, not a time slice.
//
// Workers sleep on a futex between jobs (optionally spinning first: set_spin_us).  Spinning made end-to-end
// decoding ~10% slower on a 2-vCPU machine, where the spinner competes with torch's own OpenMP threads.  One job runs at a time; a call made while the pool is busy (another Python thread,
// nesting) just runs on its calling thread.  After fork() the child starts with no workers.
#pragma once

#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <new>
#include <type_traits>

namespace lmgen_q {

class SharePool {
 public:
  using Fn = void (*)(void* ctx, int64_t chunk);

  static SharePool& instance() {
    static SharePool* pool = [] {
      auto* p = new SharePool();  // never destroyed: detached workers may still be spinning at exit
      pthread_atfork(nullptr, nullptr, [] { SharePool::instance().after_fork_child(); });
      return p;
    }();
    return *pool;
  }

  // Runs fn(ctx, c) for every c in [0, nchunks) on the calling thread and up to nthreads - 1 workers.
  void run(int64_t nchunks, int nthreads, Fn fn, void* ctx) {
    if (nchunks <= 0) return;
    if (nchunks == 1 || nthreads <= 1 || !busy_.try_lock()) {
      for (int64_t c = 0; c < nchunks; ++c) fn(ctx, c);
      return;
    }
    std::lock_guard<std::mutex> hold(busy_, std::adopt_lock);
    const int want = std::min<int>(nthreads - 1, kMaxWorkers);
    spawn(want);
    fn_ = fn;
    ctx_ = ctx;
    wanted_.store(want, std::memory_order_relaxed);
    worker_done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & kGenMask;
    ticket_.store(pack(gen_, nchunks, 0), std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) epoch_.notify_all();
    int64_t mine = 0;
    for (;;) {
      const uint64_t t = ticket_.fetch_add(1, std::memory_order_acq_rel);
      const int64_t idx = static_cast<int64_t>(t & kIdxMask);
      if (idx >= nchunks) break;
      fn(ctx, idx);
      ++mine;
    }
    // every chunk is claimed; wait only for the ones workers are still running
    while (worker_done_.load(std::memory_order_acquire) < nchunks - mine) _mm_pause();
  }

  void set_spin_us(int64_t us) { spin_ns_.store(std::max<int64_t>(0, us) * 1000, std::memory_order_relaxed); }

  // threads lmgen's kernels use (set_tuning's `threads`); 0: the caller's default (torch's thread count)
  void set_threads(int64_t n) { threads_.store(static_cast<int>(std::clamp<int64_t>(n, 0, kMaxWorkers + 1)), std::memory_order_relaxed); }
  int threads() const { return threads_.load(std::memory_order_relaxed); }

 private:
  static constexpr int kMaxWorkers = 63;
  static constexpr uint64_t kIdxBits = 24, kTotBits = 24;
  static constexpr uint64_t kIdxMask = (uint64_t{1} << kIdxBits) - 1, kTotMask = (uint64_t{1} << kTotBits) - 1;
  static constexpr uint64_t kGenMask = (uint64_t{1} << (64 - kIdxBits - kTotBits)) - 1;

  static uint64_t pack(uint64_t gen, int64_t total, int64_t idx) {
    return (gen << (kIdxBits + kTotBits)) | (static_cast<uint64_t>(total) << kIdxBits) | static_cast<uint64_t>(idx);
  }

  void spawn(int want) {
    while (nworkers_ < want) {
      pthread_t th;
      auto* arg = new WorkerArg{this, nworkers_};
      if (pthread_create(&th, nullptr, &SharePool::worker_main, arg) != 0) {
        delete arg;
        return;  // fewer helpers; the caller does the rest
      }
      pthread_detach(th);
      ++nworkers_;
    }
  }

  struct WorkerArg {
    SharePool* pool;
    int id;
  };

  static void* worker_main(void* p) {
    auto* arg = static_cast<WorkerArg*>(p);
    SharePool* pool = arg->pool;
    const int id = arg->id;
    delete arg;
    pool->worker_loop(id);
    return nullptr;
  }

  void worker_loop(int id) {
    uint32_t seen = epoch_.load(std::memory_order_acquire);
    const uint64_t fork_gen = fork_gen_.load(std::memory_order_acquire);
    for (;;) {
      // wait for the next job: spin a little, then sleep
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (epoch_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++spins < 64) continue;
        spins = 0;
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
        if (ns >= spin_ns_.load(std::memory_order_relaxed)) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          if (epoch_.load(std::memory_order_seq_cst) == seen) epoch_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          t0 = std::chrono::steady_clock::now();
        }
      }
      seen = epoch_.load(std::memory_order_acquire);
      if (fork_gen_.load(std::memory_order_acquire) != fork_gen) return;  // stale (cannot happen in practice)
      if (id >= wanted_.load(std::memory_order_relaxed)) continue;
      for (;;) {
        const uint64_t t = ticket_.fetch_add(1, std::memory_order_acq_rel);
        const int64_t idx = static_cast<int64_t>(t & kIdxMask);
        const int64_t total = static_cast<int64_t>((t >> kIdxBits) & kTotMask);
        if (idx >= total) break;
        // the job is live (its caller waits for this chunk), so fn_ / ctx_ belong to it
        fn_(ctx_, idx);
        worker_done_.fetch_add(1, std::memory_order_acq_rel);
      }
      t0 = std::chrono::steady_clock::now();
    }
  }

  void after_fork_child() {
    // only the forking thread exists in the child: forget the workers, reset the lock
    new (&busy_) std::mutex();
    nworkers_ = 0;
    sleepers_.store(0);
    fork_gen_.fetch_add(1);
  }

  std::mutex busy_;
  int nworkers_ = 0;
  uint64_t gen_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  alignas(64) std::atomic<uint64_t> ticket_{0};
  alignas(64) std::atomic<int64_t> worker_done_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> wanted_{0};
  std::atomic<int64_t> spin_ns_{0};
  std::atomic<int> threads_{0};
  std::atomic<uint64_t> fork_gen_{0};
};

// f(begin, end) over [0, n) in chunks of `chunk`, shared as above
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, int nthreads, F&& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>({int64_t{1}, chunk, (n >> 22) + 1});  // chunk count must fit the 24-bit ticket
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks == 1 || nthreads <= 1) {
    f(int64_t{0}, n);
    return;
  }
  using Fv = std::remove_reference_t<F>;
  struct Ctx {
    Fv* f;
    int64_t n, chunk;
  } ctx{&f, n, chunk};
  SharePool::instance().run(nchunks, nthreads, [](void* p, int64_t c) {
    auto* x = static_cast<Ctx*>(p);
    const int64_t b = c * x->chunk;
    (*x->f)(b, std::min(x->n, b + x->chunk));
  }, &ctx);
}

}  // namespace lmgen_q

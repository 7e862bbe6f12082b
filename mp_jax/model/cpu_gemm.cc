// C[M, N] = op(A) @ op(B) in float32 as an XLA:CPU FFI custom call (mp_jax/model/cpu_gemm.py).
//
// The GEMM is MKL's sequential cblas_sgemm (linked: libmkl_intel_lp64, libmkl_sequential,
// libmkl_core) on row blocks of C, or column blocks when C has few rows, spread over XLA's own
// intra-op thread pool: no second thread pool spins beside XLA's between calls (MKL's OpenMP
// threads did, and slowed the elementwise ops around them: docs/RESULTS.md, session 35).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <climits>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// MKL's CBLAS sgemm (CBLAS enums as ints; LP64: 32-bit sizes), declared here so that only the
// libraries are needed, not MKL's headers.
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace {

using Matrix = ffi::Buffer<ffi::F32, 2>;  // an alias: the handler macro splits on template commas

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Below this many multiply-adds one thread does the whole GEMM: splitting costs more than it saves.
constexpr int64_t kMinSplitMacs = int64_t{1} << 20;
// Fewer rows of C than this per thread: split its columns instead (each part streams all of B).
constexpr int64_t kMinRowsPerPart = 64;

// Parts claimed from a counter by whichever thread comes first. The calling thread claims too,
// so the call finishes even if every pool thread is busy (no deadlock when XLA runs two GEMMs
// at once); a pool task that starts after the call has returned finds nothing left to claim and
// touches only this heap-held state.
struct Job {
  std::function<void(int)> part;
  int parts = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    for (int i; (i = next.fetch_add(1)) < parts;) {
      part(i);
      if (done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error Gemm(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> c, bool trans_a,
                bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k) return ffi::Error::InvalidArgument("mp_cpu_gemm: K differs");
  if (std::max({m, n, k, ad[1], bd[1]}) > INT32_MAX)
    return ffi::Error::InvalidArgument("mp_cpu_gemm: a dimension exceeds LP64 BLAS's int");
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  float* pc = c->typed_data();
  const int lda = ad[1], ldb = bd[1], ldc = n, ta = trans_a ? kTrans : kNoTrans,
            tb = trans_b ? kTrans : kNoTrans;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(pc, pc + m * n, 0.f);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || m * n * k < kMinSplitMacs) {
    cblas_sgemm(kRowMajor, ta, tb, m, n, k, 1.f, pa, lda, pb, ldb, 0.f, pc, ldc);
    return ffi::Error::Success();
  }
  const bool by_rows = m >= kMinRowsPerPart * threads;
  const int64_t len = by_rows ? m : n;
  auto job = std::make_shared<Job>();
  job->parts = static_cast<int>(std::min<int64_t>(threads, len));
  job->part = [=, parts = job->parts](int i) {
    const int64_t lo = len * i / parts, hi = len * (i + 1) / parts;
    if (by_rows) {  // rows lo..hi of op(A) and C
      cblas_sgemm(kRowMajor, ta, tb, hi - lo, n, k, 1.f, trans_a ? pa + lo : pa + lo * lda, lda,
                  pb, ldb, 0.f, pc + lo * ldc, ldc);
    } else {  // columns lo..hi of op(B) and C
      cblas_sgemm(kRowMajor, ta, tb, m, hi - lo, k, 1.f, pa, lda,
                  trans_b ? pb + lo * ldb : pb + lo, ldb, 0.f, pc + lo, ldc);
    }
  };
  for (int i = 1; i < job->parts; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->parts; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MpCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// C[M, N] = op(A) @ op(B) in float32 as an XLA:CPU FFI custom call (mp_jax/model/cpu_gemm.py).
//
// The GEMM is MKL's sequential cblas_sgemm (cpu_gemm.py links libmkl_intel_lp64,
// libmkl_sequential and libmkl_core and passes its address in) on row blocks of C, or column
// blocks when C has few rows, spread over XLA's own intra-op thread pool: no second thread pool
// spins beside XLA's between calls (MKL's OpenMP threads did, and slowed the elementwise ops
// around them: docs/RESULTS.md, session 35).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

using Matrix = ffi::Buffer<ffi::F32, 2>;  // an alias: the handler macro splits on template commas

// cblas_sgemm's signature (CBLAS enums as ints; LP64: 32-bit sizes): no MKL headers needed.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
// Set by address from this library's own MKL (dlsym on its handle), never looked up by name in
// the process's global scope, where another BLAS's cblas_sgemm could come first.
std::atomic<Sgemm> g_sgemm{nullptr};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Below this many multiply-adds one thread does the whole GEMM: splitting costs more than it saves.
constexpr int64_t kMinSplitMacs = int64_t{1} << 20;
// Fewer rows of C than this per thread: split its columns instead (each part streams all of A).
// Parts are at least this many rows or columns, column parts a multiple of 16 floats (64 bytes:
// no cache line of C shared by two threads).
constexpr int64_t kMinPart = 64;
constexpr int64_t kColumnAlign = 16;

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
  const Sgemm cblas_sgemm = g_sgemm.load();
  if (cblas_sgemm == nullptr) return ffi::Error::Internal("mp_cpu_gemm: no sgemm was set");
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
  if (threads == 1 || double(m) * n * k < kMinSplitMacs) {
    cblas_sgemm(kRowMajor, ta, tb, m, n, k, 1.f, pa, lda, pb, ldb, 0.f, pc, ldc);
    return ffi::Error::Success();
  }
  const bool by_rows = m >= kMinPart * threads;
  const int64_t len = by_rows ? m : n, align = by_rows ? 1 : kColumnAlign;
  auto job = std::make_shared<Job>();
  job->parts = static_cast<int>(std::clamp<int64_t>(len / kMinPart, 1, threads));
  job->part = [=, parts = job->parts](int i) {
    // bounds on multiples of `align`, the last part to the end
    const int64_t lo = len * i / parts / align * align;
    const int64_t hi = i + 1 == parts ? len : len * (i + 1) / parts / align * align;
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

extern "C" void mp_cpu_gemm_set_sgemm(void* sgemm) {
  g_sgemm.store(reinterpret_cast<Sgemm>(sgemm));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MpCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// Peak fp32 FLOP/s of this machine: the FMA register probe (train/flops.cpp) at 1 and
// at all threads, and an Eigen GEMM (n x n times n x n, 2 n^3 FLOPs) at 1 and at all
// threads. Reported as user counters GFLOP/s; the CPU model and the probe's ISA are in
// the context. These are the denominators of MFU (MODEL.md section 9).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <Eigen/Core>

#include <algorithm>
#include <random>
#include <vector>

#include "train/flops.hpp"

namespace {

int all_threads() { return std::max(1, omp_get_num_procs()); }

// Arg: thread count. One measure_peak_flops call of 0.3 s per iteration.
void BM_FmaProbe(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  double gflops = 0.0;
  for (auto _ : state) {
    gflops = moetune::measure_peak_flops(threads, 0.3) / 1e9;
    benchmark::DoNotOptimize(gflops);
  }
  state.counters["threads"] = threads;
  state.counters["GFLOP/s"] = gflops;
  state.counters["GFLOP/s/core"] = gflops / threads;
}

// Args: n, thread count. C (n,n) = A (n,n) * B (n,n), row-major views over std::vector.
void BM_EigenGemm(benchmark::State& state) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int n = static_cast<int>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& x : a) x = u(rng);
  for (auto& x : b) x = u(rng);
  Eigen::Map<const Mat> A(a.data(), n, n), B(b.data(), n, n);
  Eigen::Map<Mat> C(c.data(), n, n);
  const int saved = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  const double t0 = omp_get_wtime();
  for (auto _ : state) {
    C.noalias() = A * B;
    benchmark::ClobberMemory();
  }
  const double elapsed = omp_get_wtime() - t0;
  Eigen::setNbThreads(saved);
  state.counters["threads"] = threads;
  state.counters["GFLOP/s"] = 2.0 * n * n * n * double(state.iterations()) / elapsed / 1e9;
}

void probe_args(benchmark::internal::Benchmark* b) {
  b->Arg(1);
  if (all_threads() > 1) b->Arg(all_threads());
}

void gemm_args(benchmark::internal::Benchmark* b) {
  b->Args({1024, 1});
  if (all_threads() > 1) b->Args({1024, all_threads()});
}

}  // namespace

BENCHMARK(BM_FmaProbe)->Apply(probe_args)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_EigenGemm)->Apply(gemm_args)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_model", moetune::cpu_model_name());
  benchmark::AddCustomContext("fma_probe_isa", moetune::peak_probe_isa());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

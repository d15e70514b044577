// GEMM throughput: moetune's kernels (every ISA this CPU runs) next to Eigen, OpenBLAS
// and oneDNN on the same shapes and threads, in GFLOP/s and as a fraction of the
// measured FMA peak of the threads in use (train/flops.hpp). OpenBLAS and oneDNN are
// benchmark peers only: they are loaded at run time (libopenblas.so.0, libdnnl.so.2,
// Debian's libopenblas0-* and libdnnl2) and skipped when absent; moetune never links
// them. Shapes: square products and the per-expert ones of training (M = 32..512 rows
// routed to an expert, N, K = 256..2048), in the three forms of kernels/gemm.hpp.
//   ./build/bench/moetune_bench_gemm --benchmark_counters_tabular=true
//   --benchmark_filter=nt/   (only the forward form), MOETUNE_BENCH_THREADS=1,2 (default),
//   MOETUNE_BENCH_COLD=1     (operands from memory, not from a warm cache: see run())
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <dlfcn.h>
#include <omp.h>

#include <Eigen/Core>
#include <cstdlib>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/gemm.hpp"
#include "train/flops.hpp"

using namespace moetune;

namespace {

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
using CblasSgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                            int);
using OpenblasThreads = void (*)(int);
using OpenblasConfig = const char* (*)();
// dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), row-major
using DnnlSgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);

struct Peers {
  CblasSgemm openblas = nullptr;
  OpenblasThreads openblas_threads = nullptr;
  std::string openblas_config;
  DnnlSgemm dnnl = nullptr;
  Peers() {
    if (void* h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL)) {
      openblas = reinterpret_cast<CblasSgemm>(dlsym(h, "cblas_sgemm"));
      openblas_threads = reinterpret_cast<OpenblasThreads>(dlsym(h, "openblas_set_num_threads"));
      if (auto cfg = reinterpret_cast<OpenblasConfig>(dlsym(h, "openblas_get_config"))) openblas_config = cfg();
    }
    if (void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL))
      dnnl = reinterpret_cast<DnnlSgemm>(dlsym(h, "dnnl_sgemm"));
  }
};
const Peers& peers() {
  static const Peers p;
  return p;
}

enum class Form { nt, nn, tn };  // C = A B^T, A B, A^T B

struct Operands {
  std::vector<float> a, b, c;
  Operands(int64_t M, int64_t N, int64_t K) : a(M * K), b(N * K), c(M * N) {
    std::mt19937 g(7);
    std::normal_distribution<float> d(0.f, 1.f);
    for (auto& x : a) x = d(g);
    for (auto& x : b) x = d(g);
  }
};

bool cold() {
  const char* env = std::getenv("MOETUNE_BENCH_COLD");
  return env && *env && std::string(env) != "0";
}

double peak_of(int threads) {
  static std::map<int, double> cache;
  auto it = cache.find(threads);
  if (it == cache.end()) it = cache.emplace(threads, measure_peak_flops(threads)).first;
  return it->second;
}

void report(benchmark::State& state, int64_t M, int64_t N, int64_t K, int threads) {
  const double flops = 2.0 * double(M) * double(N) * double(K) * double(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
  // Fraction of the measured FMA peak of these threads (as kIsRate: flops/s / peak).
  state.counters["peak_frac"] = benchmark::Counter(flops / peak_of(threads), benchmark::Counter::kIsRate);
}

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void run(benchmark::State& state, const std::string& lib, Form form, int64_t M, int64_t N, int64_t K, int threads) {
  // MOETUNE_BENCH_COLD=1: each call takes the next of enough copies of the operands to
  // fill 64 MiB (more than the L2 and, on the dev VM, the L3 share of a core), so that
  // they come from memory, as in a training step, not from a warm cache.
  const int64_t set_bytes = int64_t(sizeof(float)) * (M * K + N * K + M * N);
  const int64_t nsets = cold() ? std::max<int64_t>(2, (int64_t(64) << 20) / set_bytes + 1) : 1;
  std::vector<Operands> sets(1, Operands(M, N, K));
  while (int64_t(sets.size()) < nsets) sets.push_back(sets.front());
  Operands* op = &sets.front();
  omp_set_num_threads(threads);
  const int64_t lda = form == Form::tn ? M : K, ldb = form == Form::nt ? K : N;
  std::function<void()> f;
  if (lib.rfind("moetune-", 0) == 0) {
    kernels::set_gemm_isa(kernels::parse_isa(lib.substr(8), "bench"));
    f = [&] {
      if (form == Form::nt) kernels::gemm_nt<float>(M, N, K, op->a.data(), lda, op->b.data(), ldb, op->c.data(), N, false);
      if (form == Form::nn) kernels::gemm_nn<float>(M, N, K, op->a.data(), lda, op->b.data(), ldb, op->c.data(), N, false);
      if (form == Form::tn) kernels::gemm_tn<float>(M, N, K, op->a.data(), lda, op->b.data(), ldb, op->c.data(), N, false);
    };
  } else if (lib == "eigen") {
    Eigen::setNbThreads(threads);
    f = [&] {
      Eigen::Map<Mat> C(op->c.data(), M, N);
      if (form == Form::nt) C.noalias() = Eigen::Map<Mat>(op->a.data(), M, K) * Eigen::Map<Mat>(op->b.data(), N, K).transpose();
      if (form == Form::nn) C.noalias() = Eigen::Map<Mat>(op->a.data(), M, K) * Eigen::Map<Mat>(op->b.data(), K, N);
      if (form == Form::tn) C.noalias() = Eigen::Map<Mat>(op->a.data(), K, M).transpose() * Eigen::Map<Mat>(op->b.data(), K, N);
    };
  } else if (lib == "openblas") {
    const Peers& p = peers();
    if (p.openblas_threads) p.openblas_threads(threads);
    f = [&] {
      p.openblas(101, form == Form::tn ? 112 : 111, form == Form::nt ? 112 : 111, int(M), int(N), int(K), 1.f,
                 op->a.data(), int(lda), op->b.data(), int(ldb), 0.f, op->c.data(), int(N));
    };
  } else if (lib == "onednn") {
    const Peers& p = peers();
    f = [&] {
      p.dnnl(form == Form::tn ? 'T' : 'N', form == Form::nt ? 'T' : 'N', M, N, K, 1.f, op->a.data(), lda, op->b.data(),
             ldb, 0.f, op->c.data(), N);
    };
  }
  f();  // warm-up: packing buffers, thread pools
  int64_t call = 0;
  for (auto _ : state) {
    op = &sets[size_t(++call % nsets)];
    f();
    benchmark::ClobberMemory();
  }
  state.counters["operand_sets"] = double(nsets);
  report(state, M, N, K, threads);
}

std::vector<int> bench_threads() {
  std::vector<int> v;
  std::stringstream ss(std::getenv("MOETUNE_BENCH_THREADS") ? std::getenv("MOETUNE_BENCH_THREADS") : "1,2");
  for (std::string t; std::getline(ss, t, ',');) v.push_back(std::atoi(t.c_str()));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::vector<std::string> libs;
  for (kernels::Isa isa : kernels::supported_isas())
    if (isa != kernels::Isa::generic) libs.push_back(std::string("moetune-") + kernels::isa_name(isa));
  libs.push_back("eigen");
  if (peers().openblas) libs.push_back("openblas");
  if (peers().dnnl) libs.push_back("onednn");
  struct Shape {
    Form form;
    int64_t M, N, K;
  };
  std::vector<Shape> shapes = {{Form::nt, 256, 256, 256},   {Form::nt, 512, 512, 512},   {Form::nt, 1024, 1024, 1024},
                               {Form::nt, 32, 1024, 256},   {Form::nt, 128, 512, 2048},  {Form::nt, 128, 2048, 512},
                               {Form::nt, 512, 2048, 512},  {Form::nt, 512, 256, 1024},  {Form::nn, 512, 512, 512},
                               {Form::nn, 128, 512, 2048},  {Form::tn, 512, 512, 512},   {Form::tn, 2048, 512, 128}};
  const char* form_name[] = {"nt", "nn", "tn"};
  // MOETUNE_BENCH_SHAPES=nt:1024x512x256,tn:512x256x1024 replaces the shapes above.
  if (const char* env = std::getenv("MOETUNE_BENCH_SHAPES"); env && *env) {
    shapes.clear();
    std::stringstream ss(env);
    for (std::string item; std::getline(ss, item, ',');) {
      Shape s{};
      char form[3] = {0, 0, 0};
      long long M = 0, N = 0, K = 0;
      if (std::sscanf(item.c_str(), "%2[a-z]:%lldx%lldx%lld", form, &M, &N, &K) != 4 || M <= 0 || N <= 0 || K <= 0) {
        std::fprintf(stderr, "MOETUNE_BENCH_SHAPES: '%s' is not FORM:MxNxK (FORM nt, nn or tn; positive sizes)\n",
                     item.c_str());
        return 2;
      }
      const std::string f = form;
      if (f != "nt" && f != "nn" && f != "tn") {
        std::fprintf(stderr, "MOETUNE_BENCH_SHAPES: '%s': unknown form '%s' (nt, nn or tn)\n", item.c_str(), form);
        return 2;
      }
      s.form = f == "nt" ? Form::nt : f == "nn" ? Form::nn : Form::tn;
      s.M = M, s.N = N, s.K = K;
      shapes.push_back(s);
    }
  }
  for (int threads : bench_threads())
    for (const Shape& s : shapes)
      for (const std::string& lib : libs) {
        const std::string name = std::string(form_name[int(s.form)]) + "/" + std::to_string(s.M) + "x" +
                                 std::to_string(s.N) + "x" + std::to_string(s.K) + "/" + lib + "/threads:" +
                                 std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
          run(st, lib, s.form, s.M, s.N, s.K, threads);
        })->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.3);
      }
  benchmark::AddCustomContext("gemm_isa_default", kernels::isa_name(kernels::gemm_isa()));
  benchmark::AddCustomContext("fma_probe", peak_probe_isa());
  if (!peers().openblas_config.empty()) benchmark::AddCustomContext("openblas", peers().openblas_config);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}

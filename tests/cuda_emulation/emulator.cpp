// Runs the CUDA SupCon kernels (csrc/cuda/supcon_kernels.cuh, supcon_rows.cuh) under the host emulation of
// cuda_host_shim.h; loaded with ctypes by tests/test_supcon_cpp.py.
#include "cuda_host_shim.h"

#include <ucontext.h>

#include <cstdio>
#include <vector>

#include "cuda/supcon_rows.cuh"

emu::Index threadIdx, blockIdx;

namespace {

constexpr int kThreads = anchor_kernels::supcon_cuda::detail::kThreads;
constexpr size_t kStack = 256 * 1024;

ucontext_t main_ctx;
ucontext_t thread_ctx[kThreads];
std::vector<std::vector<char>> stacks;
int current = 0;
bool descending = false;
int barriers[kThreads];
int finished = 0;
float exchange[kThreads];
void (*body)() = nullptr;

int next_of(int t) { return descending ? (t + kThreads - 1) % kThreads : (t + 1) % kThreads; }
int first() { return descending ? kThreads - 1 : 0; }
int last() { return descending ? 0 : kThreads - 1; }

void switch_to(int next) {
  const int me = current;
  current = next;
  threadIdx.x = unsigned(next);
  swapcontext(&thread_ctx[me], &thread_ctx[next]);
}

void trampoline() {
  body();
  ++finished;
  if (current == last()) {
    setcontext(&main_ctx);
  } else {
    const int me = current;
    current = next_of(me);
    threadIdx.x = unsigned(current);
    setcontext(&thread_ctx[current]);
  }
}

// Runs body() as every thread of the current block. Returns false if the threads did not
// all pass the same number of barriers (a divergent __syncthreads).
bool run_block(void (*fn)()) {
  if (stacks.empty()) stacks.assign(kThreads, std::vector<char>(kStack));
  body = fn;
  finished = 0;
  for (int t = 0; t < kThreads; ++t) {
    barriers[t] = 0;
    getcontext(&thread_ctx[t]);
    thread_ctx[t].uc_stack.ss_sp = stacks[t].data();
    thread_ctx[t].uc_stack.ss_size = kStack;
    thread_ctx[t].uc_link = nullptr;
    makecontext(&thread_ctx[t], trampoline, 0);
  }
  current = first();
  threadIdx.x = unsigned(current);
  swapcontext(&main_ctx, &thread_ctx[current]);
  for (int t = 0; t < kThreads; ++t)
    if (barriers[t] != barriers[0]) return false;
  return finished == kThreads;
}

template <typename Args>
struct Launch {
  static Args args;
  static void (*kernel)(Args);
  static void call() { kernel(args); }
};
template <typename Args>
Args Launch<Args>::args;
template <typename Args>
void (*Launch<Args>::kernel)(Args);

template <typename Args>
int run_grid(void (*kernel)(Args), const Args& args, unsigned gx, unsigned gy, int order) {
  Launch<Args>::args = args;
  Launch<Args>::kernel = kernel;
  descending = order != 0;
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      blockIdx.x = bx;
      blockIdx.y = by;
      if (!run_block(&Launch<Args>::call)) return 1;
    }
  return 0;
}

}  // namespace

void __syncthreads() {
  ++barriers[current];
  switch_to(next_of(current));
}

int __syncthreads_or(int predicate) {
  exchange[current] = predicate != 0;
  __syncthreads();
  int any = 0;
  for (int t = 0; t < kThreads; ++t) any |= exchange[t] != 0.f;
  __syncthreads();
  return any;
}

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int me = current;
  exchange[me] = value;
  __syncthreads();
  const float other = exchange[me ^ lane_mask];
  __syncthreads();
  return other;
}

namespace sc = anchor_kernels::supcon_cuda;
namespace dt = anchor_kernels::supcon_cuda::detail;

// dtype: 0 float32, 1 float16, 2 bfloat16 (the half types take their tensor-core kernels,
// which compile to the FMA path here). order: 0 ascending threads, 1 descending.
extern "C" int emu_supcon_fwd(int dtype, const sc::FwdArgs* a, int order) {
  const unsigned gx = unsigned((a->x.rows + dt::kBlock - 1) / dt::kBlock);
  switch (dtype) {
    case 1:
      return run_grid(&dt::supcon_fwd_kernel<__half, true>, *a, gx, 1, order);
    case 2:
      return run_grid(&dt::supcon_fwd_kernel<__nv_bfloat16, true>, *a, gx, 1, order);
    default:
      return run_grid(&dt::supcon_fwd_kernel<float, false>, *a, gx, 1, order);
  }
}

extern "C" int emu_supcon_bwd(int dtype, const sc::BwdArgs* a, int order) {
  const unsigned gx = unsigned((a->x.rows + dt::kBlock - 1) / dt::kBlock);
  const unsigned gy = unsigned((a->D + dt::kBlock - 1) / dt::kBlock);
  switch (dtype) {
    case 1:
      return run_grid(&dt::supcon_bwd_kernel<__half, true>, *a, gx, gy, order);
    case 2:
      return run_grid(&dt::supcon_bwd_kernel<__nv_bfloat16, true>, *a, gx, gy, order);
    default:
      return run_grid(&dt::supcon_bwd_kernel<float, false>, *a, gx, gy, order);
  }
}

extern "C" int emu_row_norms(int dtype, const sc::RowNormArgs* a, int order) {
  const unsigned gx = unsigned((a->x.rows + a->y.rows + dt::kNormRows - 1) / dt::kNormRows);
  switch (dtype) {
    case 1:
      return run_grid(&dt::row_norms_kernel<__half>, *a, gx, 1, order);
    case 2:
      return run_grid(&dt::row_norms_kernel<__nv_bfloat16>, *a, gx, 1, order);
    default:
      return run_grid(&dt::row_norms_kernel<float>, *a, gx, 1, order);
  }
}

extern "C" int emu_norm_backward(int dtype, const sc::NormBwdArgs* a, int order) {
  const unsigned gx = unsigned((a->x.rows + dt::kNormRows - 1) / dt::kNormRows);
  switch (dtype) {
    case 1:
      return run_grid(&dt::norm_backward_kernel<__half>, *a, gx, 1, order);
    case 2:
      return run_grid(&dt::norm_backward_kernel<__nv_bfloat16>, *a, gx, 1, order);
    default:
      return run_grid(&dt::norm_backward_kernel<float>, *a, gx, 1, order);
  }
}

extern "C" int emu_loss_reduce(const sc::LossReduceArgs* a, int order) {
  return run_grid(&dt::loss_reduce_kernel, *a, 1, 1, order);
}

extern "C" int emu_anchor_stage(const sc::AnchorStageArgs* a, int order) {
  return run_grid(&dt::anchor_stage_kernel, *a, 1, 1, order);
}

extern "C" int emu_sizeof_row_norm_args() { return int(sizeof(sc::RowNormArgs)); }
extern "C" int emu_sizeof_norm_bwd_args() { return int(sizeof(sc::NormBwdArgs)); }
extern "C" int emu_sizeof_loss_reduce_args() { return int(sizeof(sc::LossReduceArgs)); }
extern "C" int emu_sizeof_anchor_stage_args() { return int(sizeof(sc::AnchorStageArgs)); }
extern "C" int emu_sizeof_fwd_args() { return int(sizeof(sc::FwdArgs)); }
extern "C" int emu_sizeof_bwd_args() { return int(sizeof(sc::BwdArgs)); }

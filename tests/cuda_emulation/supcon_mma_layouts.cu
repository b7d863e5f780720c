// Host check of the fragment layouts the CuTe SupCon kernels (csrc/cuda/supcon_mma.cuh) rely
// on, for every thread of a CTA: which rows and columns of a tile a thread's accumulators hold
// (the per-row statistics, quad reductions and the epilogue's addressing assume it), and that
// the accumulators of S read as A fragments (acc_as_a_operand) hold the coordinates the next
// product's A operand expects. Compiled with nvcc and run on the host by
// tests/test_supcon_cuda_emulated.py; prints the number of failures, exits non-zero on any.
#include <cstdio>

#include "cuda/supcon_mma.cuh"

using namespace cute;
using namespace anchor_kernels::supcon_cuda::mma;

static int failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) if (failures++ < 10) printf("failed: %s (thread %d)\n", #cond, t); \
  } while (0)

template <int kM, int kN>
void check_tile() {
  TiledMma<bfloat16_t> mma;
  for (int t = 0; t < kThreads; ++t) {
    auto coords = [&](int thread) {
      return mma.get_thread_slice(thread).partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    };
    auto cC = coords(t);
    auto cQ = coords((t & ~3) | ((t + 1) & 3));  // the next lane of the same quad
    constexpr int kMi = decltype(size<1>(cC))::value, kNi = decltype(size<2>(cC))::value;
    // Row slot r and column slot c of the kernels' loops.
    for (int r = 0; r < 2 * kMi; ++r)
      for (int c = 0; c < 2 * kNi; ++c) {
        auto x = cC(make_coord(c % 2, r % 2), r / 2, c / 2);
        CHECK(get<0>(x) == get<0>(cC(make_coord(0, r % 2), r / 2, 0)));
        CHECK(get<1>(x) == get<1>(cC(make_coord(c % 2, 0), 0, c / 2)));
        CHECK(get<0>(cQ(make_coord(c % 2, r % 2), r / 2, c / 2)) == get<0>(x));
      }
    // Element e: row row0 + 8 ((e >> 1) & 1) + 16 kNumWarps-slab, column col0 + (e & 1) + 8 (e >> 2).
    if (kMi == 1)
      for (int e = 0; e < size(cC); ++e) {
        CHECK(get<0>(cC(e)) == get<0>(cC(0)) + 8 * ((e >> 1) & 1));
        CHECK(get<1>(cC(e)) == get<1>(cC(0)) + (e & 1) + 8 * (e >> 2));
      }
    auto cA = mma.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    auto cH = make_tensor(cC.data(), acc_as_a_operand(cC.layout()));
    CHECK(size(cH) == size(cA));
    for (int i = 0; i < size(cA); ++i) CHECK(cA(i) == cH(i));
  }
}

int main() {
  check_tile<kFwdRows, 64>();
  check_tile<kBwdRows, 64>();
  check_tile<kBwdRows, 32>();
  check_tile<kBwdRows, kD>();
  printf("failures %d\n", failures);
  return failures != 0;
}

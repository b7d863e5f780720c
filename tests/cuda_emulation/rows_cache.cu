// Host check of RowsCache (csrc/cuda/rows_cache.h), which keeps the Hopper kernels' TMA
// descriptors: over a random sequence of matrices and widths from a small pool, every value
// it returns is the one make() gives for that (matrix, D), whether remembered or made; a
// (matrix, D) asked for again while among the last kSlots distinct ones asked is not made
// again; one that differs in any field (address, rows, row stride, D) is. Compiled with nvcc
// and run on the host by tests/test_supcon_cuda_emulated.py; prints the number of failures,
// exits non-zero on any.
#include <cstdio>
#include <deque>
#include <random>
#include <tuple>
#include <vector>
#include <algorithm>

#include "cuda/rows_cache.h"

using anchor_kernels::supcon_cuda::Matrix;
using anchor_kernels::supcon_cuda::RowsCache;

static int failures = 0;
#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond) && failures++ < 10) printf("failed: %s (step %d)\n", #cond, step); \
  } while (0)

using Key = std::tuple<const void*, int64_t, int64_t, int64_t>;

// What make() gives for a key: any function of the key's fields alone.
int64_t value_of(const Key& k) {
  return reinterpret_cast<intptr_t>(std::get<0>(k)) * 1000003 + std::get<1>(k) * 10007 +
         std::get<2>(k) * 101 + std::get<3>(k);
}

int main() {
  constexpr int kSlots = 4;
  static char buffers[3][64];
  std::vector<Key> pool;
  for (auto& b : buffers)
    for (int64_t rows : {7, 8})
      for (int64_t s0 : {128, 136})
        for (int64_t D : {120, 128}) pool.emplace_back(static_cast<const void*>(b), rows, s0, D);

  RowsCache<int64_t, kSlots> cache;
  std::deque<Key> recent;  // the last kSlots distinct keys made, oldest first
  std::mt19937 rng(7);
  for (int step = 0; step < 20000; ++step) {
    // Mostly a few hot keys (as a training loop's), sometimes any of the pool.
    const Key k = pool[rng() % 4 == 0 ? rng() % pool.size() : rng() % 3];
    const Matrix m{std::get<0>(k), std::get<1>(k), std::get<2>(k), 1};
    int made = 0;
    const int64_t v = cache.get(m, std::get<3>(k), [&] { ++made; return value_of(k); });
    CHECK(v == value_of(k));
    const bool held = std::find(recent.begin(), recent.end(), k) != recent.end();
    CHECK(made == (held ? 0 : 1));
    if (!held) {
      recent.push_back(k);
      if (int(recent.size()) > kSlots) recent.pop_front();
    }
  }
  printf("failures %d\n", failures);
  return failures != 0;
}

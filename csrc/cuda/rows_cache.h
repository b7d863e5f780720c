// A few per-matrix values (the Hopper kernels' TMA descriptors), remembered by the row
// matrix they describe. Host code only, no CUDA.
#pragma once

#include <cstdint>

#include "supcon_kernels.h"

namespace anchor_kernels::supcon_cuda {

// get(m, D, make) returns make() for (m, D), made once while it stays among the last kSlots
// (m, D) asked for (round robin). A value must depend on nothing but the matrix's address,
// rows and row stride and on D: then a value remembered is the one make() would give.
template <typename Value, int kSlots = 4>
class RowsCache {
 public:
  template <typename Make>
  Value get(const Matrix& m, int64_t D, Make&& make) {
    for (const Slot& s : slots_)
      if (s.used && s.data == m.data && s.rows == m.rows && s.s0 == m.s0 && s.D == D) return s.value;
    Slot& s = slots_[next_];
    next_ = (next_ + 1) % kSlots;
    s = Slot{true, m.data, m.rows, m.s0, D, make()};
    return s.value;
  }

 private:
  struct Slot {
    bool used = false;
    const void* data = nullptr;
    int64_t rows = 0, s0 = 0, D = 0;
    Value value{};
  };
  Slot slots_[kSlots];
  int next_ = 0;
};

}  // namespace anchor_kernels::supcon_cuda

// Host check of the shared-memory side of the Hopper kernels (csrc/cuda/supcon_sm90.cuh): for
// every wgmma they issue, the matrix descriptors CuTe builds from the kernels' own layouts,
// decoded the way the hardware reads them, must address the element the maths needs, at the
// byte where the TMA copy put it.
//
// The two hardware models, from the PTX ISA (elements of b bytes: 2, or 4 for TF32; 128-byte
// swizzle):
// - TMA: a (rows, D) tile is copied as boxes of 128 / b columns (128 bytes), box i at
//   i * rows * 128 bytes; element (r, c) lands at r * 128 + b (c % (128 / b)) in its box, and
//   the swizzle XORs address bits [4, 7) with bits [7, 10) (tiles are 1024-byte aligned).
// - wgmma, descriptor (start, LBO, SBO), operand element (mn, k) of an instruction (k < 32 / b):
//   K-major:  start + (mn / 8) SBO + (mn % 8) 128 + b k              (LBO unused)
//   MN-major: start + (mn / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (mn % 64)   (16-bit only)
//   then the same swizzle, on the whole address.
// Addresses are offsets from the start of the kernels' own storage structs, which put every
// tile and stage on a 1024-byte boundary (checked), where the swizzle of an offset is that of
// the address.
//
// Checked: the forward's S = X Y^T (A: the warpgroup's 64 anchor rows, B: the stage's column
// tile, every k-step and stage; bf16, fp16 and TF32); the backward's S (64- and 32-column
// tiles); and dX += H Y, whose B is Y's tile read transposed (SmemRowsStagesT): B(d, j) must be
// the stage's row j, feature d. TF32 backward: its S over 32-column tiles; dX's B from the
// stage's Y^T (K-major), whose element (d, k) must be Y's row yt_col(k), feature d, once the
// transposers have run (transpose_tile, run here for all of them over a tile of distinct
// values); and the byte offsets the transposers use (tf32_rows_byte, tf32_yt_byte) against
// the CuTe layouts.
// Compiled with nvcc and run on the host by tests/test_supcon_cuda_emulated.py; prints the
// number of failures, exits non-zero on any.
#include <unistd.h>

#include <cstdio>

#include "cuda/supcon_sm90.cuh"

using namespace cute;
namespace h = anchor_kernels::supcon_cuda::sm90;

static int failures = 0;
#define CHECK(cond, what)                                                              \
  do {                                                                                 \
    if (!(cond) && failures++ < 10) printf("failed: %s: %s\n", what, #cond);           \
  } while (0)

constexpr uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7u) << 4); }

// Where the TMA copy of a (rows, kD) tile of T starting at byte `base` puts element (r, c).
template <typename T>
constexpr uint32_t tma_byte(uint32_t base, int rows, int r, int c) {
  constexpr int kBox = 128 / sizeof(T);  // columns of a box
  return swizzle128(base + uint32_t(c / kBox) * rows * 128 + r * 128 + sizeof(T) * (c % kBox));
}
// Elements of one wgmma k-step: 32 bytes' worth (k16 for 16-bit, k8 for TF32).
template <typename T>
constexpr int kStepK = 32 / sizeof(T);

struct Desc {
  uint32_t start, lbo, sbo;
  int layout, base_offset;
};
Desc decode(const GmmaDescriptor& d) {
  return {uint32_t(d.bitfield.start_address_) << 4, uint32_t(d.bitfield.leading_byte_offset_) << 4,
          uint32_t(d.bitfield.stride_byte_offset_) << 4, int(d.bitfield.layout_type_),
          int(d.bitfield.base_offset_)};
}
template <typename T>
uint32_t k_major_byte(const Desc& d, int mn, int k) {
  return swizzle128(d.start + (mn / 8) * d.sbo + (mn % 8) * 128 + sizeof(T) * k);
}
uint32_t mn_major_byte(const Desc& d, int mn, int k) {
  return swizzle128(d.start + (mn / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + 2 * (mn % 64));
}

// Host CuTe reports that it cannot convert a shared-memory pointer (and uses 0): silence it
// while the fragments are built.
template <typename F>
auto quietly(F&& f) {
  fflush(stdout);
  const int saved = dup(1);
  FILE* null = fopen("/dev/null", "w");
  dup2(fileno(null), 1);
  auto r = f();
  fflush(stdout);
  dup2(saved, 1);
  close(saved);
  fclose(null);
  return r;
}

// Byte offset of a (possibly swizzled) shared-memory iterator from the storage's start.
template <typename Storage, typename Iterator>
uint32_t at(const Storage& st, Iterator it) {
  return uint32_t(reinterpret_cast<const char*>(raw_pointer_cast(it)) - reinterpret_cast<const char*>(&st));
}

// A thread's descriptors for its partition of an operand tile: on the device their start
// address is the partition's (cast_smem_ptr_to_uint); host CuTe uses 0 for it, so the
// partition's offset in the storage is added here. (descriptors, offset)
template <bool kA, typename Storage, typename Thr, typename Tile>
auto descriptors(const Storage& st, const Thr& thr, const Tile& tile) {
  auto part = [&] {
    if constexpr (kA) return thr.partition_A(tile);
    else return thr.partition_B(tile);
  }();
  auto frag = quietly([&] {
    if constexpr (kA) return thr.make_fragment_A(part);
    else return thr.make_fragment_B(part);
  });
  return cute::make_tuple(frag, at(st, part.data()));
}
Desc start_at(Desc d, uint32_t offset) {
  d.start += offset;
  return d;
}

// S = X Y^T over kCols-column tiles, in the kernels' storage: A is rows 64 w ... of x, B the
// stage's tile, both K-major.
template <typename T, int kCols, typename Storage>
void check_s(const char* what) {
  static Storage st;
  CHECK(at(st, st.x) % 1024 == 0, what);
  for (int s = 0; s < h::kStages; ++s) CHECK(at(st, st.y[s]) % 1024 == 0, what);
  h::TiledMmaS<T, kCols> mma;
  Tensor sX = make_tensor(make_smem_ptr(st.x), h::SmemRows<T, h::kM>{});
  Tensor sY = make_tensor(make_smem_ptr(&st.y[0][0]), h::SmemRowsStages<T, kCols>{});
  for (int w = 0; w < h::kConsumers; ++w) {
    auto thr = mma.get_thread_slice(128 * w);
    auto [rX, x_at] = descriptors<true>(st, thr, sX);
    auto [rY, y_at] = descriptors<false>(st, thr, sY);
    constexpr int kK = kStepK<T>;
    CHECK(size<1>(rX) == 1 && size<2>(rX) == h::kD / kK, what);
    CHECK(size<1>(rY) == 1 && size<2>(rY) == h::kD / kK && size<3>(rY) == h::kStages, what);
    for (int q = 0; q < h::kD / kK; ++q) {
      const Desc a = start_at(decode(rX(0, 0, q)), x_at);
      CHECK(a.layout == 1 && a.base_offset == 0, what);
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < kK; ++k)
          CHECK(k_major_byte<T>(a, m, k) == tma_byte<T>(at(st, st.x), h::kM, 64 * w + m, kK * q + k), what);
      for (int s = 0; s < h::kStages; ++s) {
        const Desc b = start_at(decode(rY(0, 0, q, s)), y_at);
        CHECK(b.layout == 1 && b.base_offset == 0, what);
        for (int n = 0; n < kCols; ++n)
          for (int k = 0; k < kK; ++k)
            CHECK(k_major_byte<T>(b, n, k) == tma_byte<T>(at(st, st.y[s]), kCols, n, kK * q + k), what);
      }
    }
  }
}

// dX += H Y: B(d, k) over the k-steps. 16-bit: read MN-major from the stage Y's tile was copied
// to, B(d, j) = Y(j, d) at the TMA model's byte. TF32: read K-major from the stage's Y^T, at the
// byte of Y^T's element (d, k) in its CuTe layout (SmemYtStages), where the transposers write
// it (check_transpose).
template <typename T, int kCols, typename Storage>
void check_dx(const char* what) {
  static Storage st;
  constexpr int kK = kStepK<T>;
  h::TiledMmaDx<T, kCols> mma;
  Tensor sYt = [&] {
    if constexpr (h::kIsTf32<T>) return make_tensor(make_smem_ptr(&st.yt[0][0]), h::SmemYtStages<kCols>{});
    else return make_tensor(make_smem_ptr(&st.y[0][0]), h::SmemRowsStagesT<T, kCols>{});
  }();
  if constexpr (h::kIsTf32<T>)
    for (int s = 0; s < h::kStages; ++s) CHECK(at(st, st.yt[s]) % 1024 == 0, what);
  for (int w = 0; w < h::kConsumers; ++w) {
    auto [rYt, y_at] = descriptors<false>(st, mma.get_thread_slice(128 * w), sYt);
    CHECK(size<1>(rYt) == 1 && size<2>(rYt) == kCols / kK && size<3>(rYt) == h::kStages, what);
    for (int q = 0; q < kCols / kK; ++q)
      for (int s = 0; s < h::kStages; ++s) {
        const Desc b = start_at(decode(rYt(0, 0, q, s)), y_at);
        CHECK(b.layout == 1 && b.base_offset == 0, what);
        for (int d = 0; d < h::kD; ++d)
          for (int k = 0; k < kK; ++k) {
            if constexpr (h::kIsTf32<T>)
              CHECK(k_major_byte<T>(b, d, k) == at(st, &sYt(d, kK * q + k, s)), what);
            else
              CHECK(mn_major_byte(b, d, k) == tma_byte<T>(at(st, st.y[s]), kCols, kK * q + k, d), what);
          }
      }
  }
}

// The transposers' byte offsets are the CuTe layouts' (SmemRows, where TMA writes; SmemYt,
// what wgmma reads), and after every transposer has run, Y^T(d, k) = Y(yt_col(k), d).
template <int kCols>
void check_transpose(const char* what) {
  alignas(1024) static float y[kCols * h::kD];
  alignas(1024) static float yt[h::kD * kCols];
  Tensor sY = make_tensor(make_smem_ptr(reinterpret_cast<tfloat32_t*>(y)), h::SmemRows<tfloat32_t, kCols>{});
  Tensor sYt = make_tensor(make_smem_ptr(reinterpret_cast<tfloat32_t*>(yt)), h::SmemYt<kCols>{});
  auto byte = [](const void* p, const void* base) {
    return int(reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(base));
  };
  for (int j = 0; j < kCols; ++j)
    for (int d = 0; d < h::kD; ++d) {
      CHECK(byte(&sY(j, d), y) == h::tf32_rows_byte<kCols>(j, d), what);
      CHECK(byte(&sYt(d, j), yt) == h::tf32_yt_byte(d, j), what);
      y[byte(&sY(j, d), y) / 4] = float(1 + j * h::kD + d);  // distinct, exact in float
      yt[byte(&sYt(d, j), yt) / 4] = 0.f;
    }
  for (int t = 0; t < h::kTransposers; ++t)
    h::transpose_tile<kCols>(reinterpret_cast<const char*>(y), reinterpret_cast<char*>(yt), t);
  for (int d = 0; d < h::kD; ++d)
    for (int k = 0; k < kCols; ++k)
      CHECK(yt[byte(&sYt(d, k), yt) / 4] == float(1 + h::yt_col(k) * h::kD + d), what);
}

// The kernels' layouts are where the TMA copies put the data (CuTe derives the copies from
// them): element (r, c) of a tensor on SmemRows, addressed through CuTe's swizzled pointer
// (the swizzle acts on the byte address), is at the TMA model's byte.
template <typename T, int kRows>
void check_tma_layout(const char* what) {
  alignas(1024) static T tile[kRows * h::kD];
  Tensor s = make_tensor(make_smem_ptr(tile), h::SmemRows<T, kRows>{});
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < h::kD; ++c) {
      const auto byte = reinterpret_cast<const char*>(&s(r, c)) - reinterpret_cast<const char*>(tile);
      CHECK(uint32_t(byte) == tma_byte<T>(0, kRows, r, c), what);
    }
}

int main() {
  using anchor_kernels::supcon_cuda::kBwdSoftExact;
  using anchor_kernels::supcon_cuda::kBwdUniform;
  check_tma_layout<bfloat16_t, h::kM>("tma layout, 128 rows");
  check_tma_layout<half_t, 32>("tma layout, 32 rows");
  check_tma_layout<tfloat32_t, h::kM>("tma layout, 128 rows, TF32");
  check_tma_layout<tfloat32_t, 64>("tma layout, 64 rows, TF32");
  check_s<bfloat16_t, h::fwd_cols<bfloat16_t>(), h::FwdStorage<bfloat16_t>>("forward S, bf16");
  check_s<half_t, h::fwd_cols<half_t>(), h::FwdStorage<half_t>>("forward S, fp16");
  check_s<tfloat32_t, h::fwd_cols<tfloat32_t>(), h::FwdStorage<tfloat32_t>>("forward S, TF32");
  check_s<bfloat16_t, 64, h::BwdStorage<bfloat16_t, kBwdUniform>>("backward S, 64 columns");
  check_s<half_t, 32, h::BwdStorage<half_t, kBwdSoftExact>>("backward S, 32 columns");
  check_dx<bfloat16_t, 64, h::BwdStorage<bfloat16_t, kBwdUniform>>("dX, 64 columns, bf16");
  check_dx<half_t, 64, h::BwdStorage<half_t, kBwdUniform>>("dX, 64 columns, fp16");
  check_dx<bfloat16_t, 32, h::BwdStorage<bfloat16_t, kBwdSoftExact>>("dX, 32 columns");
  check_tma_layout<tfloat32_t, 32>("tma layout, 32 rows, TF32");
  check_s<tfloat32_t, 32, h::BwdStorage<tfloat32_t, kBwdUniform>>("backward S, TF32");
  check_dx<tfloat32_t, 32, h::BwdStorage<tfloat32_t, kBwdSoftExact>>("dX, TF32");
  check_transpose<32>("transposers, TF32");
  printf("failures %d\n", failures);
  return failures != 0;
}

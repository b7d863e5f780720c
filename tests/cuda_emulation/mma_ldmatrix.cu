// Host check of the shared-memory side of the sm_80 tensor-core kernels (csrc/cuda/supcon_mma.cuh
// and similarity_mma.cuh): for every ldmatrix they issue, the rows CuTe has each lane point at
// in the kernels' own swizzled layouts, read the way the hardware reads them, must fill every
// fragment register with the element the mma.sync after it expects there.
//
// The hardware model, from the PTX ISA (ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16):
// lanes 8 m .. 8 m + 7 give the addresses of the eight 16-byte rows of matrix m (m < 4), and
// register m of lane t receives, as its two halves h = 0, 1,
//   plain:  element 2 (t % 4) + h of the row lane 8 m + t / 4 gave;
//   .trans: element t / 4 of the row lane 8 m + 2 (t % 4) + h gave.
// A row is 8 elements at consecutive, 16-byte aligned offsets of the layout (checked). For
// 32-bit elements (TF32: the kernels read them with the same b16 ldmatrix, never .trans) a row
// is 4 elements, and the two halves of register m are element t % 4 of that row, whole.
//
// Checked, for every warp, copy and k-step: the SupCon forward's anchor block and column tiles,
// the backward's S operands and Y read transposed (64- and 32-row tiles), the similarity
// forward's, its backward's G (as it lies in memory, and G^T read transposed) and scaled Y, and
// the selection's anchors and contrast rows; for TF32, the S = A B^T operands of the SupCon
// forward, the similarity forward and the selection. Compiled with nvcc
// and run on the host by tests/test_supcon_cuda_emulated.py; prints the number of failures,
// exits non-zero on any.
#include <cstdio>

#include "cuda/hard_positive_mma.cuh"
#include "cuda/similarity_mma.cuh"

using namespace cute;
namespace sm = anchor_kernels::supcon_cuda::mma;
namespace sim = anchor_kernels::similarity_cuda::mma;
namespace hp = anchor_kernels::hard_positive_cuda::mma;

static int failures = 0;
#define CHECK(cond, what)                                                                \
  do {                                                                                   \
    if (!bool(cond) && failures++ < 10) printf("failed: %s: %s (thread %d)\n", what, #cond, t); \
  } while (0)

constexpr int kKey = 4096;  // (row, column) as row * kKey + column

// The copy of operand A (kA) or B of sm::TiledMma<T> with Atom from the smem layout `layout`
// ((M, K) or (N, K)); trans: the atom is ldmatrix .trans.
template <bool kA, typename Atom, typename T, typename Layout>
void check(const char* what, Layout layout, bool trans) {
  constexpr int kRow = 16 / int(sizeof(T)), kPerReg = 4 / int(sizeof(T));  // elements: row, register
  static_assert(kRow <= 8, "at most 8 elements a row");
  if (trans && kPerReg != 2) {
    const int t = -1;
    CHECK(false, "ldmatrix .trans moves 16-bit elements only");
    return;
  }
  sm::TiledMma<T> mma;
  auto copy = [&] {
    if constexpr (kA) return make_tiled_copy_A(Copy_Atom<Atom, T>{}, mma);
    else return make_tiled_copy_B(Copy_Atom<Atom, T>{}, mma);
  }();
  auto id = make_identity_tensor(make_shape(size<0>(layout), size<1>(layout)));  // flat (row, column)
  static T storage[cosize_v<Layout>];
  auto smem = make_tensor(&storage[0], layout);
  for (int warp = 0; warp < sm::kThreads / 32; ++warp) {
    int t = warp * 32;
    // Per lane: the coordinates its copies read (CPY, CPY_M, CPY_K) and those its fragment
    // registers must hold, in the copy's order (retile_D).
    auto src0 = copy.get_thread_slice(t).partition_S(id);
    auto frag0 = [&] {
      if constexpr (kA) return mma.get_thread_slice(t).partition_fragment_A(smem);
      else return mma.get_thread_slice(t).partition_fragment_B(smem);
    }();
    CHECK(size<0>(src0) == kRow, what);
    constexpr int kCopies = decltype(size(src0))::value / kRow;
    static int rows[32][kCopies][8], want[32][kCopies][8];
    for (int lane = 0; lane < 32; ++lane) {
      t = warp * 32 + lane;
      auto src = group_modes<1, 3>(copy.get_thread_slice(t).partition_S(id));
      auto coords = [&] {
        if constexpr (kA) return mma.get_thread_slice(t).partition_A(id);
        else return mma.get_thread_slice(t).partition_B(id);
      }();
      Tensor keys = make_tensor<int>(frag0.layout());
      for (int i = 0; i < size(keys); ++i) {
        auto x = coords(i);
        keys(i) = int(get<0>(x)) * kKey + int(get<1>(x));
      }
      auto dst = group_modes<1, 3>(copy.get_thread_slice(t).retile_D(keys));
      CHECK(size(dst) == size(src), what);
      for (int c = 0; c < kCopies; ++c) {
        const int first = int(layout(get<0>(src(0, c)), get<1>(src(0, c))));
        CHECK(first % kRow == 0, what);
        for (int v = 0; v < kRow; ++v) {
          auto x = src(v, c);
          CHECK(int(layout(get<0>(x), get<1>(x))) == first + v, what);  // one 16-byte row
          rows[lane][c][v] = int(get<0>(x)) * kKey + int(get<1>(x));
          want[lane][c][v] = dst(v, c);
        }
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      t = warp * 32 + lane;
      for (int c = 0; c < kCopies; ++c)
        for (int v = 0; v < kRow; ++v) {
          const int m = v / kPerReg, h = v % kPerReg;
          const int got = trans ? rows[8 * m + 2 * (lane % 4) + h][c][lane / 4]
                                : rows[8 * m + lane / 4][c][kPerReg * (lane % 4) + h];
          CHECK(got == want[lane][c][v], what);
        }
    }
  }
}

template <typename T>
void check_all() {
  using N = SM75_U32x4_LDSM_N;
  using Tr = SM75_U16x8_LDSM_T;
  constexpr int kSoftCols = sm::bwd_cols<anchor_kernels::supcon_cuda::kBwdSoftExact>();
  check<true, N, T>("supcon forward anchors", sm::SmemTile<sm::kFwdRows>{}, false);
  check<false, N, T>("supcon forward columns", sm::SmemTile<sm::kFwdCols>{}, false);
  check<true, N, T>("supcon backward rows", sm::SmemTile<sm::kBwdRows>{}, false);
  check<false, N, T>("supcon backward columns", sm::SmemTile<64>{}, false);
  check<false, N, T>("supcon backward columns (soft)", sm::SmemTile<kSoftCols>{}, false);
  check<false, Tr, T>("supcon backward Y^T", sm::SmemTileT<64>{}, true);
  check<false, Tr, T>("supcon backward Y^T (soft)", sm::SmemTileT<kSoftCols>{}, true);
  check<true, N, T>("similarity forward a", sm::SmemTile<sim::kFwdRows>{}, false);
  check<false, N, T>("similarity forward b", sm::SmemTile<sim::kCols>{}, false);
  check<true, N, T>("similarity backward G", sim::GTileA<false>{}, false);
  check<true, Tr, T>("similarity backward G^T", sim::GTileA<true>{}, true);
  check<false, Tr, T>("similarity backward y", sm::SmemTileT<sim::kCols>{}, true);
  check<true, N, T>("selection anchors", sm::SmemTile<hp::kRows>{}, false);
  check<false, N, T>("selection contrast rows", sm::SmemTile<hp::kCols>{}, false);
}

// TF32 rows: the S = A B^T products alone (the forwards and the selection).
void check_tf32() {
  using N = SM75_U32x4_LDSM_N;
  using T = tfloat32_t;
  check<true, N, T>("TF32 supcon forward anchors", sm::SmemTile<sm::kFwdRows, T>{}, false);
  check<false, N, T>("TF32 supcon forward columns", sm::SmemTile<sm::kFwdCols, T>{}, false);
  check<true, N, T>("TF32 similarity forward a", sm::SmemTile<sim::kFwdRows, T>{}, false);
  check<false, N, T>("TF32 similarity forward b", sm::SmemTile<sim::kCols, T>{}, false);
  check<true, N, T>("TF32 selection anchors", sm::SmemTile<hp::kRows, T>{}, false);
  check<false, N, T>("TF32 selection contrast rows", sm::SmemTile<hp::kCols, T>{}, false);
}

int main() {
  // G^T's view: element (r, q) of the A operand is where load_g put G^T's row q, column r.
  const int t = -1;  // CHECK names a thread; none here
  for (int r = 0; r < sim::kBwdRows; ++r)
    for (int q = 0; q < sim::kCols; ++q) CHECK(sim::GTileA<true>{}(r, q) == sim::GTile{}(q, r), "G^T view");
  check_all<bfloat16_t>();
  check_all<half_t>();
  check_tf32();
  printf("failures %d\n", failures);
  return failures != 0;
}

// Host check of the fragment layouts the CuTe SupCon kernels (csrc/cuda/supcon_mma.cuh and the
// Hopper forward, supcon_sm90.cuh) rely on, for every thread of a CTA: which rows and columns
// of a tile a thread's accumulators hold (the per-row statistics, quad reductions and the
// epilogue's addressing assume it), that the accumulators of S read as A fragments
// (acc_as_a_operand) hold the coordinates the next product's A operand expects (for TF32: the
// registers the backward hands its product with the columns permuted), and which chunks of a
// tile load_rows has each thread copy (16-bit and TF32 elements). Compiled with nvcc and run on
// the host by tests/test_supcon_cuda_emulated.py; prints the number of failures, exits non-zero
// on any.
#include <cstdio>

#include "cuda/supcon_mma.cuh"
#include "cuda/supcon_sm90.cuh"

using namespace cute;
using namespace anchor_kernels::supcon_cuda::mma;

static int failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) if (failures++ < 10) printf("failed: %s (thread %d)\n", #cond, t); \
  } while (0)

template <int kM, int kN, typename T = bfloat16_t>
void check_tile() {
  TiledMma<T> mma;
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
    // The forwards' per-logit code (mma::tile_update) reads m16 slab mi as
    // acc(_, mi, _)(k + 2 i + 4 j): row i of the slab's two (8 apart), column col0 + 8 j + k.
    for (int mi = 0; mi < kMi; ++mi) {
      auto slab = cC(_, mi, _);
      CHECK(size(slab) == kN / 2);
      for (int v = 0; v < size(slab); ++v) {
        const int k = v % 2, i = (v / 2) % 2, j = v / 4;
        CHECK(get<0>(slab(v)) == get<0>(cC(make_coord(0, 0), mi, 0)) + 8 * i);
        CHECK(get<1>(slab(v)) == get<1>(cC(0)) + 8 * j + k);
      }
    }
    // Element e: row row0 + 8 ((e >> 1) & 1) + 16 kNumWarps-slab, column col0 + (e & 1) + 8 (e >> 2).
    if (kMi == 1)
      for (int e = 0; e < size(cC); ++e) {
        CHECK(get<0>(cC(e)) == get<0>(cC(0)) + 8 * ((e >> 1) & 1));
        CHECK(get<1>(cC(e)) == get<1>(cC(0)) + (e & 1) + 8 * (e >> 2));
      }
    if constexpr (sizeof(T) == 2) {  // the 16-bit backward feeds S back as A (never TF32)
      auto cA = mma.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
      auto cH = make_tensor(cC.data(), acc_as_a_operand(cC.layout()));
      CHECK(size(cH) == size(cA));
      for (int i = 0; i < size(cA); ++i) CHECK(cA(i) == cH(i));
    }
  }
}

// The TF32 backwards' products with the k-steps' columns permuted (gemm_h_y_tf32 of the loss,
// similarity_bwd_tf32), against CuTe's m16n8k8 layouts: for every thread and k-step j (the S
// tile's n8 block), A register v is accumulator 4 j + tf32_h_order(v) (same row; its column
// 8 j + 2t or 8 j + 2t + 1 is k = t or t + 4 permuted: permuted_col), which is the similarity's
// G(row0 + 8 (v & 1), permuted_col(j, lane, v >> 1)); and B register v of dX's n8 block n is
// Y^T(8 n + g, permuted_col(j, lane, v)): column g of the block, the permuted k.
template <int kCols>
void check_tf32_h_times_y() {
  TiledMma<tfloat32_t> mma;
  for (int t = 0; t < kThreads; ++t) {
    auto slice = mma.get_thread_slice(t);
    auto cS = slice.partition_C(make_identity_tensor(Shape<Int<kBwdRows>, Int<kCols>>{}));
    auto cA = slice.partition_A(make_identity_tensor(Shape<Int<kBwdRows>, _8>{}));  // one k-step
    auto cB = slice.partition_B(make_identity_tensor(Shape<Int<kD>, _8>{}));        // (n, k)
    auto cD = slice.partition_C(make_identity_tensor(Shape<Int<kBwdRows>, Int<kD>>{}));
    CHECK(size(cA) == 4 && size(cB) == 2 * kD / 8);
    const int lane = t % 32;
    auto column_of = [&](int k) { return k < 4 ? 2 * k : 2 * (k - 4) + 1; };  // k -> S column in the block
    for (int j = 0; j < kCols / 8; ++j)
      for (int v = 0; v < 4; ++v) {
        auto s = cS(4 * j + tf32_h_order(v));
        CHECK(get<0>(s) == get<0>(cA(v)));
        CHECK(get<1>(s) == 8 * j + column_of(get<1>(cA(v))));
        // the similarity's A registers, read from G: row row0 + 8 (v & 1) of dX's, permuted_col
        CHECK(get<0>(cA(v)) == get<0>(cD(0)) + 8 * (v & 1));
        CHECK(8 * j + column_of(get<1>(cA(v))) == permuted_col(j, lane, v >> 1));
      }
    for (int n = 0; n < kD / 8; ++n)
      for (int v = 0; v < 2; ++v) {
        auto b = cB(v, n, 0);
        CHECK(get<0>(b) == yt_row(n, lane));
        CHECK(column_of(get<1>(b)) == permuted_col(0, lane, v));  // the column in k-step 0's block
      }
  }
  // transpose_tile, run by every thread over a tile of keys in the swizzled layout: Y^T holds
  // element (q, d) at (d, q), for every element.
  using T = tfloat32_t;
  static float tile[kCols * kD];
  auto sy = make_tensor(reinterpret_cast<T*>(&tile[0]), SmemTile<kCols, T>{});
  for (int q = 0; q < kCols; ++q)
    for (int d = 0; d < kD; ++d) tile[sy.layout()(q, d)] = float(q * kD + d);
  static YtTile<kCols> yt;
  for (auto& row : yt.v)
    for (float& v : row) v = -1.f;
  for (int t = 0; t < kThreads; ++t) transpose_tile(sy, yt, t);
  for (int d = 0; d < kD; ++d)
    for (int q = 0; q < kCols; ++q) {
      const int t = -1;  // CHECK names a thread; none here
      CHECK(yt.v[d][q] == float(q * kD + d));
    }
}

// The Hopper forward's 128 x kN tile (kN = 128, 64 for TF32) over two consumer warpgroups:
// element v = k + 2 i + 4 j of a thread's kN / 2 accumulators is row i of its two (the second 8
// below the first), column col0 + 8 j + k; the four lanes of a quad hold the same rows (quad
// reductions) and together every column; each tile element is held by exactly one thread, its
// warpgroup's 64 rows.
template <typename T>
void check_sm90_tile() {
  namespace h = anchor_kernels::supcon_cuda::sm90;
  constexpr int kN = h::fwd_cols<T>();
  h::TiledMmaS<T, kN> mma;
  static int held[h::kM][kN];
  for (auto& r : held)
    for (int& v : r) v = 0;
  for (int t = 0; t < 128 * h::kConsumers; ++t) {
    auto coords = [&](int thread) {
      return mma.get_thread_slice(thread).partition_C(make_identity_tensor(Shape<Int<h::kM>, Int<kN>>{}));
    };
    auto cC = coords(t);
    CHECK(size(cC) == kN / 2);
    const int row0 = get<0>(cC(0)), col0 = get<1>(cC(0));
    CHECK(row0 / 64 == t / 128);
    for (int v = 0; v < size(cC); ++v) {
      const int k = v % 2, i = (v / 2) % 2, j = v / 4;
      CHECK(get<0>(cC(v)) == row0 + 8 * i);
      CHECK(get<1>(cC(v)) == col0 + 8 * j + k);
      for (int q = 1; q < 4; ++q) CHECK(get<0>(coords(t ^ q)(v)) == get<0>(cC(v)));
      held[get<0>(cC(v))][get<1>(cC(v))]++;
    }
  }
  for (int r = 0; r < h::kM; ++r)
    for (int c = 0; c < kN; ++c) {
      const int t = -1;  // CHECK names a thread; none here
      CHECK(held[r][c] == 1);
    }
}

// The Hopper backward: S over (kM, kCols) and dX over (kM, kD) give a thread the same two rows,
// dX element v is row row0 + 8 ((v >> 1) & 1), column col0 + (v & 1) + 8 (v >> 2), and the S
// accumulators read as A registers (sm90::acc_as_a_operand) hold the coordinates dX's A expects:
// the same for 16-bit elements; for TF32, A's k stands for S's column sm90::yt_col(k) (the
// order of Y^T's columns).
template <typename T, int kCols>
void check_sm90_backward() {
  namespace h = anchor_kernels::supcon_cuda::sm90;
  h::TiledMmaS<T, kCols> mma_s;
  h::TiledMmaDx<T, kCols> mma_dx;
  for (int t = 0; t < 128 * h::kConsumers; ++t) {
    auto cS = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<h::kM>, Int<kCols>>{}));
    auto cD = mma_dx.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<h::kM>, Int<h::kD>>{}));
    const int row0 = get<0>(cS(0)), col0 = get<1>(cD(0));
    CHECK(size(cS) == kCols / 2 && size(cD) == 64 && get<0>(cD(0)) == row0);
    for (int v = 0; v < size(cS); ++v) {
      CHECK(get<0>(cS(v)) == row0 + 8 * ((v >> 1) & 1));
      CHECK(get<1>(cS(v)) == get<1>(cS(0)) + (v & 1) + 8 * (v >> 2));
    }
    for (int v = 0; v < size(cD); ++v) {
      CHECK(get<0>(cD(v)) == row0 + 8 * ((v >> 1) & 1));
      CHECK(get<1>(cD(v)) == col0 + (v & 1) + 8 * (v >> 2));
    }
    auto cA = mma_dx.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<h::kM>, Int<kCols>>{}));
    auto cH = make_tensor(cS.data(), h::acc_as_a_operand<T>(cS.layout()));
    CHECK(size(cH) == size(cA) && size(cA) == kCols / 2);
    for (int i = 0; i < size(cA); ++i) {
      const int k = get<1>(cA(i));
      CHECK(get<0>(cA(i)) == get<0>(cH(i)));
      CHECK(get<1>(cH(i)) == (h::kIsTf32<T> ? h::yt_col(k) : k));
    }
  }
}

// load_rows: thread t copies chunk c of rows r0 + kStep k; both loop forms (unrolled over k,
// rolled from t / kChunks) copy every 16-byte chunk of the tile exactly once, and each chunk's
// elements lie at consecutive, 16-byte aligned offsets of the swizzled tile (one cp.async).
template <int kRows, typename T = half_t>
void check_row_copy() {
  using Copy = RowCopy<kRows, T>;
  constexpr int kE = kChunk<T>;
  const SmemTile<kRows, T> tile{};
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < Copy::kChunks; ++c) {
      const int t = -1;  // CHECK names a thread; none here
      const int first = int(tile(r, c * kE));
      CHECK(first % kE == 0);
      for (int e = 1; e < kE; ++e) CHECK(int(tile(r, c * kE + e)) == first + e);
    }
  static int copied[kRows][Copy::kChunks];
  for (auto& r : copied)
    for (int& v : r) v = 0;
  for (int t = 0; t < kThreads; ++t) {
    const Copy cp = Copy::of(t);
    int k = 0;
    for (int r = t / Copy::kChunks; r < kRows; r += Copy::kStep, ++k) CHECK(cp.row(k) == r);
    CHECK(k == Copy::kPasses);
    for (k = 0; k < Copy::kPasses; ++k) copied[cp.row(k)][cp.c]++;
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < Copy::kChunks; ++c) {
      const int t = -1;  // CHECK names a thread; none here
      CHECK(copied[r][c] == 1);
    }
}

int main() {
  check_row_copy<kFwdRows>();
  check_row_copy<kFwdCols>();
  check_row_copy<bwd_cols<anchor_kernels::supcon_cuda::kBwdSoftExact>()>();
  check_row_copy<kFwdRows, tfloat32_t>();  // TF32: 4-element chunks, twice the passes
  check_row_copy<kFwdCols, tfloat32_t>();
  check_sm90_tile<bfloat16_t>();
  check_sm90_tile<half_t>();
  check_sm90_tile<tfloat32_t>();
  check_sm90_backward<bfloat16_t, 64>();
  check_sm90_backward<half_t, 32>();
  check_sm90_backward<tfloat32_t, 32>();
  for (int k = 0; k < 64; ++k) {  // yt_k inverts yt_col, within each 8
    const int t = -1;  // CHECK names a thread; none here
    namespace h = anchor_kernels::supcon_cuda::sm90;
    CHECK(h::yt_k(h::yt_col(k)) == k && h::yt_col(k) / 8 == k / 8);
  }
  check_tile<kFwdRows, 64>();
  check_tile<kBwdRows, 64>();
  check_tile<kBwdRows, 32>();
  check_tile<kBwdRows, kD>();
  check_tile<kFwdRows, 64, tfloat32_t>();  // the TF32 forwards' (m16n8k8: the same C layout)
  check_tile<64, 64, tfloat32_t>();        // the TF32 selection's
  check_tile<kBwdRows, 64, tfloat32_t>();  // the TF32 backward's S (32 columns: soft mining) and dX
  check_tile<kBwdRows, 32, tfloat32_t>();
  check_tile<kBwdRows, kD, tfloat32_t>();
  check_tf32_h_times_y<64>();
  check_tf32_h_times_y<32>();
  printf("failures %d\n", failures);
  return failures != 0;
}

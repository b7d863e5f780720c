// Host check of the forwards' per-logit code (csrc/cuda/supcon_mma.cuh: RowState, tile_update,
// finish_row, shared by the sm_80 kernel's and the Hopper TF32 kernel's 64-column tiles and
// the Hopper 16-bit kernel's 128-column ones) against a float64 evaluation of the same
// statistics, and of the Hopper backward's self-pair arithmetic (SelfPairs) against the 64-bit
// condition it replaces.
//
// One lane's view, with its quad reductions the identity: the thread holds two rows and, of
// every kCols-column tile, the kCols / 4 columns 8 j + k (j < kCols / 8, k < 2); the reference
// sums over those columns alone. Cases cover the three modes, several tiles (the online
// rescaling of the log-sum-exp and of the soft weights), a last partial tile, the self pair
// inside, at the edge of and outside the thread's columns, rows without positives, and large
// logits. Each case also runs split as the sm_80 forward splits its columns among CTAs
// (FwdArgs::splits), every part from a fresh state, the parts merged by RowState::merge: the
// statistics must be the unsplit ones. The labels, of every int64 range (label_of), reach the
// per-logit code as the kernels' keys (label_keys.cuh), and the reference compares the labels
// themselves; the keys are also checked alone (check_label_keys). Compiled with nvcc and run on
// the host by tests/test_supcon_cuda_emulated.py; prints the number of failures, exits non-zero
// on any.
#include <climits>
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include "cuda/supcon_sm90.cuh"

using namespace anchor_kernels::supcon_cuda;
using mma::RowState;
namespace lk = label_keys;

// The label keys of a CTA whose rows have labels lx (at most kRows), as cta_keys forms them on
// the device: the rows' labels sorted into `sorted` where one is out of range.
template <int kRows>
lk::Keys keys_of_rows(lk::SortedRows<kRows>& sorted, const std::vector<int64_t>& lx) {
  const int n = int(lx.size());
  bool wide = false;
  for (int64_t l : lx) wide |= !lk::own_key(l);
  for (int r = 0; r < kRows; ++r)
    sorted.v[lk::SortedRows<kRows>::position(lx.data(), n, r)] = lk::SortedRows<kRows>::label(lx.data(), n, r);
  return {wide};
}

static int failures = 0;

template <int kCols>
struct Fragment {  // acc(v), v = k + 2 i + 4 j
  float v[kCols / 2];
  CUTE_HOST_DEVICE float& operator()(int i) { return v[i]; }
};

void close(double got, double want, double tol, const char* what, int mode, int row) {
  const bool ok = std::isfinite(got) && std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  if (!ok && failures++ < 20)
    printf("failed: %s mode %d row %d: got %.7g want %.7g\n", what, mode, row, got, want);
}

// Cosines of the fixed-shift cases: random, or the extremes that make a row's terms smallest
// (every cosine -1: the log-sum-exp's terms 2^(-2 shift2); positives at +1 and others at -1:
// the soft weights' 2^(-2 beta log2(e)) with the largest log-sum-exp beside them).
enum Cosines { kRandom, kAllOpposite, kPositivesAligned };

// Class c's label: class indices, labels past int32 both ways, and labels in and next to the
// range of the keys that stand for labels out of it (lk::kOutOfRange + p, lk::kNoRow).
int64_t label_of(int c) {
  switch (c % 5) {
    case 0: return c;
    case 1: return (int64_t(c) << 40) + 7;
    case 2: return int64_t(INT32_MIN) + c / 5;
    case 3: return -int64_t(c) * 1000003;
    default: return int64_t(INT32_MAX) + 1 + c;
  }
}

// kFixed: normalised rows (acc = cos ||x|| ||y||, |cos| <= 1, scale_acc unused) and the fixed
// shifts that fixed_shift (supcon_kernels.h, the rule the glue applies) admits for tau, beta
// and n; otherwise raw products of any scale and running maxima.
template <int kMode, bool kFixed, int kN>
void check_case(int n, int64_t self0, float scale_acc, unsigned seed, int classes, float tau = 0.1f,
                float beta = 1.5f, Cosines cosines = kRandom) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> uni(-1.f, 1.f), pos(0.5f, 2.f);
  const int tiles = (n + kN - 1) / kN;
  std::vector<float> rn(tiles * kN, 0.f);
  std::vector<int64_t> label(tiles * kN, 0);
  for (int c = 0; c < n; ++c) rn[c] = pos(gen), label[c] = label_of(int(gen() % classes));
  // The CTA's rows: 16 labels, the thread's two rows among them (rows 3 and 11); the columns
  // and the rows compare by their keys.
  std::vector<int64_t> cta(16);
  for (int64_t& l : cta) l = label_of(int(gen() % classes));
  const float inv_tau = 1.f / tau, nbt = kMode == kFwdSoft ? -beta * tau : 0.f;
  const float shift2 = kFixed ? fixed_shift(true, tau, kMode == kFwdSoft ? beta : 0.0, n) : 0.f;
  if (kFixed && shift2 <= 0.f && failures++ < 20)
    printf("failed: fixed_shift refuses tau %g beta %g n %d\n", tau, beta, n);
  float sc[2];
  int64_t lab[2], self[2];
  lk::SortedRows<16> sorted;
  const auto key_of = keys_of_rows(sorted, cta);
  std::vector<int32_t> key(label.size());
  for (size_t c = 0; c < label.size(); ++c) key[c] = key_of(label[c], sorted);
  std::vector<float> acc[2];
  RowState rs[2];
  for (int i = 0; i < 2; ++i) {
    const float norm = pos(gen);  // ||x||
    sc[i] = inv_tau * mma::kLog2e / norm;
    lab[i] = cta[3 + 8 * i];
    self[i] = self0 < 0 ? -1 : self0 + 8 * i;  // the thread's rows are 8 apart
    acc[i].resize(tiles * kN);
    for (int c = 0; c < tiles * kN; ++c) {
      const float cos = cosines == kRandom ? uni(gen)
                        : cosines == kPositivesAligned && label[c] == lab[i] ? 1.f : -1.f;
      acc[i][c] = kFixed ? cos * norm / (rn[c] > 0.f ? rn[c] : 1.f) : uni(gen) * scale_acc;
    }
    rs[i] = RowState::start(sc[i], nbt, key_of(lab[i], sorted), self[i], shift2);
  }
  // Tiles [t0, t1) into states started like rs (a split's share of the columns).
  auto run = [&](int t0, int t1, RowState (&st)[2]) {
    for (int i = 0; i < 2; ++i) st[i] = RowState::start(sc[i], nbt, key_of(lab[i], sorted), self[i], shift2);
    for (int t = t0; t < t1; ++t) {
      const int64_t y0 = int64_t(t) * kN;
      Fragment<kN> f;
      for (int v = 0; v < kN / 2; ++v) {
        const int k = v % 2, i = (v / 2) % 2, j = v / 4;
        f(v) = acc[i][y0 + 8 * j + k];
      }
      const bool edge = y0 + kN > n || (self0 >= 0 && y0 <= self0 + 8 && self0 < y0 + kN);
      if (edge)
        mma::tile_update<kMode, true, kFixed, kN>(f, st, &key[y0], &rn[y0], 0, y0, n, mma::OneLane{});
      else
        mma::tile_update<kMode, false, kFixed, kN>(f, st, &key[y0], &rn[y0], 0, y0, n, mma::OneLane{});
    }
  };
  run(0, tiles, rs);
  // The same columns split as the sm_80 forward splits them (FwdArgs::splits: ceil(tiles /
  // splits) tiles each, the last ones possibly empty), each part's state merged in order.
  for (int splits : {2, 3, 5}) {
    RowState merged[2];
    for (int i = 0; i < 2; ++i) merged[i] = RowState::start(sc[i], nbt, key_of(lab[i], sorted), self[i], shift2);
    const int per = (tiles + splits - 1) / splits;
    for (int k = 0; k < splits; ++k) {
      RowState part[2];
      run(std::min(tiles, k * per), std::min(tiles, (k + 1) * per), part);
      for (int i = 0; i < 2; ++i)
        merged[i].template merge<kMode>(part[i].m, part[i].l, part[i].cnt, part[i].sw, part[i].tm, part[i].lw);
    }
    for (int i = 0; i < 2; ++i) {
      const mma::RowStats a = mma::finish_row<kMode>(rs[i], 1.f, mma::OneLane{});
      const mma::RowStats b = mma::finish_row<kMode>(merged[i], 1.f, mma::OneLane{});
      if (b.lse != a.lse) close(b.lse, a.lse, 2e-5, "lse of a split", kMode, i);  // (-inf: no columns)
      close(b.count, a.count, 0, "count of a split", kMode, i);
      if (a.valid != b.valid && failures++ < 20) printf("failed: valid of a split, mode %d\n", kMode);
      if (a.valid && kMode != kFwdLse) {
        close(b.sbar, a.sbar, 2e-5, "sbar of a split", kMode, i);
        close(b.logw, a.logw, 2e-5, "logw of a split", kMode, i);
      }
    }
  }
  for (int i = 0; i < 2; ++i) {
    // float64 reference over the thread's columns: s in natural units.
    double mx = -INFINITY, cnt = 0, ssum = 0, wmx = -INFINITY;
    std::vector<double> s_all, s_pos;
    for (int c = 0; c < n; ++c) {
      if (c % 8 >= 2 || c == self[i]) continue;
      const double s = double(acc[i][c]) * rn[c] * sc[i] / mma::kLog2e;
      s_all.push_back(s);
      mx = std::max(mx, s);
      if (label[c] == lab[i]) s_pos.push_back(s), wmx = std::max(wmx, s * nbt);
    }
    double l = 0;
    for (double s : s_all) l += std::exp(s - mx);
    const double lse = mx + std::log(l);
    double w = 0, ws = 0;
    for (double s : s_pos) {
      cnt += 1, ssum += s;
      const double e = std::exp(s * nbt - wmx);
      w += e, ws += e * s;
    }
    const mma::RowStats r = mma::finish_row<kMode>(rs[i], float(s_all.size()), mma::OneLane{});
    if (s_all.empty()) {  // every column masked: no valid anchor, whatever LSE says
      if (r.valid && failures++ < 20) printf("failed: valid without columns, mode %d\n", kMode);
      continue;
    }
    close(r.lse, lse, 2e-5, "lse", kMode, i);
    if (kMode == kFwdLse) {
      close(r.count, double(s_all.size()), 0, "count", kMode, i);
      continue;
    }
    close(r.count, cnt, 0, "count", kMode, i);
    if ((cnt > 0) != r.valid && failures++ < 20) printf("failed: valid mode %d row %d\n", kMode, i);
    if (cnt == 0) {
      close(r.loss, 0, 0, "loss without positives", kMode, i);
      continue;
    }
    const double sbar = kMode == kFwdSoft ? ws / w : ssum / cnt;
    const double logw = kMode == kFwdSoft ? wmx + std::log(w) : std::log(cnt);
    close(r.sbar, sbar, 2e-5, "sbar", kMode, i);
    close(r.logw, logw, 2e-5, "logw", kMode, i);
    close(r.loss, lse - sbar, 2e-5, "loss", kMode, i);
  }
}

// [last false, first true] of a predicate false at lo and true at hi, by bisection.
template <typename Pred>
std::pair<float, float> bracket(Pred pred, float lo, float hi) {
  for (int k = 0; k < 60; ++k) {
    const float mid = 0.5f * (lo + hi);
    (pred(mid) ? hi : lo) = mid;
  }
  return {lo, hi};
}

template <int kMode, int kN>
void check_mode() {
  unsigned seed = 1;
  for (int n : {1, 2, 37, 128, 200, 640})
    for (int64_t self0 : {int64_t(-1), int64_t(0), int64_t(3), int64_t(130), int64_t(121)})
      for (int classes : {1, 3, 50})
        if (self0 < n) {
          for (float scale : {1.f, 60.f}) check_case<kMode, false, kN>(n, self0, scale, seed++, classes);
          // Fixed shifts: at the default temperature, and at the limits fixed_shift itself
          // admits for n (the smallest temperature, the largest beta), with the extreme
          // cosines there: a rule that admitted more would let those terms underflow.
          const float tau_min =
              bracket([&](float tau) { return fixed_shift(true, tau, 0.0, n) > 0.f; }, 1e-3f, 1.f).second;
          const float beta_max =
              bracket([&](float b) { return fixed_shift(true, 0.1, b, n) == 0.f; }, 0.f, 1e3f).first;
          check_case<kMode, true, kN>(n, self0, 1.f, seed++, classes);
          for (Cosines cosines : {kRandom, kAllOpposite, kPositivesAligned}) {
            check_case<kMode, true, kN>(n, self0, 1.f, seed++, classes, tau_min, 1.5f, cosines);
            check_case<kMode, true, kN>(n, self0, 1.f, seed++, classes, 0.1f, beta_max, cosines);
          }
        }
}

// SelfPairs: c - r == delta(t) exactly when x0 + r + shift == t kCols + c, for every row of the
// block, every column of every tile, blocks before, across and after the diagonal, and both
// signs of the shift (one set; the columns' pass of two sets has shift = -offset).
template <int kCols>
void check_self_pairs() {
  constexpr int kM = sm90::kM;
  for (int64_t shift : {int64_t(0), int64_t(5), int64_t(-70), int64_t(300), int64_t(-1000)})
    for (int64_t x0 : {int64_t(0), int64_t(128), int64_t(256), int64_t(1024)})
      for (int n_tiles : {1, 3, 9, 40})
        for (bool has_self : {true, false}) {
          const auto sp = sm90::SelfPairs<kCols>::of(has_self, shift, x0, n_tiles);
          for (int t = 0; t < n_tiles; ++t) {
            const int d = sp.delta(t);
            for (int r = 0; r < kM; ++r)
              for (int c = 0; c < kCols; ++c) {
                const bool self = has_self && x0 + r + shift == int64_t(t) * kCols + c;
                if ((c - r == d) != self && failures++ < 20)
                  printf("failed: self pair shift %lld x0 %lld tile %d row %d col %d\n",
                         (long long)shift, (long long)x0, t, r, c);
              }
          }
        }
}

// The keys alone: for CTAs of kRows rows, kRows or fewer of them in the matrix, with labels
// drawn from the edges of every range (duplicates included), a row's key equals a label's key
// exactly when the row's label is that label, rows' keys are never kNoRow, and labels in range
// are their own keys.
template <int kRows>
void check_label_keys() {
  const int64_t edges[] = {0, 1, -1, 7, lk::kKeyMin, int64_t(lk::kKeyMin) - 1, lk::kNoRow, lk::kOutOfRange,
                           int64_t(lk::kOutOfRange) + 1, int64_t(lk::kOutOfRange) + 255, INT32_MAX,
                           int64_t(INT32_MAX) + 1, int64_t(INT32_MIN) - 1, INT64_MIN, INT64_MAX,
                           int64_t(1) << 32, (int64_t(1) << 32) + 1, -(int64_t(1) << 32), int64_t(5) << 40};
  std::vector<int64_t> pool(std::begin(edges), std::end(edges));
  for (int c = 0; c < 40; ++c) pool.push_back(label_of(c));
  std::mt19937 gen(7);
  for (int n : {0, 1, 2, kRows / 2 + 3, kRows})
    for (int draw = 0; draw < 20; ++draw) {
      std::vector<int64_t> lx(n);
      for (int64_t& l : lx) l = pool[gen() % (draw % 2 ? 6 : pool.size())];  // odd draws: many duplicates
      if (draw == 2 && n > 0) {  // every label in range but one
        for (int64_t& l : lx) l %= 1000;
        lx[0] = INT64_MAX;
      }
      lk::SortedRows<kRows> sorted;
      const auto key_of = keys_of_rows(sorted, lx);
      for (int r = 0; r < n; ++r) {
        const int32_t kr = key_of(lx[r], sorted);
        if (kr == lk::kNoRow && failures++ < 20) printf("failed: a row's key is kNoRow, n %d\n", n);
        for (int64_t l : pool)
          if ((kr == key_of(l, sorted)) != (lx[r] == l) && failures++ < 20)
            printf("failed: keys of %lld and %lld, n %d\n", (long long)lx[r], (long long)l, n);
      }
      for (int64_t l : pool)
        if (lk::own_key(l) && key_of(l, sorted) != l && failures++ < 20)
          printf("failed: %lld is not its own key\n", (long long)l);
    }
}

int main() {
  check_label_keys<64>();
  check_label_keys<128>();
  check_label_keys<lk::kMaxRows>();
  check_self_pairs<64>();
  check_self_pairs<32>();
  check_mode<kFwdLse, sm90::fwd_cols<cute::bfloat16_t>()>();
  check_mode<kFwdUniform, sm90::fwd_cols<cute::bfloat16_t>()>();
  check_mode<kFwdSoft, sm90::fwd_cols<cute::bfloat16_t>()>();
  check_mode<kFwdLse, mma::kFwdCols>();
  check_mode<kFwdUniform, mma::kFwdCols>();
  check_mode<kFwdSoft, mma::kFwdCols>();
  printf("failures %d\n", failures);
  return failures != 0;
}

// Launcher of the Hopper SupCon forward (supcon_sm90.cuh) and the rule of when the Hopper
// kernels run. CUDA and CuTe headers only; the backward is in supcon_sm90_bwd.cu.
#include <cuda_runtime.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "supcon_sm90.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

// The forward on grid (row blocks, FwdArgs::splits), then with splits the merge of their
// statistics (the sm_80 forward's merge kernel), one thread per row.
template <typename T>
cudaError_t fwd(const FwdArgs& a, cudaStream_t stream) {
  return mma::dispatch_fwd(a, [&](auto mode, auto fixed) {
    constexpr int kMode = decltype(mode)::value;
    const cudaError_t err = sm90::launch<sm90::FwdStorage<T>>(
        sm90::supcon_fwd_sm90_kernel<T, kMode, decltype(fixed)::value>, a,
        sm90::tma_rows<T, sm90::kM>(a.x, int(a.D)),
        sm90::tma_rows<T, sm90::fwd_cols<T>()>(a.y, int(a.D)), a.splits, stream);
    return err != cudaSuccess || a.splits <= 1 ? err : mma::launch_fwd_merge<kMode>(a, stream);
  });
}

// Compute capability 9.0, the only one sm_90a code runs on.
bool device_is_sm90() {
  return mma::once_per_device([](int dev) {
    int major = 0, minor = 0;
    return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
           major == 9 && minor == 0;
  });
}

// What a TMA descriptor of the rows takes (CuTe asserts it when encoding one): at least one
// row, a row stride of at least a row (mma_supported already asks 16-byte multiples and
// alignment), and the kernels' int shapes.
bool tma_fits(const Matrix& m, int64_t D) {
  return m.rows > 0 && m.rows < INT_MAX && m.s0 >= D && m.s0 < INT_MAX;
}

}  // namespace

const char* cuda_kernels_choice() {
  const char* v = std::getenv("ANCHOR_KERNELS_CUDA_KERNELS");
  return v == nullptr || *v == '\0' ? "auto" : v;
}

bool sm90_supported(Dtype dtype, const Matrix& x, const Matrix& y, int64_t D) {
#if defined(ANCHOR_KERNELS_SM90A)
  // Opt-in until the kernels are validated on a device: ANCHOR_KERNELS_CUDA_KERNELS=sm90.
  return std::strcmp(cuda_kernels_choice(), "sm90") == 0 && mma_supported(dtype, x, y, D) &&
         tma_fits(x, D) && tma_fits(y, D) && device_is_sm90();
#else
  (void)dtype, (void)x, (void)y, (void)D;
  return false;  // the binary holds no sm_90a code
#endif
}

int sm90_fwd_splits(Dtype dtype, const FwdArgs& a) {
  const int cols = dtype == Dtype::kTFloat32 ? sm90::fwd_cols<cute::tfloat32_t>()
                                             : sm90::fwd_cols<cute::half_t>();
  return mma::column_splits(a.x.rows, sm90::kM, a.y.rows, cols);
}

// TF32 rows are float32 copies already rounded to TF32 (RowNormArgs::tf32): the TMA copy's
// TF32 element type (CU_TENSOR_MAP_DATA_TYPE_TFLOAT32) leaves them as they are.
cudaError_t launch_supcon_fwd_sm90(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  return mma::with_element_type(dtype, [&](auto t) { return fwd<decltype(t)>(args, stream); });
}

}  // namespace anchor_kernels::supcon_cuda

// Launchers of the CUDA similarity kernels (device code in similarity_kernels.cuh). CUDA
// headers only: compiles with `nvcc -arch=sm_90 -c` without torch.
#include "similarity_kernels.cuh"

namespace anchor_kernels::similarity_cuda {

namespace {

inline unsigned blocks(int64_t n) { return unsigned((n + detail::kBlock - 1) / detail::kBlock); }

template <typename F>
cudaError_t dispatch(Dtype dtype, const F& launch) {
  switch (dtype) {
    case Dtype::kFloat32:
    case Dtype::kTFloat32:  // (the TF32 products are the CuTe kernels')
      launch(float{}, std::false_type{});
      break;
    case Dtype::kFloat16:
      launch(__half{}, std::true_type{});
      break;
    case Dtype::kBFloat16:
      launch(__nv_bfloat16{}, std::true_type{});
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_similarity_fwd(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  if (args.a.rows == 0 || args.b.rows == 0) return cudaSuccess;
  if (mma_fwd_supported(dtype, args)) return launch_similarity_fwd_mma(dtype, args, stream);
  const dim3 grid(blocks(args.a.rows), blocks(args.b.rows));
  return dispatch(dtype, [&](auto t, auto mma) {
    using T = decltype(t);
    detail::similarity_fwd_kernel<T, decltype(mma)::value>
        <<<grid, detail::kThreads, 0, stream>>>(args);
  });
}

cudaError_t launch_similarity_bwd(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  if (args.R == 0 || args.D == 0) return cudaSuccess;
  if (mma_bwd_supported(dtype, args)) return launch_similarity_bwd_mma(dtype, args, stream);
  const dim3 grid(blocks(args.R), blocks(args.D));
  return dispatch(dtype, [&](auto t, auto mma) {
    using T = decltype(t);
    detail::similarity_bwd_kernel<T, decltype(mma)::value>
        <<<grid, detail::kThreads, 0, stream>>>(args);
  });
}

}  // namespace anchor_kernels::similarity_cuda

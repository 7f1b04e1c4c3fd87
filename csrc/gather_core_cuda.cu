// svk_native::gather_core on CUDA: the decode path's per-row gathered r×r product.
//
//   u[i, j] = Σ_k p[i, k] · cores[id_i, j, k]        (transpose: cores[id_i, k, j])
//
// One block per row: the row of p goes to shared memory, each thread owns output columns j
// and reads its row of the gathered core (fp32/fp16/bf16, in place through strides). Rows
// whose id lies outside [0, n) give u = 0, so a bad id never reads out of bounds. Launched on
// the current stream with no host synchronisation: CUDA-graph capturable. The schema is
// declared in gather_core_cpu.cpp, which is always compiled alongside this file.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

template <typename scalar_t>
__global__ void gather_core_kernel(const float* __restrict__ p, const scalar_t* __restrict__ cores,
                                   const int64_t* __restrict__ ids, float* __restrict__ out,
                                   int64_t rank, int64_t n_adapters, int64_t stride_n,
                                   int64_t stride_j, int64_t stride_k) {
  extern __shared__ float p_row[];
  const int64_t row = blockIdx.x;
  for (int64_t k = threadIdx.x; k < rank; k += blockDim.x) p_row[k] = p[row * rank + k];
  __syncthreads();
  const int64_t id = ids[row];
  const bool valid = id >= 0 && id < n_adapters;
  const scalar_t* core = cores + (valid ? id : 0) * stride_n;
  for (int64_t j = threadIdx.x; j < rank; j += blockDim.x) {
    float acc = 0.f;
    if (valid) {
      for (int64_t k = 0; k < rank; ++k) {
        acc += p_row[k] * static_cast<float>(core[j * stride_j + k * stride_k]);
      }
    }
    out[row * rank + j] = acc;
  }
}

at::Tensor gather_core_cuda(const at::Tensor& p, const at::Tensor& cores, const at::Tensor& ids,
                            bool transpose) {
  TORCH_CHECK(p.dim() == 2 && cores.dim() == 3 && ids.dim() == 1,
              "gather_core: expected p (M, r), cores (n, r, r), ids (M,)");
  TORCH_CHECK(cores.size(1) == p.size(1) && cores.size(2) == p.size(1) && ids.size(0) == p.size(0),
              "gather_core: shapes disagree: p ", p.sizes(), ", cores ", cores.sizes(), ", ids ",
              ids.sizes());
  TORCH_CHECK(p.is_cuda() && cores.is_cuda() && ids.is_cuda(),
              "gather_core: all tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t rows = p.size(0), rank = p.size(1);
  const at::Tensor p32 = p.to(at::kFloat).contiguous();
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  at::Tensor out = at::empty({rows, rank}, p.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const int64_t stride_j = transpose ? cores.stride(2) : cores.stride(1);
  const int64_t stride_k = transpose ? cores.stride(1) : cores.stride(2);
  const int threads = static_cast<int>(std::min<int64_t>(256, ((rank + 31) / 32) * 32));
  const size_t shared = static_cast<size_t>(rank) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores.scalar_type(), "gather_core",
                                  [&] {
    gather_core_kernel<scalar_t><<<rows, threads, shared, stream>>>(
        p32.data_ptr<float>(), cores.data_ptr<scalar_t>(), ids64.data_ptr<int64_t>(),
        out.data_ptr<float>(), rank, cores.size(0), cores.stride(0), stride_j, stride_k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(svk_native, CUDA, m) {
  m.impl("gather_core", &gather_core_cuda);
}

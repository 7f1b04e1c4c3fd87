// svk_native::gather_core — the adapter bank's per-row gathered r×r product, CPU twin.
//
//   u[i, j] = Σ_k p[i, k] · cores[id_i, j, k]        (transpose: cores[id_i, k, j])
//
// p (M, r) any float dtype, read as fp32; cores (n, r, r) fp32/fp16/bf16, read in place
// through its strides (a bank of a million cores is never copied or converted); ids (M,)
// int32/int64. Rows whose id lies outside [0, n) (−1 selects the base layer) give u = 0.
// Output: fp32 (M, r). This file also declares the op schema; gather_core_cuda.cu adds
// the CUDA kernel to the same op when a CUDA toolkit is present.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

void check_inputs(const at::Tensor& p, const at::Tensor& cores, const at::Tensor& ids) {
  TORCH_CHECK(p.dim() == 2, "gather_core: p must be 2-D (M, r), got ", p.sizes());
  TORCH_CHECK(cores.dim() == 3 && cores.size(1) == p.size(1) && cores.size(2) == p.size(1),
              "gather_core: cores must be (n, r, r) with r = ", p.size(1), ", got ",
              cores.sizes());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == p.size(0),
              "gather_core: ids must be (M,) with M = ", p.size(0), ", got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "gather_core: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()) && at::isFloatingType(cores.scalar_type()),
              "gather_core: p and cores must be floating tensors");
}

at::Tensor gather_core_cpu(const at::Tensor& p, const at::Tensor& cores, const at::Tensor& ids,
                           bool transpose) {
  check_inputs(p, cores, ids);
  const int64_t rows = p.size(0), rank = p.size(1), n_adapters = cores.size(0);
  const at::Tensor p32 = p.to(at::kFloat).contiguous();
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({rows, rank}, p.options().dtype(at::kFloat));
  const int64_t stride_n = cores.stride(0);
  const int64_t stride_j = transpose ? cores.stride(2) : cores.stride(1);
  const int64_t stride_k = transpose ? cores.stride(1) : cores.stride(2);
  const float* p_data = p32.data_ptr<float>();
  const int64_t* id_data = ids64.data_ptr<int64_t>();
  float* out_data = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores.scalar_type(), "gather_core",
                                  [&] {
    const scalar_t* core_data = cores.data_ptr<scalar_t>();
    // Rows are independent; a grain of 16 keeps tiny decode batches on one thread.
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t id = id_data[i];
        if (id < 0 || id >= n_adapters) continue;
        const scalar_t* core = core_data + id * stride_n;
        const float* p_row = p_data + i * rank;
        for (int64_t j = 0; j < rank; ++j) {
          float acc = 0.f;
          for (int64_t k = 0; k < rank; ++k) {
            acc += p_row[k] * static_cast<float>(core[j * stride_j + k * stride_k]);
          }
          out_data[i * rank + j] = acc;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(svk_native, m) {
  m.def("gather_core(Tensor p, Tensor cores, Tensor ids, bool transpose) -> Tensor");
}

TORCH_LIBRARY_IMPL(svk_native, CPU, m) {
  m.impl("gather_core", &gather_core_cpu);
}

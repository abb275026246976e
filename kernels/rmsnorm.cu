// RMSNorm forward, as Hugging Face's LlamaRMSNorm / Qwen2RMSNorm:
//
//     y[r, i] = x[r, i] * rsqrt(mean_j(x[r, j]^2) + eps) * weight[i]
//
// x, y: (rows, dim) row-major; weight: (dim). One block per row: the block strides over the
// row once to accumulate sum(x^2) in f32, reduces it, then strides again to write y. Any dim
// works (odd ones too); the second read of x hits L1/L2 for the dims of the models we train
// (≤ 8192 bf16 = 16 KiB per row). Accumulation is always f32; the bf16 variant reads and
// writes bf16 and rounds once, at the store (HF rounds x*r to bf16 before the weight multiply;
// we keep f32 through the product, which is closer to the f32 reference).
//
// Rust launchers: src/cuda/kernels.rs (block size, grid = rows, argument order).

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_row(T* __restrict__ out, const T* __restrict__ x,
                                                const T* __restrict__ weight, float eps, int rows,
                                                int dim) {
    const int row = blockIdx.x;
    if (row >= rows) return;  // whole block leaves together: no barrier is skipped by some
    const T* xr = x + (size_t)row * dim;
    T* yr = out + (size_t)row * dim;

    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = load_f32(xr + i);
        sum_sq += v * v;
    }
    sum_sq = block_reduce_sum(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / (float)dim + eps);

    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        store_f32(yr + i, load_f32(xr + i) * inv_rms * load_f32(weight + i));
    }
}

// x, out: bf16 (rows, dim); weight: bf16 (dim). grid = rows, block = multiple of 32.
extern "C" __global__ void rmsnorm_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ x,
                                            const bf16* __restrict__ weight, float eps, int rows,
                                            int dim) {
    rmsnorm_fwd_row(out, x, weight, eps, rows, dim);
}

// x, out: f32 (rows, dim); weight: f32 (dim). grid = rows, block = multiple of 32.
extern "C" __global__ void rmsnorm_fwd_f32(float* __restrict__ out, const float* __restrict__ x,
                                           const float* __restrict__ weight, float eps, int rows,
                                           int dim) {
    rmsnorm_fwd_row(out, x, weight, eps, rows, dim);
}

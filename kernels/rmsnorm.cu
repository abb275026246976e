// RMSNorm forward, as Hugging Face's LlamaRMSNorm / Qwen2RMSNorm:
//
//     y[r, i] = x[r, i] * rsqrt(mean_j(x[r, j]^2) + eps) * weight[i]
//
// x, y: (rows, dim) row-major; weight: (dim). One warp per row, RMS_FWD_WARPS rows per block
// (no block barrier: a warp whose row is past the end just leaves). The warp strides over the
// row once to accumulate sum(x^2) in f32 (per lane, then the xor tree), then strides again to
// write y; the second read of x hits L1 (a row is ≤ 16 KiB for the models we train). With dim a
// multiple of the 16-byte vector (8 bf16 / 4 f32) and x, y, weight 16-byte aligned, each lane
// moves whole vectors; otherwise one element per lane per step (any dim works, odd ones too).
// Accumulation is always f32; the bf16 variant reads and writes bf16 and rounds once, at the
// store (HF rounds x*r to bf16 before the weight multiply; we keep f32 through the product,
// which is closer to the f32 reference). The sum of squares' order depends on the lane split
// only (not on the GPU): deterministic.
//
// Rust launchers: src/cuda/kernels.rs (grid = ceil(rows / RMS_FWD_WARPS), block =
// 32·RMS_FWD_WARPS, argument order).

#include "common.cuh"

#define RMS_FWD_WARPS 4

// ----------------------------------------------------------------------------
// CUDA kernels

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_row(T* __restrict__ out, const T* __restrict__ x,
                                                const T* __restrict__ weight, float eps, int rows,
                                                int dim) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = (int)blockIdx.x * (int)(blockDim.x / WARP_SIZE) + (int)(threadIdx.x / WARP_SIZE);
    if (row >= rows) return;  // whole warp leaves together; the kernel has no block barrier
    const T* xr = x + (size_t)row * dim;
    T* yr = out + (size_t)row * dim;
    const bool vec = dim % V == 0 && vec16_ok(x) && vec16_ok(out) && vec16_ok(weight);

    float sum_sq = 0.0f;
    if (vec) {
#pragma unroll 4
        for (int i = lane * V; i < dim; i += WARP_SIZE * V) {
            float v[V];
            load_vec16(xr + i, v);
#pragma unroll
            for (int k = 0; k < V; ++k) sum_sq += v[k] * v[k];
        }
    } else {
        for (int i = lane; i < dim; i += WARP_SIZE) {
            const float v = load_f32(xr + i);
            sum_sq += v * v;
        }
    }
    sum_sq = warp_reduce_sum(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / (float)dim + eps);

    if (vec) {
#pragma unroll 4
        for (int i = lane * V; i < dim; i += WARP_SIZE * V) {
            float v[V], w[V];
            load_vec16(xr + i, v);
            load_vec16(weight + i, w);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = v[k] * inv_rms * w[k];
            store_vec16(yr + i, v);
        }
    } else {
        for (int i = lane; i < dim; i += WARP_SIZE) {
            store_f32(yr + i, load_f32(xr + i) * inv_rms * load_f32(weight + i));
        }
    }
}

// x, out: bf16 (rows, dim); weight: bf16 (dim). grid = ceil(rows / RMS_FWD_WARPS),
// block = 32·RMS_FWD_WARPS (any multiple of 32 works: one row per warp).
extern "C" __global__ void rmsnorm_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ x,
                                            const bf16* __restrict__ weight, float eps, int rows,
                                            int dim) {
    rmsnorm_fwd_row(out, x, weight, eps, rows, dim);
}

// x, out: f32 (rows, dim); weight: f32 (dim). Grid and block as rmsnorm_fwd_bf16.
extern "C" __global__ void rmsnorm_fwd_f32(float* __restrict__ out, const float* __restrict__ x,
                                           const float* __restrict__ weight, float eps, int rows,
                                           int dim) {
    rmsnorm_fwd_row(out, x, weight, eps, rows, dim);
}

// LayerNorm fused with the residual add: y = LN(x + residual)·γ + β, and its backward.
// CPU twins: cpu::bert::layernorm_forward (after the `y += residual` in layer_forward),
// cpu::bert::layernorm_backward.
//
// x, residual, y, dy, dx are [T, n, h] (act_stride); xhat is [T, n, h] fp32 and rstd [T, n] fp32
// (the backward's cache, row_stride for rstd); gamma, beta, dgamma, dbeta point at the tensor inside
// a trial's parameter (or gradient) buffer and step by param_stride per trial.
// Launch: forward grid (ceil(n / 4), T), block 128, one warp per row.
//         backward grid (ceil(n / 32), T), block 128, dynamic shared memory 2·h floats; each block
//         reduces its 32 rows' dγ, dβ in shared memory, then adds them to the gradients (atomics).
#include "common.cuh"

template <typename Act>
__device__ void layernorm_forward(Act* y, float* xhat, float* rstd, const Act* x, const Act* residual,
                                  const float* gamma, const float* beta, float eps, int n, int h,
                                  u64 act_stride, u64 row_stride, u64 param_stride) {
    const u64 t = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= n) return;
    const u64 base = t * act_stride + (u64)row * h;
    const float* g = gamma + t * param_stride;
    const float* b = beta + t * param_stride;
    // Two passes over the row, as the CPU computes mean then Σ(x − mean)²: better conditioned
    // than E[x²] − mean².
    float s = 0.f;
    for (int j = lane; j < h; j += 32) s += to_f32(x[base + j]) + (residual ? to_f32(residual[base + j]) : 0.f);
    const float mean = warp_sum(s) / (float)h;
    float q = 0.f;
    for (int j = lane; j < h; j += 32) {
        const float c = to_f32(x[base + j]) + (residual ? to_f32(residual[base + j]) : 0.f) - mean;
        q += c * c;
    }
    const float var = warp_sum(q) / (float)h;
    const float r = 1.f / sqrtf(var + eps);
    for (int j = lane; j < h; j += 32) {
        const float xh = (to_f32(x[base + j]) + (residual ? to_f32(residual[base + j]) : 0.f) - mean) * r;
        xhat[base + j] = xh;
        y[base + j] = from_f32<Act>(xh * g[j] + b[j]);
    }
    if (lane == 0) rstd[t * row_stride + row] = r;
}

constexpr int LN_BWD_ROWS = 32;

template <typename Act>
__device__ void layernorm_backward(Act* dx, float* dgamma, float* dbeta, const Act* dy, const float* xhat,
                                   const float* rstd, const float* gamma, int n, int h, u64 act_stride,
                                   u64 row_stride, u64 param_stride) {
    DYNAMIC_SHARED(float, shared);
    float* sdg = shared;
    float* sdb = shared + h;
    const u64 t = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int j = threadIdx.x; j < h; j += blockDim.x) sdg[j] = sdb[j] = 0.f;
    __syncthreads();
    const float* g = gamma + t * param_stride;
    const float hf = (float)h;
    for (int k = warp; k < LN_BWD_ROWS; k += warps) {
        const int row = blockIdx.x * LN_BWD_ROWS + k;
        if (row >= n) break;
        const u64 base = t * act_stride + (u64)row * h;
        float sum_g = 0.f, sum_gx = 0.f;
        for (int j = lane; j < h; j += 32) {
            const float gg = to_f32(dy[base + j]) * g[j];
            sum_g += gg;
            sum_gx += gg * xhat[base + j];
        }
        sum_g = warp_sum(sum_g);
        sum_gx = warp_sum(sum_gx);
        const float r = rstd[t * row_stride + row];
        for (int j = lane; j < h; j += 32) {
            const float d = to_f32(dy[base + j]), xh = xhat[base + j];
            dx[base + j] = from_f32<Act>(r / hf * (hf * (d * g[j]) - sum_g - xh * sum_gx));
            atomicAdd(&sdg[j], d * xh);
            atomicAdd(&sdb[j], d);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        atomicAdd(&dgamma[t * param_stride + j], sdg[j]);
        atomicAdd(&dbeta[t * param_stride + j], sdb[j]);
    }
}

#define LAYERNORM(SUFFIX, T)                                                                              \
    extern "C" __global__ void layernorm_forward_##SUFFIX(T* y, float* xhat, float* rstd, const T* x,    \
                                                          const T* residual, const float* gamma,          \
                                                          const float* beta, float eps, int n, int h,      \
                                                          u64 act_stride, u64 row_stride, u64 param_stride) { \
        layernorm_forward<T>(y, xhat, rstd, x, residual, gamma, beta, eps, n, h, act_stride, row_stride,  \
                             param_stride);                                                               \
    }                                                                                                     \
    extern "C" __global__ void layernorm_backward_##SUFFIX(                                               \
        T* dx, float* dgamma, float* dbeta, const T* dy, const float* xhat, const float* rstd,            \
        const float* gamma, int n, int h, u64 act_stride, u64 row_stride, u64 param_stride) {             \
        layernorm_backward<T>(dx, dgamma, dbeta, dy, xhat, rstd, gamma, n, h, act_stride, row_stride,     \
                              param_stride);                                                              \
    }

LAYERNORM(f32, float)
LAYERNORM(bf16, bf16)

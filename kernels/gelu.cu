// Bias + exact (erf) GELU after the FFN's first GEMM, and its backward with the bias gradient.
// CPU twins: cpu::bert::gelu_forward (after linear_new's bias), cpu::bert::gelu_backward
// (and linear_backward's bias column sums for the FFN dense).
//
// x, pre, act, dy, dx are [T, n, m] (act_stride); bias and dbias point at the tensor inside a
// trial's parameter / gradient buffer (param_stride).
// Launch: forward grid (ceil(n*m / 256), T), block 256 (pre may alias x: in place).
//         backward grid (ceil(n / 32), T), block 256: a thread walks one column over 32 rows and
//         adds its partial bias gradient once (atomics; dbias may be null).
#include "common.cuh"

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_grad(float x) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return cdf + x * pdf;
}

template <typename Act>
__device__ void bias_gelu_forward(Act* pre, Act* act, const Act* x, const float* bias, int n, int m,
                                  u64 act_stride, u64 param_stride) {
    const u64 t = blockIdx.y, i = global_index();
    if (i >= (u64)n * m) return;
    const u64 k = t * act_stride + i;
    const float v = to_f32(x[k]) + bias[t * param_stride + i % m];
    pre[k] = from_f32<Act>(v);
    act[k] = from_f32<Act>(gelu(v));
}

constexpr int GELU_BWD_ROWS = 32;

template <typename Act>
__device__ void gelu_backward(Act* dx, float* dbias, const Act* pre, const Act* dy, int n, int m,
                              u64 act_stride, u64 param_stride) {
    const u64 t = blockIdx.y;
    const int row0 = blockIdx.x * GELU_BWD_ROWS;
    const int rows = min(GELU_BWD_ROWS, n - row0);
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        float acc = 0.f;
        for (int r = 0; r < rows; ++r) {
            const u64 k = t * act_stride + (u64)(row0 + r) * m + j;
            const float d = to_f32(dy[k]) * gelu_grad(to_f32(pre[k]));
            dx[k] = from_f32<Act>(d);
            acc += d;
        }
        if (dbias) atomicAdd(&dbias[t * param_stride + j], acc);
    }
}

#define GELU(SUFFIX, T)                                                                                   \
    extern "C" __global__ void bias_gelu_forward_##SUFFIX(T* pre, T* act, const T* x, const float* bias,  \
                                                          int n, int m, u64 act_stride, u64 param_stride) { \
        bias_gelu_forward<T>(pre, act, x, bias, n, m, act_stride, param_stride);                         \
    }                                                                                                     \
    extern "C" __global__ void gelu_backward_##SUFFIX(T* dx, float* dbias, const T* pre, const T* dy, int n, \
                                                      int m, u64 act_stride, u64 param_stride) {          \
        gelu_backward<T>(dx, dbias, pre, dy, n, m, act_stride, param_stride);                            \
    }

GELU(f32, float)
GELU(bf16, bf16)

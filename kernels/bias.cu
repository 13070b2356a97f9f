// The bias half of a linear layer (the GEMM half is cuBLAS): y += b per row, and db += Σ rows dy.
// CPU twins: cpu::bert::linear_new (its bias), cpu::bert::linear_backward (its column sums).
//
// y, dy are [T, n, m] (act_stride); bias, dbias point at the tensor in a trial's parameter /
// gradient buffer (param_stride).
// Launch: bias_add grid (ceil(n*m / 256), T), block 256.
//         bias_backward grid (ceil(n / 32), T), block 256 (one column per thread over 32 rows,
//         one atomic add per column and block).
#include "common.cuh"

template <typename Act>
__device__ void bias_add(Act* y, const float* bias, int n, int m, u64 act_stride, u64 param_stride) {
    const u64 t = blockIdx.y, i = global_index();
    if (i >= (u64)n * m) return;
    const u64 k = t * act_stride + i;
    y[k] = from_f32<Act>(to_f32(y[k]) + bias[t * param_stride + i % m]);
}

constexpr int BIAS_BWD_ROWS = 32;

template <typename Act>
__device__ void bias_backward(float* dbias, const Act* dy, int n, int m, u64 act_stride, u64 param_stride) {
    const u64 t = blockIdx.y;
    const int row0 = blockIdx.x * BIAS_BWD_ROWS;
    const int rows = min(BIAS_BWD_ROWS, n - row0);
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        float acc = 0.f;
        for (int r = 0; r < rows; ++r) acc += to_f32(dy[t * act_stride + (u64)(row0 + r) * m + j]);
        atomicAdd(&dbias[t * param_stride + j], acc);
    }
}

#define BIAS(SUFFIX, T)                                                                                   \
    extern "C" __global__ void bias_add_##SUFFIX(T* y, const float* bias, int n, int m, u64 act_stride,   \
                                                 u64 param_stride) {                                      \
        bias_add<T>(y, bias, n, m, act_stride, param_stride);                                            \
    }                                                                                                     \
    extern "C" __global__ void bias_backward_##SUFFIX(float* dbias, const T* dy, int n, int m,            \
                                                      u64 act_stride, u64 param_stride) {                 \
        bias_backward<T>(dbias, dy, n, m, act_stride, param_stride);                                     \
    }

BIAS(f32, float)
BIAS(bf16, bf16)

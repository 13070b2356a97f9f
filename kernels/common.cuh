// Shared helpers for every kernel file: storage types (fp32, bf16), warp reductions, index types.
//
// Conventions (see kernels/README.md): every buffer is [T, ...] with the trial index taken from the
// grid (blockIdx.y for element-wise and row kernels, blockIdx.z for attention) and a per-trial
// stride in elements (`*_stride`, 0 = one buffer shared by all trials). Arithmetic is fp32 (fp64
// for the gradient norm) whatever the storage type.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef unsigned long long u64;

// Dynamic shared memory (the launch's shared_mem_bytes). The virtual device (vcuda/, host C++)
// defines its own spelling: g++ has no `extern __shared__`.
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Element index of this thread in a 1-D grid over one trial's elements.
__device__ __forceinline__ u64 global_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }

// The CUDA built-ins our kernels use, for compiling kernels/*.cu as host C++ (g++) in the virtual
// device. Force-included (-include cuda_host.h) before each kernel file; VCUDA_HOST is defined.
//
// Execution model (runtime/scheduler.cpp): one CUDA thread is one fiber; the blocks of a launch run
// one after another on the launching OS thread, and the threads of a block take turns, each running
// until it reaches a barrier or a warp shuffle or exits. So:
// - `__shared__` variables are function-local statics (one block is live at a time); they sit in
//   their own section so the runtime can fill them with NaN bytes before every block;
// - threadIdx is the running fiber's; blockIdx/blockDim/gridDim are the launch's;
// - __syncthreads and __shfl*_sync are real synchronisation points with CUDA's semantics and
//   checks (exited threads leave a barrier; a divergent barrier, a shuffle naming an exited or
//   absent lane, and a deadlock are launch errors naming the kernel);
// - atomics are plain read-modify-writes (fibers never run at the same time).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

// The build's kernel-name scan defines __global__ as a marker first.
#ifndef __global__
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ __attribute__((section("vcuda_shared"))) static
// g++ has no `extern __shared__ T name[]`; kernels spell it DYNAMIC_SHARED(T, name).
#define DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(vcuda_dynamic_shared())

struct dim3 {
    unsigned x, y, z;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

extern "C" {
// The running thread's fiber: its index within the block comes first.
struct vcuda_thread {
    dim3 idx;
};
extern vcuda_thread* vcuda_self;
extern dim3 vcuda_block_idx, vcuda_block_dim, vcuda_grid_dim;
void vcuda_syncthreads(const char* file, int line);
// kind: 0 = index, 1 = xor, 2 = down, 3 = up.
unsigned long long vcuda_shuffle(unsigned mask, unsigned long long bits, int kind, int arg, int width,
                                 const char* file, int line);
void* vcuda_dynamic_shared(void);
}

#define threadIdx (vcuda_self->idx)
#define blockIdx vcuda_block_idx
#define blockDim vcuda_block_dim
#define gridDim vcuda_grid_dim
#define warpSize 32
#define __syncthreads() vcuda_syncthreads(__FILE__, __LINE__)

template <typename T>
static inline T vcuda_shfl(unsigned mask, T v, int kind, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = vcuda_shuffle(mask, bits, kind, arg, width, file, line);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
#define __shfl_sync(mask, v, lane, ...) vcuda_shfl(mask, v, 0, lane, vcuda_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) vcuda_shfl(mask, v, 1, m, vcuda_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) vcuda_shfl(mask, v, 2, d, vcuda_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) vcuda_shfl(mask, v, 3, d, vcuda_width(__VA_ARGS__), __FILE__, __LINE__)
static inline int vcuda_width() { return 32; }
static inline int vcuda_width(int w) { return w; }

// Atomics: fibers never run at the same time, so a read-modify-write is atomic.
template <typename T>
static inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
static inline T atomicExch(T* p, T v) {
    const T old = *p;
    *p = v;
    return old;
}
template <typename T>
static inline T atomicCAS(T* p, T compare, T v) {
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}

// Integer helpers.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// Correctly rounded arithmetic (the host's IEEE operations round to nearest; the kernels are
// compiled with -ffp-contract=off, so nothing is fused either way).
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// Per-trial global gradient norm, clipping, and multi-trial AdamW over [T, P] in one launch.
// CPU twins: cpu::adamw::grad_norm, cpu::adamw::clip_grad_norm, cpu::adamw::AdamW::step.
//
// grads, params, m, v are [T, P] (stride per trial). The norm is accumulated in fp64 as on the CPU.
// Launches:
//   grad_sumsq_partial: grid (NB, T), block 256 -> partial [T, NB] fp64 sums of squares.
//   grad_norm_finish:   grid (1, T), block 256  -> norm [T] fp64 and clip_coef [T] fp32
//                       (max_norm/(norm+1e-6) when that is < 1, else exactly 1).
//   clip_grads:         grid (ceil(P / 256), T), block 256: g *= clip_coef[t] where it is < 1.
//   adamw:              grid (min(ceil(P / 256), 4096), T), block 256, grid-stride over P.
//                       lr, wd [T] fp64 and step [T] (the 1-based number of this update; 0 = this
//                       trial does not step now) are per trial; decay [P] (1 = decayed) is shared.
// The AdamW arithmetic uses round-to-nearest intrinsics so nvcc cannot contract it into FMAs: the
// update then rounds exactly as the CPU's, operation for operation.
#include "common.cuh"

extern "C" __global__ void grad_sumsq_partial(double* partial, const float* grads, u64 p, u64 stride) {
    __shared__ double warp_sums[32];
    const u64 t = blockIdx.y;
    const float* g = grads + t * stride;
    double acc = 0.0;
    for (u64 i = global_index(); i < p; i += (u64)gridDim.x * blockDim.x) acc += (double)g[i] * (double)g[i];
    acc = warp_sum(acc);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double s = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.0;
        s = warp_sum(s);
        if (lane == 0) partial[t * gridDim.x + blockIdx.x] = s;
    }
}

extern "C" __global__ void grad_norm_finish(double* norm, float* clip_coef, const double* partial, int nb,
                                            double max_norm) {
    __shared__ double warp_sums[32];
    const u64 t = blockIdx.y;
    double acc = 0.0;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) acc += partial[t * nb + i];
    acc = warp_sum(acc);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += warp_sums[w];
        const double nrm = sqrt(s);
        norm[t] = nrm;
        const double coef = max_norm / (nrm + 1e-6);
        clip_coef[t] = coef < 1.0 ? (float)coef : 1.f;
    }
}

extern "C" __global__ void clip_grads(float* grads, const float* clip_coef, u64 p, u64 stride) {
    const u64 t = blockIdx.y, i = global_index();
    const float c = clip_coef[t];
    if (i >= p || !(c < 1.f)) return;
    grads[t * stride + i] = __fmul_rn(grads[t * stride + i], c);
}

// beta^n by repeated squaring, the same sequence of multiplications as Rust's f64::powi
// (compiler-rt __powidf2), so the bias corrections round identically.
__device__ double powi(double a, unsigned n) {
    double r = 1.0;
    for (;;) {
        if (n & 1u) r = __dmul_rn(r, a);
        n >>= 1;
        if (n == 0) break;
        a = __dmul_rn(a, a);
    }
    return r;
}

extern "C" __global__ void adamw(float* params, const float* grads, float* m, float* v,
                                 const unsigned char* decay, const double* lr, const double* wd,
                                 const unsigned* step, double beta1, double beta2, double eps, u64 p,
                                 u64 stride) {
    const u64 t = blockIdx.y;
    const unsigned n = step[t];
    if (n == 0) return;
    const double l = lr[t];
    const double bc1 = __dsub_rn(1.0, powi(beta1, n));
    const float bc2_sqrt = (float)__dsqrt_rn(__dsub_rn(1.0, powi(beta2, n)));
    const float step_size = (float)__ddiv_rn(l, bc1);
    const float decay_factor = (float)__dsub_rn(1.0, __dmul_rn(l, wd[t]));
    const float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    const float one_b1 = __fsub_rn(1.f, b1), one_b2 = __fsub_rn(1.f, b2);
    float* pp = params + t * stride;
    const float* gg = grads + t * stride;
    float* mm = m + t * stride;
    float* vv = v + t * stride;
    for (u64 i = global_index(); i < p; i += (u64)gridDim.x * blockDim.x) {
        float x = pp[i];
        const float g = gg[i];
        if (decay[i]) x = __fmul_rn(x, decay_factor);
        const float mi = __fadd_rn(__fmul_rn(b1, mm[i]), __fmul_rn(one_b1, g));
        const float vi = __fadd_rn(__fmul_rn(b2, vv[i]), __fmul_rn(__fmul_rn(one_b2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), e);
        x = __fsub_rn(x, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        mm[i] = mi;
        vv[i] = vi;
        pp[i] = x;
    }
}

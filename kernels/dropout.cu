// Dropout: out = x · keep/(1 − p) with the Philox mask of (trial's seed, stream, step, site,
// element base + i). The same launch applies a forward mask to its gradient in the backward.
// CPU twin: cpu::philox::DropoutRng::apply (as bert.rs's apply_dropout calls it).
//
// x, out are [T, n] (stride); rng is [T] DropoutState. threshold = p as f32, scale =
// (1/(1 − p)) as f32, both computed by the launcher exactly as the CPU computes them.
// Launch: grid (ceil(n / 256), T), block 256. out may alias x.
#include "philox.cuh"

template <typename Act>
__device__ void dropout(Act* out, const Act* x, const DropoutState* rng, float threshold, float scale,
                        unsigned site, u64 base, u64 n, u64 stride) {
    const u64 t = blockIdx.y, i = global_index();
    if (i >= n) return;
    const u64 k = t * stride + i;
    const bool keep = dropout_keep(rng[t], site, base + i, threshold);
    out[k] = from_f32<Act>(keep ? __fmul_rn(to_f32(x[k]), scale) : 0.f);
}

extern "C" __global__ void dropout_f32(float* out, const float* x, const DropoutState* rng, float threshold,
                                       float scale, unsigned site, u64 base, u64 n, u64 stride) {
    dropout<float>(out, x, rng, threshold, scale, site, base, n, stride);
}
extern "C" __global__ void dropout_bf16(bf16* out, const bf16* x, const DropoutState* rng, float threshold,
                                        float scale, unsigned site, u64 base, u64 n, u64 stride) {
    dropout<bf16>(out, x, rng, threshold, scale, site, base, n, stride);
}

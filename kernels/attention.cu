// Fused multi-head attention over packed, unpadded sequences: ctx = dropout(softmax(q·kᵀ/√D))·v,
// forward and backward, without ever writing the scores or probabilities to device memory.
// CPU twins: cpu::bert::attention_forward, cpu::bert::attention_backward (with the AttnSeq blocks
// of cpu::bert::attention_layout, including the [CLS]-only last layer).
//
// Shapes: q, ctx, dctx, dq are [T, Nq, H] (q_stride); k, v, dk, dv are [T, N, H] (kv_stride);
// H = heads·D, head a owns columns a·D .. a·D+D. lse and delta are [T, Nq, heads] fp32
// (lse_stride). seqs is [T, B] AttnSeq (seq_stride, 0 = one batch for every trial); rng is [T].
// Dropout acts on the probabilities exactly as the CPU indexes them: element
// p_offset + a·q_len·k_len + i·k_len + j of site `site`.
//
// Algorithm (FlashAttention-2 style, fp32 arithmetic for fp32 and bf16 storage):
// - forward: a block of 4 warps owns 16 query rows of one (sequence, head, trial); each warp keeps
//   4 rows' running max, sum and output in registers while 64-key tiles of K and V stream through
//   shared memory (online softmax). It writes ctx and each row's logsumexp.
// - backward: probabilities are recomputed from the logsumexp. delta_i = dctx_i·ctx_i equals the
//   CPU's Σ_j dp'_ij p_ij (dropout included), so no probability is stored. attention_dq owns query
//   rows and streams keys (dq, and writes delta); attention_dkdv owns key rows and streams queries
//   (dk, dv). Each output element is written by one thread: no atomics, deterministic.
// Launch: grid (ceil(q_len_max / 16), B·heads, T) for forward and dq, (ceil(k_len_max / 16),
//   B·heads, T) for dkdv; block 128. Static shared memory, at most ~42 KB (D = 64).
// Keys beyond a sequence's k_len (padding) get dk = dv = 0 from the launcher's memset.
#include "philox.cuh"

struct AttnSeq {
    unsigned q_start, q_len, k_start, k_len, p_offset;
};

constexpr int KT = 64;  // keys (forward, dq) or queries (dkdv) per shared-memory tile
constexpr int WARPS = 4;
constexpr int ROWS = 4;  // rows per warp
constexpr int BLOCK_ROWS = WARPS * ROWS;

struct AttnDropout {
    float threshold;  // p as f32; 0 = no dropout
    float scale;      // (1/(1 − p)) as f32
    unsigned site;
};

template <int D, typename Act>
__device__ void attention_forward(Act* ctx, float* lse, const Act* q, const Act* k, const Act* v,
                                  const AttnSeq* seqs, const DropoutState* rng, int heads, float scale,
                                  AttnDropout drop, u64 q_stride, u64 kv_stride, u64 lse_stride,
                                  u64 seq_stride) {
    constexpr int DL = D / 32;  // head dimensions per lane
    __shared__ float ks[KT][D + 1];
    __shared__ float vs[KT][D];
    __shared__ float qs[WARPS][ROWS][D];
    const u64 t = blockIdx.z;
    const int s = blockIdx.y / heads, a = blockIdx.y % heads;
    const AttnSeq sq = seqs[t * seq_stride + s];
    const int row0 = blockIdx.x * BLOCK_ROWS;
    if (row0 >= (int)sq.q_len) return;  // the whole block leaves together
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = heads * D;
    const Act* qb = q + t * q_stride + (u64)sq.q_start * h + a * D;
    const Act* kb = k + t * kv_stride + (u64)sq.k_start * h + a * D;
    const Act* vb = v + t * kv_stride + (u64)sq.k_start * h + a * D;
    const DropoutState st = rng[t];
    const u64 head_off = (u64)sq.p_offset + (u64)a * sq.q_len * sq.k_len;

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = row0 + warp * ROWS + r;
        for (int d = lane; d < D; d += 32) qs[warp][r][d] = i < (int)sq.q_len ? to_f32(qb[(u64)i * h + d]) : 0.f;
    }
    float m[ROWS], l[ROWS], acc[ROWS][DL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < DL; ++c) acc[r][c] = 0.f;
    }

    for (int kt0 = 0; kt0 < (int)sq.k_len; kt0 += KT) {
        __syncthreads();  // the previous tile is consumed (and qs written, on the first pass)
        const int nk = min(KT, (int)sq.k_len - kt0);
        for (int e = threadIdx.x; e < KT * D; e += blockDim.x) {
            const int jj = e / D, d = e % D;
            const bool in = jj < nk;
            ks[jj][d] = in ? to_f32(kb[(u64)(kt0 + jj) * h + d]) : 0.f;
            vs[jj][d] = in ? to_f32(vb[(u64)(kt0 + jj) * h + d]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int i = row0 + warp * ROWS + r;
            // Scores of keys lane and lane + 32 of the tile.
            float sc0 = 0.f, sc1 = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                const float qd = qs[warp][r][d];
                sc0 += qd * ks[lane][d];
                sc1 += qd * ks[lane + 32][d];
            }
            sc0 = lane < nk ? sc0 * scale : -INFINITY;
            sc1 = lane + 32 < nk ? sc1 * scale : -INFINITY;
            const float m_new = fmaxf(m[r], warp_max(fmaxf(sc0, sc1)));
            const float corr = expf(m[r] - m_new);
            float e0 = expf(sc0 - m_new), e1 = expf(sc1 - m_new);
            l[r] = l[r] * corr + warp_sum(e0 + e1);
            m[r] = m_new;
            if (drop.threshold > 0.f) {
                // The CPU drops the normalised probability; 1/l factors out of the sum, so the
                // mask and scale go on the unnormalised weight here.
                const u64 base = head_off + (u64)i * sq.k_len + kt0;
                if (lane < nk) e0 = dropout_keep(st, drop.site, base + lane, drop.threshold) ? e0 * drop.scale : 0.f;
                if (lane + 32 < nk)
                    e1 = dropout_keep(st, drop.site, base + lane + 32, drop.threshold) ? e1 * drop.scale : 0.f;
            }
#pragma unroll
            for (int c = 0; c < DL; ++c) acc[r][c] *= corr;
            const int n0 = min(nk, 32);
            for (int jj = 0; jj < n0; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, e0, jj);
#pragma unroll
                for (int c = 0; c < DL; ++c) acc[r][c] += pj * vs[jj][lane + 32 * c];
            }
            for (int jj = 32; jj < nk; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, e1, jj - 32);
#pragma unroll
                for (int c = 0; c < DL; ++c) acc[r][c] += pj * vs[jj][lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = row0 + warp * ROWS + r;
        if (i >= (int)sq.q_len) continue;
        const u64 row = (u64)(sq.q_start + i);
        Act* out = ctx + t * q_stride + row * h + a * D;
        const float inv = 1.f / l[r];
#pragma unroll
        for (int c = 0; c < DL; ++c) out[lane + 32 * c] = from_f32<Act>(acc[r][c] * inv);
        if (lane == 0) lse[t * lse_stride + row * heads + a] = m[r] + logf(l[r]);
    }
}

template <int D, typename Act>
__device__ void attention_dq(Act* dq, float* delta, const Act* q, const Act* k, const Act* v, const Act* ctx,
                             const Act* dctx, const float* lse, const AttnSeq* seqs, const DropoutState* rng,
                             int heads, float scale, AttnDropout drop, u64 q_stride, u64 kv_stride,
                             u64 lse_stride, u64 seq_stride) {
    constexpr int DL = D / 32;
    __shared__ float ks[KT][D + 1];
    __shared__ float vs[KT][D + 1];
    __shared__ float qs[WARPS][ROWS][D];
    __shared__ float dos[WARPS][ROWS][D];
    const u64 t = blockIdx.z;
    const int s = blockIdx.y / heads, a = blockIdx.y % heads;
    const AttnSeq sq = seqs[t * seq_stride + s];
    const int row0 = blockIdx.x * BLOCK_ROWS;
    if (row0 >= (int)sq.q_len) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = heads * D;
    const u64 qoff = t * q_stride + (u64)sq.q_start * h + a * D;
    const Act* kb = k + t * kv_stride + (u64)sq.k_start * h + a * D;
    const Act* vb = v + t * kv_stride + (u64)sq.k_start * h + a * D;
    const DropoutState st = rng[t];
    const u64 head_off = (u64)sq.p_offset + (u64)a * sq.q_len * sq.k_len;

    float lse_r[ROWS], delta_r[ROWS], acc[ROWS][DL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = row0 + warp * ROWS + r;
        const bool in = i < (int)sq.q_len;
        float dot = 0.f;
        for (int d = lane; d < D; d += 32) {
            const float qv = in ? to_f32(q[qoff + (u64)i * h + d]) : 0.f;
            const float dv = in ? to_f32(dctx[qoff + (u64)i * h + d]) : 0.f;
            qs[warp][r][d] = qv;
            dos[warp][r][d] = dv;
            dot += dv * (in ? to_f32(ctx[qoff + (u64)i * h + d]) : 0.f);
        }
        delta_r[r] = warp_sum(dot);
        const u64 lrow = t * lse_stride + (u64)(sq.q_start + i) * heads + a;
        lse_r[r] = in ? lse[lrow] : 0.f;
        if (in && lane == 0) delta[lrow] = delta_r[r];
#pragma unroll
        for (int c = 0; c < DL; ++c) acc[r][c] = 0.f;
    }

    for (int kt0 = 0; kt0 < (int)sq.k_len; kt0 += KT) {
        __syncthreads();
        const int nk = min(KT, (int)sq.k_len - kt0);
        for (int e = threadIdx.x; e < KT * D; e += blockDim.x) {
            const int jj = e / D, d = e % D;
            const bool in = jj < nk;
            ks[jj][d] = in ? to_f32(kb[(u64)(kt0 + jj) * h + d]) : 0.f;
            vs[jj][d] = in ? to_f32(vb[(u64)(kt0 + jj) * h + d]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int i = row0 + warp * ROWS + r;
            float s0 = 0.f, s1 = 0.f, dp0 = 0.f, dp1 = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                const float qd = qs[warp][r][d], od = dos[warp][r][d];
                s0 += qd * ks[lane][d];
                s1 += qd * ks[lane + 32][d];
                dp0 += od * vs[lane][d];
                dp1 += od * vs[lane + 32][d];
            }
            const float p0 = lane < nk ? expf(s0 * scale - lse_r[r]) : 0.f;
            const float p1 = lane + 32 < nk ? expf(s1 * scale - lse_r[r]) : 0.f;
            if (drop.threshold > 0.f) {
                const u64 base = head_off + (u64)i * sq.k_len + kt0;
                dp0 = lane < nk && dropout_keep(st, drop.site, base + lane, drop.threshold) ? dp0 * drop.scale : 0.f;
                dp1 = lane + 32 < nk && dropout_keep(st, drop.site, base + lane + 32, drop.threshold)
                          ? dp1 * drop.scale
                          : 0.f;
            }
            const float ds0 = p0 * (dp0 - delta_r[r]) * scale;
            const float ds1 = p1 * (dp1 - delta_r[r]) * scale;
            const int n0 = min(nk, 32);
            for (int jj = 0; jj < n0; ++jj) {
                const float dsj = __shfl_sync(0xffffffffu, ds0, jj);
#pragma unroll
                for (int c = 0; c < DL; ++c) acc[r][c] += dsj * ks[jj][lane + 32 * c];
            }
            for (int jj = 32; jj < nk; ++jj) {
                const float dsj = __shfl_sync(0xffffffffu, ds1, jj - 32);
#pragma unroll
                for (int c = 0; c < DL; ++c) acc[r][c] += dsj * ks[jj][lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = row0 + warp * ROWS + r;
        if (i >= (int)sq.q_len) continue;
#pragma unroll
        for (int c = 0; c < DL; ++c) dq[qoff + (u64)i * h + lane + 32 * c] = from_f32<Act>(acc[r][c]);
    }
}

template <int D, typename Act>
__device__ void attention_dkdv(Act* dk, Act* dv, const Act* q, const Act* k, const Act* v, const Act* dctx,
                               const float* lse, const float* delta, const AttnSeq* seqs,
                               const DropoutState* rng, int heads, float scale, AttnDropout drop, u64 q_stride,
                               u64 kv_stride, u64 lse_stride, u64 seq_stride) {
    constexpr int DL = D / 32;
    __shared__ float qs[KT][D + 1];
    __shared__ float dos[KT][D + 1];
    __shared__ float lses[KT], deltas[KT];
    __shared__ float kw[WARPS][ROWS][D];
    __shared__ float vw[WARPS][ROWS][D];
    const u64 t = blockIdx.z;
    const int s = blockIdx.y / heads, a = blockIdx.y % heads;
    const AttnSeq sq = seqs[t * seq_stride + s];
    const int key0 = blockIdx.x * BLOCK_ROWS;
    if (key0 >= (int)sq.k_len) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = heads * D;
    const u64 koff = t * kv_stride + (u64)sq.k_start * h + a * D;
    const u64 qoff = t * q_stride + (u64)sq.q_start * h + a * D;
    const u64 loff = t * lse_stride + (u64)sq.q_start * heads + a;
    const DropoutState st = rng[t];
    const u64 head_off = (u64)sq.p_offset + (u64)a * sq.q_len * sq.k_len;

    float dk_acc[ROWS][DL], dv_acc[ROWS][DL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int j = key0 + warp * ROWS + r;
        const bool in = j < (int)sq.k_len;
        for (int d = lane; d < D; d += 32) {
            kw[warp][r][d] = in ? to_f32(k[koff + (u64)j * h + d]) : 0.f;
            vw[warp][r][d] = in ? to_f32(v[koff + (u64)j * h + d]) : 0.f;
        }
#pragma unroll
        for (int c = 0; c < DL; ++c) dk_acc[r][c] = dv_acc[r][c] = 0.f;
    }

    for (int qt0 = 0; qt0 < (int)sq.q_len; qt0 += KT) {
        __syncthreads();
        const int nq = min(KT, (int)sq.q_len - qt0);
        for (int e = threadIdx.x; e < KT * D; e += blockDim.x) {
            const int ii = e / D, d = e % D;
            const bool in = ii < nq;
            qs[ii][d] = in ? to_f32(q[qoff + (u64)(qt0 + ii) * h + d]) : 0.f;
            dos[ii][d] = in ? to_f32(dctx[qoff + (u64)(qt0 + ii) * h + d]) : 0.f;
        }
        for (int ii = threadIdx.x; ii < KT; ii += blockDim.x) {
            const bool in = ii < nq;
            lses[ii] = in ? lse[loff + (u64)(qt0 + ii) * heads] : 0.f;
            deltas[ii] = in ? delta[loff + (u64)(qt0 + ii) * heads] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int j = key0 + warp * ROWS + r;
            // Queries lane and lane + 32 of the tile against key j.
            float s0 = 0.f, s1 = 0.f, dp0 = 0.f, dp1 = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                const float kd = kw[warp][r][d], vd = vw[warp][r][d];
                s0 += qs[lane][d] * kd;
                s1 += qs[lane + 32][d] * kd;
                dp0 += dos[lane][d] * vd;
                dp1 += dos[lane + 32][d] * vd;
            }
            const float p0 = lane < nq ? expf(s0 * scale - lses[lane]) : 0.f;
            const float p1 = lane + 32 < nq ? expf(s1 * scale - lses[lane + 32]) : 0.f;
            float pv0 = p0, pv1 = p1;
            if (drop.threshold > 0.f) {
                const u64 col = head_off + j;
                const bool k0 = lane < nq && dropout_keep(st, drop.site, col + (u64)(qt0 + lane) * sq.k_len,
                                                          drop.threshold);
                const bool k1 = lane + 32 < nq && dropout_keep(st, drop.site,
                                                               col + (u64)(qt0 + lane + 32) * sq.k_len,
                                                               drop.threshold);
                pv0 = k0 ? p0 * drop.scale : 0.f;
                pv1 = k1 ? p1 * drop.scale : 0.f;
                dp0 = k0 ? dp0 * drop.scale : 0.f;
                dp1 = k1 ? dp1 * drop.scale : 0.f;
            }
            const float ds0 = p0 * (dp0 - deltas[lane]) * scale;
            const float ds1 = p1 * (dp1 - deltas[lane + 32]) * scale;
            const int n0 = min(nq, 32);
            for (int ii = 0; ii < n0; ++ii) {
                const float pvi = __shfl_sync(0xffffffffu, pv0, ii), dsi = __shfl_sync(0xffffffffu, ds0, ii);
#pragma unroll
                for (int c = 0; c < DL; ++c) {
                    dv_acc[r][c] += pvi * dos[ii][lane + 32 * c];
                    dk_acc[r][c] += dsi * qs[ii][lane + 32 * c];
                }
            }
            for (int ii = 32; ii < nq; ++ii) {
                const float pvi = __shfl_sync(0xffffffffu, pv1, ii - 32);
                const float dsi = __shfl_sync(0xffffffffu, ds1, ii - 32);
#pragma unroll
                for (int c = 0; c < DL; ++c) {
                    dv_acc[r][c] += pvi * dos[ii][lane + 32 * c];
                    dk_acc[r][c] += dsi * qs[ii][lane + 32 * c];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int j = key0 + warp * ROWS + r;
        if (j >= (int)sq.k_len) continue;
#pragma unroll
        for (int c = 0; c < DL; ++c) {
            dk[koff + (u64)j * h + lane + 32 * c] = from_f32<Act>(dk_acc[r][c]);
            dv[koff + (u64)j * h + lane + 32 * c] = from_f32<Act>(dv_acc[r][c]);
        }
    }
}

#define ATTENTION(SUFFIX, D, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attention_forward_##SUFFIX(                         \
        T* ctx, float* lse, const T* q, const T* k, const T* v, const AttnSeq* seqs,                      \
        const DropoutState* rng, int heads, float scale, AttnDropout drop, u64 q_stride, u64 kv_stride,   \
        u64 lse_stride, u64 seq_stride) {                                                                 \
        attention_forward<D, T>(ctx, lse, q, k, v, seqs, rng, heads, scale, drop, q_stride, kv_stride,    \
                                lse_stride, seq_stride);                                                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_dq_##SUFFIX(                              \
        T* dq, float* delta, const T* q, const T* k, const T* v, const T* ctx, const T* dctx,             \
        const float* lse, const AttnSeq* seqs, const DropoutState* rng, int heads, float scale,           \
        AttnDropout drop, u64 q_stride, u64 kv_stride, u64 lse_stride, u64 seq_stride) {                  \
        attention_dq<D, T>(dq, delta, q, k, v, ctx, dctx, lse, seqs, rng, heads, scale, drop, q_stride,   \
                           kv_stride, lse_stride, seq_stride);                                            \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_dkdv_##SUFFIX(                            \
        T* dk, T* dv, const T* q, const T* k, const T* v, const T* dctx, const float* lse,                \
        const float* delta, const AttnSeq* seqs, const DropoutState* rng, int heads, float scale,         \
        AttnDropout drop, u64 q_stride, u64 kv_stride, u64 lse_stride, u64 seq_stride) {                  \
        attention_dkdv<D, T>(dk, dv, q, k, v, dctx, lse, delta, seqs, rng, heads, scale, drop, q_stride,  \
                             kv_stride, lse_stride, seq_stride);                                          \
    }

ATTENTION(d32_f32, 32, float)
ATTENTION(d64_f32, 64, float)
ATTENTION(d32_bf16, 32, bf16)
ATTENTION(d64_bf16, 64, bf16)

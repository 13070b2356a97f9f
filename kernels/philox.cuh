// Philox 4x32-10 and the dropout keep test, identical to src/cpu/philox.rs (keep the two in step):
// counter [block, site, step, stream], key [seed lo, seed hi]; element `idx` of a site uses word
// idx % 4 of block idx / 4 and is kept iff (word >> 8) / 2^24 >= p, exact in fp32 on both sides.
#pragma once
#include "common.cuh"

// One trial's generator state: DropoutRng { seed, stream, step } with the seed split in halves.
// Laid out as 4 u32 (Rust: [u32; 4]).
struct DropoutState {
    unsigned seed_lo, seed_hi, stream, step;
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += 0x9E3779B9u;
            k.y += 0xBB67AE85u;
        }
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// True when element `idx` of dropout site `site` survives with drop probability `threshold`.
__device__ __forceinline__ bool dropout_keep(const DropoutState& s, unsigned site, u64 idx, float threshold) {
    const uint4 w = philox4x32_10(make_uint4((unsigned)(idx >> 2), site, s.step, s.stream),
                                  make_uint2(s.seed_lo, s.seed_hi));
    const unsigned lane = (unsigned)(idx & 3);
    const unsigned word = lane == 0 ? w.x : lane == 1 ? w.y : lane == 2 ? w.z : w.w;
    const float u = (float)(word >> 8) * (1.0f / 16777216.0f);
    return u >= threshold;
}

// bf16 for host-compiled kernels (virtual device): storage of the upper 16 bits of an fp32,
// converted with round-to-nearest-even as __float2bfloat16_rn does on the GPU (NaN stays NaN).
#pragma once
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    unsigned short x;
};

static inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = (uint32_t)h.x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    __nv_bfloat16 h;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        h.x = (unsigned short)((bits >> 16) | 0x40);  // a quiet NaN
        return h;
    }
    const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    h.x = (unsigned short)((bits + rounding) >> 16);
    return h;
}

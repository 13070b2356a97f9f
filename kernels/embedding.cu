// Embedding gather (forward) and scatter-add (backward).
// CPU twins: cpu::bert::embedding_forward, cpu::bert::embedding_backward.
//
// out/d are [T, n, h] packed token rows; params/grads are [T, P] with the word, position and
// token-type tables at offsets inside one trial's P; ids, types and positions (each row's position
// inside its sequence) are [T, n] (tok_stride 0 = one batch for every trial). The launcher checks
// every id, type and position against its table before launching.
// Launch: grid (ceil(n*h / 256), T), block 256, one thread per output element.
#include "common.cuh"

template <typename Out>
__device__ void embedding_forward(Out* out, const float* params, const unsigned* ids, const unsigned* types,
                                  const unsigned* positions, int n, int h, u64 word_off, u64 pos_off,
                                  u64 type_off, u64 out_stride, u64 param_stride, u64 tok_stride) {
    const u64 t = blockIdx.y, i = global_index();
    if (i >= (u64)n * h) return;
    const u64 row = i / h, j = i % h;
    const float* p = params + t * param_stride;
    const u64 tok = t * tok_stride + row;
    // Same summation order as the CPU: word + position + token type.
    const float v = p[word_off + (u64)ids[tok] * h + j] + p[pos_off + (u64)positions[tok] * h + j] +
                    p[type_off + (u64)types[tok] * h + j];
    out[t * out_stride + i] = from_f32<Out>(v);
}

// grads += scatter of d; the padding token's word row gets nothing (pad_token_id 0xffffffff = none).
template <typename In>
__device__ void embedding_backward(float* grads, const In* d, const unsigned* ids, const unsigned* types,
                                   const unsigned* positions, int n, int h, unsigned pad_token_id,
                                   u64 word_off, u64 pos_off, u64 type_off, u64 d_stride, u64 grad_stride,
                                   u64 tok_stride) {
    const u64 t = blockIdx.y, i = global_index();
    if (i >= (u64)n * h) return;
    const u64 row = i / h, j = i % h;
    float* g = grads + t * grad_stride;
    const u64 tok = t * tok_stride + row;
    const float v = to_f32(d[t * d_stride + i]);
    const unsigned id = ids[tok];
    if (id != pad_token_id) atomicAdd(&g[word_off + (u64)id * h + j], v);
    atomicAdd(&g[pos_off + (u64)positions[tok] * h + j], v);
    atomicAdd(&g[type_off + (u64)types[tok] * h + j], v);
}

#define EMBEDDING(SUFFIX, T)                                                                              \
    extern "C" __global__ void embedding_forward_##SUFFIX(                                                \
        T* out, const float* params, const unsigned* ids, const unsigned* types, const unsigned* positions, \
        int n, int h, u64 word_off, u64 pos_off, u64 type_off, u64 out_stride, u64 param_stride,           \
        u64 tok_stride) {                                                                                 \
        embedding_forward<T>(out, params, ids, types, positions, n, h, word_off, pos_off, type_off,       \
                             out_stride, param_stride, tok_stride);                                       \
    }                                                                                                     \
    extern "C" __global__ void embedding_backward_##SUFFIX(                                               \
        float* grads, const T* d, const unsigned* ids, const unsigned* types, const unsigned* positions,   \
        int n, int h, unsigned pad_token_id, u64 word_off, u64 pos_off, u64 type_off, u64 d_stride,       \
        u64 grad_stride, u64 tok_stride) {                                                                \
        embedding_backward<T>(grads, d, ids, types, positions, n, h, pad_token_id, word_off, pos_off,     \
                              type_off, d_stride, grad_stride, tok_stride);                               \
    }

EMBEDDING(f32, float)
EMBEDDING(bf16, bf16)

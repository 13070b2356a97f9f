// Softmax cross-entropy per sequence and its gradient in one pass over the logits.
// CPU twins: cpu::bert::cross_entropy (losses) and the `dlogits` block at the top of
// cpu::bert::backward ((softmax − onehot) · loss_scale).
//
// logits, dlogits are [T, b, c] fp32 (logit_stride); labels [T, b] (label_stride, 0 = shared; the
// launcher checks each < c); losses [T, b] (loss_stride); loss_scale [T] (the trial's 1/batch).
// losses or dlogits may be null (evaluation needs no gradient).
// Launch: grid (ceil(b / 128), T), block 128, one thread per row (c is a handful of labels).
#include "common.cuh"

extern "C" __global__ void softmax_cross_entropy_f32(float* losses, float* dlogits, const float* logits,
                                                     const unsigned* labels, const float* loss_scale, int b,
                                                     int c, u64 logit_stride, u64 label_stride,
                                                     u64 loss_stride) {
    const u64 t = blockIdx.y, row = global_index();
    if (row >= (u64)b) return;
    const float* x = logits + t * logit_stride + row * c;
    const unsigned y = labels[t * label_stride + row];
    float mx = -INFINITY;
    for (int j = 0; j < c; ++j) mx = fmaxf(mx, x[j]);
    float sum = 0.f;
    for (int j = 0; j < c; ++j) sum += expf(x[j] - mx);
    if (losses) losses[t * loss_stride + row] = (logf(sum) + mx) - x[y];
    if (dlogits) {
        const float s = loss_scale[t];
        float* d = dlogits + t * logit_stride + row * c;
        for (int j = 0; j < c; ++j) d[j] = expf(x[j] - mx) / sum * s;
        d[y] -= s;
    }
}

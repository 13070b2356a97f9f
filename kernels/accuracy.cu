// Argmax per row (first maximum wins, as the CPU's strict `>` scan) and the count of rows whose
// argmax equals the label, per trial.
// CPU twin: train::argmax and the `correct` count in train.rs's evaluation.
//
// logits [T, b, c] fp32 (logit_stride); labels [T, b] (label_stride); preds [T, b] (pred_stride,
// may be null); correct [T] (the launcher zeroes it; atomics add 1 per hit).
// Launch: grid (ceil(b / 128), T), block 128, one thread per row.
#include "common.cuh"

extern "C" __global__ void argmax_accuracy_f32(unsigned* preds, unsigned* correct, const float* logits,
                                               const unsigned* labels, int b, int c, u64 logit_stride,
                                               u64 label_stride, u64 pred_stride) {
    const u64 t = blockIdx.y, row = global_index();
    if (row >= (u64)b) return;
    const float* x = logits + t * logit_stride + row * c;
    int best = 0;
    for (int j = 1; j < c; ++j)
        if (x[j] > x[best]) best = j;
    if (preds) preds[t * pred_stride + row] = (unsigned)best;
    if ((unsigned)best == labels[t * label_stride + row]) atomicAdd(&correct[t], 1u);
}

// Small row and element-wise ops the trial-array model needs between the big kernels: the
// [CLS]-row gather and its scatter-add (last layer), the pooler's tanh forward/backward, an
// in-place add (residual gradients), and zeroing the dummy sequences' loss-gradient rows.
// CPU twins: ops::host::HostOps (gather_cls, scatter_add_cls, tanh_forward,
// tanh_backward, add, the dummy-row masking in cross_entropy). Trial index: blockIdx.y.
#include "common.cuh"

// out[t, i, :] = x[t, rows[t*b + i], :]
extern "C" __global__ void gather_rows_f32(float* out, const float* x, const unsigned* rows, int b, int h,
                                           u64 x_stride, u64 out_stride) {
    const u64 t = blockIdx.y;
    const u64 idx = global_index();
    if (idx >= (u64)b * h) return;
    const u64 i = idx / h, j = idx % h;
    const u64 r = rows[t * b + i];
    out[t * out_stride + idx] = x[t * x_stride + r * h + j];
}

// dx[t, rows[t*b + i], :] += d[t, i, :]; the rows of one trial are distinct, so no two threads
// write the same element.
extern "C" __global__ void scatter_add_rows_f32(float* dx, const float* d, const unsigned* rows, int b, int h,
                                                u64 dx_stride, u64 d_stride) {
    const u64 t = blockIdx.y;
    const u64 idx = global_index();
    if (idx >= (u64)b * h) return;
    const u64 i = idx / h, j = idx % h;
    const u64 r = rows[t * b + i];
    dx[t * dx_stride + r * h + j] += d[t * d_stride + idx];
}

extern "C" __global__ void tanh_forward_f32(float* x, u64 n) {
    const u64 i = global_index();
    if (i < n) x[i] = tanhf(x[i]);
}

// d *= 1 - y^2 (y = tanh output)
extern "C" __global__ void tanh_backward_f32(float* d, const float* y, u64 n) {
    const u64 i = global_index();
    if (i < n) d[i] *= 1.0f - y[i] * y[i];
}

extern "C" __global__ void add_f32(float* y, const float* x, u64 n) {
    const u64 i = global_index();
    if (i < n) y[i] += x[i];
}

// Zeroes rows i >= valid[t] of x [T, b, w] (stride between trials).
extern "C" __global__ void zero_rows_from_f32(float* x, const unsigned* valid, int b, int w, u64 stride) {
    const u64 t = blockIdx.y;
    const u64 idx = global_index();
    if (idx >= (u64)b * w) return;
    if (idx / w >= valid[t]) x[t * stride + idx] = 0.0f;
}

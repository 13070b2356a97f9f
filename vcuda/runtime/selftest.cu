// Kernels that break CUDA's rules on purpose (and a few that keep them at the edges), compiled
// into the virtual device beside kernels/*.cu so its own tests (vcuda/tests/device.rs) can show
// that each broken rule is reported. They never appear in hpo-gpu's PTX.

// Correct: a block reduction with shuffles and a barrier; out[blockIdx.x] = Σ in over the block.
extern "C" __global__ void selftest_block_sum(float* out, const float* in, int n) {
    __shared__ float warp_sums[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? in[i] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) s += warp_sums[w];
        out[blockIdx.x] = s;
    }
}

// Correct: threads that return early leave the barrier.
extern "C" __global__ void selftest_early_exit_barrier(int* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = (int)threadIdx.x + 1;
}

// Correct: dynamic shared memory, reversed through it.
extern "C" __global__ void selftest_reverse(float* out, const float* in) {
    DYNAMIC_SHARED(float, s);
    s[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Broken: half the block waits at one barrier, half at another.
extern "C" __global__ void selftest_divergent_barrier(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Broken: lane 5 has exited when the others shuffle with a full mask.
extern "C" __global__ void selftest_shuffle_exited_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Broken: lane 0 waits at a barrier for lanes that wait at a shuffle for lane 0.
extern "C" __global__ void selftest_deadlock(float* out) {
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 0);
    }
}

// Broken when launched with more threads than out has elements: writes one past the end.
extern "C" __global__ void selftest_write_index(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f; }

// Broken: 52 KB of static shared memory (the limit is 48 KB).
extern "C" __global__ void selftest_big_shared(float* out) {
    __shared__ float big[13 * 1024];
    big[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

// Reads shared memory nobody wrote: gets NaN (shared memory is filled with NaN bytes per block).
extern "C" __global__ void selftest_uninitialised_shared(float* out) {
    __shared__ float never_written[32];
    out[threadIdx.x] = never_written[threadIdx.x];
}

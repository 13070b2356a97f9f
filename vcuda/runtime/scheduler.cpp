// Runs one kernel launch on the host: every CUDA thread is a fiber with its own stack; the blocks
// of the grid run one after another; within a block one fiber runs at a time, until it reaches a
// barrier or a warp shuffle, or exits (cooperative scheduling, so no data races exist
// here that the GPU would have: see kernels/README.md for what this cannot show).
//
// Checked, as launch errors naming the kernel, the block and the source line:
// - __syncthreads reached at two different lines by threads of one block (divergent barrier);
// - a shuffle whose mask leaves out the calling lane, names a lane that does not exist or has
//   exited, or reads from a lane outside its mask; lanes of one shuffle with different masks;
// - a deadlock (live threads, none able to go on);
// - an access to an address outside every allocation's usable range that faults (SIGSEGV on the
//   inaccessible page after each allocation or fiber stack), reported with the address.
// Exited threads leave a barrier, as on Volta and later. The lowest-numbered ready thread runs (the
// highest in odd blocks), so a missing barrier lets a warp read shared memory that later (or
// earlier) warps have not written yet, and shared memory starts as NaN bytes in every block.
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <vector>

#include "cuda_host.h"
#include "registry.h"

extern "C" {
vcuda_thread* vcuda_self = nullptr;
dim3 vcuda_block_idx, vcuda_block_dim, vcuda_grid_dim;
// The linker's bounds of the section holding every kernel's __shared__ statics.
extern char __start_vcuda_shared[] __attribute__((weak));
extern char __stop_vcuda_shared[] __attribute__((weak));
}

// ---- context switching (x86-64 System V): saves callee-saved registers, MXCSR and the x87
// control word on the old stack, stores the stack pointer, and resumes the other stack.
extern "C" void vcuda_switch(void** save_sp, void* load_sp);
extern "C" void vcuda_fiber_trampoline();
asm(R"(
    .text
    .globl vcuda_switch
    .hidden vcuda_switch
    .type vcuda_switch, @function
vcuda_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vcuda_switch, .-vcuda_switch

    .globl vcuda_fiber_trampoline
    .hidden vcuda_fiber_trampoline
    .type vcuda_fiber_trampoline, @function
vcuda_fiber_trampoline:
    call vcuda_fiber_main@PLT
    ud2
    .size vcuda_fiber_trampoline, .-vcuda_fiber_trampoline
)");

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr unsigned MAX_THREADS = 1024;

enum class State { Ready, AtBarrier, AtShuffle, Exited };

struct Fiber {
    vcuda_thread thread;  // first: vcuda_self points here
    void* sp = nullptr;
    char* stack = nullptr;  // usable part, above the guard page
    unsigned linear = 0;
    State state = State::Ready;
};

struct Warp {
    unsigned exists = 0;   // lanes that are threads of the block
    unsigned exited = 0;   // lanes that have returned
    unsigned arrived = 0;  // lanes waiting at the current shuffle
    unsigned mask = 0;     // the current shuffle's mask
    unsigned gen = 0;      // shuffles completed
    const char* file = nullptr;
    int line = 0;
    unsigned long long slot[2][32];
};

struct Launch {
    const vcuda_kernel_info* kernel = nullptr;
    void** params = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    unsigned alive = 0;
    unsigned at_barrier = 0;
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    std::vector<unsigned char> dynamic_shared;
    // Bit i set: thread i is Ready (so the next thread to run is found with one bit scan).
    uint64_t ready[MAX_THREADS / 64] = {};
    unsigned ready_words = 0;
    bool lowest_first = true;  // which ready thread runs next: the lowest-numbered, or the highest
    void* scheduler_sp = nullptr;
    bool failed = false;
    std::string error;
};

std::mutex launch_mutex;  // one launch at a time, process-wide (__shared__ statics are global)
Launch* current = nullptr;
pthread_t launch_thread;
volatile sig_atomic_t in_launch = 0;
sigjmp_buf fault_jump;
volatile unsigned long long fault_address = 0;
struct sigaction previous_segv, previous_bus;

// Fiber stacks, each above an inaccessible guard page; made once, reused by every launch. Like the
// launch state below, never destroyed: a process may exit (a worker stopped by Ctrl-C) while
// another thread is inside a launch, and exit's destructors must not free what that thread uses.
std::vector<char*>& stacks = *new std::vector<char*>;

char* stack_for(unsigned i) {
    while (stacks.size() <= i) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* m = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, page, PROT_NONE);
        stacks.push_back(static_cast<char*>(m) + page);
    }
    return stacks[i];
}

void set_state(Fiber& f, State s) {
    f.state = s;
    uint64_t& word = current->ready[f.linear / 64];
    const uint64_t bit = 1ull << (f.linear % 64);
    word = s == State::Ready ? (word | bit) : (word & ~bit);
}

std::string block_name() {
    char b[96];
    snprintf(b, sizeof b, "block (%u, %u, %u)", vcuda_block_idx.x, vcuda_block_idx.y, vcuda_block_idx.z);
    return b;
}

std::string thread_name(const Fiber& f) {
    char b[64];
    snprintf(b, sizeof b, "thread (%u, %u, %u)", f.thread.idx.x, f.thread.idx.y, f.thread.idx.z);
    return b;
}

void yield_to_scheduler() {
    Fiber* self = reinterpret_cast<Fiber*>(vcuda_self);
    vcuda_switch(&self->sp, current->scheduler_sp);
}

// The ready thread to run next, or -1.
int next_ready(const Launch& l) {
    if (l.lowest_first) {
        for (unsigned w = 0; w < l.ready_words; ++w)
            if (l.ready[w]) return (int)(w * 64 + __builtin_ctzll(l.ready[w]));
    } else {
        for (unsigned w = l.ready_words; w-- > 0;)
            if (l.ready[w]) return (int)(w * 64 + 63 - __builtin_clzll(l.ready[w]));
    }
    return -1;
}

// The running thread waits or has exited: run the next ready thread directly (one switch, not
// two through the scheduler), or go back to the scheduler when none is ready.
void switch_away() {
    Fiber* self = reinterpret_cast<Fiber*>(vcuda_self);
    const int next = next_ready(*current);
    if (next < 0) {
        vcuda_switch(&self->sp, current->scheduler_sp);
        return;
    }
    Fiber& f = current->fibers[next];
    vcuda_self = &f.thread;
    vcuda_switch(&self->sp, f.sp);
}

// Ends the launch with `message`; the calling fiber never runs again.
[[noreturn]] void fail(const char* fmt, ...) {
    char b[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    current->failed = true;
    current->error = std::string(current->kernel->name) + ", " + block_name() + ": " + b;
    yield_to_scheduler();
    abort();  // unreachable: a failed launch never resumes its fibers
}

void release_barrier() {
    current->at_barrier = 0;
    for (Fiber& f : current->fibers)
        if (f.state == State::AtBarrier) set_state(f, State::Ready);
}

}  // namespace

extern "C" void vcuda_fiber_main() {
    current->kernel->invoke(current->params);
    Fiber* self = reinterpret_cast<Fiber*>(vcuda_self);
    set_state(*self, State::Exited);
    current->alive -= 1;
    Warp& w = current->warps[self->linear / 32];
    const unsigned bit = 1u << (self->linear % 32);
    w.exited |= bit;
    if (w.arrived != 0 && (w.mask & bit))
        fail("%s exited while lanes %#x wait at the shuffle at %s:%d whose mask %#x names it",
             thread_name(*self).c_str(), w.arrived, w.file, w.line, w.mask);
    // Exited threads leave a barrier: the others may now all be there.
    if (current->at_barrier > 0 && current->at_barrier == current->alive) release_barrier();
    switch_away();
    abort();  // unreachable: an exited fiber is never resumed
}

extern "C" void vcuda_syncthreads(const char* file, int line) {
    Launch& l = *current;
    Fiber* self = reinterpret_cast<Fiber*>(vcuda_self);
    if (l.at_barrier == 0) {
        l.barrier_file = file;
        l.barrier_line = line;
    } else if (l.barrier_line != line || strcmp(l.barrier_file, file) != 0) {
        fail("%s reached __syncthreads at %s:%d while %u threads of the block wait at %s:%d (a divergent barrier)",
             thread_name(*self).c_str(), file, line, l.at_barrier, l.barrier_file, l.barrier_line);
    }
    l.at_barrier += 1;
    if (l.at_barrier == l.alive) {
        release_barrier();
        return;
    }
    set_state(*self, State::AtBarrier);
    switch_away();
}

extern "C" unsigned long long vcuda_shuffle(unsigned mask, unsigned long long bits, int kind, int arg, int width,
                                            const char* file, int line) {
    Launch& l = *current;
    Fiber* self = reinterpret_cast<Fiber*>(vcuda_self);
    const unsigned lane = self->linear % 32;
    Warp& w = l.warps[self->linear / 32];
    if (!(mask >> lane & 1u))
        fail("%s (lane %u) calls the shuffle at %s:%d with mask %#x, which leaves it out", thread_name(*self).c_str(),
             lane, file, line, mask);
    if (mask & ~w.exists)
        fail("the shuffle at %s:%d names lanes %#x of warp %u, which are not threads of a %u-thread block", file,
             line, mask & ~w.exists, self->linear / 32, vcuda_block_dim.x * vcuda_block_dim.y * vcuda_block_dim.z);
    if (mask & w.exited)
        fail("the shuffle at %s:%d (mask %#x) names lanes %#x of warp %u, which have exited", file, line, mask,
             mask & w.exited, self->linear / 32);
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail("the shuffle at %s:%d has width %d (a power of two up to 32)", file, line, width);
    if (w.arrived == 0) {
        w.mask = mask;
        w.file = file;
        w.line = line;
    } else if (w.mask != mask) {
        fail("lanes of warp %u shuffle with different masks: %#x at %s:%d and %#x at %s:%d", self->linear / 32,
             w.mask, w.file, w.line, mask, file, line);
    }
    const unsigned gen = w.gen;
    w.slot[gen & 1][lane] = bits;
    w.arrived |= 1u << lane;
    if (w.arrived == mask) {
        w.gen += 1;
        w.arrived = 0;
        for (unsigned i = 0; i < 32; ++i)
            if (mask >> i & 1u) {
                Fiber& f = l.fibers[(self->linear / 32) * 32 + i];
                if (f.state == State::AtShuffle) set_state(f, State::Ready);
            }
    } else {
        set_state(*self, State::AtShuffle);
        switch_away();
    }
    const unsigned seg = lane & ~(unsigned)(width - 1);
    unsigned src = lane;
    switch (kind) {
        case 0: src = seg + ((unsigned)arg & (unsigned)(width - 1)); break;
        case 1: {
            const unsigned s = lane ^ (unsigned)arg;
            if (s < seg + (unsigned)width && s >= seg) src = s;
            break;
        }
        case 2:
            if ((lane - seg) + (unsigned)arg < (unsigned)width) src = lane + (unsigned)arg;
            break;
        case 3:
            if ((lane - seg) >= (unsigned)arg) src = lane - (unsigned)arg;
            break;
    }
    if (!(mask >> src & 1u))
        fail("%s (lane %u) reads lane %u in the shuffle at %s:%d, outside its mask %#x", thread_name(*self).c_str(),
             lane, src, file, line, mask);
    return w.slot[gen & 1][src];
}

extern "C" void* vcuda_dynamic_shared(void) {
    if (current->dynamic_shared.empty())
        fail("the kernel uses dynamic shared memory but the launch gave it 0 bytes");
    return current->dynamic_shared.data();
}

namespace {

void on_fault(int sig, siginfo_t* info, void* ctx) {
    if (in_launch && pthread_equal(pthread_self(), launch_thread)) {
        fault_address = (unsigned long long)(uintptr_t)info->si_addr;
        siglongjmp(fault_jump, 1);
    }
    // Not ours: hand it to whoever had it before (Rust's stack-overflow handler, or the default).
    struct sigaction& prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, info, ctx);
    } else if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);  // returning re-runs the access, which now kills the process
    } else {
        prev.sa_handler(sig);
    }
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
    // The handler runs on an alternate stack: a fiber's stack may be the thing that overflowed.
    static thread_local bool has_altstack = false;
    if (!has_altstack) {
        stack_t ss;
        if (sigaltstack(nullptr, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {
            ss.ss_sp = malloc(1 << 16);
            ss.ss_size = 1 << 16;
            ss.ss_flags = 0;
            sigaltstack(&ss, nullptr);
        }
        has_altstack = true;
    }
}

void start_fiber(Fiber& f) {
    // Initial frame as vcuda_switch leaves it: [mxcsr, fpu cw][r15 r14 r13 r12 rbx rbp][return].
    char* top = f.stack + STACK_BYTES;
    void** sp = reinterpret_cast<void**>(top - 80);
    const unsigned csr[2] = {0x1F80u, 0x037Fu};
    memcpy(sp, csr, 8);
    for (int i = 1; i <= 6; ++i) sp[i] = nullptr;
    sp[7] = reinterpret_cast<void*>(&vcuda_fiber_trampoline);
    f.sp = sp;
    set_state(f, State::Ready);
}

// Runs one block; false when the launch failed (message in current->error).
bool run_block(Launch& l) {
    const unsigned nthreads = vcuda_block_dim.x * vcuda_block_dim.y * vcuda_block_dim.z;
    l.alive = nthreads;
    l.at_barrier = 0;
    for (unsigned w = 0; w < l.warps.size(); ++w) {
        Warp& warp = l.warps[w];
        const unsigned lanes = nthreads - w * 32 >= 32 ? 32 : nthreads - w * 32;
        warp.exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        warp.exited = warp.arrived = warp.mask = 0;
    }
    memset(l.ready, 0, sizeof l.ready);
    for (unsigned i = 0; i < nthreads; ++i) start_fiber(l.fibers[i]);
    if (!l.dynamic_shared.empty()) memset(l.dynamic_shared.data(), 0xff, l.dynamic_shared.size());
    if (__start_vcuda_shared && __stop_vcuda_shared)
        memset(__start_vcuda_shared, 0xff, (size_t)(__stop_vcuda_shared - __start_vcuda_shared));
    // The lowest-numbered ready thread runs (the highest in odd blocks): a warp goes as far as it
    // can before the next one starts, so a missing barrier lets a thread read what threads after
    // it (or, in odd blocks, before it) have not written yet — shared memory starts as NaN bytes.
    l.lowest_first = (vcuda_block_idx.x + vcuda_block_idx.y + vcuda_block_idx.z) % 2 == 0;
    l.ready_words = (nthreads + 63) / 64;
    while (l.alive > 0) {
        // Threads hand over to each other directly (switch_away); the scheduler runs again when
        // none is ready: the block has ended, failed or deadlocked.
        const int next = next_ready(l);
        const bool progressed = next >= 0;
        if (progressed) {
            Fiber& f = l.fibers[next];
            vcuda_self = &f.thread;
            vcuda_switch(&l.scheduler_sp, f.sp);
            if (l.failed) return false;
        }
        if (!progressed) {
            unsigned at_shuffle = 0;
            std::string where;
            for (unsigned i = 0; i < nthreads; ++i)
                if (l.fibers[i].state == State::AtShuffle) {
                    ++at_shuffle;
                    if (where.empty()) {
                        const Warp& w = l.warps[i / 32];
                        char b[256];
                        snprintf(b, sizeof b, "; warp %u waits at the shuffle at %s:%d (mask %#x, arrived %#x)", i / 32,
                                 w.file, w.line, w.mask, w.arrived);
                        where = b;
                    }
                }
            char b[512];
            snprintf(b, sizeof b, "deadlock: %u live threads, %u at __syncthreads%s%s:%d, %u at a shuffle%s", l.alive,
                     l.at_barrier, l.at_barrier ? " at " : "", l.at_barrier ? l.barrier_file : "",
                     l.at_barrier ? l.barrier_line : 0, at_shuffle, where.c_str());
            l.failed = true;
            l.error = std::string(l.kernel->name) + ", " + block_name() + ": " + b;
            return false;
        }
    }
    return true;
}

}  // namespace

extern "C" {

struct vcuda_launch {
    const vcuda_kernel_info* kernel;
    dim3 grid, block;
    unsigned dynamic_shared_bytes;
    void** params;
};

// Runs a launch to the end. 0: it ran; 1: it broke a rule (message in err); 2: it touched a
// faulting address (in *fault; the caller names the allocation).
int vcuda_run(const vcuda_launch* launch, char* err, size_t err_len, unsigned long long* fault) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    install_fault_handler();
    const unsigned nthreads = launch->block.x * launch->block.y * launch->block.z;
    if (nthreads == 0 || nthreads > MAX_THREADS) {
        snprintf(err, err_len, "%s: %u threads per block", launch->kernel->name, nthreads);
        return 1;
    }
    // Reused, so its vectors keep their capacity between launches; never destroyed (see stacks).
    static Launch& l = *new Launch;
    l.kernel = launch->kernel;
    l.params = launch->params;
    l.failed = false;
    l.error.clear();
    if (l.fibers.size() < nthreads) l.fibers.resize(nthreads);
    l.warps.resize((nthreads + 31) / 32);
    l.dynamic_shared.assign(launch->dynamic_shared_bytes, 0xff);
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = l.fibers[i];
        f.stack = stack_for(i);
        if (!f.stack) {
            snprintf(err, err_len, "%s: cannot map fiber stacks", launch->kernel->name);
            return 1;
        }
        f.linear = i;
        f.thread.idx = dim3{i % launch->block.x, (i / launch->block.x) % launch->block.y,
                            i / (launch->block.x * launch->block.y)};
    }
    current = &l;
    vcuda_block_dim = launch->block;
    vcuda_grid_dim = launch->grid;
    launch_thread = pthread_self();
    volatile int result = 0;
    if (sigsetjmp(fault_jump, 1) != 0) {
        in_launch = 0;
        *fault = fault_address;
        snprintf(err, err_len, "%s, %s", launch->kernel->name, block_name().c_str());
        result = 2;
    } else {
        in_launch = 1;
        for (unsigned z = 0; z < launch->grid.z && result == 0; ++z)
            for (unsigned y = 0; y < launch->grid.y && result == 0; ++y)
                for (unsigned x = 0; x < launch->grid.x && result == 0; ++x) {
                    vcuda_block_idx = dim3{x, y, z};
                    if (!run_block(l)) {
                        snprintf(err, err_len, "%s", l.error.c_str());
                        result = 1;
                    }
                }
        in_launch = 0;
    }
    current = nullptr;
    vcuda_self = nullptr;
    return result;
}

}  // extern "C"

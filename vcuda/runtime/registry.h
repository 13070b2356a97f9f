// How a host-compiled kernel is described to the virtual driver: its name, its file, and its
// parameters as its C++ signature declares them (count, size, alignment, pointer or not). The
// driver checks these against the PTX `.entry` at module load and unpacks cuLaunchKernel's
// parameter pointers with them.
#pragma once
#include <stddef.h>

#include <type_traits>
#include <utility>

extern "C" {
typedef void (*vcuda_invoke_fn)(void** params);

struct vcuda_kernel_info {
    const char* name;
    const char* file;
    unsigned param_count;
    const unsigned* param_sizes;
    const unsigned* param_aligns;
    const unsigned char* param_is_pointer;
    vcuda_invoke_fn invoke;
};
}

namespace vcuda {

template <auto Kernel, typename... A, size_t... I>
void invoke_with(void** params, std::index_sequence<I...>) {
    Kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <auto Kernel, typename Sig>
struct KernelOf;

template <auto Kernel, typename... A>
struct KernelOf<Kernel, void (*)(A...)> {
    static constexpr unsigned count = sizeof...(A);
    // One extra element so a kernel without parameters still has arrays.
    static constexpr unsigned sizes[] = {(unsigned)sizeof(A)..., 0u};
    static constexpr unsigned aligns[] = {(unsigned)alignof(A)..., 0u};
    static constexpr unsigned char is_pointer[] = {(unsigned char)std::is_pointer<A>::value..., 0};
    static void invoke(void** params) { invoke_with<Kernel, A...>(params, std::index_sequence_for<A...>{}); }
};

}  // namespace vcuda

#define VCUDA_KERNEL(FILE, NAME)                                                                     \
    vcuda_kernel_info {                                                                              \
        #NAME, FILE, vcuda::KernelOf<&NAME, decltype(&NAME)>::count,                                 \
            vcuda::KernelOf<&NAME, decltype(&NAME)>::sizes, vcuda::KernelOf<&NAME, decltype(&NAME)>::aligns, \
            vcuda::KernelOf<&NAME, decltype(&NAME)>::is_pointer, &vcuda::KernelOf<&NAME, decltype(&NAME)>::invoke \
    }

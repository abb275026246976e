// Registration of the emulated kernels with the fake driver (driver.cpp): every `extern "C"`
// kernel of a kernels/*.cu file, rewritten by ../kernel_emu/gen.py, is registered under its name
// with a binder that turns cuLaunchKernel's `void** kernelParams` (one pointer to each argument's
// value, as the driver API defines it) into a call of the C++ function. The argument types come
// from the function's own signature, so each value is copied with the size the kernel declares —
// the same reading the GPU does of the bytes the Rust launcher passed.
#pragma once
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

using EmuCall = std::function<void()>;
using EmuBinder = std::function<EmuCall(void**)>;
void emu_register_kernel(const char* name, EmuBinder binder);
void emu_check_kernel_ptr(const void* p, size_t arg);  // aborts unless in a live device allocation

template <class T>
static inline void emu_check_arg(void* slot, size_t i) {
    if constexpr (std::is_pointer_v<T>) emu_check_kernel_ptr(*reinterpret_cast<const void* const*>(slot), i);
}

template <class... A>
struct EmuBind {
    template <size_t... I>
    static EmuCall bind(void (*f)(A...), void** p, std::index_sequence<I...>) {
        // The values are copied now: cuLaunchKernel's parameter array lives only for the call,
        // and a launch recorded in a stream capture replays later.
        (emu_check_arg<std::decay_t<A>>(p[I], I), ...);
        auto args = std::make_tuple(*reinterpret_cast<std::decay_t<A>*>(p[I])...);
        return [f, args]() { std::apply(f, args); };
    }
};
template <class... A>
static inline void emu_reg(const char* name, void (*f)(A...)) {
    emu_register_kernel(name, [f](void** p) { return EmuBind<A...>::bind(f, p, std::index_sequence_for<A...>{}); });
}
#define EMU_REGISTER(name) static const int emu_reg_##name = (emu_reg(#name, &name), 0);

//! CPU autocast, called in libtorch directly.
//!
//! tch 0.26 wraps only the CUDA autocast (`at::autocast::set_enabled`). The CPU one
//! is `at::autocast::set_autocast_enabled(at::kCPU, …)` and friends, exported by
//! `libtorch_cpu.so` (which tch already links) as plain C++ functions. They take
//! and return `c10::DeviceType` and `c10::ScalarType`, both `enum class … : int8_t`,
//! and `bool`: on the Itanium C++ ABI (Linux and macOS, x86-64 and aarch64) such a
//! function is called exactly like a C function over `i8` and `bool`, so it is
//! declared here by its mangled name. A libtorch without these symbols fails at
//! link time, not at run time; the tests check that the calls take effect.

#![allow(unsafe_code)]

use std::marker::PhantomData;

/// `c10::DeviceType::CPU`.
const CPU: i8 = 0;
/// `c10::ScalarType::BFloat16`.
const BFLOAT16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn get_autocast_dtype(device: i8) -> i8;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device: i8, dtype: i8);
}

/// Whether CPU autocast is on for the current thread.
pub fn cpu_autocast_enabled() -> bool {
    // SAFETY: reads a thread-local flag; takes a plain enum value and returns a bool.
    unsafe { is_autocast_enabled(CPU) }
}

/// CPU autocast to bfloat16 on the current thread while the guard lives, as
/// `with torch.autocast("cpu", dtype=torch.bfloat16):` in Python: convolutions,
/// linear layers and matrix products run in bf16 (their outputs are bf16 tensors;
/// an op that names its output type, such as `log_softmax(…, Float)`, still
/// gives that type). The previous state is restored on drop. Autocast is
/// thread-local, so the guard is neither `Send` nor `Sync`.
#[must_use = "autocast is switched off again when the guard is dropped"]
#[derive(Debug)]
pub struct CpuAutocast {
    was_enabled: bool,
    previous_dtype: i8,
    _thread_bound: PhantomData<*const ()>,
}

impl CpuAutocast {
    /// Turns bfloat16 CPU autocast on for the current thread.
    pub fn bf16() -> Self {
        // SAFETY: these only read and write libtorch's thread-local autocast state,
        // with valid `DeviceType` / `ScalarType` values.
        unsafe {
            let guard = Self {
                was_enabled: is_autocast_enabled(CPU),
                previous_dtype: get_autocast_dtype(CPU),
                _thread_bound: PhantomData,
            };
            set_autocast_dtype(CPU, BFLOAT16);
            set_autocast_enabled(CPU, true);
            guard
        }
    }
}

impl Drop for CpuAutocast {
    fn drop(&mut self) {
        // SAFETY: as in `bf16`; the dtype is one libtorch itself returned.
        unsafe {
            set_autocast_enabled(CPU, self.was_enabled);
            set_autocast_dtype(CPU, self.previous_dtype);
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn the_guard_runs_matrix_products_in_bf16_and_restores_float() {
        let a = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([8, 2], (Kind::Float, Device::Cpu));
        assert!(!cpu_autocast_enabled());
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        {
            let _outer = CpuAutocast::bf16();
            assert!(cpu_autocast_enabled());
            let product = a.matmul(&b);
            assert_eq!(product.kind(), Kind::BFloat16);
            assert_eq!(product.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]), 64.0);
            {
                let _inner = CpuAutocast::bf16();
            }
            assert!(cpu_autocast_enabled(), "an inner guard restores the outer state");
        }
        assert!(!cpu_autocast_enabled());
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
    }

    #[test]
    fn autocast_is_per_thread() {
        let _guard = CpuAutocast::bf16();
        let other = std::thread::spawn(cpu_autocast_enabled).join().unwrap();
        assert!(cpu_autocast_enabled());
        assert!(!other);
    }
}

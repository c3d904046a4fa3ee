//! What mnistflow needs from libtorch beyond what tch 0.26 exposes.
//!
//! - [`Precision`]: the number format a stage computes in (`f32`, `bf16`, or
//!   `auto`: bf16 where the CPU does it natively), parsed the same way for
//!   `TRAINER_PRECISION` and `INFERENCE_PRECISION`.
//! - [`CpuAutocast`]: PyTorch's CPU autocast (`torch.autocast("cpu")`) for the
//!   current thread. tch only wraps the CUDA one. It runs a TorchScript model's
//!   convolutions and matrix products in bfloat16 even though a traced model's
//!   weights are constants that `CModule::to` cannot convert.

mod autocast;

use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use autocast::{CpuAutocast, cpu_autocast_enabled};

/// The number format of a stage's convolutions and matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float throughout.
    F32,
    /// bfloat16 mixed precision (as PyTorch's autocast): convolutions and linear
    /// layers in bf16 on float weights, everything else in float. Uses AMX /
    /// AVX-512 BF16 where the CPU has them.
    Bf16,
    /// `bf16` on a CPU with native bfloat16 arithmetic (AMX or AVX-512 BF16); `f32`
    /// anywhere else, where emulated bf16 would be slower.
    Auto,
}

impl Precision {
    /// The precision to compute in on `device`: `Auto` resolved, the rest as they are.
    pub fn resolve(self, device: tch::Device) -> Self {
        match self {
            Self::Auto if device == tch::Device::Cpu && cpu_has_native_bf16() => Self::Bf16,
            Self::Auto => Self::F32,
            other => other,
        }
    }

    /// Its name in configuration and logs: `f32`, `bf16` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float" | "fp32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown precision {other:?} (use f32, bf16 or auto)")),
        }
    }
}

/// Whether the CPU does bfloat16 arithmetic natively (Linux: `/proc/cpuinfo` flags).
pub fn cpu_has_native_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| info.lines().find(|l| l.starts_with("flags")).map(str::to_owned))
            .is_some_and(|flags| flags.split_whitespace().any(|f| f == "amx_bf16" || f == "avx512_bf16"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_parse_and_print() {
        for (text, precision) in [("f32", Precision::F32), (" BF16 ", Precision::Bf16), ("auto", Precision::Auto)] {
            let parsed: Precision = text.parse().unwrap();
            assert_eq!(parsed, precision);
            assert_eq!(parsed.to_string().parse::<Precision>().unwrap(), precision);
        }
        assert!("f8".parse::<Precision>().unwrap_err().contains("use f32, bf16 or auto"));
    }

    #[test]
    fn auto_resolves_to_what_the_cpu_does_natively() {
        let expected = if cpu_has_native_bf16() { Precision::Bf16 } else { Precision::F32 };
        assert_eq!(Precision::Auto.resolve(tch::Device::Cpu), expected);
        assert_eq!(Precision::F32.resolve(tch::Device::Cpu), Precision::F32);
        assert_eq!(Precision::Bf16.resolve(tch::Device::Cpu), Precision::Bf16);
    }
}

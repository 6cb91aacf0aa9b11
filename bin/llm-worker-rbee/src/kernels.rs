//! The worker's CPU kernels: the only module where `unsafe` is allowed.
//!
//! Everything here has a scalar reference, SIMD bodies for AVX2 (+FMA,
//! F16C) and AVX-512 (F, BW, VNNI) chosen once at run time by CPU feature
//! detection, and tests that check every body against the reference over
//! random data and awkward shapes. The SIMD bodies perform the same IEEE
//! operations in the same order as the references (integer dot products
//! are exact; float accumulation follows one fixed order), so they agree
//! bit for bit, and results never depend on how many rows are computed
//! together or on which thread.
//!
//! - [`packed`]: weight matrices repacked at load (GGUF Q4_0, Q4_1, Q8_0,
//!   Q4_K, Q6_K, and dense f32/f16/bf16);
//! - [`acts`]: activations quantized to 8 bits, 32 at a time;
//! - [`matmul`]: quantized and dense matrix products, one row or many;
//! - [`math`]: exp, softmax, RMS norm, SiLU and attention over an f16 KV cache;
//! - [`pool`]: the compute threads and the tiles they write through.
//!
//! `RBEE_KERNELS=scalar|avx2|avx512` lowers the instruction set used (never
//! above what the CPU has), for comparisons and tests.

pub mod acts;
pub mod math;
pub mod matmul;
pub mod packed;
pub mod pool;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

/// An instruction set the kernels have bodies for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F, BW and VNNI.
    Avx512,
}

impl Isa {
    /// The name used by `RBEE_KERNELS` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the set (detected once).
    pub fn supported(self) -> bool {
        static SUPPORTED: OnceLock<[bool; 3]> = OnceLock::new();
        let sets =
            SUPPORTED.get_or_init(|| [Self::Scalar, Self::Avx2, Self::Avx512].map(Self::detect));
        sets[self as usize]
    }

    fn detect(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2.detect()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512 => false,
        }
    }

    /// Every set this CPU can run, lowest first (the tests run them all).
    pub fn available() -> Vec<Self> {
        [Self::Scalar, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }
}

/// The instruction set the kernels use: the best this CPU has, or lower if
/// `RBEE_KERNELS` asks for it.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::available().pop().unwrap_or(Isa::Scalar);
        let asked = std::env::var("RBEE_KERNELS").ok();
        match asked.as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") => best.min(Isa::Avx2),
            Some("avx512") => best.min(Isa::Avx512),
            _ => best,
        }
    })
}

//! AVX2 and AVX-512 bodies of the kernels, x86-64 only.
//!
//! Each public function checks that the CPU has the instruction set and
//! that every slice holds what the body will read or write, then calls a
//! `#[target_feature]` body. The bodies mirror the scalar references
//! operation for operation (see the parent module).

mod acts;
mod attention;
mod math;
mod matmul;

pub(super) use self::acts::quantize_row;
pub(super) use self::attention::attention;
pub(super) use self::math::{silu_mul, sum_squares};
pub(super) use self::matmul::matmul_group;

use super::Isa;

/// Refuse an instruction set this CPU lacks: every body's soundness
/// starts here.
fn check(isa: Isa) {
    assert!(
        isa != Isa::Scalar && isa.supported(),
        "{isa:?} is not supported here"
    );
}
